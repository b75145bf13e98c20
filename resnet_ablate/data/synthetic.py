"""The `synthetic` data set: small, seeded, learnable random data for tests (a random prototype
per class plus noise)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .bundle import DataBundle, make_bundle


@dataclass(frozen=True)
class SyntheticSpec:
    """Shape and difficulty of the `synthetic` dataset: a random prototype per class plus noise."""

    num_classes: int = 4
    channels: int = 1
    image_size: int = 8
    train_size: int = 256
    test_size: int = 128
    noise: float = 1.0

    def __post_init__(self) -> None:
        for name in ("num_classes", "channels", "image_size", "train_size", "test_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SyntheticSpec.{name} must be a positive int, got {value!r}")
        if self.num_classes < 2:
            raise ValueError(f"SyntheticSpec.num_classes must be >= 2, got {self.num_classes}")
        if isinstance(self.noise, bool) or not isinstance(self.noise, (int, float)) or not (
                math.isfinite(self.noise) and self.noise >= 0):
            raise ValueError(f"SyntheticSpec.noise must be a finite number >= 0, got "
                             f"{self.noise!r}")


def load_synthetic(
    spec: SyntheticSpec, seed: int, validation: bool, validation_fraction: float
) -> DataBundle:
    generator = torch.Generator().manual_seed(seed)
    shape = (spec.channels, spec.image_size, spec.image_size)
    prototypes = torch.randn((spec.num_classes, *shape), generator=generator)

    def sample(count: int) -> tuple[np.ndarray, np.ndarray]:
        # Balanced classes in a shuffled order, so any prefix of the data holds every class.
        labels = torch.arange(count) % spec.num_classes
        labels = labels[torch.randperm(count, generator=generator)]
        noise = torch.randn((count, *shape), generator=generator)
        return (prototypes[labels] + spec.noise * noise).numpy(), labels.numpy()

    train_images, train_labels = sample(spec.train_size)
    test_images, test_labels = sample(spec.test_size)
    return make_bundle(
        "synthetic",
        train_images,
        train_labels,
        test_images,
        test_labels,
        classes=tuple(str(c) for c in range(spec.num_classes)),
        seed=seed,
        validation=validation,
        validation_fraction=validation_fraction,
        augmentation=None,
        extra={"synthetic": {k: getattr(spec, k) for k in spec.__dataclass_fields__}},
    )
