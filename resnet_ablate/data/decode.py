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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO, Literal

import numpy as np
import torch
from PIL import Image

from ..recipe import TEST_VIEWS
from ..spec.catalogue import STREAMED_AUGMENTATIONS
from .errors import NoImages
from .crops import PAPER_CROP, centre_crop, eval_length, resize_shorter, training_draws

# ImageNet's per-channel training mean and std (RGB, pixel values in [0, 1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# How a streamed data set crops its training images (not the in-memory `augment.Augmentation`):
# the spec's list, and its Literal for type checkers (a test holds the two together).
AUGMENTATIONS = STREAMED_AUGMENTATIONS
CropAugmentation = Literal["scale", "random_resized_crop"]


def check_streamed_options(augmentation: str, image_size: int, loader_workers: int) -> None:
    """A streamed data set's options (image folders and shards alike), each refused by name."""
    if augmentation not in AUGMENTATIONS:
        raise ValueError(f"augmentation={augmentation!r} is not one of {', '.join(AUGMENTATIONS)}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an int >= 8, got {image_size!r}")
    if isinstance(loader_workers, bool) or not isinstance(loader_workers, int) or loader_workers < 0:
        raise ValueError(f"loader_workers must be an int >= 0, got {loader_workers!r}")
@dataclass(frozen=True, eq=False)
class PixelStatistics:
    """A data set's training pixels (values in [0, 1]) as the paper's preprocessing needs them:
    the per-pixel mean of the centre crops (`mean_image`, (S, S, 3)), and the eigen-decomposition
    of the RGB covariance over all their pixels (`eigenvalues` ascending, `eigenvectors` as
    columns: numpy's eigh) for AlexNet's PCA lighting."""

    mean_image: np.ndarray
    eigenvalues: np.ndarray
    eigenvectors: np.ndarray

    @classmethod
    def of(cls, crops: Sequence[np.ndarray] | np.ndarray, tried: int | None = None
           ) -> PixelStatistics:
        """From centre crops (N, S, S, 3) in [0, 1]: their mean image, and the eigh of the
        population covariance of their N*S*S RGB pixels (accumulated in float64). NoImages
        where there is none (`tried`: how many images were read for them)."""
        if len(crops) == 0:
            raise NoImages(f"none of the {tried or 0} training images read for the data set's "
                           "pixel statistics could be decoded; check the data set's files")
        crops = np.stack(crops)
        pixels = crops.reshape(-1, 3).astype(np.float64)
        centred = pixels - pixels.mean(axis=0)
        covariance = centred.T @ centred / pixels.shape[0]
        eigenvalues, eigenvectors = np.linalg.eigh(covariance)
        return cls(crops.mean(axis=0, dtype=np.float64).astype(np.float32),
                   np.clip(eigenvalues, 0, None), eigenvectors)

    def lighting_shift(self, std: float, rng: np.random.Generator) -> np.ndarray:
        """AlexNet's colour augmentation (Krizhevsky et al. 2012, Sec. 4.1), which the paper
        cites: the RGB shift sum_i alpha_i lambda_i p_i, alpha_i ~ N(0, std), added to every
        pixel, with p_i and lambda_i the eigenvectors and eigenvalues of the RGB covariance of
        pixels in [0, 1]. That is AlexNet's formula as written, and fb.resnet.torch's (which
        multiplies its alphas by fixed ImageNet eigenvalues, 0.2175, 0.0188 and 0.0045); the
        eigenvalues here are the data set's own."""
        alpha = rng.normal(0.0, std, size=3)
        return (self.eigenvectors @ (alpha * self.eigenvalues)).astype(np.float32)


@dataclass(frozen=True)
class Preprocess:
    """How a decoded crop becomes the model's input: AlexNet's PCA lighting on training crops
    (`lighting`: alpha's std, 0.1 in AlexNet and the paper; 0 for none), and the per-pixel mean
    subtracted (`pixel_mean`, the paper's; `statistics` then needed) instead of ImageNet's
    channel mean and std."""

    lighting: float = 0.0
    pixel_mean: bool = False
    statistics: PixelStatistics | None = None

    def __post_init__(self) -> None:
        if (self.lighting or self.pixel_mean) and self.statistics is None:
            raise ValueError("lighting and pixel_mean need the data set's PixelStatistics")


PLAIN = Preprocess()


def to_tensor(image: Image.Image, preprocess: Preprocess = PLAIN,
              rng: np.random.Generator | None = None) -> torch.Tensor:
    """RGB image -> float32 (3, H, W): lit (training, with `rng`) and normalised as `preprocess`
    says; by default with ImageNet's channel mean and std. A per-pixel mean is subtracted where
    the image has the crop's size, else its channel average (a fully-convolutional view)."""
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    stats = preprocess.statistics
    if preprocess.lighting and rng is not None:
        pixels = pixels + stats.lighting_shift(preprocess.lighting, rng)
    if preprocess.pixel_mean:
        mean = stats.mean_image
        pixels = pixels - (mean if mean.shape == pixels.shape else mean.mean(axis=(0, 1)))
    else:
        pixels = (pixels - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD,
                                                                               np.float32)
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def _open(source: str | os.PathLike[str] | BinaryIO) -> Image.Image | None:
    try:
        with Image.open(source) as opened:
            return opened.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def decodable(source: str | os.PathLike[str] | BinaryIO) -> bool:
    """Whether the image decodes: read to its end at the lowest scale Pillow's draft allows (a
    JPEG at 1/8, which still reads every byte), as a training crop may read it."""
    try:
        with Image.open(source) as opened:
            opened.draft("RGB", (1, 1))
            opened.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return False
    return True


def train_crop(source: str | os.PathLike[str] | BinaryIO, *, image_size: int,
               augmentation: CropAugmentation, rng: np.random.Generator) -> Image.Image | None:
    """One training crop, flipped or not, drawn from `rng`: its box drawn from the image's size
    (read from the header), the image decoded at the lowest resolution the crop needs (a JPEG at
    1/2, 1/4 or 1/8 scale, Pillow's draft), and only the box resampled. None where the image
    cannot be decoded."""
    try:
        with Image.open(source) as opened:
            width, height = opened.size
            box, flip = training_draws(width, height, image_size, augmentation, rng)
            per_output_pixel = min(box[2] - box[0], box[3] - box[1]) / image_size
            opened.draft("RGB", (math.ceil(width / per_output_pixel),
                                 math.ceil(height / per_output_pixel)))
            image = opened.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    rx, ry = image.size[0] / width, image.size[1] / height  # the draft's reduction, if any
    image = image.resize((image_size, image_size), Image.BILINEAR,
                         box=(box[0] * rx, box[1] * ry, box[2] * rx, box[3] * ry))
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return image


def decode(source: str | os.PathLike[str] | BinaryIO, *, image_size: int,
           augmentation: CropAugmentation, rng: np.random.Generator | None,
           preprocess: Preprocess = PLAIN) -> torch.Tensor | None:
    """One image file (a path or an open binary file) as a normalised float tensor: augmented
    with `rng`'s draws for training, the centre crop for evaluation (rng None); None where it
    cannot be decoded (the loader skips and counts it)."""
    if rng is None:
        image = _open(source)
        return None if image is None else to_tensor(centre_view(image, image_size), preprocess)
    image = train_crop(source, image_size=image_size, augmentation=augmentation, rng=rng)
    return None if image is None else to_tensor(image, preprocess, rng)


def decode_sample(source: str | os.PathLike[str] | BinaryIO, *, image_size: int,
                  augmentation: CropAugmentation, rng: np.random.Generator | None,
                  preprocess: Preprocess = PLAIN) -> torch.Tensor | None:
    """What a loader hands on: `decode`'s crop as uint8 (3, S, S), normalised on the device
    (`normalise`: a quarter of the bytes to copy, no float work in the workers), or, where
    `preprocess` lights or subtracts the per-pixel mean, `decode`'s float tensor."""
    if preprocess.lighting or preprocess.pixel_mean:
        return decode(source, image_size=image_size, augmentation=augmentation, rng=rng,
                      preprocess=preprocess)
    if rng is None:
        image = _open(source)
        image = None if image is None else centre_view(image, image_size)
    else:
        image = train_crop(source, image_size=image_size, augmentation=augmentation, rng=rng)
    return None if image is None else torch.from_numpy(np.array(image)).permute(2, 0, 1)


def normalise(images: torch.Tensor) -> torch.Tensor:
    """A batch of uint8 crops (N, 3, H, W), on whatever device, as `to_tensor` normalises them
    (ImageNet's channel mean and std, in float32); a float batch as it is."""
    if images.dtype != torch.uint8:
        return images
    return channel_normalised(images.float() / 255.0)


def channel_normalised(pixels: torch.Tensor) -> torch.Tensor:
    """A float batch of pixels in [0, 1] (N, 3, H, W) normalised with ImageNet's channel mean
    and std, on its own device."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    return (pixels - mean) / std


def centre_view(image: Image.Image, image_size: int) -> Image.Image:
    """The evaluation's single crop: the centre `image_size` square of the image scaled to
    256/224 of it."""
    return centre_crop(resize_shorter(image, eval_length(image_size)), image_size)


def centre_pixels(source: str | os.PathLike[str] | BinaryIO, image_size: int) -> np.ndarray | None:
    """The evaluation's centre crop as pixels (S, S, 3) in [0, 1], for PixelStatistics."""
    image = _open(source)
    return None if image is None else np.asarray(centre_view(image, image_size),
                                                 dtype=np.float32) / 255.0


# Test-time views (He et al., Sec. 3.4): "ten_crop", the 4 corner and centre crops of the image
# scaled to 256/224 of the crop and their mirror images; "multi_scale", the whole image with its
# shorter side at each scale (fully-convolutional: the model's global pooling takes any size).
VIEWS = TEST_VIEWS
# The paper's scales for a 224 crop, {224, 256, 384, 480, 640}; other crop sizes scale them.
PAPER_SCALES = (224, 256, 384, 480, 640)


def decode_views(source: str | os.PathLike[str] | BinaryIO, *, image_size: int, view: str,
                 preprocess: Preprocess = PLAIN) -> list[torch.Tensor] | None:
    """The test-time views of one image, as a list of (V, 3, h, w) tensors whose scores are
    averaged: one (10, 3, S, S) for "ten_crop"; one (1, 3, h, w) per scale for "multi_scale".
    None where the image cannot be decoded."""
    image = _open(source)
    if image is None:
        return None
    if view == "ten_crop":
        scaled = resize_shorter(image, eval_length(image_size))
        width, height = scaled.size
        s = image_size
        corners = [(0, 0), (width - s, 0), (0, height - s), (width - s, height - s),
                   ((width - s) // 2, (height - s) // 2)]
        crops = [scaled.crop((x, y, x + s, y + s)) for x, y in corners]
        crops += [crop.transpose(Image.FLIP_LEFT_RIGHT) for crop in crops]
        return [torch.stack([to_tensor(crop, preprocess) for crop in crops])]
    if view == "multi_scale":
        return [to_tensor(resize_shorter(image, round(image_size * scale / PAPER_CROP)),
                          preprocess)[None] for scale in PAPER_SCALES]
    raise ValueError(f"view {view!r} is not one of {', '.join(VIEWS)}")


def collate_views(batch: list[tuple[list[torch.Tensor] | None, int]]) -> tuple[
        list[torch.Tensor], torch.Tensor, int]:
    """(views, labels, unreadable images left out) of a batch of decode_views' results: each
    view stacked over the batch's images to (B, V, 3, h, w); images of one batch must share their
    views' sizes (ten crops always do; a multi-scale batch is one image)."""
    kept = [(x, y) for x, y in batch if x is not None]
    if not kept:
        return [], torch.empty(0, dtype=torch.int64), len(batch)
    views = [torch.stack([x[i] for x, _ in kept]) for i in range(len(kept[0][0]))]
    return views, torch.tensor([y for _, y in kept], dtype=torch.int64), len(batch) - len(kept)


def collate(batch: list[tuple[torch.Tensor | None, int]]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(images, labels, how many of the batch's images were unreadable and left out)."""
    kept = [(x, y) for x, y in batch if x is not None]
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.int64), len(batch)
    images = torch.stack([x for x, _ in kept])
    return images, torch.tensor([y for _, y in kept], dtype=torch.int64), len(batch) - len(kept)


def one_thread(_worker: int) -> None:
    torch.set_num_threads(1)  # a decoding worker is one CPU of the trial's

