"""The paper's Fig. 7 drawn from a study's trained models: the std of each 3x3 layer's response
(its BN output, before the add and ReLU), mean over seeds per architecture, in layer order and
sorted by magnitude, on a log scale; a plain net and its residual twins in one colour, told apart
by their lines (plain dotted; shortcut A solid, B dashed, C dash-dot)."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .plot_axes import (labelled_within_a_decade, level_label, natural_order, panels_figure,
                        varied_factors)
from .study_results import Results


def plot_responses(results: Results, responses: pd.DataFrame | None = None, *,
                   max_images: int | None = 1000) -> Figure:
    """Fig. 7: std of each 3x3 layer's response (BN output, before add and ReLU), mean over
    seeds per architecture: in layer order (left) and sorted by magnitude (right)."""
    if responses is None:
        responses = results.layer_responses(max_images=max_images)
    figure, (original, ordered) = panels_figure(2)
    # A plain net and its residual twin share a colour (their configuration's but for the
    # shortcut: depth, width, ...), told apart by the line.
    twins = _twins(results, responses["arch_name"].unique())
    keys = sorted(set(twins.values()), key=lambda key: tuple(map(natural_order, key)))
    labels = _configuration_labels(results)
    lines = _line_styles(results, responses["arch_name"].unique())
    for name, group in sorted(responses.groupby("arch_name"),
                              key=lambda item: (keys.index(twins[item[0]]), _arch_order(item))):
        mean = group.groupby("layer")["std"].mean()
        style = {"color": f"C{keys.index(twins[name]) % 10}",
                 "linestyle": lines[name],
                 "marker": ".", "label": labels.get(name, name)}
        original.plot(mean.index, mean.to_numpy(), **style)
        ordered.plot(np.arange(1, len(mean) + 1), np.sort(mean.to_numpy())[::-1], **style)
    for ax in (original, ordered):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    original.set_xlabel("layer index (original)")
    ordered.set_xlabel("layer index (sorted by magnitude)")
    for ax in (original, ordered):
        # Logarithmic: a plain deep net's responses can peak 100x above a ResNet's, which a
        # linear axis would flatten to a line at zero.
        ax.set_yscale("log")
        labelled_within_a_decade(ax)
        ax.set_ylabel("std of BN output (log scale)")
        ax.grid(alpha=0.3, which="both")
    if len(original.get_legend_handles_labels()[1]) > 4:  # below both panels, off the lines
        figure.legend(*original.get_legend_handles_labels(), loc="outside lower center",
                      ncols=2, fontsize="small")
    else:
        original.legend(fontsize="small")
    figure.suptitle(f"{results.title}: each 3x3 layer's response (std of its BN output), mean "
                    "over seeds (the paper's Fig. 7)")
    return figure


def _configuration_labels(results: Results) -> dict[str, str]:
    """Each architecture by the factors that vary ("depth=20, base_width=64"), where its name
    leaves a default out (resnet20-cifar-bottleneck-B-v1 is base width 64)."""
    factors = varied_factors(results)
    rows = _by_architecture(results)
    return {name: ", ".join(level_label(f, rows.loc[name, f]) for f in factors)
            for name in rows.index} if factors else {}


def _depth_of(name: str) -> int:
    found = re.search(r"\d+", name)
    return int(found.group()) if found else 0


def _twins(results: Results, names: Sequence[str]) -> dict[str, tuple]:
    """Each architecture's configuration but for its shortcut (what a plain net shares with its
    residual twin); its depth where the study's trials do not name it."""
    factors = [f for f in varied_factors(results) if f != "shortcut"]
    rows = _by_architecture(results)
    return {name: tuple(rows.loc[name, factors]) if name in rows.index and factors
            else (_depth_of(name),) for name in names}


# A residual net's line by its shortcut option, in the options' order (A, B, C); a plain net's
# is dotted.
_RESIDUAL_LINES = ("-", "--", "-.")


def _line_styles(results: Results, names: Sequence[str]) -> dict[str, str]:
    """Each architecture's line: dotted where plain, else its shortcut option's, so that the
    twins of one colour (one configuration but for the shortcut: A, B and plain) are told
    apart; they were all solid but the plain one."""
    rows = _by_architecture(results)
    option = {name: str(rows.loc[name, "shortcut"]) if name in rows.index
              and "shortcut" in rows.columns else "" for name in names}
    residual = sorted({option[n] for n in names if not n.startswith("plain")}, key=natural_order)
    return {name: ":" if name.startswith("plain") else
            _RESIDUAL_LINES[residual.index(option[name]) % len(_RESIDUAL_LINES)]
            for name in names}


def _by_architecture(results: Results) -> pd.DataFrame:
    """One completed trial per architecture, indexed by its name: its configuration's columns."""
    return results.completed().drop_duplicates("arch_name").set_index("arch_name")


def _arch_order(item: tuple[str, Sequence]) -> tuple:
    name = item[0]
    return (not name.startswith("plain"), _depth_of(name), name)


__all__ = ["plot_responses"]
