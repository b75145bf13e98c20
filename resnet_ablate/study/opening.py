"""Opening a spec's study in its store: created, or reopened after checking that it was made from
this spec (its fingerprint); the store's folder checked before anything is written; and the
retry that the writes of a stop need while another process holds a SQLite store's lock.

The driver is the only writer of a study's store (its lease: lease.py); workers only compute. A
store is any Optuna RDB URL (SQLite file, PostgreSQL); every way of failing to reach one ends in
one `StoreError` line (storage.py). Where Optuna's public API does not reach: optuna_tables.py.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import optuna
import sqlalchemy

from ..recipe import EXECUTION_ONLY
from ..record import StudyKey
from ..spec import MAX_CPUS, IntRange, SpecError, StudySpec, parse_spec
from ..spec.dataset import DATASET_EXECUTION_ONLY
from ..spec.space import CHECKED_POINTS
from ..storage import StoreError, file_in_the_way, sqlite_path, store_faults
from .optuna_tables import STUDIES_TABLE, sqlite_tables

optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress display says what happens

# The spec sections whose meaning defines a study: another meaning is another study.
SECTIONS_THAT_DEFINE_A_STUDY = ("dataset", "model", "space", "objectives", "train",
                                "warmup_from_depth")


class StudyConflict(RuntimeError):
    """The named study exists in the storage but was created from a different spec."""


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
        # The random sampler takes every kind of space (lists and ranges); which sampler,
        # budget and resources the spec has does not define the study (the CPUs: enough for any
        # data set's decoding workers).
        parsed = parse_spec({"study": "fingerprint", **sections, "train": train,
                             "sampler": "random", "budget": {"trials": 1},
                             "resources": {"cpus": MAX_CPUS}})
    except SpecError:
        return None
    return {
        "dataset": {k: v for k, v in dataclasses.asdict(parsed.dataset).items()
                    if k not in DATASET_EXECUTION_ONLY},
        # The network each point of the space builds, resolved (`block: basic` written out on
        # CIFAR is what the family builds anyway; on ImageNet at depth 50 it is another network),
        # as many points as the spec's own check builds, in no order (the space's keys may be
        # listed in any).
        "model": sorted(json.dumps([sorted(point.items()), dataclasses.asdict(parsed.arch(point))],
                                   sort_keys=True, default=str)
                        for point in itertools.islice(parsed.grid(), CHECKED_POINTS)),
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


def _only_root_differs(stored: Mapping[str, Any], current: Mapping[str, Any]) -> bool:
    """Whether two fingerprints' data sets differ in their root alone (and how data is read)."""
    def without_root(fingerprint):
        dataset = fingerprint.get("dataset")
        return {k: v for k, v in dataset.items() if k not in ("root", *DATASET_EXECUTION_ONLY)} \
            if isinstance(dataset, Mapping) else dataset
    return without_root(stored) == without_root(current)


def _check_sampler(study: optuna.Study, spec: StudySpec, url: str) -> None:
    """Refuse a grid study reopened with a sampler, or a sampler's with grid: the sampler would
    train configurations and seeds the grid already has (and the grid would not count the
    sampler's trials as its points). random and tpe may take each other's place."""
    stored = study.user_attrs.get(StudyKey.SAMPLER)
    if stored is None:  # a store from before the sampler was recorded: its trials say
        trials = study.get_trials(deepcopy=False)
        stored = "grid" if any("fixed_params" in t.system_attrs for t in trials) else None
    if stored is not None and stored != spec.sampler and "grid" in (stored, spec.sampler):
        raise StudyConflict(
            f"study {spec.study!r} in {url} was run with sampler: {stored}, and {spec.source} has "
            f"sampler: {spec.sampler}: a grid's trials and a sampler's do not mix; keep sampler: "
            f"{stored}, or give this spec another study name")


def _casefolded(section: Any) -> str:
    """A spec section as JSON, case-folded: what two spellings of the same levels share."""
    return json.dumps(section, sort_keys=True).casefold()


def open_study(spec: StudySpec, storage: str | optuna.storages.BaseStorage, *,
               sampler: optuna.samplers.BaseSampler | None = None,
               pruner: optuna.pruners.BasePruner | None = None) -> optuna.Study:
    """Create the spec's study in `storage`, or reopen it after checking it was made from this
    spec (`check_same_study`); a reworded `question` replaces the stored one."""
    from . import space

    url = storage if isinstance(storage, str) else "the study store"
    with store_faults(url):
        backend = connect_storage(storage) if isinstance(storage, str) else storage
        study = optuna.create_study(
            study_name=spec.study, storage=backend, directions=spec.directions,
            sampler=sampler or space.sampler(spec), pruner=pruner or space.pruner(spec),
            load_if_exists=True,
        )
        if study.user_attrs.get(StudyKey.SPEC) is None:
            study.set_user_attr(StudyKey.SAMPLER, spec.sampler)
            study.set_user_attr(StudyKey.SPEC, fingerprint(spec))
            study.set_user_attr(StudyKey.SPEC_SOURCE, spec.source)
            study.set_user_attr(StudyKey.QUESTION, spec.question)
            study.set_user_attr(StudyKey.OBJECTIVES, list(spec.objectives))
            study.set_user_attr(StudyKey.SEEDS, list(spec.seeds))
        else:
            check_same_study(study, spec, url)
            if study.user_attrs.get(StudyKey.QUESTION) != spec.question:
                study.set_user_attr(StudyKey.QUESTION, spec.question)  # words, not meaning
        if sampler is None and spec.sampler != "grid":  # drawing on from the recorded trials
            study.sampler = space.sampler(spec, len(study.get_trials(deepcopy=False)))
        # The rule the study's seeds follow (None: fixed seeds), replaced only where the
        # checks let it change (before any trial): results read the intervals with it.
        rule = (spec.raw or {}).get("seeds") if spec.adaptive_seeds is not None else None
        if study.user_attrs.get(StudyKey.SEED_RULE) != rule:
            study.set_user_attr(StudyKey.SEED_RULE, rule)
        if study.metric_names is None:  # optuna-dashboard and the optuna CLI then name them
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names(list(spec.objectives))
    return study


def read_study(spec: StudySpec, storage: str) -> optuna.Study:
    """The spec's existing study, checked as `open_study` checks it, and nothing written: what a
    dry run reads (it rewrote the stored seed rule, and a store it may not write refused it)."""
    with store_faults(storage):
        study = optuna.load_study(study_name=spec.study, storage=storage)
        if study.user_attrs.get(StudyKey.SPEC) is not None:
            check_same_study(study, spec, storage)
    return study


def check_same_study(study: optuna.Study, spec: StudySpec, url: str) -> None:
    """StudyConflict unless `study` (which has a stored fingerprint) was made from this spec: the
    sections that define a study mean the same, the sampler is of the same kind, and the seeds
    follow the same rule."""
    stored, current = study.user_attrs[StudyKey.SPEC], fingerprint(spec)
    if not same_study(stored, current):
        differ = [s for s in SECTIONS_THAT_DEFINE_A_STUDY if stored.get(s) != current.get(s)]
        if differ == ["space"] and (_casefolded(stored.get("space"))
                                    == _casefolded(current.get("space"))):
            # The same levels (the architecture reads `a` as `A`), but the store keys its
            # trials by the levels as written: another spelling would run them all again.
            raise StudyConflict(
                f"study {spec.study!r} in {url} spells its levels {stored.get('space')}, "
                f"and {spec.source} spells them {current.get('space')}: the same levels, "
                "but the store keys its trials by their spelling; write them as the study "
                "was created")
        if differ == ["dataset"] and _only_root_differs(stored, current):
            raise StudyConflict(
                f"study {spec.study!r} in {url} reads its data set from root "
                f"{stored['dataset'].get('root')!r}, and {spec.source} from "
                f"{current['dataset'].get('root')!r}: a study's trials are all on one data "
                "set; if it is the same data moved, give the stored root (a link from there "
                "works), else another study name")
        raise StudyConflict(
            f"study {spec.study!r} in {url} was created from a different spec "
            f"({', '.join(differ)} differ: stored {[stored.get(s) for s in differ]}, "
            f"{spec.source} has {[current.get(s) for s in differ]}); its recorded trials are "
            "kept: give this spec another study name, or point it at another storage"
        )
    _check_sampler(study, spec, url)
    _check_seed_rule(study, spec, url)


def _check_seed_rule(study: optuna.Study, spec: StudySpec, url: str) -> None:
    """Refuse another seed rule for a study that has trials: an adaptive rule's guarantee is
    for the looks made under it, and its intervals are read with it (resnet_ablate.results); a study
    run with fixed seeds has made no look to continue. Fixed seeds may grow, as ever."""
    from ..spec import adaptive_rule

    raw_seeds = (spec.raw or {}).get("seeds")
    stored = study.user_attrs.get(StudyKey.SEED_RULE)
    space = (spec.raw or {}).get("space") or {}
    current_rule = adaptive_rule(raw_seeds, space) if spec.adaptive_seeds is not None else None
    stored_rule = adaptive_rule(stored, space) if stored is not None else None
    if stored_rule == current_rule or not study.get_trials(deepcopy=False):
        return
    was = f"seeds: {stored}" if stored is not None else "fixed seeds"
    now = f"seeds: {raw_seeds}" if current_rule is not None else "fixed seeds"
    raise StudyConflict(
        f"study {spec.study!r} in {url} was run with {was}, and {spec.source} has {now}: an "
        "adaptive rule's decisions hold for the looks made under that rule, and its intervals "
        "are read with it; keep the stored seeds, or give this spec another study name")


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
        tables = sqlite_tables(database)
        if tables and STUDIES_TABLE not in tables:
            raise StoreError(f"study store {url}: {database} is a SQLite database of something "
                             f"else (tables: {', '.join(sorted(tables)[:5])}); it is left as it "
                             "is: point --storage or --runs-dir at a new file")


def prepare_store_folder(url: str) -> None:
    """`check_store_folder`, then a SQLite store's folder is made on first use."""
    check_store_folder(url)
    database = sqlite_path(url)
    if database is not None:
        database.parent.mkdir(parents=True, exist_ok=True)
