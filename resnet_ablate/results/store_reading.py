"""Reading a study's store: opened read-only (SQLite's `mode=ro`), the studies it holds with their
counts by state, and each trial as one row of plain values (study_results.py builds its `Results`
from them)."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import sqlite3
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import optuna
import pandas as pd
import sqlalchemy

from ..arch import ResNetArch
from ..record import (INTERRUPTED_STATE, TOOLKIT, VIEW_METRICS, StudyKey, TrialKey,
                      metric_values, shown_state, untrained_draw)
from ..storage import (RUNS_ENVIRONMENT_VARIABLE, ResultsError, StoreError, default_storage,
                       runs_folder, sqlite_path, sqlite_url, store_faults)

optuna.logging.set_verbosity(optuna.logging.WARNING)

ARCH_COLUMNS = ("family", "depth", "stages", "block", "shortcut", "widths", "base_width",
                "downsampling", "fused")
TRIAL_COLUMNS = ("number", "state", "arch_name", *ARCH_COLUMNS, "seed", "params", "flops",
                 "test_accuracy", "test_error", "best_test_error", "test_top5_error",
                 *VIEW_METRICS, "train_error", "test_images", "skipped_images", "epochs",
                 "wall_seconds", "images_per_second", "precision", "memory_format", "compile",
                 "cuda_graphs", "decode", "stacked_seeds", "compile_seconds", "device",
                 "version", "replicas", "restarts", "failure_kind", "failure",
                 "arch_digest", "weights")
_INT_COLUMNS = ("number", "depth", "base_width", "seed", "params", "flops", "test_images",
                "skipped_images", "epochs", "stacked_seeds", "replicas", "restarts")
STATES = ("COMPLETE", "RUNNING", "FAIL", "PRUNED", "WAITING", INTERRUPTED_STATE)
# The states `list_studies` counts (a WAITING trial is one a driver has asked and not yet started).
LISTED_STATES = ("COMPLETE", "RUNNING", "FAIL", "PRUNED", INTERRUPTED_STATE)


# ----------------------------------------------------------------------------------------------
# Storage


def open_storage(storage: str) -> optuna.storages.BaseStorage:
    """The storage behind `storage`, read-only for SQLite; never creates a database.

    It keeps no connection open between reads (no pool): a process that reads results again and
    again (a notebook, a dashboard polling a running study) would otherwise hold a pool of
    connections per read until garbage collection, and PostgreSQL refuses clients past its
    max_connections (100 by default), the running study's own drivers included."""
    url = storage
    path = sqlite_path(storage)
    if path is not None:
        if not path.is_file():
            raise ResultsError(f"no study storage at {path}; {_databases_beside(path)}")
        # mode=ro: no write lock, no file creation, no schema upgrade; a busy writer is waited on.
        # Encoded twice: SQLAlchemy decodes the URL, then SQLite the URI filename (a `#` in it
        # ends it).
        url = f"sqlite:///file:{quote(quote(str(path)))}?mode=ro&uri=true"
    try:
        with store_faults(storage):
            engine_kwargs: dict[str, Any] = {"poolclass": sqlalchemy.pool.NullPool}
            if storage.startswith("sqlite"):
                engine_kwargs["connect_args"] = {"timeout": 30}
            return optuna.storages.RDBStorage(url, skip_table_creation=True,
                                              engine_kwargs=engine_kwargs)
    except StoreError as error:
        unfinished = None if path is None else _unfinished(path)
        if unfinished:
            raise ResultsError(f"study store {path}: unfinished ({unfinished}): a run stopped "
                               "while creating it; run the study again to finish it, or delete "
                               "the file") from None
        raise ResultsError(str(error)) from None


def _unfinished(path: Path) -> str | None:
    """How a SQLite store that a run stopped while creating it looks (an empty file, or
    Optuna's tables without their version record), or None."""
    if path.stat().st_size == 0:
        return "an empty file"
    try:
        with contextlib.closing(sqlite3.connect(f"file:{quote(str(path))}?mode=ro",
                                                uri=True)) as connection:
            tables = {row[0] for row in connection.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
            if not tables:
                return "a database without tables"
            if "version_info" in tables and not connection.execute(
                    "SELECT COUNT(*) FROM version_info").fetchone()[0]:
                return "its tables without their version record"
    except sqlite3.DatabaseError:
        return None
    return None


RUNS_FOLDER_HINT = (f" (the runs folder is --runs-dir / runs_dir, else ${RUNS_ENVIRONMENT_VARIABLE}, "
                     "else ./runs)")


def _databases_beside(path: Path) -> str:
    """Where to look instead: the .db files in `path`'s folder (in `path` itself, a folder)."""
    folder = (path if path.is_dir() else path.parent).resolve()
    found = sorted(p.name for p in folder.glob("*.db")) if folder.is_dir() else []
    if found:
        return f"databases in {folder}/: {', '.join(found)}" + RUNS_FOLDER_HINT
    return (f"{folder}/ holds no .db file; run a study first, or pass --storage / --runs-dir (or "
            f"set ${RUNS_ENVIRONMENT_VARIABLE}), or the path of the study's .db file")


def study_summaries(storage: str) -> list[optuna.study.StudySummary]:
    backend = open_storage(storage)
    try:
        with store_faults(storage):
            return optuna.get_all_study_summaries(backend)
    except StoreError as error:
        raise ResultsError(str(error)) from None


def list_studies(storage: str | None = None, runs_dir: str | Path | None = None) -> pd.DataFrame:
    """Studies with their trial counts by state: in `storage`, or in every runs_dir/*.db.

    In a runs folder, a store that cannot be read (a damaged file) does not hide the others: it
    is left out of the rows, and `frame.attrs["unreadable"]` holds one message for each."""
    if storage is not None:
        storages = [storage]
    else:
        runs_dir = runs_folder(runs_dir)
        if runs_dir.exists() and not runs_dir.is_dir():
            raise ResultsError(f"the runs folder {runs_dir} is a file, not a folder; pass "
                               "--runs-dir (or set RESNET_ABLATE_RUNS) naming a folder")
        storages = [sqlite_url(p) for p in sorted(runs_dir.glob("*.db"))]
        if not storages:
            raise ResultsError(f"no study storage in {runs_dir}/ (no .db file); run a study "
                               "first, or pass --storage URL or --runs-dir")
    rows, unreadable = [], []
    for url in storages:
        try:
            backend, summaries = open_storage(url), study_summaries(url)
        except ResultsError as error:
            if storage is not None:
                raise
            unreadable.append(str(error))
            continue
        for summary in summaries:
            study = optuna.load_study(study_name=summary.study_name, storage=backend)
            counts = pd.Series([shown_state(t) for t in study.get_trials(deepcopy=False)
                                if not untrained_draw(t)], dtype=object).value_counts()
            rows.append({"study": summary.study_name, "trials": int(counts.sum()),
                         **{state: int(counts.get(state, 0)) for state in LISTED_STATES},
                         "question": study.user_attrs.get(StudyKey.QUESTION, ""), "storage": url})
    frame = pd.DataFrame(rows, columns=["study", "trials", *LISTED_STATES, "question", "storage"])
    frame.attrs["unreadable"] = unreadable
    return frame


def store_holding(study: str, runs_dir: str | Path | None = None) -> str:
    """The store of `study` in the runs folder: its own file (RUNS/STUDY.db) where there is one,
    else the one other .db file there that holds a study of that name (one `ls` lists, such as
    a run's --storage sqlite:///runs/mine.db), else its own file's URL (whose absence the reader
    then reports); ResultsError where several hold one."""
    own = default_storage(study, runs_dir)
    folder = runs_folder(runs_dir)
    if sqlite_path(own).is_file() or not folder.is_dir():
        return own
    holding = []
    for path in sorted(folder.glob("*.db")):
        with contextlib.suppress(ResultsError, OSError):
            if any(s.study_name == study for s in study_summaries(sqlite_url(path))):
                holding.append(sqlite_url(path))
    if len(holding) > 1:
        names = ", ".join(sqlite_path(url).name for url in holding)
        raise ResultsError(f"study {study!r} is in {len(holding)} stores of {folder}/ ({names}) "
                           f"and none is {study}.db: name one, by its path or --storage")
    return holding[0] if holding else own


# ----------------------------------------------------------------------------------------------
# Trials as rows


def scalar_value(value: Any) -> Any:
    """Lists (stages, widths) become "16-32-64" so rows group, query and print cleanly."""
    return "-".join(map(str, value)) if isinstance(value, (list, tuple)) else value


def _swept_values(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """A trial's swept parameters as its architecture record holds them (lists as lists)."""
    params = trial.params or trial.system_attrs.get("fixed_params") or {}
    return {name: json.loads(value) if isinstance(value, str) and value.startswith("[") else value
            for name, value in params.items()}


def trial_row(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    attrs = trial.user_attrs
    # A trial whose launch a killed driver cut short has no recorded architecture: its swept
    # values are still its parameters (or, never asked, the ones it was enqueued with).
    arch = attrs.get(TrialKey.ARCH) or _swept_values(trial)
    execution = attrs.get(TrialKey.EXECUTION) or {}
    parallel = attrs.get(TrialKey.DATA_PARALLEL) or {}
    metrics = metric_values(attrs)
    return {
        "number": trial.number, "state": shown_state(trial),
        "arch_name": _arch_name(attrs),
        **{name: scalar_value(arch.get(name)) for name in ARCH_COLUMNS},
        "seed": attrs.get(TrialKey.SEED),
        **{name: metrics[name] for name in ("params", "flops", "test_accuracy", "test_error",
                                            "best_test_error", "test_top5_error", "train_error",
                                            *VIEW_METRICS)},
        "test_images": attrs.get(TrialKey.TEST_IMAGES),
        # Undecodable images its last epoch left out (training and evaluation; streamed data).
        "skipped_images": ((attrs.get(TrialKey.CURVES) or [{}])[-1]).get("skipped_images"),
        # A pruned or failed trial ran the epochs its curves hold.
        "epochs": attrs.get(TrialKey.EPOCHS_COMPLETED,
                            len(attrs.get(TrialKey.CURVES) or []) or None),
        "wall_seconds": metrics["wall_seconds"], "images_per_second": metrics["images_per_second"],
        # How it executed (auto choices resolved): one spec can run differently on two machines.
        **{name: execution.get(name) for name in ("precision", "memory_format", "compile",
                                                  "cuda_graphs", "decode")},
        # The seeds it trained beside, stacked into one model (resources.stack_seeds); 1: alone.
        "stacked_seeds": execution.get("stacked_seeds", 1) if execution else None,
        "compile_seconds": attrs.get(TrialKey.COMPILE_SECONDS),
        "device": attrs.get(TrialKey.DEVICE),
        # The toolkit's version that trained it: a study resumed across a change that moves
        # results (README's list) says which of its trials trained before it.
        "version": (attrs.get(TrialKey.VERSIONS) or {}).get(TOOLKIT),
        # Data-parallel trials: how many processes trained it, how often it resumed after a loss.
        "replicas": parallel.get("replicas", 1),
        "restarts": len(parallel.get("resumed_after_epochs", [])),
        "failure_kind": attrs.get(TrialKey.FAILURE_KIND),
        "failure": attrs.get(TrialKey.FAILURE) or attrs.get(TrialKey.PRUNED),
        "arch_digest": attrs.get(TrialKey.ARCH_DIGEST), "weights": attrs.get(TrialKey.WEIGHTS),
    }


def _arch_name(attrs: Mapping[str, Any]) -> str | None:
    """The architecture's name as the toolkit names it now, from the stored description: stores
    written before custom CIFAR stages were named would otherwise group two networks under one
    name. The stored name where the description no longer builds."""
    try:
        return ResNetArch.from_dict(attrs[TrialKey.ARCH]).name
    except (KeyError, TypeError, ValueError):
        return attrs.get(TrialKey.ARCH_NAME)


_FLOAT_COLUMNS = ("test_accuracy", "test_error", "best_test_error", "test_top5_error",
                  *VIEW_METRICS, "train_error", "wall_seconds", "images_per_second")


def trials_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The trials' rows as a frame, each column built once in its type (casting a built frame
    column by column took most of a small study's load)."""
    columns: dict[str, Any] = {}
    for name in TRIAL_COLUMNS:
        values = [row.get(name) for row in rows]
        if name in _INT_COLUMNS:  # nullable ints: a failed trial's gap does not turn 20 into 20.0
            # A value past 64 bits (a seed stored before seeds were range-checked) stays as stored.
            with contextlib.suppress(OverflowError, TypeError, ValueError):
                values = pd.array(values, dtype="Int64")
        elif name == "fused":
            values = pd.array(values, dtype="boolean")
        elif name in _FLOAT_COLUMNS:
            values = np.array(values, dtype=float)
        elif not values:  # no trials: object columns, as a frame of no rows has
            values = np.array(values, dtype=object)
        columns[name] = values
    return pd.DataFrame(columns, columns=list(TRIAL_COLUMNS))


def store_file(study: str) -> Path | None:
    """The .db file `study` names where it is a path, not a study's name (a name never holds a
    separator; one ending in .db is read as a file's, existing or not); None for a name.
    `runs/quickstart` finds runs/quickstart.db."""
    path = Path(study).expanduser()
    if not ("/" in study or os.sep in study or path.suffix == ".db"):
        return None
    for candidate in (path, path.with_name(path.name + ".db")):
        if candidate.is_file():
            return candidate
    if path.is_dir():
        raise ResultsError(f"{path} is a folder, not a study store file; "
                           f"{_databases_beside(path)}")
    raise ResultsError(f"no study store file {path}; {_databases_beside(path)}")


def only_study(study: str, storage: str) -> str:
    """The one study a store holds, which a path or URL given for the study names."""
    names = [s.study_name for s in study_summaries(storage)]
    if len(names) != 1:
        raise ResultsError(f"{study} holds {len(names)} studies ({', '.join(names) or 'none'}); "
                           "name one: `resnet-ablate show NAME --storage "
                           f"{shlex.quote(storage)}` (in Python, load(NAME, storage={storage!r}))")
    return names[0]
