"""Pareto fronts of a study: `Results.pareto`, the non-dominated configurations (their means over
seeds, with intervals) or single trials."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ..record import DIRECTIONS
from ..storage import ResultsError
from .contrasts import CONFIGURATION_CONSTANTS, joined, with_methods

if TYPE_CHECKING:
    from .study_results import Results


def pareto(results: Results, objectives: Sequence[str] = ("test_error", "flops"),
           over: str = "configurations") -> pd.DataFrame:
    """The non-dominated points (at least as good in every objective, better in one), sorted
    by the first objective. Directions: see DIRECTIONS.

    `over="configurations"` (the default) takes the front over each configuration's mean
    over its seeds, with `n` and each objective's interval beside it (the summary's: 95%, or
    a width rule's own level): one lucky seed does not put a configuration on the front. `over="trials"`
    takes it over single completed trials."""
    objectives = list(objectives)
    if len(set(objectives)) < len(objectives):
        raise ResultsError(f"objectives {objectives}: each once (a front over one objective "
                           "twice is a sort)")
    if len(objectives) < 2:
        raise ResultsError(f"a Pareto front needs two or more objectives, got {objectives}")
    if over not in ("configurations", "trials"):
        raise ResultsError(f"over={over!r}: a Pareto front is over 'configurations' (their "
                           "means over seeds) or 'trials'")
    results.check_columns(objectives, list(DIRECTIONS), "Pareto objectives")
    unknown = [o for o in objectives if o not in DIRECTIONS]
    if unknown:
        raise ResultsError(f"no direction known for {unknown[0]!r}; Pareto objectives: "
                           f"{', '.join(DIRECTIONS)}")
    done = results.require_completed("take a Pareto front of")
    done = done[done[objectives].notna().all(axis=1)]
    if over == "trials":
        columns = ["number", "arch_name", *results.configuration_columns(), "seed",
                   *objectives, "params", "flops"]
        front = done[_non_dominated(done, objectives)]
        return front.sort_values([*objectives, "number"], kind="stable")[
            list(dict.fromkeys(columns))]
    by = results.configuration_columns()
    # The summary's rows start from an objective with an interval (FLOPs and parameters have
    # none), so that the methods and notes are those of the intervals shown, in any order.
    uncertain = [o for o in objectives if o not in CONFIGURATION_CONSTANTS]
    first = uncertain[0] if uncertain else objectives[0]
    means = results.summary(by=by, metric=first)
    for objective in objectives:
        if objective != first:
            means = _with_objective(means, results, by, objective)
    # An objective that is also a configuration column (params, flops): its mean is the one.
    means = means.drop(columns=[o for o in objectives if o in means.columns])
    means = means.rename(columns={f"{o}_mean": o for o in objectives})
    front = means[_non_dominated(means, objectives)]
    columns = [*by, "arch_name", "n"]
    for objective in objectives:
        # A configuration's FLOPs and parameters are one number: no interval to show.
        fixed = objective in CONFIGURATION_CONSTANTS
        columns += [objective] if fixed else \
            [objective, f"{objective}_ci95_low", f"{objective}_ci95_high"]
    columns += ["params", "flops", "method", "note"]
    front = front.sort_values(objectives, kind="stable")[list(dict.fromkeys(columns))]
    front = front.reset_index(drop=True)
    for objective in uncertain:
        front["note"] = [joined(note, flag) for note, flag in
                         zip(front["note"], _overlapping(front, objective, objectives, by))]
    return with_methods(front)


def _with_objective(means: pd.DataFrame, results: Results, by: list[str],
                    objective: str) -> pd.DataFrame:
    """`means` (summary rows per configuration) with `objective`'s statistics beside them, and
    each interval's method and note: the first objective's, then this one's where it has its
    own (FLOPs and parameters have no interval, and repeat the row's notes)."""
    if objective in CONFIGURATION_CONSTANTS and objective in means.columns:
        # One value a configuration, already beside each row: no second summary to make (it
        # was half of a front's time).
        return means.assign(**{f"{objective}_mean": means[objective]})
    extra = results.summary(by=by, metric=objective)
    extra = extra.rename(columns={"method": "extra_method", "note": "extra_note"})
    means = means.merge(extra[[*by, "extra_method", "extra_note",
                               *(c for c in extra.columns if c.startswith(f"{objective}_"))]],
                        on=by)
    if objective not in CONFIGURATION_CONSTANTS:
        means["method"] = [m if e in ("", m) else joined(m, f"{objective}: {e}")
                           for m, e in zip(means["method"], means["extra_method"])]
        means["note"] = [n if e in ("", n) else joined(n, f"{objective}: {e}")
                         for n, e in zip(means["note"], means["extra_note"])]
    return means.drop(columns=["extra_method", "extra_note"])


def _overlapping(front: pd.DataFrame, objective: str, objectives: Sequence[str],
                 by: Sequence[str]) -> list[str]:
    """Per front member, where its `objective` interval overlaps that of a member at least as
    good in every other objective: its place on the front may be the seeds' chance, which a
    front over means cannot tell (a paired `compare` of the two tests it). Descriptive: two
    overlapping 95% intervals are not a test."""
    low, high = (front[f"{objective}_ci95_{end}"].to_numpy(float) for end in ("low", "high"))
    rest = [o for o in objectives if o != objective]
    signs = np.array([1.0 if DIRECTIONS[o] == "minimize" else -1.0 for o in rest])
    others = front[rest].to_numpy(float) * signs
    flags = []
    for i in range(len(front)):
        rivals = [j for j in range(len(front)) if j != i and (others[j] <= others[i]).all()
                  and (others[j] < others[i]).any() and low[i] <= high[j] and low[j] <= high[i]]
        names = [", ".join(f"{c}={front.at[j, c]}" for c in by) for j in rivals]
        flags.append(f"its {objective} interval overlaps that of {'; '.join(names)}, better "
                     f"in {', '.join(rest)}: compare them" if rivals else "")
    return flags


def _non_dominated(frame: pd.DataFrame, objectives: Sequence[str]) -> np.ndarray:
    """Which rows no other row dominates (at least as good in every objective, better in one)."""
    signs = np.array([1.0 if DIRECTIONS[o] == "minimize" else -1.0 for o in objectives])
    points = np.column_stack([frame[o].to_numpy(dtype=float, na_value=np.nan)
                               for o in objectives]) * signs
    no_worse = (points[:, None, :] <= points[None, :, :]).all(axis=2)
    better = (points[:, None, :] < points[None, :, :]).any(axis=2)
    return ~(no_worse & better).any(axis=0)  # [i, j]: row i dominates row j
