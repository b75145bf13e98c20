"""One trial as a plain Ray task: the trial's body (trial.py) in one worker process, on the CPUs
and GPUs the driver declared where it launched the task (study/cluster.py). The outcome comes back
as a typed record (record.TrialOutcome), its exceptions included, so that only a lost worker
surfaces as a Ray error. A data-parallel trial runs as a Ray Train run instead (data_parallel.py).
"""

from __future__ import annotations

from typing import Any

import ray
import torch

from .record import TrialOutcome, TrialTask
from .trial import run_stacked_body, run_trial_body


def execute(task: TrialTask, board: Any | None = None) -> TrialOutcome:
    """Run one trial in this process and return its outcome; `board` is a TrialBoard handle or
    None."""
    return run_trial_body(task, board, torch.device("cuda" if task.use_gpu else "cpu"))


@ray.remote(max_retries=0)
def run_trial(task: TrialTask, board: Any | None = None) -> TrialOutcome:
    """The Ray task of a single-process trial; resources are declared where the driver launches
    it."""
    return execute(task, board)


@ray.remote(max_retries=0)
def run_stacked_trials(task: TrialTask, board: Any | None = None) -> list[TrialOutcome]:
    """The Ray task of a stack of seeds (`task.stack`) trained as one model: one outcome per
    seed, each a trial of its own."""
    return run_stacked_body(task, board, torch.device("cuda" if task.use_gpu else "cpu"))
