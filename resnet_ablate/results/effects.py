"""The effect of every factor of a multi-factor study (depth x shortcut x width ...), each with its
95% interval and p-value, and Optuna's fANOVA importance as a second view. Reads only.

    from resnet_ablate import results
    r = results.load("cifar10_shortcuts")
    r.effects()                     # main effects and two-factor interactions, one row each
    r.importance()                  # each factor's share of the metric's variance over trials

**Main effects**: each level of a factor against its baseline (the level the spec lists first;
shortcut: "A" where present), averaged over the configurations of the other factors: the
stratified "all" row of `Results.compare` (its only row where there is one configuration).

**Two-factor interactions**: for factors F and G, level l of F against its baseline b, level g of
G against its baseline g0, the difference of differences
``[y(l, g) - y(b, g)] - [y(l, g0) - y(b, g0)]``: how much the effect of F changes when G moves
from its baseline (zero when the two effects add). Seeds are paired by seed number across the
four cells; over several configurations of the remaining factors, the mean of their contrasts,
averaged seed by seed over the seeds all of them have (`contrasts.stratified_contrast`). Test
error and accuracy use the per-image record: the seeds x images table of the contrast analysed
as crossed random effects (`stats.contrast`), as `compare` does for a difference; other metrics
Student's t over the per-seed contrasts.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from itertools import combinations
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from .. import stats
from ..record import TEST_SET_RATES
from ..spec import adaptive_rule
from ..storage import ResultsError
from .contrasts import (LOOKED, difference_bounds, joined, note, paired_contrast, plain,
                        recorded, stacked_timing, stratified_contrast, with_holm, with_note)
from .left_out import LeftOut

if TYPE_CHECKING:
    from .study_results import Results

EFFECT_COLUMNS = ("effect", "factor(s)", "level", "baseline", "n_pairs", "diff_mean",
                  "diff_ci95_low", "diff_ci95_high", "p_value", "method", "note", "metric")
# The four cells of an interaction contrast, as (level of F?, level of G?) and their weights.
_CELLS = ((True, True, 1.0), (False, True, -1.0), (True, False, -1.0), (False, False, 1.0))


def factor_levels(results: Results) -> dict[str, list[Any]]:
    """Each swept factor with two or more completed levels: those levels as the trials hold them,
    in the order the spec lists them, the baseline first (the first listed; shortcut: "A" where
    present); a factor the spec gives as a range (random and TPE samplers), the levels its
    trials drew, lowest first."""
    space = results.spec.get("space") or {}
    done = results.completed()
    found = {}
    for factor in results.swept:
        listed = space.get(factor)
        if factor not in done or not isinstance(listed, (list, dict)):
            continue
        held = list(pd.unique(done[factor].dropna()))
        levels = [] if isinstance(listed, list) else sorted(held)
        for value in listed if isinstance(listed, list) else ():
            text = "-".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
            levels += [h for h in held if str(h) == text and h not in levels]
        if len(levels) < 2:
            continue
        if factor == "shortcut" and "A" in levels:
            levels.remove("A")
            levels.insert(0, "A")
        found[factor] = levels
    return found


def effects(results: Results, metric: str = "test_error") -> pd.DataFrame:
    """Main effects and two-factor interactions of `metric` (module docstring): one row per
    effect with `n_pairs`, the estimate, its 95% interval, the two-sided p-value of no effect,
    the method and a note; `frame.attrs["methods"]` lists the methods."""
    results.check_metric(metric)
    recorded(results, metric, "estimate effects from")
    levels = factor_levels(results)
    if len(levels) < 2:
        raise ResultsError(_too_few_factors(results, levels))
    rows = []
    for factor, (baseline, *others) in levels.items():
        rows += _main_effects(results, factor, baseline, others, metric)
    rule = adaptive_rule(results.seed_rule, results.spec.get("space") or {})
    for (f, f_levels), (g, g_levels) in combinations(levels.items(), 2):
        for level_f in f_levels[1:]:
            for level_g in g_levels[1:]:
                row = _interaction(results, (f, f_levels[0], level_f), (g, g_levels[0], level_g),
                                   metric)
                if rule is not None and rule.decided in (f, g):  # its seeds were added so too
                    row["note"] = joined(row["note"], LOOKED)
                rows.append(row)
    return with_holm(pd.DataFrame(rows, columns=list(EFFECT_COLUMNS)))


def _too_few_factors(results: Results, levels: Mapping[str, list[Any]]) -> str:
    """Why there are no effects: in the study, or in the trials a filter selected from it (the
    study itself may have several such factors: the message blamed the study)."""
    swept = ", ".join(results.swept) or "nothing"
    among = f"study {results.study!r}" if not results.selection else \
        f"study {results.study!r} (sweeping {swept}) where {results.selection}"
    if not levels:
        return (f"{among}: no factor has two completed levels yet: effects need two or more "
                "factors with two or more completed levels")
    (factor, (baseline, *_)), = levels.items()
    # the command for the same trials (without the filter it compared over the whole study)
    where = f" --where {shlex.quote(results.selection)}" if results.selection else ""
    return (f"{among}: one factor has two or more completed levels ({factor}: "
            f"{', '.join(map(plain, levels[factor]))}" + ("" if results.selection else
                                                           f"; swept: {swept}")
            + "); effects need two or more; for one factor, `resnet-ablate compare "
            f"{results.study} --factor {factor} --baseline {baseline}{where}` gives its paired "
            "differences")


def _row(effect: str, factors: str, level: Any, baseline: Any, n_pairs: int,
         estimate: stats.Estimate, metric: str) -> dict[str, Any]:
    return {"effect": effect, "factor(s)": factors, "level": level, "baseline": baseline,
            "n_pairs": n_pairs, "diff_mean": estimate.mean, "diff_ci95_low": estimate.low,
            "diff_ci95_high": estimate.high, "p_value": estimate.p_value,
            "method": estimate.method, "note": note(estimate), "metric": metric}


# ----------------------------------------------------------------------------------------------
# Main effects: Results.compare's stratified rows


def _main_effects(results: Results, factor: str, baseline: Any, levels: Sequence[Any],
                  metric: str) -> list[dict[str, Any]]:
    try:
        table = results.compare(factor, baseline, metric=metric)
    except ResultsError:
        return []  # no seed has both levels yet
    others = [c for c in results.configuration_columns(without=[factor]) if c != "arch_name"]
    rows = []
    for level in levels:
        mine = table[table[factor].astype(str) == str(level)]
        if len(mine) > 1:  # several configurations: the stratified "all" row
            mine = mine[(mine[others].astype(str) == "all").all(axis=1)]
        if len(mine) != 1:
            continue
        row = mine.iloc[0]
        fields = {c: row[c] for c in EFFECT_COLUMNS[4:]}
        # One configuration's difference, where the study sweeps others (the rest have no
        # completed pair): said, not passed off as the average over them.
        at = {c: row[c] for c in others
              if str(row[c]) != "all" and results.trials[c].nunique(dropna=True) > 1}
        if at:
            fields["note"] = joined(fields["note"], (
                f"at {', '.join(f'{c}={v}' for c, v in at.items())} only: no other "
                f"configuration of {', '.join(at)} has a completed pair, so this is not the "
                "average over them"))
        rows.append({"effect": "main", "factor(s)": factor, "level": level, "baseline": baseline,
                     **fields})
    return rows


# ----------------------------------------------------------------------------------------------
# Two-factor interactions: the difference of differences


def _interaction(results: Results, f: tuple[str, Any, Any], g: tuple[str, Any, Any],
                 metric: str) -> dict[str, Any]:
    """The interaction row of level f[2] (baseline f[1]) of factor f[0] with level g[2]
    (baseline g[1]) of factor g[0], stratified over the configurations of the other factors."""
    (f_name, f_base, f_level), (g_name, g_base, g_level) = f, g
    done, lacking = recorded(results, metric, "estimate effects from")
    where = {f_name: [f_base, f_level], g_name: [g_base, g_level]}
    left = LeftOut.of(results, done, lacking, metric).note(where)
    others = [c for c in results.configuration_columns(without=[f_name, g_name])
              if c != "arch_name"]
    keys = [*others, "seed", f_name, g_name]
    cells = [(f_level if in_f else f_base, g_level if in_g else g_base) for in_f, in_g, _ in _CELLS]
    weights = [w for *_, w in _CELLS]
    grouped = done.groupby(keys, dropna=False)
    values = grouped[metric].mean().unstack([f_name, g_name])
    numbers = grouped["number"].agg(list).unstack([f_name, g_name])
    present = [c for c in cells if c in values.columns]
    quads = values[present].dropna() if len(present) == 4 else values.iloc[:0]
    trials = numbers.loc[quads.index, cells] if len(quads) else None
    bounds = tuple(2 * b for b in difference_bounds(metric))
    configurations = quads.groupby(level=others, dropna=False).ngroups if others else 1
    if quads.empty:
        estimate = stats.Estimate(np.nan, np.nan, np.nan, np.nan, np.nan, np.nan, 0, "",
                                  "no seed has all four cells completed yet")
    elif configurations == 1:
        estimate = paired_contrast(results, quads[cells], trials, weights, metric, bounds)
    else:
        estimate, _ = stratified_contrast(results, quads[cells], trials, others, weights,
                                          metric, bounds)
    return _row("interaction", f"{f_name} x {g_name}", f"{_text(f_level)} x {_text(g_level)}",
                f"{_text(f_base)} x {_text(g_base)}", estimate.n, with_note(estimate, left),
                metric)


def _text(value: Any) -> str:
    return plain(value).strip("'")


# ----------------------------------------------------------------------------------------------
# A second view: Optuna's fANOVA importance


IMPORTANCE_METHOD = ("fANOVA (Optuna's FanovaImportanceEvaluator, seed 0): each factor's share of "
                     "the variance of the per-trial {metric} that a random forest over the factors "
                     "explains; the seed is not a factor, so seed-to-seed variation is left as "
                     "noise; a description of these trials, with no interval or test")


def importance(results: Results, metric: str = "test_error") -> pd.DataFrame:
    """Each factor's importance for `metric` by Optuna's fANOVA evaluator over the completed
    trials (factors with two or more completed levels), shares summing to 1, largest first."""
    import optuna
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    results.check_metric(metric)
    done = results.require_completed("weigh factors from")
    levels = factor_levels(results)
    if not levels:
        raise ResultsError(_too_few_factors(results, levels))
    done = done[done[metric].notna()]
    choices = {f: [_choice(v) for v in lv] for f, lv in levels.items()}
    distributions = {f: optuna.distributions.CategoricalDistribution(c) for f, c in choices.items()}
    trials = []
    for _, row in done.iterrows():
        params = {f: _choice(row[f]) for f in levels}
        if all(params[f] in choices[f] for f in levels):
            trials.append(optuna.trial.create_trial(params=params, distributions=distributions,
                                                    value=float(row[metric])))
    if len(trials) < 2:
        raise ResultsError(f"study {results.study!r} has {len(trials)} completed trial with "
                           f"{metric}: importance needs two or more")
    no_variance = ResultsError(
        f"study {results.study!r}: every completed trial has the same {metric} "
        f"({trials[0].value:.6g}): the factors explain no variance, so fANOVA has none to share")
    if len({t.value for t in trials}) == 1:
        raise no_variance
    study = optuna.create_study()  # in memory: the trials as the evaluator reads them
    study.add_trials(trials)
    try:
        shares = get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0),
                                       normalize=True)
    except RuntimeError as error:  # every tree of the forest drew trials of one value alike
        if "zero total variance" not in str(error):
            raise
        raise no_variance from None
    frame = pd.DataFrame([{"factor": f, "importance": float(v), "levels": len(levels[f]),
                           "trials": len(trials), "metric": metric} for f, v in shares.items()])
    frame.attrs["methods"] = [IMPORTANCE_METHOD.format(metric=metric)]
    frame.attrs["notes"] = [_explained(done, list(levels), metric)]
    return frame


def _explained(done: pd.DataFrame, factors: list[str], metric: str) -> str:
    """How much of the trials' variance the configurations explain at all: shares that sum to 1
    say nothing of it, and under seed noise alone some factor always holds half of them."""
    found = explained_variance(done, factors, metric)
    if found is None:
        return (f"how much of {metric}'s variance the configurations explain is not estimable "
                f"here (one trial per configuration, {metric} the same in every trial, seeds "
                "that tie within every configuration, or seeds stacked into one run, which share "
                "its timing): the table's shares divide it, whatever its size")
    omega, p_value, configurations = found
    # Trials as independent draws: a test-set metric's ANOVA cannot see that every configuration
    # is scored on the same images, which one finds harder than another (simulated: 7-15% of
    # null studies rejected where configurations differ image by image, 5% where they do not).
    conditional = (" on these test images (conditional on them: compare and effects count the "
                   "test set's sampling)") if metric in TEST_SET_RATES else ""
    return (f"the configurations explain an estimated {100 * max(omega, 0):.0f}% of {metric}'s "
            f"variance over these {len(done)} trials (omega^2 of a one-way ANOVA over the "
            f"{configurations} configurations; F test of no difference{conditional} p = "
            f"{p_value:.3g}); the rest is seed-to-seed, and the table's shares divide the explained "
            "part, summing to 1 whatever its size")


_TIE_TOLERANCE = 1e-12  # of the total sum of squares: what rounding leaves of exact ties


def explained_variance(done: pd.DataFrame, factors: list[str],
                       metric: str) -> tuple[float, float, int] | None:
    """(omega^2, the F test's p-value, k) of a one-way ANOVA of `metric` over the k
    configurations of `factors`: omega^2 = (SS_between - (k - 1) MS_within) / (SS_total +
    MS_within), which is 0 on average where the configurations do not differ (below 0 where
    they differ less than seed noise makes them; the plain R^2 of k means over N trials is
    about (k - 1)/(N - 1) then). None where it cannot be estimated (no trial beside one per
    configuration, no variance at all, or none within configurations: tied seeds, or seeds
    stacked into one run, whose timings are shares of one)."""
    if stacked_timing(done, metric):
        return None
    values = done[metric].astype(float)
    cells = values.groupby([done[f].astype(str) for f in factors])
    trials, configurations = len(values), cells.ngroups
    total = float(((values - values.mean()) ** 2).sum())
    within = float(((values - cells.transform("mean")) ** 2).sum())
    if trials <= configurations or total == 0:
        return None
    between, mean_within = total - within, within / (trials - configurations)
    if configurations < 2:
        return 0.0, 1.0, configurations
    # Seeds that agree within every configuration (to rounding) leave no seed noise to test
    # against: not "p = 0, all explained", which ties would claim as certainty from a few seeds.
    if within <= _TIE_TOLERANCE * total:
        return None
    omega = (between - (configurations - 1) * mean_within) / (total + mean_within)
    p_value = float(scipy_stats.f.sf(between / (configurations - 1) / mean_within,
                                     configurations - 1, trials - configurations))
    return omega, p_value, configurations


def _choice(value: Any) -> Any:
    """A level as an Optuna categorical choice: a plain Python scalar."""
    return value.item() if isinstance(value, np.generic) else value


__all__ = ["EFFECT_COLUMNS", "effects", "explained_variance", "factor_levels", "importance"]
