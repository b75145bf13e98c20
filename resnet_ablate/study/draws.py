"""A random or TPE sampler's draws that cannot be trained, and the trial trained in their place.

A sampler may draw a configuration whose seeds have all been spent (TPE does so more and more as
it settles on the best configurations), or one over budget.max_gflops. Training the first again
would repeat one of its seeds bit for bit, and the second is not to be trained at all. Either is
recorded as a draw not trained, a repeat or over budget, with no seed: the store says what the
sampler drew, but the draw is no trial of the results (`record.untrained_draw`), spends no seed
and does not count against budget.trials. The trial trained in its place is a configuration
drawn at random (by a generator seeded from the spec's first seed and the draw's number: a rerun
draws alike) among those with a seed left within the ceiling: asking the sampler again instead
could go on for ever once it has settled. When none is left, the run ends, saying why.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import optuna

from ..record import TrialKey
from ..spec import StudySpec
from ..spec.sections import values_of
from .costs import StudyCosts
from .grid import GridHistory, PendingPoint
from .space import decode_params, point_key, seed_spent

# Up to this many configurations the stand-in is chosen among all of them, and a covered space
# is known; from a larger space (its trials cannot cover it) this many are drawn at random and
# the first with a seed left and within the ceiling taken (each is profiled: a second or so).
ENUMERATED_CONFIGURATIONS = 100_000
_STAND_IN_CANDIDATES = 25
REPEAT_REASON = "its configuration has had each of its seeds: not trained again"


def spent_points(spec: StudySpec, trials: Iterable[optuna.trial.FrozenTrial]) -> set[str]:
    """The (configuration, seed) points whose seed is spent, as point keys: by a trial that
    spent it (space.seed_spent), or given up after `spec.max_attempts` failures that are tried
    again, as a grid point is (GridHistory)."""
    trials = list(trials)
    spent = {point_key(decode_params(t.params, spec.space), t.user_attrs[TrialKey.SEED])
             for t in trials if TrialKey.SEED in t.user_attrs and seed_spent(t)}
    return spent | GridHistory(spec, trials).given_up_points()


def free_seed(spec: StudySpec, params: Mapping[str, Any], spent: set[str]) -> int | None:
    """The first of the spec's seeds that `params` has not spent; None where it has them all."""
    return next((seed for seed in spec.seeds if point_key(params, seed) not in spent), None)


def stand_in(spec: StudySpec, trials: Sequence[optuna.trial.FrozenTrial], draw: int,
             costs: StudyCosts) -> PendingPoint | str:
    """The configuration, with its first free seed, trained in place of draw number `draw`:
    chosen at random among those with a seed left and within budget.max_gflops; where there is
    none, why the run ends."""
    spent = spent_points(spec, trials)
    rng = random.Random(f"{spec.seeds[0]}:{draw}")
    size = math.prod(len(values_of(choice)) for choice in spec.space.values())
    if size > ENUMERATED_CONFIGURATIONS:
        drawn = [{name: rng.choice(values_of(choice)) for name, choice in spec.space.items()}
                 for _ in range(_STAND_IN_CANDIDATES)]
        candidates = [(params, free_seed(spec, params, spent)) for params in drawn]
    else:
        candidates = [(params, seed) for params in spec.grid()
                      if (seed := free_seed(spec, params, spent)) is not None]
        rng.shuffle(candidates)
    for params, seed in candidates:
        if seed is not None and _trainable(spec, params, costs):
            return PendingPoint(params, seed)
    ceiling = f"budget.max_gflops={spec.budget.max_gflops:g}" \
        if spec.budget.max_gflops is not None else ""
    if size > ENUMERATED_CONFIGURATIONS:
        return (f"none of {_STAND_IN_CANDIDATES} configurations drawn at random from the "
                f"space's {size:,} has a seed left{' and fits ' + ceiling if ceiling else ''}: "
                f"the run ends{' (raise the ceiling, or narrow the space)' if ceiling else ''}")
    if candidates:
        return (f"every configuration with a seed left is over {ceiling}: the run ends"
                if ceiling else "no configuration with a seed left builds: the run ends")
    return "every configuration has had each of its seeds: the space is covered, and the run ends"


def _trainable(spec: StudySpec, params: dict[str, Any], costs: StudyCosts) -> bool:
    """Within budget.max_gflops, and one that builds: the spec checks a huge space's first
    points only (spec.space.CHECKED_POINTS)."""
    try:
        return not costs.over_budget(spec.arch(params))
    except ValueError:  # ArchError, or a model that does not build
        return False
