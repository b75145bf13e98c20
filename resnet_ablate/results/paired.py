"""Paired comparisons of a study's levels: `Results.compare`, a factor's levels against a baseline
level, seeds paired by seed number (and test images by image where the record was kept)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .. import stats
from ..record import METRICS
from ..spec import adaptive_rule
from ..storage import ResultsError
from .contrasts import (LOOKED, difference_bounds, joined, note, paired_contrast, plain,
                        recorded, stratified_contrast, with_holm, with_note)
from .left_out import LeftOut, failure_kinds, rows_where

if TYPE_CHECKING:
    from .study_results import Results


def compare(results: Results, factor: str, baseline: Any,
            metric: str = "test_error") -> pd.DataFrame:
    """Paired differences `metric(level) - metric(baseline)`, seeds paired by seed number, for
    each other level of `factor`: one row per configuration of the other swept factors, with
    the mean difference, its 95% interval and the two-sided p-value of "no difference", the
    method that made them and a note. Test error and accuracy are compared image by image on
    the shared test set where the per-image record was kept (resnet_ablate/stats/intervals.py),
    other metrics by Student's t over the paired seeds. Where the other factors take several
    configurations, an "all" row gives the stratified estimate: the mean of the configurations'
    differences (never a pool of unlike pairs) seed by seed and image by image over the seeds all
    of them have (`contrasts.stratified_contrast`), as its n_pairs and means are. Trials of one
    configuration and seed are averaged first (and lose their per-image record)."""
    results.require_completed("compare")  # an empty study says so, not "no such level"
    levels, baseline = _levels(results, factor, baseline)
    results.check_metric(metric)
    done, lacking = recorded(results, metric, "compare")
    left = LeftOut.of(results, done, lacking, metric)
    others = [c for c in results.configuration_columns(without=[factor]) if c != "arch_name"]
    keys = [*others, "seed", factor]
    keyed = done.groupby(keys, dropna=False)[metric].mean().unstack(factor)
    numbers = done.groupby(keys, dropna=False)["number"].agg(list).unstack(factor)
    if baseline not in keyed.columns:
        raise ResultsError(f"no completed trial with {factor}={plain(baseline)} yet; completed "
                           f"levels: {', '.join(map(plain, keyed.columns)) or '(none yet)'}")
    comparing = _Comparing(results, factor, baseline, metric, others, left,
                           difference_bounds(metric), _tried(results, factor, others))
    rows, unpaired = [], []
    for level in [lv for lv in levels if lv != baseline and lv in keyed.columns]:
        level_rows = comparing.rows(level, keyed[[baseline, level]], numbers)
        if not level_rows:
            unpaired.append(level)
        rows += level_rows
    if not rows:
        raise ResultsError(f"no configuration has completed trials of both {factor}="
                           f"{plain(baseline)} and another level with the same seed (compare "
                           "pairs a configuration's seeds by seed number)")
    frame = with_holm(pd.DataFrame(rows))
    frame.attrs["notes"] = _unpaired_notes(factor, baseline, unpaired)
    rule = adaptive_rule(results.seed_rule, results.spec.get("space") or {})
    if rule is not None and rule.decided == factor:
        frame["note"] = [joined(text, LOOKED) for text in frame["note"]]
    return frame


@dataclasses.dataclass(frozen=True)
class _Comparing:
    """What the rows of every level of one comparison share."""

    results: Results
    factor: str
    baseline: Any
    metric: str
    others: list[str]
    left: LeftOut
    bounds: tuple[float, float]
    tried: dict[str, dict[tuple[str, ...], tuple]]  # see `_tried`

    def rows(self, level: Any, sides: pd.DataFrame, numbers: pd.DataFrame) -> list[dict]:
        """The level's rows: one per configuration of the other factors with paired seeds, and
        an "all" row over them where there are several; none where no seed is paired. `sides`:
        the baseline's and the level's values, indexed by the other factors and the seed."""
        factor, baseline, others = self.factor, self.baseline, self.others
        pairs = sides.dropna()
        if pairs.empty:
            return []
        # Seeds that completed one side only.
        lone = sides[(~np.isnan(sides.to_numpy(float))).sum(axis=1) == 1]
        trials = numbers.loc[pairs.index, [baseline, level]]
        groups = pairs.groupby(level=others, dropna=False, sort=True) if others \
            else [((), pairs)]
        rows = []
        for key, group in groups:
            key = key if isinstance(key, tuple) else (key,)
            configuration = dict(zip(others, key))
            where = {**configuration, factor: [baseline, level]}
            estimate = with_note(paired_contrast(self.results, group, trials.loc[group.index],
                                                 (-1.0, 1.0), self.metric, self.bounds),
                                 joined(self.left.note(where),
                                        _partnerless(lone, others, key, factor)))
            rows.append(_paired_row(factor, level, baseline, self.metric, configuration,
                                    group[baseline], group[level], estimate))
        # Configurations tried with no seed paired (one side failed throughout, say) have no
        # row: the level's rows say so, or a level seen at one configuration reads as the answer.
        paired = {_plain_key(key) for key, _ in groups}
        tried = {**self.tried.get(plain(baseline), {}), **self.tried.get(plain(level), {})}
        missing = _rowless(self.results, self.left, others, factor, (baseline, level),
                           [values for key, values in tried.items() if key not in paired])
        if len(rows) == 1:
            rows[0]["note"] = joined(rows[0]["note"], missing)
            return rows
        overall, used = stratified_contrast(self.results, pairs, trials, others, (-1.0, 1.0),
                                            self.metric, self.bounds)
        overall = with_note(overall, joined(self.left.note({factor: [baseline, level]}),
                                            _strata_disagree(rows, others, self.metric),
                                            missing))
        return [*rows, _paired_row(factor, level, baseline, self.metric,
                                   {name: "all" for name in others}, used[baseline],
                                   used[level], overall)]


def _partnerless(lone: pd.DataFrame, others: list[str], key: tuple, factor: str) -> str:
    """A row's note on its configuration's seeds that completed one side only (of `lone`, the
    rows of one side's value alone, indexed by the `others` and "seed"): left out, so that its
    means are over the paired seeds, not each side's own."""
    if lone.empty:  # (most comparisons: every seed paired)
        return ""
    if others:
        at = [k if isinstance(k, tuple) else (k,) for k in lone.index.droplevel("seed")]
        lone = lone[[k == key for k in at]]
    named = []
    for side in lone.columns:
        seeds = sorted(lone.index.get_level_values("seed")[lone[side].notna()])
        if seeds:
            named.append(f"seed{'s' if len(seeds) != 1 else ''} {', '.join(map(plain, seeds))} "
                         f"of {factor}={plain(side)}")
    return (f"no partner, left out: {' and '.join(named)} (seeds pair by number)"
            if named else "")


def _plain_key(key: Any) -> tuple[str, ...]:
    """A configuration of the other factors as text, to match however pandas typed it."""
    return tuple(map(plain, key if isinstance(key, tuple) else (key,)))


def _tried(results: Results, factor: str, others: list[str]
           ) -> dict[str, dict[tuple[str, ...], tuple]]:
    """For each level of `factor` (as text), the configurations of the `others` factors its
    trials tried, in any state: each as text (`_plain_key`, to match pandas' types), to its
    values. Read once a comparison, as every level asks."""
    tried: dict[str, dict[tuple[str, ...], tuple]] = {}
    if others:
        configurations = results.trials[[factor, *others]].drop_duplicates()
        for level, *values in configurations.itertuples(index=False, name=None):
            tried.setdefault(plain(level), {})[_plain_key(tuple(values))] = tuple(values)
    return tried


def _rowless(results: Results, left: LeftOut, others: list[str], factor: str,
             sides: tuple[Any, Any], missing: list[tuple]) -> str:
    """The note on the configurations of the `others` factors (`missing`: their values) that
    trials of either side tried (in any state) but no seed completed on both, so that they have
    no row: each with its sides' completed and failed seeds (a side that diverged at every seed
    is an answer in itself)."""
    if not missing:
        return ""
    done = results.completed()
    notes = []
    for values in missing:
        where = dict(zip(others, values))
        told = []
        for side in reversed(sides):  # the level, then its baseline
            at = {**where, factor: side}
            completed = rows_where(done, at)["seed"].nunique()
            failed = rows_where(left.failed, at)
            told.append(f"{factor}={plain(side)}: {completed or 'none'} completed" + (
                f" and {len(failed)} failed ({failure_kinds(failed)})" if len(failed) else ""))
        at = ", ".join(f"{o}={plain(v)}" for o, v in where.items())
        notes.append(f"no row at {at}: no seed completed both ({' / '.join(told)})")
    return joined(*sorted(notes))


def _unpaired_notes(factor: str, baseline: Any, levels: list[Any]) -> list[str]:
    """The table's notes of `levels` that have no row (a sampler's study that drew them only
    beside other levels of the other factors than the baseline's)."""
    return [f"{factor}={plain(level)} has no row: no configuration of the other factors has "
            f"completed trials of it and of {factor}={plain(baseline)} with the same seed"
            for level in levels]


# The "all" row's flag (_strata_disagree); the report's answer looks for it.
DISAGREE = "disagree (their 95% intervals do not overlap)"


def _strata_disagree(rows: list[dict[str, Any]], others: list[str], metric: str) -> str:
    """The "all" row's flag where two of the configurations it averages have differences whose
    95% intervals do not overlap: the average then depends on which levels of the other factors
    the study swept (a large effect at one depth, none at another). A flag, not a test: `effects`
    tests the interaction."""
    rows = [r for r in rows
            if np.isfinite(r["diff_ci95_low"]) and np.isfinite(r["diff_ci95_high"])]
    if len(rows) < 2:  # (one seed: no interval)
        return ""
    lowest = min(rows, key=lambda row: row["diff_ci95_high"])
    highest = max(rows, key=lambda row: row["diff_ci95_low"])
    if not highest["diff_ci95_low"] > lowest["diff_ci95_high"]:
        return ""
    show = METRICS[metric].show if metric in METRICS else (lambda value: f"{value:.3g}")

    def name(row):  # with its interval, as the table shows it (an exact metric's: one value)
        where = ", ".join(f"{column}={plain(row[column])}" for column in others)
        low, high = show(row["diff_ci95_low"]), show(row["diff_ci95_high"])
        return f"{where} ({low})" if low == high else f"{where} ({low} to {high})"
    return (f"the differences at {name(lowest)} and at {name(highest)} {DISAGREE}: this average "
            f"depends on which {', '.join(others)} the study swept; `effects` tests the "
            "interaction")


def _levels(results: Results, factor: str, baseline: Any) -> tuple[list[Any], Any]:
    """The levels of `factor` in the study and the one `baseline` names; one clear error where
    `factor` is no factor or has one level."""
    factors = results.configuration_columns()
    results.check_columns([factor], factors, "factors")
    if factor not in factors:  # seeds, metrics and names are not levels a study sets
        raise ResultsError(f"{factor!r} is not a factor study {results.study!r} sweeps, so it has "
                           f"no levels to compare; factors: {', '.join(factors)}")
    levels = list(pd.unique(results.trials[factor].dropna()))
    baseline = _match_level(baseline, levels, factor)
    if len(levels) < 2:
        raise ResultsError(f"{factor} has only one value ({plain(baseline)}) in study "
                           f"{results.study!r}: there is nothing to compare it with")
    return levels, baseline


def _match_level(value: Any, levels: list[Any], factor: str) -> Any:
    """The level equal to `value`, accepting its text ("20" for depth 20, as typed on a CLI) in
    either case where that is unambiguous."""
    if value is None:  # not the level 'none' (the plain net's shortcut)
        raise ResultsError(f"compare needs a baseline: one of {factor}'s levels, "
                           f"{', '.join(map(plain, levels)) or '(none yet)'}")
    for level in levels:
        if level == value or str(level) == str(value):
            return level
    # Specs accept a shortcut option in either case ("a" is option A): so does a baseline.
    folded = [level for level in levels if str(level).lower() == str(value).lower()]
    if len(folded) == 1:
        return folded[0]
    raise ResultsError(f"no trial has {factor}={value!r}; {factor} values: "
                       f"{', '.join(map(plain, levels)) or '(none yet)'}")


def _paired_row(factor: str, level: Any, baseline: Any, metric: str, configuration: dict,
                base: pd.Series, other: pd.Series, estimate: stats.Estimate) -> dict[str, Any]:
    # n_pairs: the paired seeds (an "all" row's note says over how many configurations).
    return {factor: level, "baseline": baseline, **configuration, "n_pairs": estimate.n,
            f"{metric}_baseline": _mean(base), f"{metric}_level": _mean(other),
            "diff_mean": estimate.mean, "diff_std": estimate.std,
            "diff_ci95_low": estimate.low, "diff_ci95_high": estimate.high,
            "p_value": estimate.p_value, "method": estimate.method, "note": note(estimate),
            "metric": metric}


def _mean(values: pd.Series) -> float:
    """The values' mean; NaN, without numpy's warning, where no seed is paired."""
    return float(values.to_numpy(float).mean()) if len(values) else float("nan")
