"""Where studies live, and what goes wrong reaching them. Torch- and Ray-free: the spec, the driver
and every reader share these rules.

A study's store is an Optuna RDB URL: by default `RUNS/STUDY.db` (SQLite), where RUNS is the
`--runs-dir` / `runs_dir` argument, else the `RESNET_ABLATE_RUNS` environment variable, else
`runs` under the working folder. The CLI and the Python API resolve it the same way.

A study's name becomes file names there (`STUDY.db`, `STUDY.artifacts/`, `STUDY.checkpoints/`)
and part of a URL, so it is held to one plain alphabet (`STUDY_NAME_ALPHABET`): no character that a
path or a URL reads as syntax (`/`, `%`, `?`, `#`, spaces, `..`) can reach either.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

RUNS_ENVIRONMENT_VARIABLE = "RESNET_ABLATE_RUNS"


class ResultsError(LookupError):
    """A study, storage, column or value that does not exist; the message names what does."""

PathLike = str | os.PathLike[str]

# Letters, digits and `._-`, starting with a letter or digit: a file name on every platform, and
# text that neither a path (`/`, `..`, a leading `.`) nor a URL (`%`, `?`, `#`) reads as syntax.
STUDY_NAME_MAX_LENGTH = 100
STUDY_NAME_PATTERN = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{STUDY_NAME_MAX_LENGTH - 1}}}")
STUDY_NAME_ALPHABET = (f"1 to {STUDY_NAME_MAX_LENGTH} ASCII letters, digits, '.', '_' and '-', "
                       "starting with a letter or digit, without '..', not ending in '.db' "
                       "(the query commands read such a name as a store file)")


class StudyNameError(ValueError, ResultsError):
    """A study name outside STUDY_NAME_ALPHABET; the message names the value and the alphabet.
    A ResultsError too: looking a study up by such a name is a lookup problem like the rest."""


def study_name_problem(name: object) -> str | None:
    """Why `name` cannot name a study (a clause quoting it), or None for a usable name."""
    if isinstance(name, str) and STUDY_NAME_PATTERN.fullmatch(name) and ".." not in name \
            and not name.lower().endswith(".db"):
        return None
    shown = repr(name)
    if len(shown) > 60:
        shown = f"{shown[:60]}... ({len(name) if isinstance(name, str) else len(shown)} characters)"
    return (f"{shown} is not a usable name: a study's name names its files in the runs folder, "
            f"so it is {STUDY_NAME_ALPHABET}")


def check_study_name(name: str) -> str:
    """`name` if it is a usable study name; else StudyNameError naming it and the alphabet."""
    problem = study_name_problem(name)
    if problem is not None:
        raise StudyNameError(f"study {problem}")
    return name


def study_file(study: str, suffix: str, folder: PathLike) -> Path:
    """`folder/STUDY<suffix>`, the path of one of a study's files (its store, its artifacts, its
    checkpoints). The name is checked against the alphabet; and, should that check ever loosen,
    the path is still refused unless it is a direct child of `folder` once `..` is resolved
    (symbolic links are not followed: a store linked from elsewhere is the user's choice)."""
    check_study_name(study)
    path = Path(folder) / f"{study}{suffix}"
    if Path(os.path.abspath(path)).parent != Path(os.path.abspath(folder)):
        raise StudyNameError(f"study {study!r}: its file {path} would lie outside {folder}/")
    return path


# The folders a study keeps beside its store: kept weights, and Ray Train's checkpoints.
ARTIFACTS_SUFFIX = ".artifacts"
CHECKPOINTS_SUFFIX = ".checkpoints"


def study_folder_holding(path: PathLike) -> Path | None:
    """The study folder (`STUDY.artifacts/`, `STUDY.checkpoints/`) that `path` lies in once links
    and `..` are resolved, or None: nothing but the study itself writes there."""
    real = Path(os.path.realpath(path))
    return next((folder for folder in real.parents
                 if folder.name.endswith((ARTIFACTS_SUFFIX, CHECKPOINTS_SUFFIX))), None)


SQLITE_MAGIC = b"SQLite format 3\x00"
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format: a trial's kept weights, a checkpoint


def holds_results(path: PathLike) -> str | None:
    """Why writing `path` would lose recorded results, or None: it lies in a study's own folder
    (kept weights, checkpoints), or it is a SQLite database (a study's store, whatever path names
    it) or a zip archive (saved weights). Every writer of tables, reports and plots asks."""
    study_folder = study_folder_holding(path)
    if study_folder is not None:
        return f"lies in {study_folder}, a study's own folder (kept weights, checkpoints)"
    database = _companion_of(Path(path))
    if database is not None:
        # SQLite takes such a file, present or not, for the database's own: a table written
        # there made every later query on the store fail (an audit), and over a live one could
        # lose its last transactions.
        return (f"is where SQLite keeps the rollback journal or write-ahead log of "
                f"{database.name}, a SQLite database (a study's store?)")
    if not Path(path).is_file():
        return None  # nothing there yet, or a device such as /dev/null
    try:
        with open(path, "rb") as f:
            head = f.read(len(SQLITE_MAGIC))
    except OSError as error:
        return f"cannot be read to check what it is ({error.strerror})"
    if head == SQLITE_MAGIC:
        return "is a SQLite database (a study's store?)"
    if head.startswith(ZIP_MAGIC):
        return "is a zip archive (saved weights?)"
    return None


SQLITE_COMPANIONS = ("-journal", "-wal", "-shm")


def _companion_of(path: Path) -> Path | None:
    """The SQLite database `path` would be the journal, log or shared memory of, or None."""
    for suffix in SQLITE_COMPANIONS:
        if path.name.endswith(suffix) and len(path.name) > len(suffix):
            database = path.with_name(path.name[: -len(suffix)])
            if _starts_with(database, SQLITE_MAGIC):
                return database
    return None


def _starts_with(path: Path, magic: bytes) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(magic)) == magic
    except OSError:
        return False


def refuse_to_lose_results(path: PathLike, named: str | None = None) -> None:
    """ResultsError where writing `path` would lose recorded results (holds_results), forced or
    not; `named` is how the message names the path (default: the path)."""
    reason = holds_results(path)
    if reason is not None:
        raise ResultsError(f"{named or path}: {reason}; refusing to write over recorded results, "
                           "whatever the options: name a file elsewhere")


def runs_folder(runs_dir: PathLike | None = None) -> Path:
    """The runs folder: `runs_dir` if given, else $RESNET_ABLATE_RUNS, else ./runs."""
    if runs_dir is not None:
        return Path(runs_dir)
    return Path(os.environ.get(RUNS_ENVIRONMENT_VARIABLE) or "runs")


def default_storage(study: str, runs_dir: PathLike | None = None) -> str:
    """Where a study is stored unless its spec or the command line says otherwise:
    RUNS/STUDY.db; StudyNameError for a name outside the alphabet."""
    return sqlite_url(study_file(study, '.db', runs_folder(runs_dir)))


# What a database URL would read otherwise in a file's path: SQLAlchemy decodes %XX in it and
# ends it at a `?` (a folder `runs?x=1` put the store in a file `runs`), and a SQLite URI
# filename ends at a `#`.
_URL_SPECIAL = {"%": "%25", "?": "%3F", "#": "%23"}


def sqlite_url(path: PathLike) -> str:
    """The `sqlite:///` storage URL of the database file at `path`, whatever its characters."""
    return "sqlite:///" + "".join(_URL_SPECIAL.get(c, c) for c in os.fspath(path))


def sqlite_path(storage: str) -> Path | None:
    """The database file of a `sqlite:///` storage URL (also in SQLite's `file:...?mode=ro&uri=true`
    form, percent-encoded once more for SQLite itself); None for other storages. As SQLAlchemy
    reads it: up to its query, percent-decoded."""
    if not storage.startswith("sqlite:///"):
        return None
    path = unquote(storage.removeprefix("sqlite:///").split("?")[0])
    if path.startswith("file:"):
        path = unquote(path.removeprefix("file:"))
    return Path(path)


def store_tag(storage: str) -> str:
    """Eight hex digits naming one store: of a SQLite file's absolute path, else of the URL
    without its password. A kept weights file carries it, so that two stores of one study in one
    folder (runs/a.db, and runs/b.db copied from it) never write one file."""
    database = sqlite_path(storage)
    if database is not None:
        identity = os.path.abspath(database)
    else:
        parts = urlsplit(storage)
        host = parts.netloc.rsplit("@", 1)
        user = host[0].split(":", 1)[0] + "@" if len(host) == 2 else ""
        identity = urlunsplit(parts._replace(netloc=user + host[-1]))
    return hashlib.sha1(identity.encode()).hexdigest()[:8]


def file_in_the_way(path: PathLike) -> Path | None:
    """The first of `path`'s folders that exists as a file (so nothing can be written under it),
    or None."""
    return next((p for p in Path(path).parents if p.exists() and not p.is_dir()), None)


def weights_folder(storage: str, runs_dir: PathLike | None = None) -> Path:
    """The folder a study's kept weights are recorded relative to: a SQLite store's own folder
    (the store and its weights move together), else the runs folder."""
    database = sqlite_path(storage)
    return database.parent if database is not None else runs_folder(runs_dir)


class StoreError(RuntimeError):
    """A study's store cannot be opened, read or written; the message says why and what to do."""


@contextlib.contextmanager
def store_faults(url: str) -> Iterator[None]:
    """Within: a database fault becomes one StoreError naming the store and the likely cure."""
    import optuna
    import sqlalchemy

    try:
        yield
    except sqlalchemy.exc.NoSuchModuleError:
        raise StoreError(f"storage URL {url!r} names a database this installation cannot open; "
                         "expected an Optuna RDB URL such as sqlite:///runs/STUDY.db or "
                         "postgresql+psycopg://USER@HOST/DATABASE") from None
    except sqlalchemy.exc.ArgumentError:
        raise StoreError(f"cannot parse the storage URL {url!r}; expected an Optuna RDB URL such "
                         "as sqlite:///runs/STUDY.db or postgresql://USER@HOST/DATABASE") from None
    except sqlalchemy.exc.SQLAlchemyError as error:
        raise StoreError(f"study store {url}: {_reason(error)}") from None
    except ImportError as error:
        if "DB access module" not in str(error):  # Optuna's words for a missing database driver
            raise
        missing = error.__cause__ or error
        raise StoreError(f"study store {url}: its database driver is not installed ({missing}); "
                         "install it, or use sqlite:/// or postgresql+psycopg:// (pip install -e "
                         "\".[cluster]\")") from None
    except optuna.exceptions.StorageInternalError as error:
        # Optuna wraps database errors in its own ("invalid data in the commit, e.g. exceeding
        # max length"), which would mislead: the database's own error says what happened.
        cause = error.__cause__ or error.__context__
        if cause is None:
            raise
        raise StoreError(f"study store {url}: {_reason(cause)}") from None
    except (ValueError, AssertionError, IndexError, KeyError) as error:
        # A record Optuna cannot read back (bad JSON, bytes that are not UTF-8, a value its
        # model rejects, a parameter's index out of its choices): the store is damaged,
        # whichever of its readers met it first.
        if not _raised_reading_the_store(error):
            raise
        what = f"{type(error).__name__}: {error}".strip().rstrip(":").splitlines()[0]
        raise StoreError(f"study store {url}: a record in it cannot be read ({what}); it is "
                         "damaged: restore it from a copy") from None


def _raised_reading_the_store(error: BaseException) -> bool:
    """Whether `error` was raised inside Optuna's storage code (reading or writing records)."""
    frame = error.__traceback__
    while frame is not None:
        if f"{os.sep}optuna{os.sep}storages{os.sep}" in frame.tb_frame.f_code.co_filename:
            return True
        frame = frame.tb_next
    return False


def _reason(error: Exception) -> str:
    cause = str(getattr(error, "orig", None) or error).strip().splitlines()[0]
    text = cause.lower()
    if "file is not a database" in text or "malformed" in text or "no such table" in text:
        return (f"not a readable study store ({cause}); it is not an Optuna database or it is "
                "damaged: point --storage at the study's .db file, or restore it from a copy")
    if "disk is full" in text or "no space left" in text:
        return (f"the disk is full ({cause}); free space and run the study again: its completed "
                "trials are kept and it resumes")
    if "readonly" in text or "read-only" in text:
        # (also a query's, where SQLite finds a journal beside the store to roll back: one
        # written there by hand made every query fail with this, naming the driver: an audit)
        return (f"cannot write ({cause}); opening a study store may write to it, a query's too "
                "(SQLite rolls back a journal it finds beside the store), so the store and its "
                "folder need write access")
    if "unable to open database file" in text:
        return f"cannot open the file ({cause}); does its folder exist, and may it be written?"
    if "authentication" in text or "password" in text:
        return f"refused the credentials ({cause}); check the URL's user and password"
    if "connect" in text or "could not translate host name" in text or "timeout" in text:
        return f"cannot connect ({cause}); is the database server up and the URL's host right?"
    return f"{type(error).__name__}: {cause}"
