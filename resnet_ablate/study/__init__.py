"""Running a study: the driver asks Optuna for trials, runs them as Ray tasks, and records them.

The driver alone writes the study's store; Ray workers only compute (worker.py). Its parts, one
concern each:

    runner.py    StudyRunner, run_study, plan_study: the public face, wiring the parts below
    loop.py      one run: fill free workers, collect ended trials, show progress; stopping cleanly
    grid.py      a grid's points: settled, pending, retried; the dry run's plan
    recorder.py  every write of a trial's record (ask, launch, finish, fail, interrupted)
    store.py     opening the study in its store, which spec it is, the driver's lease, store faults
    space.py     the search space as Optuna sees it: distributions, samplers, pruners
    cluster.py   Ray: connecting, launching trials, the mailbox for epochs and pruning verdicts
    costs.py     the data set's shape and each architecture's parameters and FLOPs
    signals.py   SIGTERM as a clean stop, and clean-up that a second signal cannot cut short
"""

from ..worker import library_versions
from .cluster import ClusterError
from .grid import PlannedTrial
from .runner import RunOptions, RunSummary, StudyRunner, plan_study, run_study
from .signals import StopRequested
from ..storage import StoreError
from .store import DriverLease, StudyBusy, StudyConflict, open_study

__all__ = ["ClusterError", "DriverLease", "PlannedTrial", "RunOptions", "RunSummary",
           "StopRequested", "StoreError", "StudyBusy", "StudyConflict", "StudyRunner",
           "library_versions", "open_study", "plan_study", "run_study"]
