"""One driver per study: the lease a driver takes in the study's attributes before it writes
anything, renews while it runs and gives up when it stops. Its atomic read-and-swap in the store
is optuna_tables.AttributeCell's: the lease itself holds only the rules (who may take it, when a
driver is presumed dead)."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Mapping
from typing import Any

import optuna

from ..record import StudyKey
from ..storage import StoreError, sqlite_path, store_faults
from .opening import retry_while_locked
from .optuna_tables import AttributeCell, LostRace


class StudyBusy(RuntimeError):
    """Another live driver is running this study."""


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
    renewing it are atomic in the store (AttributeCell), so two drivers that read the same free
    lease cannot both take it.
    """

    def __init__(self, study: optuna.Study, url: str) -> None:
        self.study = study
        self.url = url
        self.me = {"host": socket.gethostname(), "pid": os.getpid()}
        self.renewed = 0.0
        self._held: str | None = None  # the stored text of our lease, while we hold it
        self._file = self._file_identity()  # a SQLite store's file, to notice it vanish
        with store_faults(url):
            self._cell = AttributeCell(url, study.study_name, StudyKey.DRIVER)

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

    def _mine(self) -> str:
        return json.dumps({**self.me, "renewed": time.time()})

    def acquire(self) -> None:
        with store_faults(self.url):
            while True:
                try:
                    with self._cell.transaction() as connection:
                        stored = self._cell.read(connection)
                        held = json.loads(stored) if stored else None
                        if held and {k: held.get(k) for k in self.me} != self.me:
                            self._refuse_unless_dead(held)
                        mine = self._mine()
                        if self._cell.swap(connection, stored, mine):
                            self._held, self.renewed = mine, time.monotonic()
                            return
                except LostRace:
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
        with store_faults(self.url), self._cell.transaction() as connection:
            mine = self._mine()
            if not self._cell.swap(connection, self._held, mine):
                stored = self._cell.read(connection)
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
            with self._cell.transaction() as connection:
                self._cell.swap(connection, self._held, None)

        with store_faults(self.url):
            retry_while_locked(give_up)
        self._held = None
        self._cell.close()
