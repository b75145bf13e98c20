"""What a row over a study's completed trials is not over, and the note that says so: completed
trials without the row's metric, seeds the pruner stopped, seeds that failed (summaries,
comparisons and effects: `LeftOut`; figures: `pruned_seeds`, `failed_seeds`)."""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

import pandas as pd

from .contrasts import joined

if TYPE_CHECKING:
    from .study_results import Results


def left_out(lacking: pd.DataFrame, metric: str, where: dict[str, Any]) -> str:
    """The note of a row over the trials `where` says (see `count_where`): how many of
    `lacking`, the completed trials without `metric`, it left out ("" where none)."""
    count = count_where(lacking, where)
    return (f"{count} completed trial{'s' if count != 1 else ''} without {metric} left out"
            if count else "")


def count_where(trials: pd.DataFrame, where: dict[str, Any]) -> int:
    """How many of `trials` a row over `where` covers: column -> its value, or a list of
    values; "all", or a column the trials lack, covers any."""
    return 0 if trials.empty else int(_mask_where(trials, where).sum())


def rows_where(trials: pd.DataFrame, where: dict[str, Any]) -> pd.DataFrame:
    """Those of `trials` a row over `where` covers (see `count_where`)."""
    return trials[_mask_where(trials, where)]


def _mask_where(trials: pd.DataFrame, where: dict[str, Any]) -> pd.Series:
    mask = pd.Series(True, index=trials.index)
    for column, value in where.items():
        if column not in trials.columns or (isinstance(value, str) and value == "all"):
            continue
        values = value if isinstance(value, list) else [value]
        missing = any(v is None or (isinstance(v, float) and math.isnan(v)) for v in values)
        mask &= trials[column].isin(values) | (trials[column].isna() & missing)
    return mask


def pruned_seeds(results: Results, done: pd.DataFrame) -> pd.DataFrame:
    """The pruned trials of seeds that no completed trial of their configuration has."""
    return _seeds_without_a_completed_trial(results, done, "PRUNED")


def failed_seeds(results: Results, done: pd.DataFrame) -> pd.DataFrame:
    """The failed trials (diverged, errors, lost workers, data) of seeds that no completed trial
    of their configuration has, one per seed (a seed retried and failed again counts once)."""
    failed = _seeds_without_a_completed_trial(results, done, "FAIL")
    return failed.drop_duplicates([*results.configuration_columns(), "seed"], keep="last")


def _seeds_without_a_completed_trial(results: Results, done: pd.DataFrame,
                                     state: str) -> pd.DataFrame:
    keys = [*results.configuration_columns(), "seed"]
    trials = results.trials[results.trials["state"] == state]
    if trials.empty:
        return trials
    completed = set(done[keys].itertuples(index=False, name=None))
    return trials[[row not in completed
                   for row in trials[keys].itertuples(index=False, name=None)]]


def pruned_note(pruned: pd.DataFrame, where: dict[str, Any]) -> str:
    """A row's note on its seeds the pruner stopped (of `pruned`, over the trials `where` says:
    see `count_where`): left out, so that what the row says is over the seeds that looked good
    enough to go on."""
    count = count_where(pruned, where)
    return (f"{count} pruned seed{'s' if count != 1 else ''} left out: the pruner let the seeds "
            "that looked better finish, so this row is biased toward them" if count else "")


def failed_note(failed: pd.DataFrame, where: dict[str, Any]) -> str:
    """A row's note on its seeds that failed (of `failed_seeds`, over the trials `where` says):
    left out, so that the row is over the seeds that finished; a seed that diverged is part of
    its configuration's answer, which the row's mean and interval do not hold."""
    count = count_where(failed, where)
    if not count:
        return ""
    return (f"{count} seed{'s' if count != 1 else ''} failed "
            f"({failure_kinds(rows_where(failed, where))}), left out: this row is over the "
            "seeds that finished, which says nothing of how often training fails")


def failure_kinds(failed: pd.DataFrame) -> str:
    """How many of `failed` (failed trials) failed each way: "diverged: 2, error: 1"."""
    kinds = failed["failure_kind"].fillna("error").value_counts()
    return ", ".join(f"{kind.replace('_', ' ')}: {n}" for kind, n in kinds.items())


@dataclasses.dataclass(frozen=True)
class LeftOut:
    """What rows over a study's completed trials are not over: completed trials without the
    metric (`lacking`), seeds the pruner stopped, seeds that failed."""

    lacking: pd.DataFrame
    metric: str
    pruned: pd.DataFrame
    failed: pd.DataFrame

    @classmethod
    def of(cls, results: Results, done: pd.DataFrame, lacking: pd.DataFrame,
           metric: str) -> LeftOut:
        return cls(lacking, metric, pruned_seeds(results, done), failed_seeds(results, done))

    def note(self, where: dict[str, Any]) -> str:
        """The notes of a row over the trials `where` says (see `count_where`)."""
        return joined(left_out(self.lacking, self.metric, where), pruned_note(self.pruned, where),
                      failed_note(self.failed, where))


__all__ = ["LeftOut", "count_where", "failed_note", "failed_seeds", "failure_kinds", "left_out",
           "pruned_note", "pruned_seeds", "rows_where"]
