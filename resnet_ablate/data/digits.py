"""scikit-learn's bundled 8x8 handwritten digits (1,797 real images, no download), split
train/test with a seeded stratified split: the default data set, real data that trains in seconds."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from .bundle import DataBundle, make_bundle, stratified_indices

# A fifth of the digits is held out: 360 test images, at least 35 of each class.
DIGITS_TEST_FRACTION = 0.2


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits: images (1797, 8, 8) of integers 0..16 and their labels,
    read from the package's data file as its `load_digits` reads it, without importing
    scikit-learn (a second of CPU in the driver and in each worker)."""
    data_file = _bundled_digits_file()
    if data_file is not None:
        table = np.loadtxt(data_file, delimiter=",")  # a row: 64 pixels, then the label
        return table[:, :-1].reshape(-1, 8, 8), table[:, -1]
    from sklearn.datasets import load_digits  # a scikit-learn that keeps its data elsewhere

    digits = load_digits()
    return digits.images, digits.target


def _bundled_digits_file() -> Path | None:
    package = importlib.util.find_spec("sklearn")  # finds the package; runs none of it
    for folder in (package.submodule_search_locations or []) if package is not None else []:
        data_file = Path(folder) / "datasets" / "data" / "digits.csv.gz"
        if data_file.is_file():
            return data_file
    return None


def load_digits(seed: int, validation: bool, validation_fraction: float) -> DataBundle:
    pixels, targets = _digits_arrays()
    # Pixel values are integers 0..16; uint8 keeps them exact and the memory small.
    images = pixels.astype(np.uint8)[:, None, :, :]
    labels = targets.astype(np.int64)
    train_idx, test_idx = stratified_indices(
        labels, DIGITS_TEST_FRACTION, seed, what="the digits dataset"
    )
    return make_bundle(
        "digits",
        images[train_idx],
        labels[train_idx],
        images[test_idx],
        labels[test_idx],
        classes=tuple(str(c) for c in range(10)),
        seed=seed,
        validation=validation,
        validation_fraction=validation_fraction,
        # 8x8 images have no room for 4-pixel shifts; the paper's augmentation is for CIFAR.
        augmentation=None,
    )
