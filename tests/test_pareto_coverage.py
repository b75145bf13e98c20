"""The intervals of a Pareto front over configuration means (`Results.pareto`), held to simulated
studies with known truth: six configurations of one true error and rising cost, so that every
member of the front but the cheapest is there by its seeds' luck. Their summary intervals are not
adjusted for that choice; README states how often they still cover, and how many of the misses
go without the overlap note that tells a user to compare them."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import REGIMES, error_table, offset_for, study_in_memory, true_error

DEPTHS = (8, 14, 20, 26, 32, 38)  # six configurations, FLOPs rising with depth
IMAGES = 400
STUDIES = 200  # about 300 members chosen by luck: a coverage's simulation error ~1.9 points


@pytest.mark.parametrize("seeds", [3, 5])
def test_front_members_chosen_by_luck_are_covered_as_readme_says(seeds):
    error, seed_sd, image_sd = REGIMES["seeds matter"]
    offset = offset_for(error, seed_sd, image_sd)
    truth = true_error(offset, seed_sd, image_sd)
    rng = np.random.default_rng(11 + seeds)
    members = covered = unflagged_misses = 0
    for _ in range(STUDIES):
        difficulty = rng.normal(0, image_sd, IMAGES)  # one test set, as a study has
        front = study_in_memory([
            ({"depth": depth}, seed, wrong) for depth in DEPTHS
            for seed, wrong in enumerate(error_table(rng, seeds, offset, seed_sd, image_sd,
                                                 difficulty))]).pareto(["test_error", "flops"])
        lucky = front[front["depth"] != DEPTHS[0]]  # the cheapest is on every front
        for _, row in lucky.iterrows():
            members += 1
            hit = row["test_error_ci95_low"] <= truth <= row["test_error_ci95_high"]
            covered += hit
            unflagged_misses += not hit and "compare them" not in row["note"]
    coverage, unflagged = covered / members, unflagged_misses / members
    # README: about 88% (not the nominal 95%: they were chosen for their lucky means), and the
    # misses carry the overlap note that says to compare them (0-0.4% of members without it).
    assert 0.84 <= coverage <= 0.93, (seeds, members, coverage)
    assert unflagged <= 0.01, (seeds, members, unflagged)
