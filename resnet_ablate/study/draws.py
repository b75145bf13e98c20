"""A random or TPE sampler's draws that cannot be trained, and the trial trained in their place.

A sampler may draw a configuration whose seeds have all been spent (TPE does so more and more as
it settles on the best configurations), or one over budget.max_gflops. Training the first again
would repeat one of its seeds bit for bit, and the second is not trained at all; so neither
counts against budget.trials. The draw is recorded, the first as a repeat, the second as over
budget, so that the store says what the sampler drew, and the trial trained in its place is a
configuration drawn at random (by a generator seeded from the spec's first seed and the draw's
number: a rerun draws alike) among those with a seed left within the FLOPs ceiling. Asking the
sampler again instead could go on for ever once it has settled. When no configuration is left,
the space is covered and the run ends.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import optuna

from ..arch import ArchError
from ..record import TrialKey
from ..spec import StudySpec
from ..spec.sections import values_of
from .costs import StudyCosts
from .grid import PendingPoint
from .space import decode_params, point_key, seed_spent

# Up to this many configurations the stand-in is chosen among all of them, and a covered space
# is known; a larger space (its trials cannot cover it) is sampled, point by point, this often.
ENUMERATED_CONFIGURATIONS = 100_000
_SAMPLED_TRIES = 1_000
REPEAT_REASON = "its configuration has had each of its seeds: not trained again"
SPACE_COVERED = ("every configuration within the budget has had each of its seeds: the space is "
                 "covered, and the run ends")


def spent_points(spec: StudySpec, trials: Iterable[optuna.trial.FrozenTrial]) -> set[str]:
    """The (configuration, seed) points whose seed is spent (space.seed_spent), as point keys."""
    return {point_key(decode_params(t.params, spec.space), t.user_attrs[TrialKey.SEED])
            for t in trials if TrialKey.SEED in t.user_attrs and seed_spent(t)}


def free_seed(spec: StudySpec, params: Mapping[str, Any], spent: set[str]) -> int | None:
    """The first of the spec's seeds that `params` has not spent; None where it has them all."""
    return next((seed for seed in spec.seeds if point_key(params, seed) not in spent), None)


def stand_in(spec: StudySpec, trials: Sequence[optuna.trial.FrozenTrial], draw: int,
             costs: StudyCosts) -> PendingPoint | None:
    """The configuration, with its first free seed, trained in place of draw number `draw`:
    chosen at random among those with a seed left and within budget.max_gflops; None where
    there is none (the space is covered)."""
    spent = spent_points(spec, trials)
    rng = random.Random(f"{spec.seeds[0]}:{draw}")
    if _size(spec) > ENUMERATED_CONFIGURATIONS:
        candidates: list[dict[str, Any]] = [_random_point(spec, rng)
                                            for _ in range(_SAMPLED_TRIES)]
    else:
        candidates = [params for params in spec.grid() if free_seed(spec, params, spent) is not None]
        rng.shuffle(candidates)
    for params in candidates:
        seed = free_seed(spec, params, spent)
        if seed is not None and _trainable(spec, params, costs):
            return PendingPoint(params, seed)
    return None


def _trainable(spec: StudySpec, params: dict[str, Any], costs: StudyCosts) -> bool:
    """Within budget.max_gflops, and buildable: the spec checks a huge space's first points
    only (spec.space.CHECKED_POINTS)."""
    try:
        return not costs.over_budget(spec.arch(params))
    except ArchError:
        return False


def _size(spec: StudySpec) -> int:
    return math.prod(len(values_of(choice)) for choice in spec.space.values())


def _random_point(spec: StudySpec, rng: random.Random) -> dict[str, Any]:
    return {name: rng.choice(values_of(choice)) for name, choice in spec.space.items()}
