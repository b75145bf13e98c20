"""A seeded, stratified split of a data set's images: the same images as scikit-learn's
`train_test_split(indices, test_size=fraction, stratify=labels, random_state=seed)` gives, without
importing scikit-learn (a second of CPU in every process that loads a data set: the driver and
each of a study's workers).

The same images, not just the same rule: a study resumed under a new version of the toolkit must
train its new trials on the split its old ones had. tests/test_splits.py holds this module to
scikit-learn's own function over many label sets, fractions and seeds.
"""

from __future__ import annotations

import math

import numpy as np


def stratified_split(labels: np.ndarray, fraction: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, held_out), each sorted, with `fraction` of the images held out and every
    class in both parts in proportion. A ValueError says why labels cannot be split so."""
    if not 0 < fraction < 1:
        raise ValueError(f"the held-out fraction must be between 0 and 1, got {fraction}")
    count = len(labels)
    held_count = math.ceil(fraction * count)
    kept_count = count - held_count
    classes, class_of, class_counts = np.unique(labels, return_inverse=True, return_counts=True)
    if class_counts.min() < 2:
        raise ValueError(f"classes {classes[class_counts < 2].tolist()} have one image; a "
                         "stratified split needs at least 2 in every class")
    for part, size in (("kept", kept_count), ("held-out", held_count)):
        if size < len(classes):
            raise ValueError(f"the {part} part would get {size} of the {count} images, fewer "
                             f"than one for each of the {len(classes)} classes")
    by_class = np.split(np.argsort(class_of, kind="stable"), np.cumsum(class_counts)[:-1])
    rng = np.random.RandomState(seed)
    # The draws from `rng` come in scikit-learn's order: each part's per-class counts, then one
    # permutation per class (the final shuffle of each part is left out: the parts are sorted).
    kept_per_class = _apportion(class_counts, kept_count, rng)
    held_per_class = _apportion(class_counts - kept_per_class, held_count, rng)
    kept, held = [], []
    for members, kept_here, held_here in zip(by_class, kept_per_class, held_per_class):
        shuffled = members[rng.permutation(len(members))]
        kept.append(shuffled[:kept_here])
        held.append(shuffled[kept_here : kept_here + held_here])
    return np.sort(np.concatenate(kept)), np.sort(np.concatenate(held))


def _apportion(class_counts: np.ndarray, draws: int, rng: np.random.RandomState) -> np.ndarray:
    """How many of `draws` images each class gives: its proportional share rounded down, then one
    more for the classes with the largest remainders until the total is `draws` (ties drawn at
    random), the most likely outcome of drawing them without replacement."""
    exact = class_counts / class_counts.sum() * draws
    shares = np.floor(exact)
    missing = int(draws - shares.sum())
    remainders = exact - shares
    for remainder in np.unique(remainders)[::-1]:
        if missing <= 0:
            break
        (tied,) = np.nonzero(remainders == remainder)
        chosen = rng.choice(tied, size=min(len(tied), missing), replace=False)
        shares[chosen] += 1
        missing -= len(chosen)
    return shares.astype(int)
