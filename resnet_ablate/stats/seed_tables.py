"""What the statistics (intervals.py) take, checked: one error rate per seed, each seed's 0/1
outcomes over one test set, that test set's size, and the level asked for; and how many
degrees of freedom the test images' part of a table's variance rests on. Inputs that cannot
describe seeds scored on one test set raise one ValueError that names the seed and what is
wrong (SeedRecordsError), rather than an interval computed from them or an error from deep inside numpy. Torch-free.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np


class SeedRecordsError(ValueError):
    """Seeds' records that cannot describe seeds scored on one test set (a store edited by hand,
    or written by an older version): the message names the seed and what is wrong. The seed is
    named by its `position` among those given ("seed 1": the second), unless a caller that knows
    more names it (`named`: the trial and the seed number a study recorded)."""

    def __init__(self, template: str, position: int | None = None) -> None:
        # `template` holds "{seed}" where the message names the seed.
        self.template, self.position = template, position
        super().__init__(template.replace("{seed}", f"seed {position}"))

    def named(self, name: str) -> SeedRecordsError:
        """The same error, naming the seed as `name`."""
        error = SeedRecordsError(self.template, self.position)
        error.args = (self.template.replace("{seed}", name),)
        return error


def rates_per_seed(values: Sequence[float], what: str) -> np.ndarray:
    """`values` as one error rate per seed, each a number in [0, 1]."""
    rates = _numbers(values, what, "one error rate per seed")
    bad = np.flatnonzero(~((rates >= 0) & (rates <= 1)))  # NaN fails both comparisons
    if len(bad):
        raise SeedRecordsError(f"{what}: an error rate is a number in [0, 1]; {{seed}} has "
                               f"{float(rates[bad[0]])}", int(bad[0]))
    return rates


def finite_values(values: Sequence[float], what: str) -> np.ndarray:
    """`values` as one finite number per seed (a metric without test-set sampling)."""
    found = _numbers(values, what, "one value per seed")
    bad = np.flatnonzero(~np.isfinite(found))
    if len(bad):
        raise SeedRecordsError(f"{what}: give one finite value per seed; {{seed}} has "
                               f"{float(found[bad[0]])}", int(bad[0]))
    return found


def _numbers(values: Any, what: str, expected: str) -> np.ndarray:
    try:
        found = np.asarray(values, dtype=float)
    except (TypeError, ValueError):
        found = None
    if found is None or found.ndim != 1:
        shown = repr(values)
        raise SeedRecordsError(f"{what}: give {expected}, a flat sequence of numbers; got "
                         f"{shown if len(shown) <= 80 else shown[:77] + '...'}")
    return found


def outcome_table(outcomes: Sequence[np.ndarray], rates: np.ndarray, images: int,
                  what: str) -> np.ndarray:
    """The seeds x images table of 0/1 outcomes, checked against the rates and the test set's
    size given with it: every seed scored on the same `images` test images, each seed's rate the
    mean of its outcomes (within half an image, for rates stored in single precision)."""
    if len(outcomes) != len(rates):
        raise SeedRecordsError(f"{what}: {len(outcomes)} seeds' outcomes for {len(rates)} error rates: "
                         "give one outcome vector per seed, in the rates' order")
    # The checks run on the table at once (simulations make tens of thousands of tables), and
    # name the first seed that fails one, each seed's checks in this order: its length, 0/1,
    # its rate.
    vectors = []
    for given in outcomes:
        vector = None if given is None else _numbers(np.ravel(given), what, "0/1 outcomes")
        if vector is None or len(vector) != images:
            break
        vectors.append(vector)
    table = np.vstack(vectors) if vectors else np.empty((0, images))
    odd = (table != 0.0) & (table != 1.0)
    means = table.mean(axis=1)
    off_rate = np.abs(means - rates[:len(vectors)]) > 0.5 / images
    first = np.flatnonzero(odd.any(axis=1) | off_rate)
    if first.size:
        seed = int(first[0])
        if odd[seed].any():
            raise SeedRecordsError(f"{what}: an outcome is 0 (right) or 1 (wrong); {{seed}} has "
                                   f"{float(table[seed][odd[seed]][0])}", seed)
        raise SeedRecordsError(f"{what}: {{seed}}'s error rate {rates[seed]:.6g} is not that "
                               f"of its outcomes ({int(table[seed].sum())} of {images} wrong, "
                               f"{means[seed]:.6g}): rates and outcomes must come from the "
                               "same evaluation", seed)
    if len(vectors) < len(outcomes):
        given = outcomes[len(vectors)]
        covered = "none" if given is None else f"{np.ravel(given).size} images"
        raise SeedRecordsError(f"{what}: {{seed}}'s outcomes cover {covered} and the test "
                               f"set has {images}: every seed is scored on the same test "
                               "images", len(vectors))
    return table


def test_set_size(images: int | None, vectors: Sequence[np.ndarray | None]) -> int | None:
    """The test set's size: as given, or where only outcome `vectors` were, their length (None
    where neither is known)."""
    size: Any = images
    if images is None:
        first = next((v for v in vectors if v is not None), None)
        if first is None:
            return None
        size = np.size(first)
    whole = isinstance(size, numbers.Real) and not isinstance(size, (bool, np.bool_)) \
        and math.isfinite(size) and float(size).is_integer() and size >= 1
    if not whole:
        raise ValueError(f"the test set's size is a whole number of images >= 1, or None where "
                         f"not recorded; got {size!r}"
                         + (" (the length of the outcome vectors)" if images is None else ""))
    return int(size)


def image_df(image_means: np.ndarray) -> int:
    """The degrees of freedom of the test images' part, by Satterthwaite's moment match: a
    variance estimated from N values of kurtosis k varies as a chi-square with
    ``2 N / (k - 1)`` degrees of freedom, N - 1 for normal values (k = 3, the most it takes
    here), about twice the count where a few images carry it all (k ~ N / count: a paired
    table whose seeds tie and that differs on 5 of 1,000 images rests on about 10, not 999,
    and its test is then about as exact as the sign test on those 5)."""
    images = len(image_means)
    centred = image_means - image_means.mean()
    spread = float(np.mean(centred**2))
    if spread == 0:
        return images - 1
    kurtosis = float(np.mean(centred**4)) / spread**2
    if kurtosis <= 1 + 2 * images / (images - 1):
        return images - 1
    return max(1, min(images - 1, round(2 * images / (kurtosis - 1))))


def checked_level(level: float) -> float:
    """The level of an interval: a probability strictly between 0 and 1."""
    if isinstance(level, (bool, np.bool_)) or not isinstance(level, numbers.Real) \
            or not 0 < level < 1:
        raise ValueError(f"an interval's level is a number between 0 and 1 (0.95 for 95%); got "
                         f"{level!r}")
    return float(level)


def checked_bounds(bounds: tuple[float, float]) -> tuple[float, float]:
    """The range a metric can take, low <= high (either may be infinite)."""
    low, high = (float(b) for b in bounds)
    if not low <= high:
        raise ValueError(f"a metric's range is (low, high) with low <= high; got {bounds!r}")
    return low, high


__all__ = ["checked_bounds", "checked_level", "finite_values", "image_df", "outcome_table",
           "rates_per_seed", "test_set_size"]
