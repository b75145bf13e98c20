"""Where a running study stands, for its live line: the best configuration so far, or how many
are on the Pareto front, judged by each configuration's mean over its completed seeds. The best
single trial is its configuration's luckiest seed: of several equally good configurations, the one
with the widest spread of seeds would lead the line."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import optuna

from ..record import METRICS, TrialKey
from ..spec import StudySpec
from .space import SEED_PARAM


def best_so_far(spec: StudySpec, study: optuna.Study) -> str | None:
    """The live line's best configuration by its mean over completed seeds (or, with several
    objectives, how many configuration means are on the Pareto front); None before any
    trial completed."""
    complete = (optuna.trial.TrialState.COMPLETE,)
    trials = [t for t in study.get_trials(deepcopy=False, states=complete) if t.values is not None]
    if not trials:
        return None
    signs = np.array([1.0 if d == optuna.study.StudyDirection.MINIMIZE else -1.0
                      for d in study.directions])
    groups: dict[tuple, list[optuna.trial.FrozenTrial]] = defaultdict(list)
    for t in trials:
        groups[tuple(sorted((k, v) for k, v in t.params.items() if k != SEED_PARAM))].append(t)
    means = {key: signs * np.mean([t.values for t in group], axis=0)
             for key, group in groups.items()}
    if len(spec.objectives) != 1:
        return f"{len(_front(list(means.values())))} on the Pareto front of configuration means"
    best = min(means, key=lambda key: float(means[key][0]))
    seeds = len({t.user_attrs.get(TrialKey.SEED) for t in groups[best]})
    name = spec.objectives[0]
    return (f"{name} {METRICS[name].format(float(signs[0] * means[best][0]))} "
            f"({groups[best][0].user_attrs.get(TrialKey.ARCH_NAME)}, mean of {seeds} "
            f"seed{'s' if seeds != 1 else ''})")


def _front(points: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The points (every objective to be minimised) that no other point dominates."""
    return [p for p in points
            if not any(np.all(q <= p) and np.any(q < p) for q in points)]
