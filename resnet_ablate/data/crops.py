"""Where an image's crops lie, as boxes of the original image: the paper's scale augmentation,
RandomResizedCrop and the evaluation's centre crop. Drawn from the image's size alone (known from
its header), so that a decoder can decode at the lowest resolution a crop needs and resample only
the crop (decode.py).

Each box is where the crop of the old two-step recipe (resize the whole image, then cut) lies in
the original image, drawn with the same draws in the same order; resampling just the box maps
every output pixel's centre to the same point of the original, with the same filter support.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

Box = tuple[float, float, float, float]  # left, top, right, bottom in the original's pixels
# The paper's lengths for a 224 crop: shorter side in [256, 480] to train, 256 to evaluate.
SCALE_LOW, SCALE_HIGH, EVAL_RESIZE, PAPER_CROP = 256, 480, 256, 224


def scaled_size(width: int, height: int, length: int) -> tuple[int, int]:
    """The size of a `width` x `height` image whose shorter side is scaled to `length`."""
    scale = length / min(width, height)
    return max(length, round(width * scale)), max(length, round(height * scale))


def resize_shorter(image: Image.Image, length: int) -> Image.Image:
    return image.resize(scaled_size(*image.size, length), Image.BILINEAR)


def _box_of_crop(width: int, height: int, length: int, left: int, top: int, size: int) -> Box:
    """The box of the original image that the `size` crop at (left, top) of the image scaled to
    shorter side `length` shows."""
    scaled_width, scaled_height = scaled_size(width, height, length)
    sx, sy = width / scaled_width, height / scaled_height
    return left * sx, top * sy, (left + size) * sx, (top + size) * sy


def scale_box(width: int, height: int, size: int, rng: np.random.Generator) -> Box:
    """The paper's augmentation: the shorter side scaled to a random length in [256, 480] (for a
    224 crop; scaled with `size`), a random `size` crop of it."""
    low = round(size * SCALE_LOW / PAPER_CROP)
    high = round(size * SCALE_HIGH / PAPER_CROP)
    length = int(rng.integers(low, high + 1))
    scaled_width, scaled_height = scaled_size(width, height, length)
    left = int(rng.integers(0, scaled_width - size + 1))
    top = int(rng.integers(0, scaled_height - size + 1))
    return _box_of_crop(width, height, length, left, top, size)


def random_resized_box(width: int, height: int, size: int, rng: np.random.Generator) -> Box:
    """A random 8%-100% of the area at an aspect ratio in [3/4, 4/3] (RandomResizedCrop); after
    ten misses, the centre crop of the image scaled to shorter side `size`."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(0.08, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    return centre_box(width, height, size, size)


def centre_box(width: int, height: int, size: int, length: int) -> Box:
    """The centre `size` crop of the image scaled to shorter side `length`."""
    scaled_width, scaled_height = scaled_size(width, height, length)
    return _box_of_crop(width, height, length, (scaled_width - size) // 2,
                        (scaled_height - size) // 2, size)


def training_draws(width: int, height: int, size: int, augmentation: str,
                   rng: np.random.Generator) -> tuple[Box, bool]:
    """A training crop's box (augmentation "scale": the paper's, else RandomResizedCrop's) and
    whether it is flipped, drawn from `rng` in that order: every decoder draws them here, so a
    seed gives the same crops whichever decodes."""
    draw = scale_box if augmentation == "scale" else random_resized_box
    box = draw(width, height, size, rng)
    return box, bool(rng.random() < 0.5)


def eval_length(size: int) -> int:
    """The shorter side an image is scaled to for its evaluation crops of `size` (256 for 224)."""
    return round(size * EVAL_RESIZE / PAPER_CROP)


def centre_crop(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))
