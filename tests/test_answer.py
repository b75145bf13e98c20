"""The report's answer (answer.py): its word decided over the answer's lines together, held to a
simulated null study; every level shown, with what it averages and leaves out; a level whose
configurations share too few seeds shown configuration by configuration."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from helpers import error_table, offset_for, study_in_memory
from resnet_ablate.results.answer import answer
from resnet_ablate.results.report import comparisons

IMAGES = 1000


def _null_study(rng, seeds: int, seed_sd: float):
    """depth 20/32/44 x shortcut A/B/none, every configuration the same 8% truth, each seed's
    errors on one test set."""
    offset = offset_for(0.08, seed_sd, 1.5)
    difficulty = rng.normal(0, 1.5, IMAGES)
    trials = []
    for depth in (20, 32, 44):
        for shortcut in ("A", "B", "none"):
            table = error_table(rng, seeds, offset, seed_sd, 1.5, difficulty)
            trials += [({"depth": depth, "shortcut": shortcut}, s, table[s]) for s in range(seeds)]
    return study_in_memory(trials)


def test_a_null_study_is_answered_with_a_difference_in_at_most_5_percent_of_studies():
    """Four lines (depth 32 and 44 against 20, shortcut B and none against A), nothing true: an
    answer saying "a difference" somewhere in 18.6% of such studies at 3 seeds when each line
    was decided by its own 95% interval; Holm over the answer's lines keeps it near 5% (200
    studies: 4.7% at the audit's 300; the bound leaves 2.5 Monte Carlo errors)."""
    rng = np.random.default_rng(11)
    studies, said = 200, 0
    for _ in range(studies):
        study = _null_study(rng, 3, 0.4)
        lines = answer(study, comparisons(study))
        assert len(lines) == 4 and all(np.isfinite(line.p_holm) for line in lines)
        said += any(line.verdict.startswith("a difference") for line in lines)
        # Holm by hand: the k-th smallest p times (m - k + 1), non-decreasing.
        p = sorted(line.p_value for line in lines)
        by_hand = np.maximum.accumulate([min(1.0, (4 - k) * v) for k, v in enumerate(p)])
        np.testing.assert_allclose(sorted(line.p_holm for line in lines), by_hand)
    assert said / studies <= 0.05 + 2.5 * np.sqrt(0.05 * 0.95 / studies)


def _diverged_study():
    """depth 20/32/56 x shortcut A/none, 3 seeds; the plain net at depth 56 failed all three."""
    rng = np.random.default_rng(4)
    difficulty = rng.normal(0, 1.5, IMAGES)
    offset = offset_for(0.08, 0.1, 1.5)
    trials = [({"depth": depth, "shortcut": shortcut}, seed,
               error_table(rng, 1, offset + (0.3 if depth == 56 else 0), 0.1, 1.5, difficulty)[0])
              for depth in (20, 32, 56) for shortcut in ("A", "none") for seed in range(3)
              if (depth, shortcut) != (56, "none")]
    study = study_in_memory(trials)
    failed = study.trials.iloc[[0, 0, 0]].assign(
        number=[100, 101, 102], state="FAIL", seed=[0, 1, 2], depth=56, shortcut="none",
        test_error=np.nan, failure_kind="diverged")
    return dataclasses.replace(study, trials=pd.concat([study.trials, failed],
                                                       ignore_index=True))


def test_every_level_is_answered_and_what_a_line_leaves_out_is_named():
    """The plain net never trained at depth 56: the shortcut line averages depths 20 and 32 and
    says so, with the failed seeds; depth 56 against 20, seen only with shortcut A, is a line of
    its own at that configuration (it was left out of the answer)."""
    study = _diverged_study()
    lines = {(line.factor, line.level): line for line in answer(study, comparisons(study))}
    assert set(lines) == {("depth", 32), ("depth", 56), ("shortcut", "none")}
    plain = lines[("shortcut", "none")]
    assert plain.where == "averaged over depth (2 configurations)"
    assert "3 seeds failed (diverged: 3)" in plain.note
    assert ("no row at depth=56: no seed completed both (shortcut='none': none completed and 3 "
            "failed (diverged: 3) / shortcut='A': 3 completed)") in plain.note.split("; ")
    assert lines[("depth", 56)].where == "at shortcut=A"
    assert lines[("depth", 32)].where == "averaged over shortcut (2 configurations)"


def test_a_level_paired_at_one_configuration_names_the_others_and_the_seeds_it_left_out():
    """Depths 20 and 56: the plain net diverged at every seed of depth 56, so shortcut none is
    compared at depth 20 alone, and that line read as the whole answer, with nothing said of
    depth 56 (from an audit); a seed of A that none lacks was left out of its mean unsaid. The
    comparison's row and the answer's line now name both."""
    study = _diverged_study().where("depth != 32")
    extra = study_in_memory([({"depth": 20, "shortcut": "A"}, 3, np.ones(IMAGES))]).trials
    study = dataclasses.replace(study, trials=pd.concat(
        [study.trials, extra.assign(number=200)], ignore_index=True))
    found = comparisons(study)
    table = next(t for factor, _, t in found if factor == "shortcut")
    (row,) = table.to_dict("records")
    notes = row["note"].split("; ")
    assert "no partner, left out: seed 3 of shortcut='A' (seeds pair by number)" in notes
    assert ("no row at depth=56: no seed completed both (shortcut='none': none completed and 3 "
            "failed (diverged: 3) / shortcut='A': 3 completed)") in notes
    done = study.trials[(study.trials["state"] == "COMPLETE") & (study.trials["depth"] == 20)]
    paired_a = done[(done["shortcut"] == "A") & (done["seed"] < 3)]["test_error"].mean()
    assert row["n_pairs"] == 3 and row["test_error_baseline"] == paired_a  # (seed 3: all wrong)
    (line,) = [line for line in answer(study, found) if line.factor == "shortcut"]
    assert line.where == "at depth=20" and line.note == row["note"]


def test_a_level_whose_configurations_share_too_few_seeds_is_answered_one_by_one():
    """Depth 56 finished one seed: the average over depths has one common seed and no interval
    ("too few seeds to tell", from that one seed); each depth's own comparison is shown instead,
    two of them with their intervals."""
    rng = np.random.default_rng(6)
    difficulty = rng.normal(0, 1.5, IMAGES)
    offset = offset_for(0.08, 0.1, 1.5)
    trials = [({"depth": depth, "shortcut": shortcut}, seed,
               error_table(rng, 1, offset + (0.4 if shortcut == "none" else 0), 0.1, 1.5,
                           difficulty)[0])
              for depth in (20, 32, 56) for shortcut in ("A", "none") for seed in range(5)
              if depth != 56 or seed == 0]
    study = study_in_memory(trials)
    shortcut = [line for line in answer(study, comparisons(study)) if line.factor == "shortcut"]
    assert [line.where for line in shortcut] == ["at depth=20", "at depth=32", "at depth=56"]
    assert [line.n_pairs for line in shortcut] == [5, 5, 1]
    assert shortcut[2].verdict == "too few seeds to tell (1 paired seed)"
    assert all(np.isfinite(line.p_holm) for line in shortcut[:2])


def test_a_selection_answers_for_what_it_selects():
    """A `where` that leaves depth 56 out: the shortcut line averages depths 20 and 32 and names
    nothing missing (the left-out depth is not the answer's to name)."""
    study = _diverged_study().where("depth != 56")
    lines = {(line.factor, line.level): line for line in answer(study, comparisons(study))}
    assert lines[("shortcut", "none")].where == "averaged over depth (2 configurations)"
    assert set(lines) == {("depth", 32), ("shortcut", "none")}


def test_an_average_over_a_factor_the_effect_depends_on_gives_each_configurations_difference():
    """No shortcut costs nothing at depth 20 and a lot at depth 56: the answer's line averaged
    the two (+33 points) and said only that the configurations disagree; it now gives each
    depth's own difference, as the comparison's per-depth rows have them."""
    rng = np.random.default_rng(8)
    difficulty = rng.normal(0, 1.5, IMAGES)
    offset = offset_for(0.08, 0.1, 1.5)
    trials = [({"depth": depth, "shortcut": shortcut}, seed,
               error_table(rng, 1, offset + (2.5 if (depth, shortcut) == (56, "none") else 0),
                           0.1, 1.5, difficulty)[0])
              for depth in (20, 56) for shortcut in ("A", "none") for seed in range(3)]
    study = study_in_memory(trials)
    found = comparisons(study)
    (line,) = [line for line in answer(study, found) if line.factor == "shortcut"]
    table = next(t for factor, _, t in found if factor == "shortcut")
    per_depth = {row["depth"]: row["diff_mean"] for _, row in table.iterrows()
                 if row["depth"] != "all"}
    assert line.where.startswith("averaged over depth")
    assert [where for where, _ in line.each] == ["at depth=20", "at depth=56"]
    assert [diff for _, diff in line.each] == [per_depth[20], per_depth[56]]
    assert "on average, but the configurations disagree: " in line.verdict
    assert f"{100 * per_depth[56]:+.2f} points at depth=56" in line.verdict
