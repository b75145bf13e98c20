"""A data set held in memory: normalised float32 images and int64 labels as tensors, with the
seeded validation split and the training-set statistics that normalise them.

Whole data sets of this kind live in memory: every one fits (CIFAR-10 is 0.7 GB as float32) and
a study runs many short trials, so per-batch decoding would cost more than the training.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from ..splits import stratified_split
from .augment import Augmentation


# eq=False: tensors do not compare to a single bool, and identity is what the cache hands out.
@dataclass(frozen=True, eq=False)
class DataBundle:
    """A dataset ready to train on: normalised float32 images (N, C, H, W) and int64 labels.

    `test_x`/`test_y` hold the evaluation set: the official test set, or the validation split
    carved from the training set when `eval_split` is "validation" (the test set is then unused).
    `mean`/`std` are the per-channel statistics of the raw training pixels used to normalise both;
    `centring` is "pixel" once the training images' per-pixel mean has also been subtracted from
    every image (`pixel_centred`).
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    in_channels: int
    image_size: int
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    eval_split: Literal["test", "validation"] = "test"
    centring: Literal["channel", "pixel"] = "channel"
    augmentation: Augmentation | None = None
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        expected = (self.in_channels, self.image_size, self.image_size)
        splits = (("train", self.train_x, self.train_y), ("test", self.test_x, self.test_y))
        for split, x, y in splits:
            if x.dim() != 4 or tuple(x.shape[1:]) != expected:
                raise ValueError(
                    f"{self.name}: {split}_x has shape {tuple(x.shape)}, "
                    f"expected (N, {expected[0]}, {expected[1]}, {expected[2]})"
                )
            if y.shape != (x.shape[0],):
                raise ValueError(
                    f"{self.name}: {split}_y has shape {tuple(y.shape)}, expected ({x.shape[0]},)"
                )

    @property
    def train_size(self) -> int:
        return int(self.train_x.shape[0])

    @property
    def test_size(self) -> int:
        return int(self.test_x.shape[0])

    def check_available(self) -> None:
        """Nothing to check: the data set is in memory (the same call as a streamed one's)."""


def stratified_indices(
    labels: np.ndarray, fraction: float, seed: int, *, what: str
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, held_out), each sorted, with `fraction` of every class held out, seeded.
    Sorted so that the kept images keep their original order; shuffling is training's job."""
    try:
        return stratified_split(labels, fraction, seed)
    except ValueError as error:
        raise ValueError(
            f"cannot split {what} ({len(labels)} images, {len(np.unique(labels))} classes) with "
            f"a stratified fraction of {fraction}: {error}"
        ) from error


def _channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and population std of (N, C, H, W) pixels, accumulated in float64.

    Chunked so that CIFAR-10 never needs a float64 copy of the whole training set (1.2 GB).
    """
    channels = images.shape[1]
    count = images.shape[0] * images.shape[2] * images.shape[3]
    sums = np.zeros(channels)
    for start in range(0, images.shape[0], 4096):
        sums += images[start : start + 4096].sum(axis=(0, 2, 3), dtype=np.float64)
    means = sums / count
    squares = np.zeros(channels)
    for start in range(0, images.shape[0], 4096):
        centred = images[start : start + 4096].astype(np.float64) - means[None, :, None, None]
        squares += (centred * centred).sum(axis=(0, 2, 3))
    stds = np.sqrt(squares / count)
    if np.any(stds == 0):
        raise ValueError(f"a channel of the training images is constant (std {stds.tolist()})")
    return tuple(float(m) for m in means), tuple(float(s) for s in stds)


def _normalise(images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32)
    x.sub_(torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
    x.div_(torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
    return x


def make_bundle(
    name: str,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    *,
    classes: tuple[str, ...],
    seed: int,
    validation: bool,
    validation_fraction: float,
    augmentation: Augmentation | None,
    extra: dict[str, Any] | None = None,
) -> DataBundle:
    """Split off validation if asked, normalise with the statistics of what is trained on."""
    if validation:
        kept, held = stratified_indices(
            train_labels, validation_fraction, seed, what=f"the {name} training set"
        )
        test_images, test_labels = train_images[held], train_labels[held]
        train_images, train_labels = train_images[kept], train_labels[kept]
    # Statistics from the images trained on only, so the evaluation set does not leak into them.
    mean, std = _channel_stats(train_images)
    return DataBundle(
        name=name,
        train_x=_normalise(train_images, mean, std),
        train_y=torch.from_numpy(np.asarray(train_labels, dtype=np.int64)),
        test_x=_normalise(test_images, mean, std),
        test_y=torch.from_numpy(np.asarray(test_labels, dtype=np.int64)),
        num_classes=len(classes),
        in_channels=int(train_images.shape[1]),
        image_size=int(train_images.shape[2]),
        classes=classes,
        mean=mean,
        std=std,
        eval_split="validation" if validation else "test",
        augmentation=augmentation,
        seed=seed,
        extra=extra or {},
    )


_CENTRING_CHUNK = 4096  # images summed at a time (CIFAR: 100 MB in float64)


def pixel_centred(data: DataBundle) -> DataBundle:
    """`data` with the per-pixel mean of its training images subtracted from its training and
    evaluation images, where its tensors are: the paper's CIFAR input ("the per-pixel mean
    subtracted", Sec. 4.2), before the padding and cropping, so that a crop's padding is the
    mean image's value, 0. The images are held divided by their channel's std (make_bundle), so
    the input is the paper's up to a constant factor per channel (CIFAR-10: 1/62 to 1/67 of a
    0-255 pixel step, nearly one factor for all three); the paper does not give its pixels'
    scale. The mean is summed in float64, over the training images only, a chunk at a time (a
    float64 copy of the whole set would double its memory on the device)."""
    if data.centring == "pixel":
        return data
    images = data.train_x
    total = torch.zeros(images.shape[1:], dtype=torch.float64, device=images.device)
    for chunk in images.split(_CENTRING_CHUNK):
        total += chunk.sum(dim=0, dtype=torch.float64)
    mean_image = (total / max(len(images), 1)).to(images.dtype).unsqueeze(0)
    return dataclasses.replace(data, train_x=data.train_x - mean_image,
                               test_x=data.test_x - mean_image, centring="pixel")
