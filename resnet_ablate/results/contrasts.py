"""What every comparison of a study's trials shares (study_results.py's tables, paired.py's
differences and effects.py's interactions): which metrics are error rates, the range a difference
can take, an estimate turned into that of its complement or negation, the note printed beside a
number, and the one estimate all of them make: a contrast of cells over seeds paired by seed number,
in one configuration of the other factors or averaged over several. Torch-free; reads a store only
through the `Results` it is handed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .. import stats
from ..record import ERROR_RATES, METRICS, TEST_SET_RATES, is_complement
from ..stats.apart import ALPHA as APART_ALPHA
from ..stats.apart import METHOD as APART_METHOD
from ..stats.apart import NAME as APART_NAME
from ..stats.apart import seeds_apart
from ..stats.seed_tables import SeedRecordsError
from ..storage import ResultsError

if TYPE_CHECKING:
    from .study_results import Results

# What a configuration fixes: equal for every seed, so seeds that tie on it tie exactly (its
# zero-width interval is the truth; for any other metric it would claim certainty).
CONFIGURATION_CONSTANTS = ("flops", "params")
# The costs that seeds stacked into one run (resources.stack_seeds) share: the run is timed
# once and each seed carries its share, so their values differ by timer jitter alone and a spread
# over them would claim a precision no measurement had.
SHARED_BY_STACKED_SEEDS = ("wall_seconds", "images_per_second")
STACKED_TIMING = ("stacked seeds: each seed's value is its share of one timing of its stack, not "
                  "a measurement of its own, so no interval")
# What a reader must know of a rate picked on the test set itself.
SELECTED_ON_TEST = {"best_test_error": "the lowest test error over epochs: picked on the test "
                                       "set, so optimistic"}
# The comparisons of an adaptive study's own question (`decided`), and interactions with its
# factor: their seeds were added while the comparison was open.
LOOKED = ("adaptive seeds: seeds were added while this comparison was open, and this interval "
          "and p-value do not account for those looks (they may overstate), where its verdict in "
          "seed_decisions does")


def stacked_timing(trials: pd.DataFrame, metric: str) -> str:
    """STACKED_TIMING where `metric` is a cost that some of `trials` (rows of the results'
    trials) shared with the seeds stacked beside them, else ""."""
    if metric not in SHARED_BY_STACKED_SEEDS or "stacked_seeds" not in trials:
        return ""
    return STACKED_TIMING if bool((trials["stacked_seeds"].fillna(1) > 1).any()) else ""


def note(estimate: stats.Estimate) -> str:
    """What a reader must know beside a number: too few seeds, no interval, a condition."""
    few = f"few seeds (n={estimate.n})" if 0 < estimate.n < stats.FEW_SEEDS else ""
    return joined(few, estimate.note)


def joined(*notes: str) -> str:
    """Notes as one, in order, the empty ones left out. A note's own text holds no "; ": tables
    show the parts that every row shares once (display.footnotes)."""
    return "; ".join(n for n in notes if n)


def with_holm(table: pd.DataFrame) -> pd.DataFrame:
    """The table (`with_methods`) with Holm's adjustment over all its rows beside each p-value
    (`p_holm`): many rows, each at 5%, find something by chance. Its methods say so, with the
    family's size: this table's rows, not the answer's or another table's."""
    p_values = table["p_value"].to_numpy(float)
    table.insert(table.columns.get_loc("p_value") + 1, "p_holm", stats.holm(p_values))
    table = with_methods(table)
    tested = int(np.isfinite(p_values).sum())
    if tested:  # (none where no row has a test: one seed each)
        table.attrs["methods"] = [*table.attrs["methods"], (
            f"p_holm: Holm's step-down adjustment over the {tested} tested "
            f"row{'s' if tested != 1 else ''} of this table (its family: this table alone)")]
    return table


def with_methods(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame with the methods of its rows that have an interval or a p-value in
    `attrs["methods"]` (a row of one seed has neither: its method made nothing shown), and the
    outlier test's where a row's note names seeds apart."""
    methods = frame["method"][_with_an_interval(frame)] if "method" in frame else []
    frame.attrs["methods"] = sorted(set(methods) - {""})
    if "note" in frame and frame["note"].astype(str).str.contains(APART_NAME, regex=False).any():
        frame.attrs["methods"].append(f"{APART_NAME}: {APART_METHOD}, at p < {APART_ALPHA:g}")
    return frame


def _with_an_interval(frame: pd.DataFrame) -> pd.Series:
    """Which rows show an interval or a p-value (every row where the frame has neither column)."""
    shown = [c for c in frame.columns if str(c).endswith("ci95_low") or c == "p_value"]
    if not shown:
        return pd.Series(True, index=frame.index)
    return frame[shown].apply(pd.to_numeric, errors="coerce").notna().any(axis=1)


def seeds_apart_note(values: np.ndarray, listed: Callable[[], Sequence[tuple[list[int], Any]]],
                     images: int | None, *, squared_weights: float = 1.0,
                     difference: bool = False) -> str:
    """A row's note where some of its seeds stand apart from the rest (apart.py): its interval
    assumes seeds that vary alike and covers far less than it says. `values`: one rate per seed
    (a configuration's, or a mean of several configurations' with those weights' squares summed
    in `squared_weights`), or with `difference` each seed's contrast of rates, shown in points;
    `listed()`: each value's trial numbers and seed, worked out only for such a note."""
    found = seeds_apart(values, images, squared_weights=squared_weights)
    if found is None:
        return ""
    seeds = listed()
    numbers = sorted(number for i in found.positions for number in seeds[i][0])
    low, high = 100 * found.others_low, 100 * found.others_high
    if not difference:
        shown, others = [f"{100 * v:.1f}%" for v in found.values], f"{low:.1f}-{high:.1f}%"
    else:
        shown = [f"{100 * v:+.1f} points" for v in found.values]
        others = f"{low:+.1f} to {high:+.1f} points"
    one = len(found.positions) == 1
    p_text = f"p = {found.p_value:.2g}" if found.p_value > 0 else "p < 1e-300"
    return (f"seed{'' if one else 's'} {_in_words([plain(seeds[i][1]) for i in found.positions])} "
            f"(trial{'' if len(numbers) == 1 else 's'} {', '.join(map(str, numbers))}) "
            f"stand{'s' if one else ''} apart: {_in_words(shown)} against {others} for the other "
            f"{found.n - len(found.positions)} ({APART_NAME} {p_text}), so the interval, which "
            "assumes seeds that vary alike, covers less than 95% here")


def _in_words(items: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def paired_contrast(results: Results, values: pd.DataFrame, trials: pd.DataFrame,
                    weights: Sequence[float], metric: str,
                    bounds: tuple[float, float]) -> stats.Estimate:
    """The contrast ``sum_c weights[c] * metric(c)`` over seeds paired by row: `values` has one
    row per seed and one column per cell, `trials` the same shape, each entry the list of trial
    numbers averaged into that value. Test error and accuracy: `stats.contrast`, image by image
    where every cell is one trial with its per-image record (a cell that averages several
    trials has lost it); the other rates over the test set (TEST_SET_RATES) the same, bounded
    by the test set's size alone. Other metrics: Student's t over the per-seed contrasts,
    clipped to `bounds`."""
    weights = np.asarray(weights, dtype=float)
    if metric not in TEST_SET_RATES:
        numbers = {number for c in trials.columns for cell in trials[c] for number in cell}
        stacked = stacked_timing(results.trials[results.trials["number"].isin(numbers)], metric)
        return stats.seed_mean(values.to_numpy(float) @ weights, bounds,
                               exact_ties=metric in CONFIGURATION_CONSTANTS,
                               not_independent=stacked)
    columns = list(values.to_numpy(float).T)  # (one array, not a frame lookup a column)
    errors = [1 - v for v in columns] if is_complement(metric) else columns
    numbers = [number for cells in trials.to_numpy().T for cell in cells for number in cell]
    outcomes, images = results.outcomes(numbers)
    tables, repeated = None, []
    if metric in ERROR_RATES and outcomes is not None and len(outcomes) == values.size:
        n = len(values)  # one trial a cell, each with its per-image record
        tables = [outcomes[k * n:(k + 1) * n] for k in range(len(columns))]
    elif metric in ERROR_RATES and outcomes is not None and len(values) > 1:
        repeated = [seed for row, seed in zip(trials.itertuples(index=False),
                                              values.index.get_level_values("seed"))
                    if any(len(cell) > 1 for cell in row)]

    def listed() -> list[tuple[list[int], Any]]:  # each seed's trials and seed, in order
        return [([n for cell in row for n in cell], seed) for row, seed in zip(
            trials.itertuples(index=False), values.index.get_level_values("seed"))]

    # A mean of configurations (weights summing to 1) is noted by its caller, in its metric.
    apart = "" if abs(weights.sum()) > 1e-9 else seeds_apart_note(
        values.to_numpy(float) @ weights, listed, images,
        squared_weights=float(weights @ weights), difference=True)
    with seeds_named(listed):
        estimate = with_note(stats.contrast(tables, weights, errors, images),
                             joined(sizes_note(results, numbers), repeats_note(repeated), apart))
    # Accuracy is 1 - error and a contrast's weights sum to zero: the same contrast, negated.
    return negated(estimate) if is_complement(metric) else selected_note(estimate, metric)


@contextlib.contextmanager
def seeds_named(listed: Callable[[], Sequence[tuple[list[int], Any]]]) -> Iterator[None]:
    """A statistic's error about a seed's record (a damaged store), naming that seed by its
    seed number and trials (`listed()`: each value's trial numbers and seed, in the order the
    statistic was given them, worked out only for such an error) rather than by its position."""
    try:
        yield
    except SeedRecordsError as error:
        seeds = listed()
        if error.position is None or error.position >= len(seeds):
            raise
        numbers, seed = seeds[error.position]
        trials = ", ".join(map(str, numbers))
        raise error.named(f"seed {plain(seed)} (trial{'s' if len(numbers) != 1 else ''} "
                          f"{trials})") from None


def sizes_note(results: Results, numbers: Sequence[int]) -> str:
    """A row's note where its seeds were scored on test sets of different sizes (images that
    did not decode in every run): the test set's sampling is then bounded by the smallest."""
    sizes = results.test_set_sizes(numbers)
    if len(sizes) < 2 or None in sizes:
        return ""
    return (f"seeds scored on test sets of different sizes ({min(sizes)} to {max(sizes)} "
            "images): the test set's sampling is bounded by the smallest")


def repeats_note(seeds: Sequence[Any]) -> str:
    """A row's note where `seeds` (of an error rate's) were each completed more than once (a
    sampler that drew a configuration again once its seeds were all taken): their trials are
    averaged, one value a seed, so the test set's part is bounded by its size alone."""
    if not seeds:
        return ""
    named = _in_words([plain(seed) for seed in seeds])
    return (f"seed{'s' if len(seeds) > 1 else ''} {named} completed more than once: averaged "
            "into one value a seed, so the test set's part is bounded by its size (the per-image "
            "records are not used)")


def selected_note(estimate: stats.Estimate, metric: str) -> stats.Estimate:
    """The estimate, noted where `metric` was picked on the test set (SELECTED_ON_TEST)."""
    return with_note(estimate, SELECTED_ON_TEST.get(metric, ""))


def with_note(estimate: stats.Estimate, text: str) -> stats.Estimate:
    """The estimate with `text` added to its note (unchanged where `text` is empty)."""
    if not text:
        return estimate
    return dataclasses.replace(estimate, note=joined(estimate.note, text))


def recorded(results: Results, metric: str, what: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The completed trials that recorded `metric`, and those that did not (a statistic over
    seeds needs a value from each: each row's note names its own, `left_out`). None recording
    it (top-5 error of a 10-class study, say) is one error."""
    done = results.require_completed(what)
    kept = done[done[metric].notna()]
    if kept.empty:
        raise ResultsError(f"no completed trial of study {results.study!r} recorded {metric}, "
                           f"so there is nothing to {what}")
    return kept, done[done[metric].isna()]


def on_common_seeds(values: pd.DataFrame, others: Sequence[str]) -> pd.DataFrame:
    """The rows of `values` (one per configuration of the `others` factors and seed, indexed by
    them and "seed") whose seed every configuration has: what a stratified contrast is over."""
    configurations = len(set(values.index.droplevel("seed")))
    seeds = values.index.get_level_values("seed")
    counts = seeds.value_counts()
    return values[seeds.isin(counts.index[counts == configurations])]


def stratified_contrast(results: Results, values: pd.DataFrame, trials: pd.DataFrame,
                        others: Sequence[str], weights: Sequence[float], metric: str,
                        bounds: tuple[float, float]) -> tuple[stats.Estimate, pd.DataFrame]:
    """The mean over the configurations of the `others` factors of each one's contrast (see
    `paired_contrast`; `values` and `trials` indexed by the `others` and "seed"), on the seeds
    that all k configurations have (`on_common_seeds`), and those rows of `values` (a caller's
    side columns are over them too): one contrast over every configuration's cells, weighted
    1/k. Each seed is one paired unit and, for error rates, each test image one too: the
    configurations share the test set (and perhaps what a seed number fixes), so their
    differences are averaged seed by seed and image by image, never combined as independent."""
    configurations = len(set(values.index.droplevel("seed")))
    method = "stratified over configurations"
    used = on_common_seeds(values, others)
    if used.empty:
        why = f"no seed that all {configurations} configurations have"
        return stats.Estimate(math.nan, math.nan, math.nan, math.nan, math.nan, math.nan, 0,
                              method, why), used
    cells = values.columns.nlevels
    wide = used.unstack(list(others)).dropna(axis=1, how="all")
    weight_of = dict(zip(values.columns, weights))
    spread = [weight_of[key[:cells] if cells > 1 else key[0]] / configurations
              for key in wide.columns]
    held = trials.loc[used.index].unstack(list(others))[wide.columns].loc[wide.index]
    estimate = paired_contrast(results, wide, held, spread, metric, bounds)
    seeds = len(wide)
    note = (f"mean over {configurations} configurations, on the {seeds} "
            f"seed{'s' if seeds != 1 else ''} all of them have")
    return dataclasses.replace(estimate, note=joined(note, estimate.note),
                               method=f"{method} ({estimate.method})"), used


def complement(estimate: stats.Estimate) -> stats.Estimate:
    """The estimate of 1 - x from that of x (accuracy from error)."""
    return dataclasses.replace(estimate, mean=1 - estimate.mean, low=1 - estimate.high,
                               high=1 - estimate.low)


def negated(estimate: stats.Estimate) -> stats.Estimate:
    """The estimate of -x from that of x (an accuracy difference from an error difference)."""
    return dataclasses.replace(estimate, mean=-estimate.mean, low=-estimate.high,
                               high=-estimate.low)


def metric_bounds(metric: str) -> tuple[float, float]:
    """The range a value of `metric` can take: [0, 1] for a rate; any, for one unknown."""
    if metric in METRICS:
        return METRICS[metric].low, METRICS[metric].high
    return -math.inf, math.inf


def difference_bounds(metric: str) -> tuple[float, float]:
    """The range a difference of `metric` can take: [-1, 1] for a rate."""
    low, high = metric_bounds(metric)
    return -(high - low), high - low


def plain(value: Any) -> str:
    """A value as a message shows it: 8, not np.int64(8); 'A' quoted."""
    value = value.item() if isinstance(value, np.generic) else value
    return repr(value) if isinstance(value, str) else str(value)


__all__ = ["ERROR_RATES", "SELECTED_ON_TEST", "TEST_SET_RATES", "complement", "difference_bounds",
           "joined", "negated", "note", "on_common_seeds", "paired_contrast", "plain", "recorded",
           "repeats_note", "seeds_apart_note", "seeds_named", "selected_note", "sizes_note",
           "stacked_timing", "stratified_contrast", "with_holm", "with_methods", "with_note"]
