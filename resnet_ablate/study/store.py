"""The study in its store: opening it (and recognising it), the driver's lease, store faults.

The driver is the only writer of a study's store; workers only compute. A store is any Optuna RDB
URL (SQLite file, PostgreSQL); every way of failing to reach one ends in one `StoreError` line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import sqlite3
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import optuna
import sqlalchemy

from ..arch import ResNetArch
from ..recipe import EXECUTION_ONLY
from ..record import StudyKey
from ..spec import IntRange, SpecError, StudySpec, parse_spec
from ..storage import StoreError, file_in_the_way, sqlite_path, store_faults

optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress display says what happens

# The spec sections whose meaning defines a study: another meaning is another study.
SECTIONS_THAT_DEFINE_A_STUDY = ("dataset", "model", "space", "objectives", "train",
                                "warmup_from_depth")


class StudyConflict(RuntimeError):
    """The named study exists in the storage but was created from a different spec."""


class StudyBusy(RuntimeError):
    """Another live driver is running this study."""


def connect_storage(url: str, attempts: int = 5) -> optuna.storages.BaseStorage:
    """Optuna's storage for `url`. Drivers that start together on a new database race to create
    its tables (and PostgreSQL's enum types); the loser sees a duplicate-object error and simply
    connects again. Any other fault is reported at once."""
    with store_faults(url):
        for attempt in range(attempts):
            try:
                return optuna.storages.get_storage(url)
            except sqlalchemy.exc.DBAPIError as error:
                lost_race = isinstance(error, sqlalchemy.exc.IntegrityError) \
                    or "already exists" in str(error.orig)
                if not lost_race or attempt == attempts - 1:
                    raise
                time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------------------------
# Which study a spec is


def fingerprint(spec: StudySpec) -> dict[str, Any]:
    """The sections of the spec's YAML that define the study, as written (stored with it)."""
    raw = dict(spec.raw or {})
    return {section: raw.get(section) for section in SECTIONS_THAT_DEFINE_A_STUDY}


def meaning(fingerprint: Mapping[str, Any]) -> dict[str, Any] | None:
    """What a fingerprint's sections mean once parsed, so that two spellings of one study compare
    equal (`dataset: digits` and `dataset: {name: digits}`), and choices of how trials execute
    (memory format, compilation, CUDA graphs, check interval) do not make another study. None
    where the stored sections no longer parse (then they must match as written)."""
    sections = {k: v for k, v in fingerprint.items() if v is not None}
    train = {k: v for k, v in (sections.get("train") or {}).items() if k not in EXECUTION_ONLY}
    try:
        # The random sampler takes every kind of space (lists and ranges); which sampler and
        # budget the spec has does not define the study.
        parsed = parse_spec({"study": "fingerprint", **sections, "train": train,
                             "sampler": "random", "budget": {"trials": 1}})
    except SpecError:
        return None
    arch_defaults = {f.name: f.default for f in dataclasses.fields(ResNetArch)}
    return {
        "dataset": dataclasses.asdict(parsed.dataset),
        "model": {k: v for k, v in parsed.model.items() if v != arch_defaults.get(k, object())},
        "space": {name: dataclasses.asdict(v) if isinstance(v, IntRange) else list(v)
                  for name, v in parsed.space.items()},
        "objectives": list(parsed.objectives),
        "train": {k: v for k, v in parsed.train.to_dict().items() if k not in EXECUTION_ONLY},
        "warmup_from_depth": parsed.warmup_from_depth,
    }


def same_study(stored: Mapping[str, Any], current: Mapping[str, Any]) -> bool:
    as_written = json.dumps(stored, sort_keys=True) == json.dumps(current, sort_keys=True)
    stored_meaning = meaning(stored)
    return as_written or (stored_meaning is not None and stored_meaning == meaning(current))


def open_study(spec: StudySpec, storage: str | optuna.storages.BaseStorage, *,
               sampler: optuna.samplers.BaseSampler | None = None,
               pruner: optuna.pruners.BasePruner | None = None) -> optuna.Study:
    """Create the spec's study in `storage`, or reopen it after checking it was made from this spec."""
    from . import space

    url = storage if isinstance(storage, str) else "the study store"
    with store_faults(url):
        backend = connect_storage(storage) if isinstance(storage, str) else storage
        study = optuna.create_study(
            study_name=spec.study, storage=backend, directions=spec.directions,
            sampler=sampler or space.sampler(spec), pruner=pruner or space.pruner(spec),
            load_if_exists=True,
        )
        current = fingerprint(spec)
        stored = study.user_attrs.get(StudyKey.SPEC)
        if stored is None:
            study.set_user_attr(StudyKey.SPEC, current)
            study.set_user_attr(StudyKey.SPEC_SOURCE, spec.source)
            study.set_user_attr(StudyKey.QUESTION, spec.question)
            study.set_user_attr(StudyKey.OBJECTIVES, list(spec.objectives))
            study.set_user_attr(StudyKey.SEEDS, list(spec.seeds))
        elif not same_study(stored, current):
            differ = [s for s in SECTIONS_THAT_DEFINE_A_STUDY if stored.get(s) != current.get(s)]
            raise StudyConflict(
                f"study {spec.study!r} in {url} was created from a different spec "
                f"({', '.join(differ)} differ: stored {[stored.get(s) for s in differ]}, "
                f"{spec.source} has {[current.get(s) for s in differ]}); its recorded trials are "
                "kept: give this spec another study name, or point it at another storage"
            )
        if spec.adaptive_seeds is not None:
            study.set_user_attr(StudyKey.SEED_RULE, (spec.raw or {}).get("seeds"))
        if study.metric_names is None:  # optuna-dashboard and the optuna CLI then name them
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names(list(spec.objectives))
    return study


# ----------------------------------------------------------------------------------------------
# A write that must not be given up: the stop's

LOCKED_RETRY_SECONDS = 30.0  # how long a stop's writes retry a SQLite store that another holds
_T = TypeVar("_T")


def _locked(error: BaseException | None) -> bool:
    while error is not None:
        if "database is locked" in str(getattr(error, "orig", None) or error):
            return True
        error = error.__cause__ or error.__context__
    return False


def retry_while_locked(write: Callable[[], _T], bound: float = LOCKED_RETRY_SECONDS) -> _T:
    """`write()`, tried again while a SQLite store answers "database is locked" (another
    process holds its write lock: a reader's long transaction, a second driver taking the
    lease), for up to `bound` seconds; other faults at once. For the writes a stop must make
    (marking unfinished trials, releasing the lease): given up, they would leave trials RUNNING
    and the lease to a process about to exit."""
    deadline = time.monotonic() + bound
    while True:
        try:
            return write()
        except (sqlalchemy.exc.OperationalError, optuna.exceptions.StorageInternalError) as error:
            if not _locked(error) or time.monotonic() >= deadline:
                raise
            time.sleep(0.25)


# ----------------------------------------------------------------------------------------------
# One driver per study

LEASE_SECONDS = 60.0  # a driver that has not renewed its lease for this long is presumed dead
LEASE_RENEW_SECONDS = 15.0


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


class DriverLease:
    """One driver per study: a lease in the study's attributes, renewed while the driver runs.

    A second driver is refused while the lease is live. A lease whose driver died is taken over at
    once on the same host (the process is gone) and after LEASE_SECONDS elsewhere. Taking and
    renewing it are atomic in the store, for SQLite and PostgreSQL alike: an insert that the
    (study, key) uniqueness of Optuna's attribute table lets only one driver make, or an update
    conditional on the value the driver read, so two drivers that read the same free lease cannot
    both take it.
    """

    def __init__(self, study: optuna.Study, url: str) -> None:
        self.study = study
        self.url = url
        self.me = {"host": socket.gethostname(), "pid": os.getpid()}
        self.renewed = 0.0
        self._held: str | None = None  # the stored text of our lease, while we hold it
        self._file = self._file_identity()  # a SQLite store's file, to notice it vanish
        self._engine = sqlalchemy.create_engine(
            url, connect_args={"timeout": 30} if url.startswith("sqlite") else {},
            poolclass=sqlalchemy.pool.NullPool)
        self._table = sqlalchemy.table("study_user_attributes", sqlalchemy.column("study_id"),
                                       sqlalchemy.column("key"), sqlalchemy.column("value_json"))
        studies = sqlalchemy.table("studies", sqlalchemy.column("study_id"),
                                   sqlalchemy.column("study_name"))
        with store_faults(url), self._engine.connect() as connection:
            self._study_id = connection.execute(sqlalchemy.select(studies.c.study_id).where(
                studies.c.study_name == study.study_name)).scalar_one()

    def _file_identity(self) -> tuple[int, int] | None:
        database = sqlite_path(self.url)
        try:
            status = database.stat() if database is not None else None
        except FileNotFoundError:
            return (-1, -1)
        return None if status is None else (status.st_dev, status.st_ino)

    def check_same_file(self) -> None:
        """StoreError if a SQLite store's file is not the one this driver opened (SQLite itself
        then reports only "attempt to write a readonly database")."""
        if self._file is not None and self._file_identity() != self._file:
            raise StoreError(
                f"study store {self.url}: the file was deleted or replaced while this driver ran; "
                "this run's trials were written to the old file and are lost with it. Restore "
                "the store from a copy or start again; never move a store while its study runs")

    def _row(self):
        return (self._table.c.study_id == self._study_id) & (self._table.c.key == StudyKey.DRIVER)

    def _read(self, connection) -> str | None:
        return connection.execute(sqlalchemy.select(self._table.c.value_json)
                                  .where(self._row())).scalar_one_or_none()

    def _swap(self, connection, expected: str | None, new: str | None) -> bool:
        """Write `new` where the stored lease is still `expected`; whether it was. Where there is
        no lease row yet, a racing driver's insert makes ours raise IntegrityError."""
        value = "null" if new is None else new
        if expected is None and self._read(connection) is None:
            connection.execute(sqlalchemy.insert(self._table).values(
                study_id=self._study_id, key=StudyKey.DRIVER, value_json=value))
            return True
        changed = connection.execute(sqlalchemy.update(self._table).where(
            self._row() & (self._table.c.value_json == (expected or "null"))).values(value_json=value))
        return changed.rowcount == 1

    def _mine(self) -> str:
        return json.dumps({**self.me, "renewed": time.time()})

    def acquire(self) -> None:
        with store_faults(self.url):
            while True:
                try:
                    with self._engine.begin() as connection:
                        stored = self._read(connection)
                        held = json.loads(stored) if stored else None
                        if held and {k: held.get(k) for k in self.me} != self.me:
                            self._refuse_unless_dead(held)
                        mine = self._mine()
                        if self._swap(connection, stored, mine):
                            self._held, self.renewed = mine, time.monotonic()
                            return
                except sqlalchemy.exc.IntegrityError:
                    continue  # another driver inserted the first lease: read it again
                # Another driver changed the lease between our read and our update: read again.

    def _refuse_unless_dead(self, held: Mapping[str, Any]) -> None:
        age = time.time() - held.get("renewed", 0)
        dead = held.get("host") == self.me["host"] and not _process_alive(held.get("pid", -1))
        if age < LEASE_SECONDS and not dead:
            raise StudyBusy(
                f"study {self.study.study_name!r} is being run by driver pid {held.get('pid')} on "
                f"{held.get('host')} (lease renewed {age:.0f} s ago); wait for it, or stop it and "
                "run this command again")

    def renew(self, force: bool = False) -> None:
        """Extend the lease; StudyBusy if another driver has taken it over meanwhile, StoreError
        if a SQLite store's file was deleted or replaced (what this run records would be lost
        with the old file)."""
        self.check_same_file()
        if not force and time.monotonic() - self.renewed <= LEASE_RENEW_SECONDS:
            return
        with store_faults(self.url), self._engine.begin() as connection:
            mine = self._mine()
            if not self._swap(connection, self._held, mine):
                stored = self._read(connection)
                held = json.loads(stored) if stored else {}
                self._held = None
                raise StudyBusy(f"study {self.study.study_name!r} was taken over by driver pid "
                                f"{held.get('pid')} on {held.get('host')} while this one ran")
            self._held, self.renewed = mine, time.monotonic()

    def release(self) -> None:
        """Give the lease up, unless another driver has taken it over; a locked SQLite store is
        retried (`retry_while_locked`). Should it fail all the same, the lease names this
        process, which is about to exit, and the next driver on this host takes it over at once."""
        if self._held is None or self._file_identity() != self._file:
            return

        def give_up() -> None:
            with self._engine.begin() as connection:
                self._swap(connection, self._held, None)

        with store_faults(self.url):
            retry_while_locked(give_up)
        self._held = None
        self._engine.dispose()


def check_store_folder(url: str) -> None:
    """A SQLite store's path must lead through folders, and an existing file there must be empty
    or a study store: refused with a StoreError otherwise, before anything is written."""
    database = sqlite_path(url)
    if database is None:
        return
    folder = file_in_the_way(database)
    if folder is not None:
        raise StoreError(f"study store {url}: {folder} is a file, not a folder; pass "
                         "--runs-dir (or --storage) naming a folder")
    if database.exists() and not database.is_file():
        raise StoreError(f"study store {url}: {database} is not a file")
    if database.is_file() and database.stat().st_size:
        tables = _sqlite_tables(database)
        if tables and "studies" not in tables:
            raise StoreError(f"study store {url}: {database} is a SQLite database of something "
                             f"else (tables: {', '.join(sorted(tables)[:5])}); it is left as it "
                             "is: point --storage or --runs-dir at a new file")


def prepare_store_folder(url: str) -> None:
    """`check_store_folder`, then a SQLite store's folder is made on first use."""
    check_store_folder(url)
    database = sqlite_path(url)
    if database is not None:
        database.parent.mkdir(parents=True, exist_ok=True)


def _sqlite_tables(database: Path) -> set[str]:
    """The tables of a SQLite file, read-only; empty where it is not a readable database (the
    store's own open then says why)."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{quote(str(database))}?mode=ro",
                                                uri=True)) as connection:
            return {row[0] for row in connection.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError:
        return set()
