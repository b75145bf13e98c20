"""What the statistics (stats.py) take, checked: one error rate per seed, each seed's 0/1
outcomes over one test set, and that test set's size. Inputs that cannot describe seeds scored
on one test set raise one ValueError that names the seed and what is wrong, rather than an
interval computed from them or an error from deep inside numpy. Torch-free.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def rates_per_seed(values: Sequence[float], what: str) -> np.ndarray:
    """`values` as one error rate per seed, each a number in [0, 1]."""
    rates = np.asarray(values, dtype=float)
    if rates.ndim != 1:
        raise ValueError(f"{what}: give one error rate per seed, a flat sequence; got an array "
                         f"of shape {rates.shape}")
    bad = np.flatnonzero(~((rates >= 0) & (rates <= 1)))  # NaN fails both comparisons
    if len(bad):
        raise ValueError(f"{what}: an error rate is a number in [0, 1]; seed {bad[0]} has "
                         f"{float(rates[bad[0]])}")
    return rates


def outcome_table(outcomes: Sequence[np.ndarray], rates: np.ndarray, images: int,
           what: str) -> np.ndarray:
    """The seeds x images table of 0/1 outcomes, checked against the rates and the test set's
    size given with it: every seed scored on the same `images` test images, each seed's rate the
    mean of its outcomes (within half an image, for rates stored in single precision)."""
    vectors = [np.asarray(o, dtype=float).ravel() for o in outcomes]
    if len(vectors) != len(rates):
        raise ValueError(f"{what}: {len(vectors)} seeds' outcomes for {len(rates)} error rates: "
                         "give one outcome vector per seed, in the rates' order")
    for seed, vector in enumerate(vectors):
        if len(vector) != images:
            raise ValueError(f"{what}: seed {seed}'s outcomes cover {len(vector)} images and the "
                             f"test set has {images}: every seed is scored on the same test images")
        if not np.isin(vector, (0.0, 1.0)).all():
            odd = float(vector[~np.isin(vector, (0.0, 1.0))][0])
            raise ValueError(f"{what}: an outcome is 0 (right) or 1 (wrong); seed {seed} has "
                             f"{odd}")
        if abs(vector.mean() - rates[seed]) > 0.5 / images:
            raise ValueError(f"{what}: seed {seed}'s error rate {rates[seed]:.6g} is not that of "
                             f"its outcomes ({int(vector.sum())} of {images} wrong, "
                             f"{vector.mean():.6g}): rates and outcomes must come from the same "
                             "evaluation")
    return np.vstack(vectors) if vectors else np.empty((0, images))


def test_set_size(images: int | None, vectors: Sequence[np.ndarray]) -> int | None:
    """The test set's size: as given, or where only outcome `vectors` were, their length."""
    if images is None and len(vectors):
        return int(np.size(vectors[0]))
    if images is not None and (images != int(images) or images < 1):
        raise ValueError(f"the test set's size is a whole number of images >= 1, or None where "
                         f"not recorded; got {images!r}")
    return None if images is None else int(images)


__all__ = ["outcome_table", "rates_per_seed", "test_set_size"]
