"""The trial record, defined once: what a study stores for each trial and for itself (keys.py),
the metrics a trial is judged by (metrics.py), and a trial's round trip between the driver and
its worker (round_trip.py: the task, each epoch's record, the outcome). Torch-free: the spec, the
driver and every reader import it.

Optuna keeps a trial's swept parameters and objective values; everything else a trial records is
one of its user attributes, named by `TrialKey`. The driver writes them (study/recorder.py);
results, the report and the command line read them, and every metric is derived from them by
`metric_values` alone. Accuracy and error convert into each other by `complement` alone.
"""

from __future__ import annotations

from .keys import (INTERRUPTED_STATE, TOOLKIT, FailureKind, StudyKey, TrialKey, shown_state,
                   untrained_draw)
from .metrics import (DIRECTIONS, ERROR_RATES, METRICS, OBJECTIVES, PERCENT_RATES,
                      TEST_SET_RATES, VIEW_METRIC_NAMES, VIEW_METRICS, Direction, Metric, complement,
                      is_complement, metric_values, pack_outcomes, unpack_outcomes)
from .round_trip import (PRUNABLE_OBJECTIVES, DataParallelRecord, EpochRecord, ExecutionRecord,
                         FinalEvaluation, Placement, Status, Timings, TrialOutcome, TrialTask,
                         epoch_objective)

__all__ = ["DIRECTIONS", "ERROR_RATES", "INTERRUPTED_STATE", "METRICS", "OBJECTIVES",
           "PERCENT_RATES", "PRUNABLE_OBJECTIVES", "TEST_SET_RATES", "TOOLKIT", "VIEW_METRIC_NAMES", "VIEW_METRICS",
           "DataParallelRecord", "Direction", "EpochRecord", "ExecutionRecord", "FailureKind",
           "FinalEvaluation", "Metric", "Placement", "Status", "StudyKey", "Timings", "TrialKey",
           "TrialOutcome", "TrialTask", "complement", "epoch_objective", "is_complement",
           "metric_values", "pack_outcomes", "shown_state", "unpack_outcomes", "untrained_draw"]
