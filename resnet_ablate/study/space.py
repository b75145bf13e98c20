"""The spec's search space as Optuna sees it: distributions, stored values, samplers, pruners.

Grid studies enumerate their points themselves (grid.py) and hand each one to Optuna with
`Study.enqueue_trial`, so every parameter of a grid trial is fixed and the sampler is never asked;
random and TPE studies let Optuna's samplers choose.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import optuna

from ..record import PRUNABLE_OBJECTIVES, FailureKind, TrialKey
from ..spec import IntRange, StudySpec
from ..spec.seeds import MAX_SEED


def encode_value(value: Any) -> Any:
    """Optuna stores scalars only: a tuple value (stages, widths) is stored as JSON text."""
    return json.dumps(list(value)) if isinstance(value, (tuple, list)) else value


def encode_params(params: Mapping[str, Any]) -> dict[str, Any]:
    return {name: encode_value(value) for name, value in params.items()}


def decode_params(params: Mapping[str, Any], space: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's stored parameters as the spec's values, in the space's order."""
    decoded = {}
    for name, value in params.items():
        if isinstance(value, str) and value.startswith("["):
            value = tuple(json.loads(value))
        decoded[name] = value
    return {name: decoded[name] for name in space if name in decoded}


def point_key(params: Mapping[str, Any], seed: int) -> str:
    """One grid point with its seed, as a hashable key (what "the same trial" means)."""
    return json.dumps([encode_params(params), seed], sort_keys=True)


def distributions(spec: StudySpec) -> dict[str, optuna.distributions.BaseDistribution]:
    dists: dict[str, optuna.distributions.BaseDistribution] = {}
    for name, choice in spec.space.items():
        if isinstance(choice, IntRange):
            dists[name] = optuna.distributions.IntDistribution(choice.low, choice.high, step=choice.step)
        else:
            dists[name] = optuna.distributions.CategoricalDistribution([encode_value(c) for c in choice])
    return dists


# A grid trial's seed is also one of its Optuna parameters (beside the user attribute the toolkit
# reads), so that optuna-dashboard shows two seeds of one point as two seeds, not as duplicates.
# Sampler studies leave it out: their sampler would choose it. Its distribution takes every seed a
# spec may list: seeds are not part of what defines a study, so a rerun may add some, and Optuna
# refuses a categorical parameter whose choices change (a categorical of the spec's seeds made
# adding one crash the run).
SEED_PARAM = "seed"
SEED_DISTRIBUTION = optuna.distributions.IntDistribution(0, MAX_SEED)


def seed_distribution(stored: optuna.distributions.BaseDistribution | None, seed: int
                      ) -> optuna.distributions.BaseDistribution | None:
    """The seed parameter's distribution for a new trial of `seed`, given the one the store's
    trials have (`stored`, None for none yet): SEED_DISTRIBUTION, except in a store written with
    a categorical of the seeds its spec listed then, whose own distribution goes on, and where
    it lacks `seed` there is no seed parameter (the user attribute names the seed, as in
    sampler studies)."""
    if not isinstance(stored, optuna.distributions.CategoricalDistribution):
        return SEED_DISTRIBUTION
    return stored if seed in stored.choices else None


def grid_distributions(spec: StudySpec, seed: optuna.distributions.BaseDistribution | None
                       ) -> dict[str, optuna.distributions.BaseDistribution]:
    """A grid trial's distributions: the space's and, where given, the seed's."""
    return {**distributions(spec), **({} if seed is None else {SEED_PARAM: seed})}


def sampler(spec: StudySpec, recorded: int = 0) -> optuna.samplers.BaseSampler:
    """The spec's sampler, seeded by the spec's first seed and the `recorded` trials of its store:
    reproducible, and a resumed run draws on from where the store stands rather than drawing
    the first run's points again."""
    seed = spec.seeds[0] + recorded
    if spec.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    # Grid trials come enqueued with every parameter fixed: their sampler is never asked.
    return optuna.samplers.RandomSampler(seed=seed)


def seed_spent(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether a sampled trial spent its seed: completed, running, pruned, or diverged; an
    error, a lost worker or a stopped run may be tried again, and a trial over budget.max_gflops
    trained nothing (stores before 0.3.1 gave a draw over it a seed: it trains once the ceiling
    allows)."""
    state = optuna.trial.TrialState
    if trial.state == state.FAIL:
        return trial.user_attrs.get(TrialKey.FAILURE_KIND) == FailureKind.DIVERGED
    return trial.state in (state.COMPLETE, state.RUNNING, state.PRUNED)


def pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    if spec.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
    if spec.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.NopPruner()


def prunes(spec: StudySpec) -> bool:
    """Whether trials report per-epoch values to a pruner: one accuracy-type objective only."""
    return spec.pruner != "none" and len(spec.objectives) == 1 \
        and spec.objectives[0] in PRUNABLE_OBJECTIVES
