"""Figures and axes that the plots share (plots.py): panels two to a row, log axes labelled in
plain numbers, a legend moved beside the axes where it would cover them."""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib import ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def panels_figure(panels: int = 1, *, height: float = 4.0,
                  sharey: bool = False) -> tuple[Figure, list[Any]]:
    """A figure of `panels` axes, at most two to a row: four in a row made a figure 2,200 pixels
    wide, which a report page shrank until its text was 5 pixels high."""
    columns = min(panels, 2)
    rows = -(-panels // columns)
    figure = Figure(figsize=(5.5 * columns, height * rows), layout="constrained")
    FigureCanvasAgg(figure)
    axes = list(figure.subplots(rows, columns, squeeze=False, sharey=sharey).flat)
    for unused in axes[panels:]:
        unused.set_visible(False)
    return figure, axes[:panels]


def log_percent_axis(ax: Any) -> None:
    """A log y-axis of percentages labelled in plain numbers at 1, 2 and 5 of each decade; an
    error of exactly 0 (a training error at the end) is left out rather than drawn at -inf."""
    ax.set_yscale("log", nonpositive="mask")
    def plain(value: float, _position: Any) -> str:
        leading = round(value / 10 ** np.floor(np.log10(value))) if value > 0 else 0
        return f"{value:g}" if leading in (1, 2, 5) else ""
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(plain))
    ax.yaxis.set_minor_formatter(ticker.FuncFormatter(plain))


def legend_beside_if_long(ax: Any) -> None:
    """The legend inside the axes, or beside them where it has more entries than fit without
    covering the points."""
    if len(ax.get_legend_handles_labels()[1]) > 4:
        ax.figure.set_figwidth(ax.figure.get_figwidth() + 2.5)  # the axes keep their width
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
    else:
        ax.legend(fontsize="small")


def labelled_within_a_decade(ax: Any) -> None:
    """A log axis that spans less than a decade gets plain ticks (0.9, 1, 1.2, ...): its
    decade ticks would label one or two points, and in powers of ten."""
    low, high = ax.get_ylim()
    if low > 0 and high / low < 10:
        ax.yaxis.set_major_locator(MaxNLocator(nbins=6))
        ax.yaxis.set_major_formatter(ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())


__all__ = ["labelled_within_a_decade", "legend_beside_if_long", "log_percent_axis",
           "panels_figure"]
