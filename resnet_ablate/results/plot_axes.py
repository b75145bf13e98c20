"""Figures and axes that the plots share (plots.py, plot_responses.py): the factors a study varies,
their levels named and ordered, each metric's unit; panels two to a row, log axes labelled in
plain numbers, a legend moved beside the axes where it would cover them, groups drawn at one x
set side by side, means without an interval drawn open, means over seeds that stand apart
ringed, means tagged above their bars."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from matplotlib import ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..record import METRICS
from ..stats.apart import NAME as APART_NAME
from .display import natural_order

if TYPE_CHECKING:
    from .study_results import Results


def level_label(column: str | None, value: Any) -> str:
    """A level as a figure's legend names it: "plain", "ResNet (A)", "20-layer", "width=64"."""
    if column == "shortcut":
        return "plain" if value == "none" else f"ResNet ({value})"
    if column == "depth":
        return f"{value}-layer"
    return f"{column}={value}" if column else str(value)


def varied_factors(results: Results) -> list[str]:
    """The factors that vary among the completed trials: depth first, then the swept ones."""
    done = results.completed()
    return [f for f in dict.fromkeys(("depth", *results.swept))
            if f in done and done[f].nunique(dropna=True) > 1]


def panel_order(value: Any) -> tuple:
    """A sort key for panels and lines: the plain nets (shortcut "none") first."""
    return ((0,) if value == "none" else (1,)) + natural_order(value)


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


def metric_unit(metric: str) -> tuple[float, str]:
    """The scale and label a figure's axis shows `metric` in, as the tables do
    (record/metrics.py): rates in %, FLOPs in G, parameters in M, seconds as they are."""
    known = METRICS.get(metric)
    if known is not None and known.high == 1.0:  # a rate: an error or an accuracy
        return 100.0, f"{metric.replace('_', ' ')} (%)"
    scale = {"flops": 1e-9, "params": 1e-6}.get(metric, 1.0)
    return scale, known.label if known is not None else metric


def at_the_floor(values: np.ndarray, floor: float) -> np.ndarray:
    """`values` for a log axis with zeros drawn at `floor` (an error of exactly 0: a training
    error at the end), not left out: a line through them would otherwise break, and a single
    point between two zeros vanish."""
    return np.where(values > 0, values, floor)


def log_percent_axis(ax: Any) -> None:
    """A log y-axis of percentages labelled in plain numbers at 1, 2 and 5 of each decade (an
    error of exactly 0 has no place on it: at_the_floor)."""
    ax.set_yscale("log", nonpositive="mask")
    def plain(value: float, _position: Any) -> str:
        leading = round(value / 10 ** np.floor(np.log10(value))) if value > 0 else 0
        return f"{value:g}" if leading in (1, 2, 5) else ""
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(plain))
    ax.yaxis.set_minor_formatter(ticker.FuncFormatter(plain))


def plain_number_x_axis(ax: Any, *, log: bool) -> None:
    """An x axis labelled in plain numbers (a digits net's 0.0025 GFLOPs, not "2.5" under a
    "1e-3"); where `log`, a log scale ticked at 1, 2 and 5 of each decade (minor ticks' labels
    in powers of ten overlap where the values span a decade or two)."""
    if log:
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    else:  # plain numbers are long (0.00125): eight of them ran together on a report's figure
        ax.xaxis.set_major_locator(ticker.MaxNLocator(nbins=5, steps=[1, 2, 2.5, 5, 10]))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))


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


ONE_SEED_LABEL = "open marker: one seed, no interval"


def mark_without_interval(ax: Any, x: Any, y: np.ndarray, below: np.ndarray, marker: str,
                           color: str) -> None:
    """Draw the means that have no interval (one seed: NaN bounds, so no bar) as open markers: a
    filled marker without a bar would read as an interval of zero width, a certainty."""
    missing = np.isnan(np.asarray(below, dtype=float))
    if not missing.any():
        return
    ax.scatter(np.asarray(x, dtype=float)[missing], np.asarray(y)[missing], marker=marker,
               s=60, facecolors="white", edgecolors=color, linewidths=1.5, zorder=3)
    if not any(c.get_label() == ONE_SEED_LABEL for c in ax.collections):
        ax.scatter([], [], marker="o", facecolors="white", edgecolors="gray", label=ONE_SEED_LABEL)


SEEDS_APART_LABEL = "ringed: seeds stand apart, the bar covers less"


def mark_seeds_apart(ax: Any, x: Any, y: np.ndarray, notes: Any, color: str) -> None:
    """Ring the means whose rows say that some of their seeds stand apart (the summary's note,
    apart.py): their bars assume seeds that vary alike and cover less than 95%."""
    apart = np.array([APART_NAME in str(note) for note in notes], dtype=bool)
    if not apart.any():
        return
    ax.scatter(np.asarray(x, dtype=float)[apart], np.asarray(y)[apart], marker="o", s=260,
               facecolors="none", edgecolors=color, linewidths=1.2, linestyle="--", zorder=3)
    if not any(c.get_label() == SEEDS_APART_LABEL for c in ax.collections):
        ax.scatter([], [], marker="o", s=100, facecolors="none", edgecolors="gray",
                   linestyle="--", label=SEEDS_APART_LABEL)


def interval_methods(table: Any) -> list[str]:
    """The methods of a table's intervals (its `methods`, less the outlier test's)."""
    return [m for m in table.attrs.get("methods") or [] if not m.startswith(APART_NAME)]


# Between neighbours set side by side: this share of the axis' span (of its decades, on a log
# axis), enough for a 95% interval's bar and cap to clear the next one's at a report's size.
SIDE_STEP = 0.012


def side_by_side(x: Any, position: int, count: int, low: float, high: float, *,
                 step: float = SIDE_STEP) -> np.ndarray:
    """`x` of the `position`-th of `count` groups drawn at the same x values, moved sideways so
    that no group's marker or bar hides another's: `step` of the axis' span from `low` to `high`
    per step, centred on the true x."""
    return np.asarray(x, dtype=float) + step * (high - low) * (position - (count - 1) / 2)


def _placements(groups: list[Any], low: float, high: float, *, log: bool = False,
                step: float = SIDE_STEP) -> dict[tuple[int, float], float]:
    """Where each group's x values are drawn ((group's position, value) -> x), where they differ
    from the values: every value, of any group, at least `step` of the axis' span (`low` to
    `high`; in decades on a log axis) from the next, in their true order (ties in the groups'
    order), each moved as little as that allows (least squares: pool-adjacent-violators on the
    values less their rank's steps). Moved by the groups' order alone, a cheaper point could be
    drawn right of a dearer one it was not even tied with (a plain net's 0.2% fewer FLOPs drawn
    2.6% above option B's)."""
    transform, back = (np.log, np.exp) if log else ((lambda v: v), (lambda v: v))
    near = step * ((np.log(high / low) if log else high - low) or 1.0)
    points = sorted((float(transform(value)), position, float(value))
                    for position, group in enumerate(groups)
                    for value in np.unique(np.asarray(group, dtype=float)))
    # x_i >= x_(i-1) + near, least moved: an isotonic fit of y_i = a_i - i near, then back.
    blocks: list[list[float]] = []  # [sum, count] of pooled y's
    for rank, (at, _, _) in enumerate(points):
        blocks.append([at - rank * near, 1.0])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    fitted = [total / count for total, count in blocks for _ in range(int(count))]
    return {(position, value): float(back(fit + rank * near))
            for rank, (fit, (at, position, value)) in enumerate(zip(fitted, points))
            if abs(fit + rank * near - at) > 1e-12 * max(1.0, abs(at))}


class SideBySide:
    """Groups drawn at their x values (`groups`: each one's), those within a step of another
    value set a step apart in their true order (`_placements`). Where all values lie within a
    tenth of their size of each other (one depth: option A and its plain twin, 0.2% apart), the
    axis spans their size around them (`widened`, `low`, `high`), so that it does not zoom in on
    that difference or on the moves; values of 0 span 1."""

    def __init__(self, groups: list[Any], *, log: bool = False, step: float = SIDE_STEP) -> None:
        every = np.concatenate([np.asarray(group, dtype=float) for group in groups])
        self.low, self.high = float(every.min()), float(every.max())
        size = max(abs(self.low), abs(self.high))
        self.widened = self.high - self.low <= 0.1 * size
        if self.widened:
            middle, width = (self.low + self.high) / 2, size or 1.0
            self.low, self.high = middle - width / 2, middle + width / 2
        self.log = log and not self.widened
        self.placed = _placements(groups, self.low, self.high, log=self.log, step=step)

    @property
    def moves(self) -> bool:
        """Whether any group is moved at all (a figure then says so)."""
        return bool(self.placed)

    def at(self, x: Any, position: int) -> np.ndarray:
        """Where the `position`-th group's values `x` are drawn."""
        return np.array([self.placed.get((position, float(v)), float(v))
                         for v in np.asarray(x, dtype=float).ravel()])


def bar_top(row: pd.Series, metric: str) -> float:
    """The upper end of a mean's bar, or the mean where it has none (one seed)."""
    high = float(row[f"{metric}_ci95_high"])
    return high if np.isfinite(high) else float(row[f"{metric}_mean"])


def tag_means(ax: Any, means: list[tuple[float, float, Any, str, str]]) -> None:
    """Each mean's (x, top of its bar, cost, tag, colour) tag just above its bar, in its colour:
    there it crosses neither the bars beside it nor the front's staircase, which runs through
    the means (set beside the mean, a tag ran over both: an audit). Means of one tag whose
    costs are within 5% (option A, its plain twin and option B's projections: one depth, set
    side by side) share one, in grey, above the highest of their bars (two would be drawn over
    each other). The axis grows to hold the tags; near its left or right end a tag is aligned
    there, so that none runs past it (or off the figure)."""
    shared: list[tuple[str, float, list[tuple[float, float, str]]]] = []
    for x, top, cost, tag, colour in sorted(means, key=lambda m: (m[3], float(m[2]))):
        if shared and shared[-1][0] == tag and float(cost) <= 1.05 * shared[-1][1]:
            shared[-1][2].append((x, top, colour))
        else:
            shared.append((tag, float(cost), [(x, top, colour)]))
    if not shared:
        return
    low, high = ax.get_ylim()
    highest = max(top for _, _, members in shared for _, top, _ in members)
    ax.set_ylim(low, max(high, highest + 0.1 * (high - low)))  # room above the highest bar
    to_axes = ax.transAxes.inverted()
    for tag, _, members in shared:
        ends = [ax.transData.transform((m[0], 0.0))[0] for m in members]
        x_display = (min(ends) + max(ends)) / 2
        where = to_axes.transform((x_display, 0.0))[0]
        align = "right" if where > 0.85 else "left" if where < 0.15 else "center"
        x_display = {"right": max(ends), "left": min(ends)}.get(align, x_display)
        x = ax.transData.inverted().transform((x_display, 0.0))[0]
        ax.annotate(tag, (x, max(m[1] for m in members)), xytext=(0, 3),
                    textcoords="offset points", fontsize="x-small", va="bottom", ha=align,
                    color=members[0][2] if len(members) == 1 else "0.35")


__all__ = ["ONE_SEED_LABEL", "SIDE_STEP", "SideBySide", "at_the_floor", "bar_top",
           "interval_methods", "labelled_within_a_decade", "legend_beside_if_long", "level_label",
           "log_percent_axis", "mark_seeds_apart", "mark_without_interval", "metric_unit",
           "natural_order", "panel_order", "panels_figure", "plain_number_x_axis", "side_by_side",
           "tag_means", "varied_factors"]
