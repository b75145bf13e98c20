"""The one module that reaches below Optuna's public API into its storage, for the three things
that API cannot do; everything else goes through `optuna.Study`. Written for Optuna's RDB schema
(tables `studies` and `study_user_attributes`, unchanged from Optuna 3 to 5) and checked against
the installed Optuna by tests/test_optuna_tables.py: what is written here is what Optuna's own
API reads back.

- `AttributeCell`: one user attribute of one study, read and compare-and-swapped in one
  transaction (the driver's lease). `Study.set_user_attr` overwrites whatever is there, so two
  drivers that read the same free lease would both take it.
- `end_in_store`: a trial ended (failed with its reason, or finished as a driver killed before
  telling it had recorded it), WAITING ones included (`Study.tell` refuses a trial that was
  enqueued and never asked, and one asked by another `Study` object).
- `sqlite_tables` with `STUDIES_TABLE`: recognising a SQLite file as an Optuna store (or not)
  before Optuna opens it and adds its tables to someone else's database.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import optuna
import sqlalchemy

# The table every Optuna RDB store has, one row per study.
STUDIES_TABLE = "studies"
_ATTRIBUTES_TABLE = "study_user_attributes"


class LostRace(Exception):
    """Another writer inserted the attribute first, between our read and our write: read again."""


class AttributeCell:
    """The user attribute `key` of the study `study_name` in the RDB store at `url`, its stored
    JSON text read and swapped atomically, for SQLite and PostgreSQL alike: an insert that the
    table's (study, key) uniqueness lets only one writer make, or an update conditional on the
    text the writer read."""

    def __init__(self, url: str, study_name: str, key: str) -> None:
        self.key = key
        self._engine = sqlalchemy.create_engine(
            url, connect_args={"timeout": 30} if url.startswith("sqlite") else {},
            poolclass=sqlalchemy.pool.NullPool)
        self._table = sqlalchemy.table(_ATTRIBUTES_TABLE, sqlalchemy.column("study_id"),
                                       sqlalchemy.column("key"), sqlalchemy.column("value_json"))
        studies = sqlalchemy.table(STUDIES_TABLE, sqlalchemy.column("study_id"),
                                   sqlalchemy.column("study_name"))
        with self._engine.connect() as connection:
            self._study_id = connection.execute(sqlalchemy.select(studies.c.study_id).where(
                studies.c.study_name == study_name)).scalar_one()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlalchemy.Connection]:
        """One transaction, committed on leaving; LostRace where a racing insert won."""
        try:
            with self._engine.begin() as connection:
                yield connection
        except sqlalchemy.exc.IntegrityError:
            raise LostRace(f"another writer inserted the study attribute {self.key!r} "
                           "first") from None

    def _row(self) -> sqlalchemy.ColumnElement[bool]:
        return (self._table.c.study_id == self._study_id) & (self._table.c.key == self.key)

    def read(self, connection: sqlalchemy.Connection) -> str | None:
        """The attribute's stored JSON text; None where it was never written."""
        return connection.execute(sqlalchemy.select(self._table.c.value_json)
                                  .where(self._row())).scalar_one_or_none()

    def swap(self, connection: sqlalchemy.Connection, expected: str | None, new: str | None
             ) -> bool:
        """Write `new` (JSON text; None stores JSON null) where the stored text is still
        `expected`; whether it was. Where there is no row yet, a racing writer's insert makes
        ours fail: the transaction raises LostRace."""
        value = "null" if new is None else new
        if expected is None and self.read(connection) is None:
            connection.execute(sqlalchemy.insert(self._table).values(
                study_id=self._study_id, key=self.key, value_json=value))
            return True
        changed = connection.execute(sqlalchemy.update(self._table).where(
            self._row() & (self._table.c.value_json == (expected or "null")))
            .values(value_json=value))
        return changed.rowcount == 1

    def close(self) -> None:
        self._engine.dispose()


def end_in_store(study: optuna.Study, trial: optuna.trial.FrozenTrial,
                 attributes: Mapping[str, Any],
                 state: optuna.trial.TrialState = optuna.trial.TrialState.FAIL,
                 values: Sequence[float] | None = None) -> None:
    """End `trial` (RUNNING or WAITING) in `state` (failed by default) with `values`, with
    `attributes` among its user attributes."""
    storage = study._storage  # noqa: SLF001 - the public API cannot end a WAITING trial
    trial_id = trial._trial_id  # noqa: SLF001
    for key, value in attributes.items():
        storage.set_trial_user_attr(trial_id, key, value)
    storage.set_trial_state_values(trial_id, state=state,
                                   values=None if values is None else list(values))


def sqlite_tables(database: Path) -> set[str]:
    """The tables of a SQLite file, read-only; empty where it is not a readable database (the
    store's own open then says why)."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{quote(str(database))}?mode=ro",
                                                uri=True)) as connection:
            return {row[0] for row in connection.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError:
        return set()
