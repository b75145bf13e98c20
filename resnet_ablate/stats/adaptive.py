"""Adaptive seeds: which configurations of a study still have an open question, and so get
another seed (the rule: spec.AdaptiveSeeds). Torch-free: the study driver asks it when a
configuration's seeds have all ended, and results ask it why each configuration stopped.

A configuration is a mapping of the swept factors to their levels; its seeds are what the store
recorded of each completed trial: the test error and, where kept, the test set's size and
per-image outcomes (the same inputs as the summary's and compare's statistics).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..record import FailureKind, TrialKey, metric_values, unpack_outcomes
from ..spec import AdaptiveSeeds
from . import intervals

Configuration = tuple[tuple[str, Any], ...]  # ((factor, level), ...) in the space's order


@dataclass(frozen=True)
class SeedResult:
    """One completed seed of a configuration."""

    seed: int
    error: float
    images: int | None = None
    outcomes: np.ndarray | None = None


def seed_result(attrs: Mapping[str, Any]) -> SeedResult | None:
    """A completed trial's SeedResult from its stored attributes, as the driver and the results
    both read them (None where it recorded no seed or no test error)."""
    error = metric_values(attrs)["test_error"]
    if error is None or TrialKey.SEED not in attrs:
        return None
    images, packed = attrs.get(TrialKey.TEST_IMAGES), attrs.get(TrialKey.TEST_OUTCOMES)
    return SeedResult(int(attrs[TrialKey.SEED]), float(error), images,
                      unpack_outcomes(packed, images) if packed and images else None)


@dataclass(frozen=True)
class Decision:
    """Whether a configuration's question is still open, and in words why or why not."""

    open: bool
    reason: str
    seeds: int
    # Closed by the width rule before `max` seeds: seeds that agreed stop sooner, so such
    # configurations are covered less often than the rest (summaries.WIDTH_STOPPED_EARLY).
    narrowed: bool = False
    kind: str = "open"  # one of KINDS: what the reason says, for readers that count verdicts


# What a decision says, in a word: a comparison decided either way (a baseline's against several
# levels, differently), still open, closed at max seeds undecided, a configuration with nothing
# to compare with (a level without its baseline's seeds, or a baseline without any other
# level's: one over budget, say), or the width rule's.
DIFFERS, WITHIN, MIXED, OPEN, UNDECIDED, NO_BASELINE, NARROW = (
    "differs", "within the margin", "decided, differently by level", "open",
    "undecided at max seeds", "nothing to compare with", "narrow enough")
KINDS = (DIFFERS, WITHIN, MIXED, OPEN, UNDECIDED, NO_BASELINE, NARROW)


def _test_set_size(results: Sequence[SeedResult]) -> tuple[int | None, bool]:
    """The test set's size the seeds were scored on, and whether it is one for all of them: where
    sizes differ (images that did not decode in every run), the smallest bounds the test set's
    sampling, as `summary` bounds it (None: a seed did not record it)."""
    sizes = {r.images for r in results}
    if None in sizes or not sizes:
        return None, False
    return min(sizes), len(sizes) == 1


def _error_estimate(results: Sequence[SeedResult], level: float) -> intervals.Estimate:
    size, one_set = _test_set_size(results)
    outcomes = [r.outcomes for r in results]
    have_outcomes = one_set and all(o is not None for o in outcomes)
    return intervals.error_rate(outcomes if have_outcomes else None, [r.error for r in results],
                            size, level=level)


def _one_per_seed(results: Sequence[SeedResult]) -> list[SeedResult]:
    """A seed completed more than once (a rerun) as one seed, as `summary` and `compare` count
    it: its errors averaged, its per-image record dropped (two runs of one seed are not two
    seeds' evidence, and would make the rule stop on pseudo-replicates)."""
    by_seed: dict[int, list[SeedResult]] = {}
    for result in results:
        by_seed.setdefault(result.seed, []).append(result)
    return [runs[0] if len(runs) == 1 else
            SeedResult(seed, float(np.mean([r.error for r in runs])),
                       _test_set_size(runs)[0], None)
            for seed, runs in by_seed.items()]


def _first_seeds(rule: AdaptiveSeeds, results: Sequence[SeedResult]) -> list[SeedResult]:
    """The seeds a question is looked at with: the first `rule.looked_at` by seed number."""
    return sorted(results, key=lambda r: r.seed)[:rule.looked_at(len(results))]


def _differences(base: Sequence[SeedResult], other: Sequence[SeedResult],
                 levels: tuple[float, ...], rule: AdaptiveSeeds) -> list[intervals.Estimate]:
    """other - base over the seeds both completed, paired by seed, at the pairs' last look, at
    each of `levels`."""
    by_seed = {r.seed: r for r in base}
    other_side = _first_seeds(rule, [r for r in other if r.seed in by_seed])
    base_side = [by_seed[r.seed] for r in other_side]
    size, one_set = _test_set_size(base_side + other_side)
    have_outcomes = one_set and all(r.outcomes is not None for r in base_side + other_side)
    return intervals.paired_differences(
        [r.outcomes for r in base_side] if have_outcomes else None,
        [r.outcomes for r in other_side] if have_outcomes else None,
        [r.error for r in base_side], [r.error for r in other_side], size, levels)


def _percent(value: float) -> str:
    return f"{100 * value:.2f}"


def _width_decision(rule: AdaptiveSeeds, results: Sequence[SeedResult]) -> Decision:
    estimate = _error_estimate(_first_seeds(rule, results), rule.level)
    width = estimate.high - estimate.low
    n = len(results)
    shown = f"{100 * rule.level:.4g}% interval ({estimate.method}) {_percent(width)} points wide"
    if not width <= rule.width:  # nan (no interval yet) is open too
        return Decision(True, f"{shown} > {_percent(rule.width)}", n)
    return Decision(False, f"{shown} <= {_percent(rule.width)}", n, narrowed=n < rule.max,
                    kind=NARROW)


def _interval(estimate: intervals.Estimate, level: float) -> str:
    """An interval as a verdict shows it: in points, with its level and method, which are not
    compare's 95% (the rule's levels share alpha over its looks)."""
    return (f"[{_percent(estimate.low)}, {_percent(estimate.high)}] points "
            f"({100 * level:.4g}% interval, {estimate.method})")


def _comparison_decision(rule: AdaptiveSeeds, base: Sequence[SeedResult],
                         other: Sequence[SeedResult]) -> tuple[str, str]:
    """(kind, reason) of one comparison: DIFFERS, WITHIN or OPEN."""
    differs, within = _differences(base, other, (rule.level, rule.equivalence_level), rule)
    if differs.low > 0 or differs.high < 0:
        return DIFFERS, f"decided: differs, {_interval(differs, rule.level)}"
    if -rule.margin <= within.low and within.high <= rule.margin:
        return WITHIN, (f"decided: within +-{_percent(rule.margin)}, "
                        f"{_interval(within, rule.equivalence_level)}")
    if rule.margin == 0:  # (until: {decided: ...} without a margin)
        return OPEN, (f"open: {_interval(differs, rule.level)} straddles 0 (no margin: levels "
                      "are never decided alike, so seeds go on to max unless they differ)")
    return OPEN, (f"open: {_interval(differs, rule.level)} straddles 0 and exceeds "
                  f"+-{_percent(rule.margin)}")


def ended_for_good(state: str, failure_kind: str | None) -> bool:
    """Whether a trial of `state` (Optuna's state name) leaves its seed number used for good, as
    `decide`'s `used` counts seed numbers: it completed, was pruned, or failed in a way no run
    retries (FailureKind.FINAL). A running or interrupted trial, or one whose failure is tried
    again, may still give its seed a result."""
    return state in ("COMPLETE", "PRUNED") or (state == "FAIL"
                                               and failure_kind in FailureKind.FINAL)


def decide(rule: AdaptiveSeeds, space_levels: Mapping[str, Sequence[Any]],
           seeds: Mapping[Configuration, Sequence[SeedResult]],
           used: Mapping[Configuration, int] | None = None) -> dict[Configuration, Decision]:
    """Every configuration's decision under `rule`. `space_levels` are the swept factors'
    levels in the spec's order (a `decided` factor's baseline is its first); `seeds` each
    configuration's completed seeds (a seed completed twice counts once); `used`, where given,
    how many of its seed numbers (0 to max - 1) have ended for good (`ended_for_good`). A
    configuration at `rule.max` seeds is closed whatever its question, and says so, as is one
    that no seed number left can bring to another look after some gave no result (diverged,
    over budget; `_out_of_seed_numbers`): seeds added to it would never be looked at, and "open"
    would read as if more were coming. One below `rule.min` is open while it can reach it."""
    decisions: dict[Configuration, Decision] = {}
    seeds = {configuration: _one_per_seed(results) for configuration, results in seeds.items()}
    if rule.decided is not None:
        baseline = space_levels[rule.decided][0]
        comparisons: dict[Configuration, list[tuple[str, str]]] = {c: [] for c in seeds}
        for configuration, results in seeds.items():
            levels = dict(configuration)
            if levels[rule.decided] == baseline:
                continue
            partner = tuple((k, baseline if k == rule.decided else v) for k, v in configuration)
            if partner not in seeds:
                continue
            verdict = _comparison_decision(rule, seeds[partner], results)
            # The interval is the level's error less the baseline's: said on both rows, the
            # baseline's reading it the other way round (the level's named no partner or sign).
            comparisons[configuration].append((verdict[0], f"vs {rule.decided}={baseline} (this "
                                               f"one's error minus its): {verdict[1]}"))
            level = levels[rule.decided]
            comparisons[partner].append((verdict[0], f"vs {rule.decided}={level} (its error "
                                         f"minus this one's): {verdict[1]}"))
    for configuration, results in seeds.items():
        n = len(results)
        if n < rule.min:
            decision = Decision(True, f"{n} of the first {rule.min} seeds", n)
        elif rule.width is not None:
            decision = _width_decision(rule, results)
        else:
            decision = _compared(comparisons[configuration], n)
        if decision.open and n >= rule.max:
            decision = Decision(False, f"max seeds ({rule.max}) reached, undecided: "
                                f"{decision.reason}", n, kind=UNDECIDED)
        elif decision.open and used is not None:
            decision = _out_of_seed_numbers(rule, decision, used.get(configuration, n))
        decisions[configuration] = decision
    return decisions


def _out_of_seed_numbers(rule: AdaptiveSeeds, decision: Decision, used: int) -> Decision:
    """An open decision closed, undecided, where the seed numbers not yet used cannot bring its
    seeds to another look: none is left, or, under the width rule, fewer than its next look
    needs after seeds that gave no result (diverged, over budget): seeds between looks wait for
    the next one, so such seeds would train without ever being looked at. A `decided` question
    is looked at with the seeds both configurations completed, which seed numbers left on either
    side may still add to, so there only the last seed number closes it."""
    n, left = decision.seeds, rule.max - used
    reaches = left > 0 if rule.decided is not None else \
        rule.looked_at(n + left) > rule.looked_at(n)
    if reaches:
        return decision
    if left <= 0:
        why = f"every seed number used ({rule.max - n} of {rule.max} without a result)"
    else:
        why = (f"{used - n} of {rule.max} seed numbers without a result, the {left} left "
               f"cannot bring its {n} seeds to the next look ({rule.next_look(n)} seeds)")
    return Decision(False, f"{why}, undecided: {decision.reason}", n, kind=UNDECIDED)


def _compared(verdicts: list[tuple[str, str]], n: int) -> Decision:
    """A configuration's decision from its comparisons' (kind, reason): open while any is; its
    kind theirs where they agree (a baseline compared with several levels may hear several)."""
    if not verdicts:
        return Decision(False, "nothing to compare with: no seed of its partner in the decided "
                        "factor completed (over budget, failed or not run)", n, kind=NO_BASELINE)
    kinds = {kind for kind, _ in verdicts}
    is_open = OPEN in kinds
    kind = OPEN if is_open else kinds.pop() if len(kinds) == 1 else MIXED
    return Decision(is_open, "; ".join(reason for _, reason in verdicts), n, kind=kind)


__all__ = ["DIFFERS", "KINDS", "MIXED", "NARROW", "NO_BASELINE", "OPEN", "UNDECIDED", "WITHIN",
           "Configuration", "Decision", "SeedResult", "decide", "seed_result"]
