"""Decoding a training crop box-first: the paper's two-step recipe (scale the whole image, then
cut) redone by hand with Pillow gives the same crop, the same draws in the same order; large
JPEGs are decoded at a reduced scale and stay close; crops are seeded; uint8 crops normalised
on the device equal the float path."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from resnet_ablate.data.crops import scaled_size
from resnet_ablate.data.decode import decode, decode_sample, normalise, train_crop


def _photo_jpeg(width: int, height: int) -> bytes:
    """A smooth, photo-like JPEG (random noise would decode unlike a photograph)."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([128 + 100 * np.sin(x / 37 + c) * np.cos(y / 23 - c) for c in range(3)], -1)
    noise = np.random.default_rng(0).normal(0, 8, base.shape)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _two_step_crop(data: bytes, seed: int, size: int = 224) -> np.ndarray:
    """He et al.'s scale augmentation as written: shorter side to a random length in [256, 480],
    the whole image resized, a random size x size cut, a coin for the flip."""
    draws = np.random.default_rng(seed)
    image = Image.open(io.BytesIO(data)).convert("RGB")
    length = int(draws.integers(256, 481))
    width, height = scaled_size(*image.size, length)
    image = image.resize((width, height), Image.BILINEAR)
    left, top = int(draws.integers(0, width - size + 1)), int(draws.integers(0, height - size + 1))
    crop = image.crop((left, top, left + size, top + size))
    if draws.random() < 0.5:
        crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(crop, dtype=np.int64)


def _box_first(data: bytes, seed: int) -> np.ndarray:
    crop = train_crop(io.BytesIO(data), image_size=224, augmentation="scale",
                      rng=np.random.default_rng(seed))
    return np.asarray(crop, dtype=np.int64)


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (500, 333)])
def test_a_box_first_crop_is_the_two_step_recipes_crop_at_imagenet_sizes(size):
    data = _photo_jpeg(*size)
    for seed in range(6):
        difference = np.abs(_box_first(data, seed) - _two_step_crop(data, seed))
        assert difference.max() <= 2, "the same pixels, but for rounding in the resampling"
        assert difference.mean() < 0.01


def test_a_large_jpeg_is_decoded_at_a_reduced_scale_and_stays_close():
    data = _photo_jpeg(2000, 1500)  # the crop needs at most 480/1500 of it: decoded at 1/2
    with Image.open(io.BytesIO(data)) as image:
        image.draft("RGB", (1000, 750))
        assert image.size == (1000, 750), "the JPEG decoder reduces at decode time"
    for seed in range(3):
        difference = np.abs(_box_first(data, seed) - _two_step_crop(data, seed))
        assert difference.mean() < 1.0 and difference.max() <= 8


def test_crops_are_seeded_and_uint8_normalised_on_the_device_equals_the_float_path():
    data = _photo_jpeg(500, 375)
    for seed, rng in ((3, None), (4, 4)):
        draws = None if rng is None else np.random.default_rng(rng)
        again = None if rng is None else np.random.default_rng(rng)
        crop = decode_sample(io.BytesIO(data), image_size=224, augmentation="scale", rng=draws)
        assert crop.dtype == torch.uint8 and crop.shape == (3, 224, 224)
        floats = decode(io.BytesIO(data), image_size=224, augmentation="scale", rng=again)
        torch.testing.assert_close(normalise(crop[None])[0], floats, atol=0, rtol=0)
    first = _box_first(data, 7)
    assert np.array_equal(first, _box_first(data, 7)) and not np.array_equal(first, _box_first(data, 8))
