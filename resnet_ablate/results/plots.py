"""The paper's figures drawn from a study's results, as matplotlib Figures (Agg, no display needed).

- `plot_curves`: Fig. 6, training curves by depth, plain vs residual: thin lines training error,
  bold lines test error, the mean over seeds per configuration.
- `plot_depth`: error (or any metric, in the tables' units) against depth or another numeric
  factor, one line per shortcut option, with 95% CI error bars (ringed where seeds stand apart).
- `plot_pareto`: test error against FLOPs (in GFLOPs, as the tables; log-scaled where they
  span a wide range) for every completed trial, the Pareto front joined (means ringed where
  seeds stand apart).
- `plot_responses` (plot_responses.py): Fig. 7, the std of each 3x3 layer's BN output, in layer
  order and sorted, on a log scale.

Built as `matplotlib.figure.Figure`s, saved through the Agg canvas: importing this module never
picks or changes pyplot's global backend."""

from __future__ import annotations

import io
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..storage import refuse_to_lose_results
from .contrasts import joined
from .left_out import failed_seeds, failure_kinds, pruned_seeds
from .plot_axes import (SIDE_STEP, SideBySide, at_the_floor, bar_top, interval_methods,
                        labelled_within_a_decade, legend_beside_if_long, level_label,
                        log_percent_axis, mark_seeds_apart, mark_without_interval, metric_unit,
                        natural_order, panel_order, panels_figure, plain_number_x_axis,
                        side_by_side, tag_means, varied_factors)
from .plot_responses import plot_responses
from .study_results import Results, ResultsError

KINDS = ("curves", "depth", "pareto", "responses")


def _averaged_over(results: Results, shown: Sequence[str | None]) -> str:
    """A caption line naming the varied factors a figure's means pool ("" for none): a line that
    averages two bottleneck widths must say so."""
    if "arch_name" in shown:  # an architecture's name tells every configuration apart
        return ""
    rest = [f for f in varied_factors(results) if f not in shown]
    return f"\nmeans over every {', '.join(rest)} too" if rest else ""


def _default_split(results: Results) -> tuple[str | None, str]:
    """Panels by shortcut (plain vs residual) and colours by depth where the study varies them;
    else colours by the first varied factor and panels by the second."""
    factors = varied_factors(results)
    panel = "shortcut" if "shortcut" in factors else None
    rest = [f for f in factors if f != panel]
    if panel is None and len(rest) > 1:
        panel = rest[1]
    return panel, rest[0] if rest else "arch_name"


def plot_curves(results: Results, *, panel_by: str | None = None, color_by: str | None = None,
                metric: str = "error") -> Figure:
    """Fig. 6: per-epoch training (thin) and test (bold) `metric` ("error" or "loss"), mean over
    seeds, one panel per `panel_by` value, one colour per `color_by` value."""
    default_panel, default_color = _default_split(results)
    panel_by = panel_by or default_panel
    color_by = color_by or default_color
    if metric not in ("error", "loss"):
        raise ResultsError(f"plot curves: no per-epoch {metric!r}; curves are of 'error' or "
                           "'loss' (each epoch's train_ and test_ values)")
    results.check_columns([c for c in (panel_by, color_by) if c],
                          results.configuration_columns(), "factors")
    curves = results.curves(list(results.require_completed("plot")["number"]))
    if curves.empty:
        raise ResultsError(f"study {results.study!r}: no per-epoch curves recorded")
    panels = sorted(curves[panel_by].unique(), key=panel_order) if panel_by else [None]
    colors = sorted(curves[color_by].unique(), key=natural_order)
    # Shades of one sequential map, in the colour factor's order (shallow to deep): the depth and
    # Pareto figures' blue and orange mean ResNet and plain, and must not mean a depth here.
    shades = colormaps["viridis"](np.linspace(0.0, 0.75, len(colors)))
    palette = {value: shades[i] for i, value in enumerate(colors)}
    # One y-scale for every panel: the panels are there to be compared.
    figure, axes = panels_figure(len(panels), sharey=True)
    figure.suptitle(f"{results.title}: mean over seeds (how many: each line's label)"
                    f"{_averaged_over(results, (panel_by, color_by))}{_pruned_caption(results)}",
                    fontsize="medium")
    columns = [f"train_{metric}", f"test_{metric}"]
    scale = 100.0 if metric == "error" else 1.0
    # Mean errors of 0 drawn at half the smallest mean shown (a log axis has no 0), marked.
    shown = curves.groupby([c for c in (panel_by, color_by) if c] + ["epoch"])[columns].mean()
    shown = shown.to_numpy(float) * scale
    floor = (0.5 * shown[shown > 0].min() if (shown > 0).any() else 0.01) \
        if metric == "error" else 0.0
    one_epoch = curves["epoch"].nunique() == 1
    log_loss = metric == "loss" and bool((shown[np.isfinite(shown)] > 0).all())
    for ax, panel in zip(axes, panels):
        subset = curves if panel is None else curves[curves[panel_by] == panel]
        for value in colors:
            lines = subset[subset[color_by] == value]
            if lines.empty:
                continue
            seeds = lines["seed"].nunique()
            _draw_curves(ax, lines.groupby("epoch")[columns].mean() * scale, floor,
                         palette[value], f"{level_label(color_by, value)} "
                                         f"({seeds} seed{'s' if seeds != 1 else ''})")
        ax.set_title(level_label(panel_by, panel) if panel_by else results.title)
        ax.set_xlabel("epoch")
        _curves_y_axis(ax, metric, floor if (shown <= 0).any() else None, log_loss)
        ax.grid(alpha=0.3, which="both")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if one_epoch:  # else the axis spans a tenth of an epoch, unlabelled
            epoch = int(curves["epoch"].iloc[0])
            ax.set_xlim(epoch - 1, epoch + 1)
        ax.legend(title="filled: test, hollow: train" if one_epoch
                  else "bold: test, thin dashed: train", fontsize="small", title_fontsize="small")
    return figure


def _curves_y_axis(ax: Any, metric: str, floor: float | None, log_loss: bool) -> None:
    """The curves' y axis: error on a log percent axis (a mean of 0 drawn at `floor`, where
    given), loss on a log axis where every loss is above 0."""
    if metric == "error":  # the last epochs, where configurations differ by a point or two,
        ax.set_ylabel(f"error (%, log scale; \u25bc 0%, drawn at {floor:.2g})" if floor
                      else "error (%, log scale)")
        log_percent_axis(ax)  # would lie flat at the bottom of a 0-70% linear axis
        labelled_within_a_decade(ax)  # 6-9%: no 1, 2 or 5 of a decade to label
    elif log_loss:  # one plain net's first-epoch loss of 210 flattened the rest to zero
        ax.set_ylabel(f"{metric} (log scale)")
        ax.set_yscale("log")
        labelled_within_a_decade(ax)
    else:
        ax.set_ylabel(metric)


def _draw_curves(ax: Any, mean: pd.DataFrame, floor: float, color: Any, label: str) -> None:
    """One configuration's mean curves, `mean`'s columns training (thin, dashed) and test
    (bold, labelled); with a `floor`, values of 0 drawn there and marked."""
    train, test = mean.columns
    # A line of one epoch is a point, which a line alone would not draw: marked (filled: test).
    alone = len(mean) == 1
    for column, width, style, fill in ((train, 0.9, "--", "none"), (test, 2.4, "-", "full")):
        y = at_the_floor(mean[column].to_numpy(), floor) if floor else mean[column]
        ax.plot(mean.index, y, color=color, linewidth=width, linestyle=style,
                alpha=0.8 if style == "--" else 1.0, label=label if column == test else None,
                marker="o" if alone else None, markersize=8 if fill == "full" else 6,
                fillstyle=fill)
        zero = (mean[column] <= 0).to_numpy() & (floor > 0)
        ax.plot(mean.index[zero], np.full(zero.sum(), floor), "v", markersize=5, color=color)


def _pruned_caption(results: Results) -> str:
    """What a figure of means over seeds says of the seeds it is not over ("" for none): those
    the pruner stopped (it let the better-looking ones finish) and those that failed."""
    done = results.completed()
    pruned, failed = len(pruned_seeds(results, done)), failed_seeds(results, done)
    parts = [f"{pruned} pruned seed{'s' if pruned != 1 else ''} left out (the pruner let the "
             "better-looking seeds finish)" if pruned else ""]
    if len(failed):
        parts.append(f"{len(failed)} failed seed{'s' if len(failed) != 1 else ''} left out "
                     f"({failure_kinds(failed)}): means over the seeds that finished")
    text = joined(*parts)
    return f"\n{text}" if text else ""


def plot_depth(results: Results, *, metric: str = "test_error", x: str = "depth",
               line_by: str | None = None) -> Figure:
    """`metric` (mean over seeds, 95% CI bars) against `x`, one line per `line_by` value."""
    if line_by is None:
        others = [f for f in varied_factors(results) if f != x]
        line_by = "shortcut" if "shortcut" in others else next(iter(others), None)
    by = [x, line_by] if line_by and line_by != x else [x]
    results.check_columns([x])
    done = results.completed()
    numeric = [f for f in dict.fromkeys(("depth", *results.swept))
               if f in done and pd.api.types.is_numeric_dtype(done[f])]
    if x not in numeric:  # (a metric is the Pareto figure's x; a level that is a name has none)
        what = "takes levels that are not numbers" if x in results.swept else "is not a factor"
        raise ResultsError(f"plot depth: x={x!r} {what}; give a numeric factor: "
                           f"{', '.join(numeric) or 'the study sweeps none'}")
    summary = results.summary(by=by, metric=metric)
    scale, unit = metric_unit(metric)
    figure, (ax,) = panels_figure()
    groups = summary.groupby(line_by, sort=False) if len(by) == 2 else [(None, summary)]
    # Colours in the values' natural order, as the Pareto figure gives them (shortcut A blue and
    # plain orange in both), whatever order the legend lists them in.
    palette = {v: f"C{i % 10}"
               for i, v in enumerate(sorted((v for v, _ in groups), key=natural_order))}
    xs = sorted(set(summary[x].astype(float)))
    span = (xs[-1] - xs[0]) or 4.0  # one x: an axis 4 wide around it (else it zooms to the dodge)
    ordered = sorted(groups, key=lambda item: panel_order(item[0]))
    for position, (value, group) in enumerate(ordered):
        group = group.sort_values(x)
        mean = scale * group[f"{metric}_mean"].to_numpy(float)
        below = mean - scale * group[f"{metric}_ci95_low"].to_numpy(float)
        above = scale * group[f"{metric}_ci95_high"].to_numpy(float) - mean
        # Lines side by side at each x, so that one's bar never hides another's.
        at = side_by_side(group[x], position, len(ordered), xs[0], xs[0] + span)
        label = f"{level_label(line_by, value) if line_by else metric} ({_seed_count(group['n'])})"
        if np.isnan(below).all():  # one seed throughout: open markers, in the legend too
            ax.plot(at, mean, marker="o", markerfacecolor="white", color=palette[value],
                    label=label)
        else:
            ax.errorbar(at, mean, yerr=[below, above], marker="o", capsize=4,
                        color=palette[value], label=label)
        mark_without_interval(ax, at, mean, below, "o", palette[value])
        mark_seeds_apart(ax, at, mean, group["note"], palette[value])
    ax.set_xlabel(x)
    ax.set_xticks(xs)  # the depths run, not fractions
    if len(xs) == 1:
        ax.set_xlim(xs[0] - span / 2, xs[0] + span / 2)
    ax.set_ylabel(f"{unit}, mean and 95% CI" if _has_intervals(summary, metric)
                  else f"{unit}, one seed each, no interval")
    # One panel is narrow: the caption wraps.
    ax.set_title("\n".join([results.title, *textwrap.wrap(
        _averaged_over(results, (x, line_by)) + _pruned_caption(results), 55)]),
        fontsize="medium")
    ax.grid(alpha=0.3)
    _depth_legend(figure, ax, interval_methods(summary), beside=len(xs) == 1)
    return figure


def _depth_legend(figure: Figure, ax: Any, methods: list[str], *, beside: bool) -> None:
    """The legend, titled with how the bars were made (in the figure itself, off the axes;
    wrapped: a stratified method's name is wider than the panel); `beside` the axes where every
    bar stands at the centre, as tall as the axes (one x), with no room inside."""
    title = textwrap.fill("95% CI: " + "; ".join(methods), 48) if methods else None
    if beside:
        figure.set_figwidth(figure.get_figwidth() + 3.0)  # the axes keep their width
        ax.legend(fontsize="small", title_fontsize="x-small", title=title, loc="upper left",
                  bbox_to_anchor=(1.02, 1.0))
    else:
        ax.legend(fontsize="small", title_fontsize="x-small", title=title)


def _has_intervals(table: pd.DataFrame, metric: str) -> bool:
    """Whether any row of a summary has an interval (none where every one has one seed: a
    figure then says so, rather than promise bars it cannot draw)."""
    return bool(table[f"{metric}_ci95_low"].notna().any())


def _seed_count(counts: pd.Series) -> str:
    """A line's seeds for its legend: "n=3 seeds", "n=1 seed", "n=2-3 seeds"."""
    seeds = sorted(set(counts))
    n = f"n={seeds[0]}" if len(seeds) == 1 else f"n={seeds[0]}-{seeds[-1]}"
    return f"{n} {'seed' if seeds == [1] else 'seeds'}"


def plot_pareto(results: Results, *, metric: str = "test_error", cost: str = "flops") -> Figure:
    """Every completed trial's `metric` against its `cost` (faint), each configuration's mean
    over seeds with its 95% interval, and the Pareto front over those means as a staircase.
    Groups that share a cost (option A and its plain twin: the same FLOPs) are set side by side
    there, so that none hides another, and the axis says so."""
    done = results.require_completed("plot")
    means = _configuration_means(results, metric, cost)
    front = results.pareto([metric, cost]).sort_values(cost)
    scale, unit = metric_unit(cost)
    y_scale, y_unit = metric_unit(metric)
    figure, (ax,) = panels_figure()
    # Colours by shortcut (plain vs residual), else by the first factor but depth (its FLOPs
    # tell depths apart along the x axis), else by depth.
    factors = varied_factors(results)
    label_by = "shortcut" if "shortcut" in factors else next(
        (f for f in factors if f != "depth"), factors[0] if factors else "arch_name")
    trials = list(done.groupby(label_by, sort=True))
    configurations = dict(list(means.groupby(label_by, sort=True))) if label_by in means \
        else {}
    positions = {value: i for i, (value, _) in enumerate(trials)}
    costs = scale * done[cost].astype(float)
    # Depths 20 to 1202 span 60x: a linear axis crowds the small nets. (An option-A net costs
    # 0.2% more than its plain twin: its shortcuts' additions.)
    # Set apart by their means (a trial whose cost is its configuration's moves with it; one
    # whose cost varies by seed, as wall time, is drawn where it is).
    apart = SideBySide([scale * (configurations[value][cost] if value in configurations
                                 else group[cost]).astype(float) for value, group in trials],
                       log=costs.min() > 0 and costs.max() / costs.min() > 8,
                       step=PARETO_SIDE_STEP)

    def placed(values: Any, value: Any) -> np.ndarray:
        return apart.at(scale * np.asarray(values, dtype=float), positions[value])

    # The other factors' levels beside each mean where they vary (width and depth swept: two
    # means of one colour, which FLOPs alone do not tell apart), unless there are too many.
    for value, group in trials:
        _draw_group(ax, group, configurations.get(value), positions[value], metric, y_scale,
                    lambda rows, value=value: placed(rows[cost], value),
                    level_label(label_by, value))
    tagged = [f for f in factors if f != label_by and f in means]
    tags = [(placed([row[cost]], value)[0], y_scale * bar_top(row, metric), row[cost],
             ", ".join(level_label(f, row[f]) for f in tagged), f"C{positions[value] % 10}")
            for value, group in configurations.items() for _, row in group.iterrows()] \
        if tagged and len(means) <= MAX_TAGGED_MEANS else []
    _draw_front(ax, np.array([placed([row[cost]], row[label_by])[0] if label_by in front else
                              scale * float(row[cost]) for _, row in front.iterrows()]),
                y_scale * front[metric].astype(float))
    plain_number_x_axis(ax, log=apart.log)
    ax.margins(x=0.08, y=0.1)
    if apart.widened:  # an axis as wide as the costs, around them (not zoomed in on 0.2%)
        ax.set_xlim(apart.low, apart.high)
    tag_means(ax, tags)  # once the axis is final: where a tag would run past it
    ax.set_xlabel(unit + (" (groups of equal cost set side by side)" if apart.moves else ""))
    ax.set_ylabel(f"{y_unit}: trials faint, means with 95% CI" if _has_intervals(means, metric)
                  else f"{y_unit}: one seed each, no interval")
    ax.set_title("\n".join([results.title, *textwrap.wrap(_pruned_caption(results), 55)]),
                 fontsize="medium")
    ax.grid(alpha=0.3)
    legend_beside_if_long(ax)
    return figure


def _draw_group(ax: Any, trials: pd.DataFrame, means: pd.DataFrame | None, position: int,
                metric: str, scale: float, at: Callable[[pd.DataFrame], np.ndarray],
                label: str) -> None:
    """One group's trials (faint) and its configurations' means with their 95% intervals (in
    `metric` x `scale`), each row drawn at `at(rows)`; a colour and a marker shape per group
    (for print in one colour)."""
    style = {"color": f"C{position % 10}", "marker": "osD^v<>"[position % 7]}
    ax.scatter(at(trials), scale * trials[metric].astype(float), alpha=0.25, s=20, **style)
    if means is None:
        return
    x, y = at(means), scale * means[f"{metric}_mean"].to_numpy(float)
    bars = [y - scale * means[f"{metric}_ci95_low"].to_numpy(float),
            scale * means[f"{metric}_ci95_high"].to_numpy(float) - y]
    label = f"{label} ({_seed_count(means['n'])})"
    if np.isnan(bars[0]).all():  # one seed throughout: open markers, in the legend too
        ax.plot(x, y, linestyle="none", markersize=7, markerfacecolor="white", label=label,
                **style)
    else:
        ax.errorbar(x, y, yerr=bars, linestyle="none", capsize=4, markersize=7, label=label,
                    **style)
    mark_without_interval(ax, x, y, bars[0], style["marker"], style["color"])
    mark_seeds_apart(ax, x, y, means["note"], style["color"])


def _draw_front(ax: Any, x: np.ndarray, y: Any) -> None:
    """The Pareto front through the configuration means at (x, y): a staircase, each member
    ringed."""
    ax.step(x, y, where="post", color="black", linewidth=1.5,
            label="Pareto front (configuration means)")
    ax.scatter(x, y, facecolors="none", edgecolors="black", s=110)


def _configuration_means(results: Results, metric: str, cost: str) -> pd.DataFrame:
    """Each configuration's summary of `metric`, with its `cost`: the architecture's (FLOPs,
    parameters), or the mean over its seeds of one that varies by seed (wall seconds)."""
    by = results.configuration_columns()
    means = results.summary(by=by, metric=metric)
    if cost in means:
        return means
    costs = results.summary(by=by, metric=cost)[[*by, f"{cost}_mean"]]
    return means.merge(costs.rename(columns={f"{cost}_mean": cost}), on=by)


PARETO_SIDE_STEP = 2 * SIDE_STEP  # its means are larger markers than a depth figure's
# Past this many configuration means, their levels beside each would cover the figure.
MAX_TAGGED_MEANS = 24


PLOTTERS: dict[str, Callable[..., Figure]] = {
    "curves": plot_curves, "depth": plot_depth, "pareto": plot_pareto, "responses": plot_responses,
}


def plot(results: Results, kind: str, **options: Any) -> Figure:
    if kind not in PLOTTERS:
        raise ResultsError(f"no plot kind {kind!r}; kinds: {', '.join(KINDS)}")
    return PLOTTERS[kind](results, **options)


def png_bytes(figure: Figure, *, dpi: int = 110) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


# What a plot file's name may end in: matplotlib writes each (a file named .svg held PNG bytes).
PLOT_FORMATS = ("png", "svg", "pdf")


def save_plot(results: Results, kind: str, path: str | Path, **options: Any) -> Path:
    """Draw plot `kind` and write it in the format its file name ends in (PLOT_FORMATS);
    returns the path."""
    path = Path(path)
    refuse_to_lose_results(path)  # a store, saved weights, a study's own folder
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in PLOT_FORMATS:
        raise ResultsError(f"cannot write a plot as {path.name!r}: the file name must end in "
                           f"{', '.join('.' + f for f in PLOT_FORMATS)}")
    figure = plot(results, kind, **options)
    buffer = io.BytesIO()
    figure.savefig(buffer, format=fmt, dpi=110)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())
    return path


__all__ = ["KINDS", "PLOTTERS", "PLOT_FORMATS", "plot", "plot_curves", "plot_depth", "plot_pareto",
           "plot_responses", "png_bytes", "save_plot"]
