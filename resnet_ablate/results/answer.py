"""The study's answer in a few lines: each level of each swept factor against its baseline.

A line is a comparison (`paired.compare`) of one level: its stratified "all" row, the mean over
the configurations of the other factors, where that row has an interval; else each of the
level's configurations on its own (a level seen at one configuration only, or one whose
configurations share too few seeds for the average). Its word is decided over the answer as a
whole, not line by line: "a difference" where Holm's adjustment over every line of the answer
(all factors together) puts its p-value below 5%, so that an answer of many lines says "a
difference" somewhere by chance in at most 5% of studies where nothing differs. An adaptive
study's own question (`seeds.until.decided`) takes the rule's verdict instead: its seeds were
added while the comparison was open, which a plain test does not account for.

Each line says what it averages, and its comparison's notes what it leaves out (configurations
with no paired seed, with each side's completed and failed seeds; failed seeds; seeds without a
partner), and where the configurations disagree, each configuration's own difference (an
average over a factor the effect depends on is not the answer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import pandas as pd

from .. import stats
from ..spec import adaptive_rule
from ..stats.adaptive import WITHIN
from .contrasts import LOOKED
from .paired import DISAGREE
from .store_reading import scalar_value

if TYPE_CHECKING:
    from .study_results import Results

ALPHA = 0.05


@dataclass(frozen=True)
class AnswerLine:
    """One level against its factor's baseline, with the word the answer gives it."""

    factor: str
    level: Any
    baseline: Any
    where: str  # what the line averages, or the configuration it is
    diff: float  # level minus baseline, test error
    low: float  # its 95% interval (this line alone)
    high: float
    p_value: float
    n_pairs: int
    note: str = ""  # the comparison's note (left-out seeds, disagreement, looks)
    # The configurations of the other factors the line covers, each ((factor, level), ...): one
    # for an "at" line.
    configurations: tuple[tuple[tuple[str, Any], ...], ...] = ()
    # An averaged line's difference at each of its configurations ((where, diff), ...), kept
    # where they disagree: an average over a factor the effect depends on is not the answer.
    each: tuple[tuple[str, float], ...] = ()
    p_holm: float = math.nan  # Holm's adjustment over the answer's lines
    verdict: str = ""

    @property
    def has_interval(self) -> bool:
        return math.isfinite(self.low) and math.isfinite(self.high)


def answer(results: Results, found: list[tuple[str, object, pd.DataFrame]]) -> list[AnswerLine]:
    """The answer's lines from the comparisons `found` ((factor, baseline, compare table), as
    report.comparisons gives them), each with its verdict."""
    lines = [line for factor, baseline, table in found
             for line in _factor_lines(factor, baseline, table)]
    adjusted = stats.holm([line.p_value if _tested(line) else math.nan for line in lines])
    rule = _RuleVerdicts(results)
    return [replace(line, p_holm=float(p), verdict=_verdict(line, float(p), rule))
            for line, p in zip(lines, adjusted)]


def _tested(line: AnswerLine) -> bool:
    """Whether the line's own test counts in the answer's family (not a looked-at one)."""
    return line.has_interval and LOOKED not in line.note


def _factor_lines(factor: str, baseline: object, table: pd.DataFrame) -> list[AnswerLine]:
    others = list(table.columns[table.columns.get_loc("baseline") + 1:
                                table.columns.get_loc("n_pairs")])
    lines = []
    for level, rows in table.groupby(factor, sort=False):
        overall = (rows[others] == "all").all(axis=1) if others else pd.Series(False, rows.index)
        each = rows[~overall]
        if overall.any() and math.isfinite(rows[overall].iloc[0]["diff_ci95_low"]):
            row = rows[overall].iloc[0]
            seen = {tuple(scalar_value(v) for v in r) for r in each[others].itertuples(
                index=False, name=None)}
            line = _line(factor, level, baseline, row,
                         f"averaged over {', '.join(others)} ({len(seen)} configurations)",
                         tuple(tuple(zip(others, c)) for c in sorted(seen, key=str)))
            if DISAGREE in line.note:
                line = replace(line, each=tuple((_at(others, r), float(r["diff_mean"]))
                                                for _, r in each.iterrows()))
            lines.append(line)
            continue
        for _, row in each.iterrows():
            values = tuple(scalar_value(row[c]) for c in others)
            lines.append(_line(factor, level, baseline, row, _at(others, row),
                               (tuple(zip(others, values)),)))
    return lines


def _at(others: list[str], row: pd.Series) -> str:
    """A configuration's place in a line ("at depth=20, width=16"; "" with no other factor)."""
    at = ", ".join(f"{c}={scalar_value(row[c])}" for c in others)
    return f"at {at}" if at else ""


def _line(factor: str, level: Any, baseline: object, row: pd.Series, where: str,
          configurations: tuple[tuple[tuple[str, Any], ...], ...]) -> AnswerLine:
    return AnswerLine(factor, scalar_value(level), baseline, where, float(row["diff_mean"]),
                      float(row["diff_ci95_low"]), float(row["diff_ci95_high"]),
                      float(row["p_value"]), int(row["n_pairs"]), str(row.get("note") or ""),
                      configurations)


def _verdict(line: AnswerLine, p_holm: float, rule: _RuleVerdicts) -> str:
    if LOOKED in line.note:
        return rule.of(line)
    if not line.has_interval:
        return f"too few seeds to tell ({line.n_pairs} paired seed" \
               f"{'s' if line.n_pairs != 1 else ''})"
    word = "a difference" if p_holm < ALPHA else "no difference shown"
    if DISAGREE not in line.note:
        return word
    # The average is over a factor the effect depends on: each configuration's difference, so
    # that +33 points averaged over +0.1 and +66 is not read as the effect (effects: the
    # interaction's own test).
    return (f"{word} on average, but the configurations disagree: "
            + ", ".join(f"{100 * diff:+.2f} points {where}" for where, diff in line.each))


class _RuleVerdicts:
    """The adaptive rule's verdicts (summaries.decisions) on an answer line's configurations,
    counted by kind: "the adaptive rule's verdict: differs at 2 of 3, open at 1"."""

    def __init__(self, results: Results) -> None:
        from .summaries import decisions

        self.decisions = decisions(results)
        self.swept = results.configuration_columns()
        rule = adaptive_rule(results.seed_rule, results.spec.get("space") or {})
        self.margin = None if rule is None else rule.margin

    def of(self, line: AnswerLine) -> str:
        kinds = []
        for others in line.configurations:
            where = {line.factor: line.level, **dict(others)}
            decision = self.decisions.get(tuple((c, where[c]) for c in self.swept))
            if decision is not None:
                kinds.append(self._word(decision.kind))
        if not kinds:
            return "the adaptive rule decides this question (its seed decisions, below)"
        counted = pd.Series(kinds).value_counts()
        if len(kinds) == 1:
            return f"the adaptive rule's verdict: {kinds[0]}"
        return "the adaptive rule's verdict: " + ", ".join(
            f"{kind} at {count} of {len(kinds)}" for kind, count in counted.items())

    def _word(self, kind: str) -> str:
        if kind == WITHIN and self.margin is not None:
            return f"within +-{100 * self.margin:.2f} points"
        return kind


__all__ = ["ALPHA", "AnswerLine", "answer"]
