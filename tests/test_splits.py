"""The toolkit's own stratified split and digits reader against scikit-learn's: the same images,
so that studies keep their data across versions of the toolkit."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from resnet_ablate.data import digits as data
from resnet_ablate.splits import stratified_split


def _sklearn_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    kept, held = train_test_split(np.arange(len(labels)), test_size=fraction, stratify=labels,
                                  random_state=seed, shuffle=True)
    return np.sort(kept), np.sort(held)


def _label_sets() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "digits": load_digits().target,
        # Equal classes: every class's share has the same remainder, so ties are drawn at random.
        "balanced": np.repeat(np.arange(10), 7),
        "imbalanced": rng.choice(5, size=203, p=[0.5, 0.2, 0.15, 0.1, 0.05]),
        "two classes, odd": np.array([0] * 9 + [1] * 4),
        "cifar-sized": np.repeat(np.arange(10), 5000)[rng.permutation(50_000)],
    }


@pytest.mark.parametrize("name", list(_label_sets()))
@pytest.mark.parametrize("fraction", [0.05, 0.1, 0.2, 0.25, 0.5, 0.73])
def test_the_split_holds_out_the_images_scikit_learn_does(name, fraction):
    labels = _label_sets()[name]
    seeds = range(3) if name == "cifar-sized" else range(12)
    for seed in seeds:
        try:
            expected = _sklearn_split(labels, fraction, seed)
        except ValueError:
            with pytest.raises(ValueError):
                stratified_split(labels, fraction, seed)
            continue
        kept, held = stratified_split(labels, fraction, seed)
        np.testing.assert_array_equal(kept, expected[0], err_msg=f"{name} seed {seed}")
        np.testing.assert_array_equal(held, expected[1], err_msg=f"{name} seed {seed}")


@pytest.mark.parametrize("labels, fraction, message", [
    (np.array([0, 0, 1, 1, 2]), 0.4, r"classes \[2\] have one image"),
    (np.repeat(np.arange(10), 2), 0.1,
     "the held-out part would get 2 of the 20 images, fewer than one for each of the 10 classes"),
    (np.repeat(np.arange(10), 2), 0.95,
     "the kept part would get 1 of the 20 images, fewer than one for each of the 10 classes"),
    (np.repeat(np.arange(3), 4), 1.0, "between 0 and 1"),
])
def test_a_split_that_cannot_be_made_says_why_where_scikit_learn_also_refuses(labels, fraction,
                                                                             message):
    with pytest.raises(ValueError):
        _sklearn_split(labels, fraction, 0)
    with pytest.raises(ValueError, match=message):
        stratified_split(labels, fraction, 0)


@pytest.mark.parametrize("data_file_found", [True, False])
def test_the_digits_are_read_as_scikit_learn_reads_them(data_file_found, monkeypatch):
    if not data_file_found:  # a scikit-learn that keeps them elsewhere: its load_digits reads them
        monkeypatch.setattr(data, "_bundled_digits_file", lambda: None)
    else:
        assert data._bundled_digits_file() is not None
    images, labels = data._digits_arrays()
    digits = load_digits()
    np.testing.assert_array_equal(images, digits.images)
    np.testing.assert_array_equal(labels, digits.target)
    assert images.shape == (1797, 8, 8)
