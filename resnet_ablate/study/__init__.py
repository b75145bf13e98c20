"""Running a study: the driver asks Optuna for trials, runs them as Ray tasks, and records them.

The driver alone writes the study's store; Ray workers only compute (worker.py). Its parts, one
concern each:

    runner.py    StudyRunner, run_study, plan_study, trials_left: the public face, wiring the
                 parts below
    loop.py      one run: fill free workers, collect ended trials, show progress; stopping cleanly
    grid.py      a grid's points: settled, pending, retried; the dry run's plan
    recorder.py  every write of a trial's record (ask, launch, finish, fail, interrupted)
    opening.py   opening the study in its store: which spec it is, the store's folder checked
    lease.py     one driver per study: the lease taken, renewed and given up
    optuna_tables.py  the one place below Optuna's public API (the lease's atomic swap, failing
                 a WAITING trial, recognising an Optuna SQLite file)
    space.py     the search space as Optuna sees it: distributions, samplers, pruners
    cluster.py   Ray: connecting, launching trials, the mailbox for epochs and pruning verdicts
    costs.py     the data set's shape and each architecture's parameters and FLOPs
    advice.py    what a dry run advises: trials packed per GPU, seeds stacked, Ray Train's start-up
    eta.py       the time left, from the training work left (FLOPs x epochs) and its rate
    signals.py   SIGTERM and SIGHUP as clean stops, and clean-up a second signal cannot cut short
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Public name -> the module that defines it. They load on first use, so that importing one part
# (`resnet_ablate.study.opening`, say) loads neither Ray nor torch with the others.
_EXPORTS: dict[str, str] = {
    "ClusterError": ".cluster", "PlannedTrial": ".grid",
    "RunOptions": ".runner", "RunSummary": ".runner", "StudyRunner": ".runner",
    "plan_study": ".runner", "run_study": ".runner", "trials_left": ".runner",
    "StopRequested": ".signals",
    "StoreError": "..storage", "DriverLease": ".lease", "StudyBusy": ".lease",
    "StudyConflict": ".opening", "open_study": ".opening",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # what type checkers and IDEs see
    from ..storage import StoreError
    from .cluster import ClusterError
    from .grid import PlannedTrial
    from .runner import RunOptions, RunSummary, StudyRunner, plan_study, run_study, trials_left
    from .signals import StopRequested
    from .lease import DriverLease, StudyBusy
    from .opening import StudyConflict, open_study
