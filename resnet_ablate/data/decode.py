"""Decoding one image file for a streamed data set (image folders, shards): Pillow and numpy only
(torchvision's wheels do not import beside every torch build).

Augmentation follows He et al. (Section 3.4): the shorter side scaled to a random length in
[256, 480], a random 224 crop, a horizontal flip, and the per-channel mean subtracted (and the
std divided, as every modern recipe does), or the common RandomResizedCrop variant; evaluation is
a single centre 224 crop of the image scaled to 256. Other crop sizes scale those lengths with it.
An image that cannot be decoded comes back as None: the loaders skip and count it.
"""

from __future__ import annotations

import math
import os
from typing import BinaryIO, Literal

import numpy as np
import torch
from PIL import Image

# ImageNet's per-channel training mean and std (RGB, pixel values in [0, 1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AUGMENTATIONS = ("scale", "random_resized_crop")
# How a streamed data set crops its training images (not the in-memory `augment.Augmentation`).
CropAugmentation = Literal["scale", "random_resized_crop"]
# The paper's lengths for a 224 crop: shorter side in [256, 480] to train, 256 to evaluate.
_SCALE_LOW, _SCALE_HIGH, _EVAL_RESIZE, _PAPER_CROP = 256, 480, 256, 224


def _resize_shorter(image: Image.Image, length: int) -> Image.Image:
    width, height = image.size
    scale = length / min(width, height)
    size = (max(length, round(width * scale)), max(length, round(height * scale)))
    return image.resize(size, Image.BILINEAR)


def _scale_crop(image: Image.Image, size: int, rng: np.random.Generator) -> Image.Image:
    low = round(size * _SCALE_LOW / _PAPER_CROP)
    high = round(size * _SCALE_HIGH / _PAPER_CROP)
    image = _resize_shorter(image, int(rng.integers(low, high + 1)))
    width, height = image.size
    left, top = int(rng.integers(0, width - size + 1)), int(rng.integers(0, height - size + 1))
    return image.crop((left, top, left + size, top + size))


def _random_resized_crop(image: Image.Image, size: int, rng: np.random.Generator) -> Image.Image:
    """A random 8%-100% of the area at an aspect ratio in [3/4, 4/3], resized to size x size."""
    width, height = image.size
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(0.08, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            return image.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h))
    return _centre_crop(_resize_shorter(image, size), size)


def _centre_crop(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image -> float32 (3, H, W), normalised with ImageNet's channel mean and std."""
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    pixels = (pixels - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def decode(source: str | os.PathLike[str] | BinaryIO, *, image_size: int,
           augmentation: CropAugmentation, rng: np.random.Generator | None) -> torch.Tensor | None:
    """One image file (a path or an open binary file) as a normalised tensor: augmented with
    `rng`'s draws for training, the centre crop for evaluation (rng None); None where it cannot be
    decoded (the loader skips and counts it)."""
    try:
        with Image.open(source) as opened:
            image = opened.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    if rng is None:
        return to_tensor(_centre_crop(_resize_shorter(
            image, round(image_size * _EVAL_RESIZE / _PAPER_CROP)), image_size))
    if augmentation == "scale":
        image = _scale_crop(image, image_size, rng)
    else:
        image = _random_resized_crop(image, image_size, rng)
    if rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return to_tensor(image)


def collate(batch: list[tuple[torch.Tensor | None, int]]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(images, labels, how many of the batch's images were unreadable and left out)."""
    kept = [(x, y) for x, y in batch if x is not None]
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.int64), len(batch)
    images = torch.stack([x for x, _ in kept])
    return images, torch.tensor([y for _, y in kept], dtype=torch.int64), len(batch) - len(kept)


def one_thread(_worker: int) -> None:
    torch.set_num_threads(1)  # a decoding worker is one CPU of the trial's

