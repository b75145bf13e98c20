"""Study results: read a study's storage into tables and statistics. Reads only; never trains.

    from resnet_ablate import results
    r = results.load("quickstart")                # storage defaults to runs/<study>.db
    r.trials                                      # one row per trial (pandas DataFrame)
    r.summary(by=["depth", "shortcut"])           # over seeds: count, mean, std, 95% CI
    r.compare("shortcut", baseline="A")           # paired over seeds: difference, CI, p-value
    r.effects()                                   # main effects and interactions of every factor
    r.pareto(["test_error", "flops"])             # the non-dominated configurations (means)
    r.curves()                                    # per-epoch train/test error, one row per epoch
    r.layer_responses()                           # Fig. 7: std of each 3x3 layer's BN output
    r.where("depth == 20").summary()              # any of them on a subset (filters.py)

SQLite storage is opened read-only (SQLite's `mode=ro`), so reading a study that is still running
never takes a write lock and cannot create or change the runner's file. Every lookup problem (no
storage, no study, no such column or value) is one `ResultsError` whose message names what exists.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import optuna
import pandas as pd

from ..record import (METRICS, PERCENT_RATES, StudyKey, TrialKey, unpack_outcomes,
                      untrained_draw)
from ..storage import ResultsError, sqlite_url, weights_folder
from . import summaries
from .display import format_table
from .effects import effects as effect_table
from .effects import importance as fanova_importance
from .filters import FilterError, filter_mask
from .paired import compare as paired_compare
from .pareto import pareto as pareto_front
from .store_reading import (ARCH_COLUMNS, RUNS_FOLDER_HINT, only_study, open_storage, store_file,
                            store_holding, study_summaries, trial_row, trials_frame)

if TYPE_CHECKING:  # results never train: the data sets and torch load where a model is asked for
    import torch

    from ..data import DataBundle, Streamed


# ----------------------------------------------------------------------------------------------
# The results object


@dataclass(eq=False)
class Results:
    """One study's trials (`trials`, a DataFrame) and the analyses over them.

    `swept` are the architecture fields the spec sweeps (the columns that tell configurations
    apart), `spec` the spec sections the study was created from, `attrs` every trial's raw user
    attributes by trial number (curves, weights, versions, tracebacks).
    """

    study: str
    storage: str
    trials: pd.DataFrame
    swept: tuple[str, ...]
    objectives: tuple[str, ...]
    question: str = ""
    spec: Mapping[str, Any] = field(default_factory=dict)
    attrs: Mapping[int, Mapping[str, Any]] = field(default_factory=dict, repr=False)
    weights_folder: Path = Path("runs")  # what kept weights' recorded paths are relative to
    seed_rule: Mapping[str, Any] | None = None  # adaptive seeds: the rule as the spec wrote it
    # Every trial of the study, whatever `where` selected: what the driver saw (its seed
    # decisions are the study's, not a selection's). None: `trials` are all of them.
    study_trials: pd.DataFrame | None = field(default=None, repr=False)
    selection: str = ""  # the filter `where` selected the trials by ("": every trial)

    # -- selecting

    @property
    def title(self) -> str:
        """The study's name, and the filter where the trials were selected by one: what a
        figure or a report of a selection is titled, so that it is not read as the study's."""
        return f"{self.study} [where {self.selection}]" if self.selection else self.study

    def completed(self) -> pd.DataFrame:
        return self.trials[self.trials["state"] == "COMPLETE"]

    def all_trials(self) -> pd.DataFrame:
        """Every trial of the study, those a `where` left out included."""
        return self.trials if self.study_trials is None else self.study_trials

    def state_counts(self) -> dict[str, int]:
        return {str(k): int(v) for k, v in self.trials["state"].value_counts().items()}

    def check_columns(self, columns: Sequence[str], valid: Sequence[str] | None = None,
                      what: str = "columns") -> None:
        """One ResultsError for the first of `columns` that is no column name here, naming
        what is `valid` (`what`: "factors", ...; every column by default)."""
        shown = f"{what}: {', '.join(self.trials.columns if valid is None else valid)}"
        for column in columns:
            if not isinstance(column, str):
                raise ResultsError(f"expected a column name (str), got {column!r}; {shown}")
            if column not in self.trials.columns:
                raise ResultsError(f"no column {column!r} in study {self.study!r}; {shown}")

    def metrics(self) -> list[str]:
        """The columns a mean can be taken of: the recorded measurements (numbers that name a
        trial or its configuration, as seed, number or depth, are not, nor the true/false
        settings a trial records, as compile)."""
        named = {"number", "seed", *ARCH_COLUMNS, *self.swept}
        return [c for c in self.trials.columns if c in METRICS or (
            c not in named and pd.api.types.is_numeric_dtype(self.trials[c])
            and not pd.api.types.is_bool_dtype(self.trials[c]))]

    def check_metric(self, metric: str) -> None:
        """A metric must be a measurement: statistics over `arch_name` or `seed` mean nothing."""
        valid = self.metrics()
        self.check_columns([metric], valid, "metrics")
        if metric not in valid:
            kind = "names a trial or its configuration, not a measurement" if \
                pd.api.types.is_numeric_dtype(self.trials[metric]) else "is not a numeric column"
            raise ResultsError(f"{metric!r} {kind}, so it has no mean; metrics: "
                               f"{', '.join(valid)}")

    def where(self, query: str | None) -> Results:
        """The same results restricted to the trials a filter selects, e.g.
        "depth == 20 and shortcut == 'A'" (the language: resnet_ablate/results/filters.py; never run
        as code)."""
        if not query:
            return self
        if not isinstance(query, str):
            raise ResultsError(f"where takes a filter (str), as \"depth == 20 and shortcut == "
                               f"'A'\", got {query!r}")
        try:
            kept = self.trials[filter_mask(self.trials, query, PERCENT_RATES)]
        except FilterError as error:
            raise ResultsError(f"--where {error}") from None
        selection = f"({self.selection}) and ({query})" if self.selection else query
        return dataclasses.replace(self, trials=kept, study_trials=self.all_trials(),
                                   selection=selection)

    def sorted_by(self, columns: Sequence[str] | None) -> pd.DataFrame:
        """The trials sorted by columns; a leading "-" sorts that column descending."""
        if not columns:
            return self.trials
        columns = _names(columns)  # "test_error" is one column, not ten letters
        names = [c.lstrip("-") for c in columns]
        self.check_columns(names)
        return self.trials.sort_values(names, ascending=[not c.startswith("-") for c in columns],
                                       na_position="last", kind="stable")

    def require_completed(self, what: str) -> pd.DataFrame:
        done = self.completed()
        if done.empty:
            if self.selection and self.trials.empty and not self.all_trials().empty:
                raise ResultsError(f"where {self.selection!r} matched none of the "
                                   f"{len(self.all_trials())} trials of study {self.study!r}: "
                                   f"nothing to {what}")
            counts = ", ".join(f"{n} {s}" for s, n in self.state_counts().items()) or "no trials"
            whose = f"of its trials where {self.selection!r}:" if self.selection else "it has"
            raise ResultsError(f"study {self.study!r} in {self.storage} has no completed trial "
                               f"to {what} ({whose} {counts})")
        return done

    def configuration_columns(self, without: Sequence[str] = ()) -> list[str]:
        return [c for c in (self.swept or ("arch_name",)) if c not in without]

    # -- statistics

    def summary(self, by: str | Sequence[str] | None = None,
                metric: str = "test_error") -> pd.DataFrame:
        """Per configuration over seeds: n, mean, seed-to-seed std and the 95% interval of
        `metric`, with the method that made the interval and a note where it needs one (few
        seeds, no interval, what it is conditional on), and the configuration's parameters and
        FLOPs (their mean where `by` mixes several). A row over several configurations (`by`
        fewer factors than the study sweeps) is the mean of their means, each seed averaged
        over them, as compare's "all" row: their trials are not more seeds.

        Test error and accuracy get intervals for the error rate itself, the test set's own
        sampling included (resnet_ablate/stats/intervals.py: crossed seeds x test images from the
        per-image record, or a conservative binomial bound where only the test set's size was
        recorded, as for every other rate over the test set: record.TEST_SET_RATES); other metrics
        Student's t over seeds. Intervals are clipped to the metric's range. Trials that did not
        record `metric` are left out, with a note, and so are pruned seeds (summaries.py).
        `frame.attrs["methods"]` lists the methods used. `by`: column names, or one string of them
        separated by commas, as the CLI takes them ("depth,shortcut")."""
        return summaries.summary(self, None if by is None else _names(by), metric)

    def outcomes(self, numbers: Sequence[int]) -> tuple[list[np.ndarray] | None, int | None]:
        """The per-image records of these trials' final evaluations and the test set's size:
        (None, N) where any lacks its per-image record, (None, the smallest N) where the sizes
        differ (not scored on one test set: images that did not decode in every run), (None,
        None) where any lacks the size."""
        attrs = [self.attrs.get(int(n), {}) for n in numbers]
        sizes = self.test_set_sizes(numbers)
        if None in sizes or not sizes:
            return None, None
        if len(sizes) > 1:
            return None, int(min(sizes))
        images = int(sizes.pop())
        if any(not a.get(TrialKey.TEST_OUTCOMES) for a in attrs):
            return None, images
        return [unpack_outcomes(a[TrialKey.TEST_OUTCOMES], images) for a in attrs], images

    def test_set_sizes(self, numbers: Sequence[int]) -> set[int | None]:
        """The test set sizes these trials recorded (None: one did not)."""
        return {self.attrs.get(int(n), {}).get(TrialKey.TEST_IMAGES) for n in numbers}

    def compare(self, factor: str, baseline: Any, metric: str = "test_error") -> pd.DataFrame:
        """Paired differences `metric(level) - metric(baseline)` for each other level of
        `factor`, per configuration of the other swept factors and stratified over them
        (resnet_ablate/results/paired.py)."""
        return paired_compare(self, factor, baseline, metric)

    def effects(self, metric: str = "test_error") -> pd.DataFrame:
        """Main effects and two-factor interactions of every swept factor, each with its 95%
        interval and p-value (resnet_ablate/results/effects.py)."""
        return effect_table(self, metric)

    def seed_decisions(self) -> pd.DataFrame:
        """Adaptive-seed studies (spec.AdaptiveSeeds): per configuration, the seeds it completed,
        its verdict in a word (adaptive.KINDS) and why it stopped or is still open, as the rule
        decides on every trial of the study (a `where` selects the configurations shown), and
        the seeds that failed in the selection; empty for a study with fixed seeds."""
        return summaries.seed_decisions(self)

    def importance(self, metric: str = "test_error") -> pd.DataFrame:
        """Each swept factor's share of `metric`'s variance over the trials by Optuna's fANOVA
        (resnet_ablate/results/effects.py): a description, with no interval."""
        return fanova_importance(self, metric)

    def pareto(self, objectives: str | Sequence[str] = ("test_error", "flops"),
               over: str = "configurations") -> pd.DataFrame:
        """The non-dominated configurations (means over seeds, with intervals) or trials,
        sorted by the first objective (resnet_ablate/results/pareto.py). Directions: see DIRECTIONS.
        `objectives`: names, or one string of them separated by commas."""
        return pareto_front(self, _names(objectives), over)

    # -- per-epoch curves and trained models

    def curves(self, numbers: int | Sequence[int] | None = None) -> pd.DataFrame:
        """Per-epoch records (epoch, lr, train/test loss and error, seconds) of the given trials
        (a number, several, or by default every trial here that recorded any), one row per trial
        and epoch."""
        return _curves(self, self.trial_numbers(numbers))

    def trial_numbers(self, numbers: int | Sequence[int] | None) -> list[int]:
        """`numbers` (one trial's, several, or None for every trial here) as a checked list."""
        if numbers is None:
            return [int(n) for n in self.trials["number"]]
        numbers = [numbers] if isinstance(numbers, (int, np.integer)) else numbers
        if isinstance(numbers, (str, bytes, Mapping)) or not isinstance(numbers, Iterable):
            raise ResultsError(f"expected trial numbers (an int or a list of them), got "
                               f"{numbers!r}")
        self.check_numbers(list(numbers))
        return [int(n) for n in numbers]

    def check_numbers(self, numbers: Sequence[int]) -> None:
        known = set(int(n) for n in self.trials["number"])
        here = f"trials here: {_ranges(sorted(known)) or 'none'}"
        for n in numbers:
            if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)):
                raise ResultsError(f"trial numbers are ints, got {n!r}; {here}")
            if int(n) not in known:
                raise ResultsError(f"no trial {n} in these results of study {self.study!r}; {here}")

    def weights_path(self, number: int) -> Path | None:
        """Where trial `number`'s kept weights are (None where none were kept). Recorded
        relative to the store's folder, so a copied or moved runs folder still finds them."""
        recorded = self.attrs.get(int(number), {}).get(TrialKey.WEIGHTS)
        if not recorded or recorded.startswith("not kept"):
            return None
        path = Path(recorded)
        return path if path.is_absolute() else self.weights_folder / path

    def dataset(self) -> DataBundle | Streamed:
        """The evaluation data the study's trials were trained and tested on."""
        from .analysis import study_dataset

        return study_dataset(self)

    def model(self, number: int, *, fused: bool | None = None,
              data: DataBundle | Streamed | None = None) -> torch.nn.Module:
        """Trial `number`'s trained model from its kept weights, in eval mode. `fused=False`
        rebuilds it from plain BatchNorm2d + ReLU modules (the same state_dict keys)."""
        from .analysis import trained_model

        return trained_model(self, number, fused=fused, data=data)

    def layer_responses(self, numbers: int | Sequence[int] | None = None, *,
                        max_images: int | None = None,
                        batch_size: int = 256) -> pd.DataFrame:
        """The paper's Fig. 7 (see analysis.layer_responses)."""
        from .analysis import layer_responses

        return layer_responses(self, numbers, max_images=max_images, batch_size=batch_size)

    # -- display

    @staticmethod
    def format_table(frame: pd.DataFrame) -> str:
        return format_table(frame)


def _curves(results: Results, numbers: list[int]) -> pd.DataFrame:
    info = results.trials.set_index("number")
    keep = list(dict.fromkeys(["arch_name", *results.configuration_columns(), "seed", "state"]))
    rows = []
    for number in numbers:
        for record in results.attrs.get(int(number), {}).get("curves") or []:
            rows.append({"number": int(number), **info.loc[number, keep].to_dict(), **record})
    columns = ["number", *keep, "epoch", "lr", "train_loss", "train_error", "test_loss",
               "test_error", "seconds"]
    # Then whatever else an epoch recorded (skipped images, top-5, the last epoch's multi-view
    # errors), in the order the records hold it: they were left out of an export "exactly".
    recorded = dict.fromkeys(key for row in rows for key in row if key not in columns)
    return pd.DataFrame(rows, columns=[*columns, *recorded])


def _names(value: str | Sequence[str]) -> list[str]:
    """Column names from a sequence of them or one string of them separated by commas (a bare
    string would otherwise be read as a sequence of one-letter names)."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, Sequence):
        raise ResultsError(f"expected column names (a str or a list of them), got {value!r}")
    return list(value)


def _ranges(numbers: Sequence[int]) -> str:
    if not numbers:
        return ""
    parts, start, previous = [], numbers[0], numbers[0]
    for n in [*numbers[1:], None]:
        if n is not None and n == previous + 1:
            previous = n
            continue
        parts.append(str(start) if start == previous else f"{start}-{previous}")
        if n is not None:
            start = previous = n
    return ", ".join(parts)


# ----------------------------------------------------------------------------------------------
# Loading


def load(study: str | os.PathLike[str], storage: str | None = None,
         runs_dir: str | Path | None = None) -> Results:
    """The trials of a study, finished or still running, as a Results object (read-only).

    `study` is a study's name (found in `storage`, by default RUNS_DIR/STUDY.db, where RUNS_DIR is
    `runs_dir`, else $RESNET_ABLATE_RUNS, else ./runs; or the one other .db file there holding a
    study of that name, as `ls` lists it), the path of a study's .db file (a str or
    Path; works from any folder), or a storage URL; a store that holds several studies then needs
    the name and `storage`.
    """
    study = os.fspath(study)
    if storage is None and "://" in study:  # a URL given where the name goes
        storage = study
        study = only_study(study, storage)
    path = store_file(study) if storage is None else None
    if path is not None:
        storage = sqlite_url(path.resolve())
        study = only_study(study, storage)
    in_runs_folder = storage is None
    storage = storage or store_holding(study, runs_dir)
    backend = open_storage(storage)
    names = [s.study_name for s in study_summaries(storage)]
    if study not in names:
        raise ResultsError(f"no study {study!r} in {storage}; studies there: "
                           f"{', '.join(names) or 'none'}" + (RUNS_FOLDER_HINT if in_runs_folder else ""))
    loaded = optuna.load_study(study_name=study, storage=backend)
    # A sampler's draw that was not trained is no trial (study/draws.py).
    trials = [t for t in loaded.get_trials(deepcopy=False) if not untrained_draw(t)]
    spec = loaded.user_attrs.get(StudyKey.SPEC) or {}
    return Results(
        study=study, storage=storage, trials=trials_frame([trial_row(t) for t in trials]),
        swept=tuple((spec.get("space") or {}).keys()),
        objectives=tuple(loaded.user_attrs.get(StudyKey.OBJECTIVES, ["test_error"])),
        question=loaded.user_attrs.get(StudyKey.QUESTION, ""), spec=spec,
        attrs={t.number: dict(t.user_attrs) for t in trials},
        # Absolute now: a later change of working folder must not lose the weights.
        weights_folder=weights_folder(storage, runs_dir).absolute(),
        seed_rule=loaded.user_attrs.get(StudyKey.SEED_RULE),
    )


__all__ = ["Results", "load"]
