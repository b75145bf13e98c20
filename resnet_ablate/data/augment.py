"""The paper's training augmentation on whole batches on the device: zero pad, random crop back
to size, random horizontal flip, with the crops of an epoch drawn at once from a seeded generator."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Augmentation:
    """Training-time augmentation of the paper: zero pad, random crop back to size, random flip."""

    pad: int = 4
    flip: bool = True

    def __post_init__(self) -> None:
        if self.pad < 0:
            raise ValueError(f"Augmentation.pad must be >= 0, got {self.pad}")



def crop_and_flip(
    images: torch.Tensor, pad: int, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor
) -> torch.Tensor:
    """Zero-pad `images` (N, C, H, W) by `pad`, then cut image n's H x W window at (top[n], left[n])
    of the padded image and mirror it left-right where flip[n] is true. Offsets are checked."""
    n = images.shape[0]
    for label, offsets in (("top", top), ("left", left)):
        if offsets.shape != (n,) or (n and (offsets.min() < 0 or offsets.max() > 2 * pad)):
            raise ValueError(f"{label} must be {n} offsets in [0, {2 * pad}] for pad {pad}")
    device = images.device
    return gather_crops(images, pad, top.to(device), left.to(device), flip.to(device))


def gather_crops(
    images: torch.Tensor, pad: int, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor
) -> torch.Tensor:
    """`crop_and_flip` without its checks, for offsets already on the images' device and known to
    be valid (`draw_crops` makes such): checking device tensors would stall on a host sync.

    One gather for the whole batch: no per-image Python loop, so it stays cheap on CPU.
    """
    n, c, h, w = images.shape
    device = images.device
    padded = F.pad(images, (pad, pad, pad, pad)) if pad else images
    rows = top[:, None] + torch.arange(h, device=device)[None, :]
    columns = torch.arange(w, device=device)[None, :].expand(n, w)
    columns = torch.where(flip[:, None], columns.flip(1), columns) + left[:, None]
    batch = torch.arange(n, device=device)
    channel = torch.arange(c, device=device)
    if c > 1 and images.is_contiguous(memory_format=torch.channels_last):
        # Gathered in NHWC order, so the batch comes out channels_last like its source (no copy).
        nhwc = padded.permute(0, 2, 3, 1)
        crops = nhwc[batch[:, None, None, None], rows[:, :, None, None],
                     columns[:, None, :, None], channel[None, None, None, :]]
        return crops.permute(0, 3, 1, 2)
    return padded[batch[:, None, None, None], channel[None, :, None, None],
                  rows[:, None, :, None], columns[:, None, None, :]]


@dataclass(frozen=True)
class CropDraws:
    """Random crop offsets and flips for `n` images (see `draw_crops`)."""

    top: torch.Tensor
    left: torch.Tensor
    flip: torch.Tensor

    def to(self, device: torch.device | str) -> CropDraws:
        return CropDraws(self.top.to(device), self.left.to(device), self.flip.to(device))

    def __getitem__(self, index: slice) -> CropDraws:
        return CropDraws(self.top[index], self.left[index], self.flip[index])


def draw_crops(n: int, augmentation: Augmentation, generator: torch.Generator) -> CropDraws:
    """The paper's augmentation draws for `n` images, from `generator` (a CPU generator).

    The draws happen on the CPU whatever the images' device, so a seed gives the same crops on
    every device; a training loop draws a whole epoch at once and moves it to the device once.
    """
    top = torch.randint(0, 2 * augmentation.pad + 1, (n,), generator=generator)
    left = torch.randint(0, 2 * augmentation.pad + 1, (n,), generator=generator)
    if augmentation.flip:
        flip = torch.randint(0, 2, (n,), generator=generator).bool()
    else:
        flip = torch.zeros(n, dtype=torch.bool)
    return CropDraws(top, left, flip)


def random_crop_flip(
    images: torch.Tensor, augmentation: Augmentation, generator: torch.Generator
) -> torch.Tensor:
    """The paper's training augmentation on a batch, drawn from `generator` (a CPU generator).

    Padding is zero in normalised space, i.e. the training mean, as for the paper's
    mean-subtracted inputs.
    """
    draws = draw_crops(images.shape[0], augmentation, generator).to(images.device)
    return gather_crops(images, augmentation.pad, draws.top, draws.left, draws.flip)
