"""Per-configuration statistics over seeds: `Results.summary` (each configuration's mean, spread
and interval of a metric, with what it left out) and `Results.seed_decisions` (an adaptive-seed
study's rule, decided on the trials recorded)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .. import stats
from ..record import ERROR_RATES, TEST_SET_RATES, is_complement
from ..spec import AdaptiveSeeds, adaptive_rule
from ..stats.adaptive import Decision, SeedResult, decide, ended_for_good, seed_result
from ..storage import ResultsError
from .contrasts import (CONFIGURATION_CONSTANTS, complement, joined, metric_bounds, note,
                        recorded, repeats_note, seeds_apart_note, seeds_named, selected_note,
                        sizes_note, stacked_timing, stratified_contrast, with_methods, with_note)
from .left_out import LeftOut, failed_seeds, failure_kinds, rows_where
from .store_reading import scalar_value

if TYPE_CHECKING:
    from .study_results import Results

# Stopping on a narrow interval favours seeds that happened to agree: the interval that stopped
# them is narrower than one over a fixed count of seeds. A configuration's test error is
# therefore shown at the rule's own level, its 5% shared over its looks (Bonferroni): were each
# look's interval exact, the chance that the one at any look misses would be at most 5%, so the
# one at the look that stopped the seeds covers about 95% of a study's configurations (94-98%
# simulated, tests/test_adaptive_seeds.py; skewed seed means cost every interval some).
# Those that stopped early are covered less often than those that ran on; other metrics and
# rows over several configurations are not adjusted.
WIDTH_RULE_LEVEL = ("the width rule's {level:.4g}% interval (5% shared over its {looks} looks): "
                    "a 95% interval whatever look stopped the seeds")
WIDTH_STOPPED_EARLY = ("stopped early by the width rule, as seeds that agree do: such "
                       "configurations are covered less often than the rest")
WIDTH_STOPPED = ("seeds stopped once the interval was narrow (the width rule): not adjusted "
                 "for that, so it covers less than 95%")


def _check_groups_keep_seeds_together(results: Results, by: list[str]) -> None:
    """One ResultsError where a column of `by` takes several values among one configuration's
    trials (a measurement, as test_error): its groups would split a configuration's seeds by
    their outcome (an audit: `--by test_error` gave rows of unrelated trials)."""
    swept = results.configuration_columns()
    for column in (c for c in by if c not in swept):
        values = results.trials.groupby(swept, dropna=False)[column].nunique(dropna=False)
        if len(values) and values.max() > 1:
            raise ResultsError(
                f"summary by {column!r}: it differs between trials of one configuration (a "
                "measurement, not a setting), so its groups would split a configuration's seeds "
                f"by their outcome; by takes the study's configuration columns "
                f"({', '.join(swept)}) or its architectures' (e.g. depth)")


def summary(results: Results, by: Sequence[str] | None = None,
            metric: str = "test_error") -> pd.DataFrame:
    """`Results.summary`: one row per group of `by` (default: per configuration)."""
    by = list(by or results.configuration_columns())
    results.check_columns(by)
    replicates = [c for c in by if c in ("seed", "number")]
    if replicates:
        raise ResultsError(
            f"summary by {', '.join(map(repr, replicates))}: a row's interval is over seeds, so "
            f"its groups are configurations; by takes the study's configuration columns "
            f"({', '.join(results.configuration_columns())}) or its architectures' (e.g. depth)")
    _check_groups_keep_seeds_together(results, by)
    results.check_metric(metric)
    done, lacking = recorded(results, metric, "summarise")
    narrowed = {c for c, d in decisions(results).items() if d.narrowed}
    width_rule = _width_rule(results) if metric in ERROR_RATES else None
    left = LeftOut.of(results, done, lacking, metric)
    swept = results.configuration_columns()
    partial = _partial_pools(done, by, swept)
    rows = []
    for key, group in done.groupby(by, sort=True, dropna=False):
        where = dict(zip(by, key if isinstance(key, tuple) else (key,)))
        configurations = {tuple(zip(swept, values))
                          for values in group[swept].itertuples(index=False, name=None)}
        if len(configurations) > 1:
            estimate, stopping = _pooled_estimate(results, group, metric, by), WIDTH_STOPPED
        elif width_rule is not None:
            estimate = configuration_estimate(results, group, metric, width_rule.level)
            estimate = with_note(estimate, WIDTH_RULE_LEVEL.format(
                level=100 * width_rule.level, looks=len(width_rule.looks)))
            stopping = WIDTH_STOPPED_EARLY
        else:
            estimate, stopping = configuration_estimate(results, group, metric), WIDTH_STOPPED
        estimate = with_note(estimate, joined(
            left.note(where), stopping if configurations & narrowed else "",
            partial.get(tuple(where.values()), "")))
        names = group["arch_name"].unique()
        rows.append({
            **where,
            "arch_name": names[0] if len(names) == 1 else f"{len(names)} architectures",
            "n": estimate.n, f"{metric}_mean": estimate.mean, f"{metric}_std": estimate.std,
            f"{metric}_ci95_low": estimate.low, f"{metric}_ci95_high": estimate.high,
            "method": estimate.method, "note": note(estimate),
            "params": _configurations_mean(group, "params", swept),
            "flops": _configurations_mean(group, "flops", swept),
        })
    frame = with_methods(pd.DataFrame(rows))
    frame.attrs["notes"] = _unsummarised(results.trials, done, by)
    return frame


def _unsummarised(trials: pd.DataFrame, done: pd.DataFrame, by: list[str]) -> list[str]:
    """A line for each group of `by` that has trials but no row (none completed with the
    metric: all pruned, interrupted, failed, running): said below the table, not left out in
    silence."""
    summarised = set(done[by].itertuples(index=False, name=None))
    lines = []
    for key, group in trials.groupby(by, sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        if key in summarised:
            continue
        where = ", ".join(f"{c}={v}" for c, v in zip(by, key))
        states = group["state"].value_counts()
        if set(states.index) == {"PRUNED"}:
            lines.append(f"{where}: all {len(group)} trials pruned, no completed seed to "
                         "summarise")
        else:
            counts = ", ".join(f"{n} {state}" for state, n in states.items())
            lines.append(f"{where}: no completed trial to summarise ({counts})")
    return lines


def _width_rule(results: Results) -> AdaptiveSeeds | None:
    """The study's adaptive-seed rule where it stops on its test error's width, else None."""
    rule = adaptive_rule(results.seed_rule, results.spec.get("space") or {})
    return rule if rule is not None and rule.width is not None else None


def configuration_estimate(results: Results, group: pd.DataFrame, metric: str,
                           level: float = stats.LEVEL) -> stats.Estimate:
    """The estimate of `metric` over one configuration's completed seeds (see `summary`), its
    interval at `level` where the metric is a test-set rate."""
    keys = [*results.configuration_columns(), "seed"]
    values, repeated = _per_seed(group, metric, keys)
    numbers = group["number"].tolist()

    def seeds() -> list[tuple[list[int], Any]]:  # each value's trials and seed, in order
        if repeated:
            return [(list(trials["number"]), seed) for (*_, seed), trials
                    in group.groupby(keys, dropna=False, sort=True)]
        return [([number], seed) for number, seed in zip(numbers, group["seed"])]

    with seeds_named(seeds):
        if metric not in TEST_SET_RATES:
            return stats.seed_mean(values, metric_bounds(metric),
                                   exact_ties=metric in CONFIGURATION_CONSTANTS,
                                   not_independent=stacked_timing(group, metric))
        outcomes, images = results.outcomes(numbers)
        averaged = [seed for trials, seed in seeds() if len(trials) > 1] \
            if repeated and metric in ERROR_RATES and outcomes is not None and len(values) > 1 \
            else []
        if metric not in ERROR_RATES or repeated:  # the test set's size alone bounds it
            outcomes = None
        errors = 1 - values if is_complement(metric) else values
        estimate = with_note(stats.error_rate(outcomes, errors, images, level=level),
                             joined(sizes_note(results, numbers), repeats_note(averaged),
                                    seeds_apart_note(values, seeds, images)))
    return complement(estimate) if is_complement(metric) else selected_note(estimate, metric)


def _pooled_estimate(results: Results, group: pd.DataFrame, metric: str,
                     by: Sequence[str]) -> stats.Estimate:
    """A row over several configurations (`summary --by` fewer factors than the study sweeps):
    the mean of their means, each seed averaged over them on the seeds all of them have, as
    compare's "all" row is (contrasts.stratified_contrast): their trials are not more seeds."""
    others = [c for c in results.configuration_columns() if c not in by and c != "arch_name"]
    grouped = group.groupby([*others, "seed"], dropna=False, sort=True)
    accuracy = is_complement(metric)  # as its error, whose mean contrasts average
    values = grouped[metric].mean().to_frame("mean")
    if accuracy:
        values = 1 - values
    trials = grouped["number"].agg(list).to_frame("mean")
    estimate, used = stratified_contrast(results, values, trials, others, [1.0],
                                         "test_error" if accuracy else metric,
                                         metric_bounds(metric))
    estimate = complement(estimate) if accuracy else estimate
    if metric not in TEST_SET_RATES or used.empty:
        return estimate
    # Each seed's mean over the configurations, in the metric's own terms, as the row shows it.
    per_seed = used["mean"].groupby(level="seed", sort=True)
    means = per_seed.mean().to_numpy(float)
    cells = trials.loc[used.index, "mean"]
    held = cells.groupby(level="seed", sort=True)
    numbers = [number for cell in cells for number in cell]
    sizes = [size for size in results.test_set_sizes(numbers) if size is not None]
    configurations = int(per_seed.size().iloc[0])
    return with_note(estimate, seeds_apart_note(
        1 - means if accuracy else means,
        lambda: [([n for cell in listed for n in cell], seed) for seed, listed in held],
        min(sizes) if sizes else None, squared_weights=1 / configurations))


def seed_decisions(results: Results) -> pd.DataFrame:
    """`Results.seed_decisions`: one row per configuration with its seeds, open, reason, and a
    note where seeds failed: the rule decided on those that finished."""
    columns = [*results.configuration_columns(), "seeds", "open", "verdict", "reason", "note"]
    failed = failed_seeds(results, results.completed())
    rows = [{**dict(c), "seeds": d.seeds, "open": d.open, "verdict": d.kind, "reason": d.reason,
             "note": _failed_note(failed, dict(c))} for c, d in decisions(results).items()]
    return pd.DataFrame(rows, columns=columns).sort_values(
        results.configuration_columns(), kind="stable")


def _failed_note(failed: pd.DataFrame, configuration: dict[str, Any]) -> str:
    """A decision's note on its configuration's failed seeds ("" for none)."""
    mine = rows_where(failed, configuration)
    if mine.empty:
        return ""
    return (f"{len(mine)} seed{'s' if len(mine) != 1 else ''} failed ({failure_kinds(mine)}): "
            "decided on the seeds that finished, which flatter a configuration that fails to "
            "train")


def decisions(results: Results) -> dict[tuple, Decision]:
    """The adaptive rule's decision for each configuration ((column, value), ...) that has
    completed trials; empty for a study with fixed seeds. Decided on every completed trial of the
    study, as its driver decided, whatever `where` selected (a selection without a configuration's
    baseline, or with some of its seeds, would otherwise show another decision than the one that
    stopped its seeds); the configurations are the selection's."""
    rule = adaptive_rule(results.seed_rule, results.spec.get("space") or {})
    if rule is None:
        return {}
    swept = results.configuration_columns()
    shown = {tuple(zip(swept, values)) for values in results.require_completed(
        "decide seeds for")[swept].itertuples(index=False, name=None)}
    study = results.all_trials()
    configurations: dict[tuple, list[SeedResult]] = {}
    for row in study[study["state"] == "COMPLETE"].itertuples(index=False):
        result = seed_result(results.attrs.get(int(row.number), {}))
        if result is not None:  # as the driver reads a trial (adaptive.seed_result)
            configurations.setdefault(tuple((c, getattr(row, c)) for c in swept), []).append(
                result)
    levels = {name: [scalar_value(v) for v in values] if isinstance(values, list) else []
              for name, values in (results.spec.get("space") or {}).items()}
    # Seed numbers ended for good, as the driver counts them (grid.seed_decisions). The trials
    # table names an interrupted trial's state INTERRUPTED, never ended for good.
    used: dict[tuple, set] = {}
    kinds = study["failure_kind"] if "failure_kind" in study else pd.Series(None, study.index)
    for row, kind in zip(study.itertuples(index=False), kinds):
        if pd.notna(row.seed) and ended_for_good(row.state, kind if pd.notna(kind) else None):
            used.setdefault(tuple((c, getattr(row, c)) for c in swept), set()).add(int(row.seed))
    used_counts = {c: len(numbers) for c, numbers in used.items()}
    return {c: d for c, d in decide(rule, levels, configurations, used_counts).items()
            if c in shown}


def _per_seed(group: pd.DataFrame, metric: str, keys: list[str]) -> tuple[np.ndarray, bool]:
    """`metric`'s values, one per configuration and seed (the `keys`), and whether any seed was
    completed more than once: its trials are then averaged into one value, as `compare` does,
    for a seed counted twice is not two seeds' evidence."""
    if not group.duplicated(keys).any():
        return _floats(group[metric]), False
    return _floats(group.groupby(keys, dropna=False, sort=True)[metric].mean()), True


def _floats(series: pd.Series) -> np.ndarray:
    return series.to_numpy(dtype=float, na_value=np.nan)


def _configurations_mean(group: pd.DataFrame, column: str, swept: list[str]) -> Any:
    """A value each configuration fixes (parameters, FLOPs): the one value, or the mean over
    the group's configurations (the mean of its distinct values weighed two configurations
    of one size as one)."""
    per_configuration = group.groupby(swept, sort=False, dropna=False)[column].first().dropna()
    if per_configuration.nunique() == 1:
        return per_configuration.iloc[0]
    return float(per_configuration.astype(float).mean()) if len(per_configuration) else None


def _partial_pools(done: pd.DataFrame, by: list[str], swept: list[str]) -> dict[tuple, str]:
    """A note for each row of `by` that pools fewer of the other factors' configurations than
    another row does (one with no completed seed at some of them): rows over different sets of
    configurations would otherwise sit side by side as if alike."""
    others = [c for c in swept if c not in by]
    if not others:
        return {}
    pools = {(key if isinstance(key, tuple) else (key,)):
             set(group[others].astype(str).itertuples(index=False, name=None))
             for key, group in done.groupby(by, sort=True, dropna=False)}
    every = set().union(*pools.values())
    notes = {}
    for key, pool in pools.items():
        missing = sorted(every - pool)
        if missing:
            shown = "; ".join(", ".join(f"{c}={v}" for c, v in zip(others, m))
                              for m in missing[:3])
            notes[key] = (f"over {len(pool)} of the {len(every)} configurations of "
                          f"{', '.join(others)} the other rows pool: none completed at {shown}"
                          f"{' and more' if len(missing) > 3 else ''}")
    return notes
