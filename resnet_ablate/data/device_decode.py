"""Training crops decoded on the GPU (`decode: gpu`): the loader's workers only read each file and
draw its crop; the GPU decodes the batch's JPEGs (nvJPEG, through torchvision where it is
installed) and resamples each crop there.

A CPU core crops ~600 full-size ImageNet JPEGs a second (box first, at the lowest resolution the
crop needs: decode.py), so a GPU training ResNet-50 at ~3,000 images/s needs about 5 cores of
decoding; here a worker does a file read and a header parse per image, and the decoding moves to
the GPU, which has spare cycles while the step is memory-bound.

The crop is the CPU path's: the same box and flip, drawn from the same generator in the same order
(both paths draw them with `crops.training_draws`), so a run's augmentation does not depend on
where it decodes. The resampling is Pillow's (its bilinear filter over the exact box,
rounded to 8 bits after each pass), so a crop is the CPU path's within a level or so of 255:
decoders round differently, and where a crop is at most half the box's size the CPU path decodes
at reduced scale (JPEG's DCT scaling), which the GPU does not. The paper's preprocessing applies
as on the CPU path: PCA lighting drawn by the worker after the crop (the same draw), the
per-pixel mean subtracted on the device. Evaluation stays on the CPU path, so that test errors
never depend on the decoder.

Images the GPU decoder refuses (a PNG among JPEGs, CMYK JPEGs) are decoded by Pillow instead; an
image neither can decode is skipped and counted, as on the CPU path.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image

from .crops import Box, centre_box, eval_length, training_draws
from .decode import PLAIN, CropAugmentation, Preprocess, channel_normalised

# Decodes a batch of encoded images (1-D uint8 tensors) to uint8 (3, H, W) RGB tensors on the
# decoder's device; raises where any of them cannot be decoded.
BatchDecoder = Callable[[list[torch.Tensor]], list[torch.Tensor]]


@dataclass(frozen=True)
class EncodedCrop:
    """What a worker hands on for one image: the file's bytes and where its crop lies."""

    data: bytes  # the encoded file (bytes pickle between processes as one buffer)
    box: Box  # in the original image's pixels
    flip: bool
    lighting: tuple[float, float, float] | None = None  # the RGB shift of PCA lighting, if drawn


def encoded_crop(source: str | os.PathLike[str] | BinaryIO, *, image_size: int,
                 augmentation: CropAugmentation, rng: np.random.Generator | None,
                 preprocess: Preprocess = PLAIN) -> EncodedCrop | None:
    """The file's bytes and its training crop drawn from `rng`, as `decode.decode` draws them
    (the box from the image's size in its header, then the flip, then `preprocess`'s lighting);
    the centre view's box, not flipped, where `rng` is None (training without augmentation).
    None where the header cannot be read (the loader skips and counts it)."""
    try:
        if hasattr(source, "read"):
            data = source.read()
        else:
            with open(source, "rb") as file:
                data = file.read()
        with Image.open(io.BytesIO(data)) as opened:
            width, height = opened.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    if rng is None:
        box, flip = centre_box(width, height, image_size, eval_length(image_size)), False
    else:
        box, flip = training_draws(width, height, image_size, augmentation, rng)
    lighting = None
    if preprocess.lighting and rng is not None:
        lighting = tuple(float(v) for v in preprocess.statistics.lighting_shift(
            preprocess.lighting, rng))
    return EncodedCrop(data, box, flip, lighting)


def collate_encoded(batch: list[tuple[EncodedCrop | None, int]]) -> tuple[
        list[EncodedCrop], torch.Tensor, int]:
    """A batch of encoded crops with their labels, leaving out (and counting) unreadable ones."""
    kept = [(crop, label) for crop, label in batch if crop is not None]
    return ([crop for crop, _ in kept], torch.tensor([label for _, label in kept],
                                                     dtype=torch.long),
            len(batch) - len(kept))


_PROBED: dict[torch.device, bool] = {}  # whether nvJPEG decoded the probe, per device


def nvjpeg_decoder(device: torch.device) -> BatchDecoder | None:
    """torchvision's batched nvJPEG decoder on `device`, or None where it cannot decode there:
    no CUDA, torchvision not installed or built for another torch, or (checked once per device
    by decoding a small JPEG) an image extension that imported but does not decode."""
    if device.type != "cuda":
        return None
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except Exception:  # not installed, or built for another torch: the CPU path stays
        return None

    # torchvision allocates the decoded images on the caller's current stream, then writes them
    # from a stream of its own that does not wait for the caller's: a block the training step
    # freed while its queued kernels still read it could be written before they run. Allocated
    # on a stream that runs no other work, and marked as used by the caller's stream (so not
    # reused before what it queues on them has run), the images can take no such block. The
    # caller's stream waits for that stream's work (torchvision's own event): the images are
    # written when it reads them, whether or not the decoder also waits on the host, as
    # torchvision's does now.
    decoding = torch.cuda.Stream(device)

    def decoder(datas: list[torch.Tensor]) -> list[torch.Tensor]:
        consumer = torch.cuda.current_stream(device)
        with torch.cuda.stream(decoding):
            images = decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)
        consumer.wait_stream(decoding)
        for image in images:
            image.record_stream(consumer)
        return images

    if device not in _PROBED:
        _PROBED[device] = _decodes_a_probe(decoder)
    return decoder if _PROBED[device] else None


def _decodes_a_probe(decoder: BatchDecoder) -> bool:
    """Whether `decoder` decodes a 16x16 JPEG to the right size."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 90)).save(buffer, format="JPEG")
    try:
        image, = decoder([torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)])
    except Exception:  # whatever the extension raises: it does not decode here
        return False
    return tuple(image.shape) == (3, 16, 16)


def pillow_decode(data: torch.Tensor) -> torch.Tensor | None:
    """One encoded image as uint8 (3, H, W) RGB on the CPU, by Pillow; None where it cannot."""
    try:
        with Image.open(io.BytesIO(data.numpy().tobytes())) as opened:
            pixels = np.asarray(opened.convert("RGB"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1)


# A batch's images are resampled together, zero-padded to the largest: at most this many bytes
# of padded float32 pixels at once (a batch of large photographs goes in several groups).
RESAMPLE_BYTES = 512 * 2**20


def resample(image: torch.Tensor, box: Box, size: int, flip: bool) -> torch.Tensor:
    """The `size` x `size` crop of uint8 (3, H, W) `image` at `box`, flipped if asked, on the
    image's device (see `resample_batch`)."""
    return resample_batch([image], [box], size, [flip])[0]


def resample_batch(images: Sequence[torch.Tensor], boxes: Sequence[Box], size: int,
                   flips: Sequence[bool]) -> torch.Tensor:
    """uint8 (N, 3, size, size): each uint8 (3, H, W) image's crop at its box, flipped where
    asked, on the images' device: Pillow's bilinear resampling of the box (decode.train_crop's),
    as two matrix products, rounded to 8 bits after each pass as Pillow rounds them.

    The whole batch at once (zero-padded to its largest image, whose padding every weight
    leaves out), its weights worked out on the device: one image at a time, with its weights
    built on the CPU and copied over, an H200 resampled ~500 crops/s, less than its CPU decoded."""
    out = torch.empty((len(images), 3, size, size), dtype=torch.uint8,
                      device=images[0].device if images else "cpu")
    start = 0
    while start < len(images):
        end, height, width = start, 0, 0
        while end < len(images):
            h, w = max(height, images[end].shape[1]), max(width, images[end].shape[2])
            if end > start and (end + 1 - start) * 3 * h * w * 4 > RESAMPLE_BYTES:
                break
            end, height, width = end + 1, h, w
        out[start:end] = _resample_group(images[start:end], boxes[start:end], size,
                                         flips[start:end], height, width)
        start = end
    return out


def _resample_group(images, boxes, size, flips, height, width) -> torch.Tensor:
    device = images[0].device
    padded = torch.zeros((len(images), 3, height, width), dtype=torch.float32, device=device)
    for row, image in enumerate(images):
        padded[row, :, :image.shape[1], :image.shape[2]] = image
    heights = [image.shape[1] for image in images]
    widths = [image.shape[2] for image in images]
    across = _bilinear_weights([b[0] for b in boxes], [b[2] for b in boxes], widths, width, size,
                               device)  # (N, size, W)
    down = _bilinear_weights([b[1] for b in boxes], [b[3] for b in boxes], heights, height, size,
                             device)  # (N, size, H)
    rows = (padded @ across.transpose(1, 2)[:, None]).round_().clamp_(0, 255)  # (N, 3, H, size)
    crops = (down[:, None] @ rows).round_().clamp_(0, 255)  # (N, 3, size, size)
    flipped = torch.tensor(flips, dtype=torch.bool).to(device, non_blocking=True)
    crops = torch.where(flipped[:, None, None, None], crops.flip(-1), crops)
    return crops.to(torch.uint8)


def _bilinear_weights(starts: Sequence[float], ends: Sequence[float], in_sizes: Sequence[int],
                      padded_size: int, out_size: int, device: torch.device) -> torch.Tensor:
    """Pillow's bilinear filter from [start, end) of each image's `in_size` pixels to `out_size`,
    as an (N, out_size, padded_size) stack of matrices whose rows sum to 1 (the columns past an
    image's own size 0): output pixel i centred at start + (i + 0.5) * scale, a triangle of
    half-width max(scale, 1) (so it averages when shrinking), over the input pixels Pillow's
    window admits."""
    def column(values) -> torch.Tensor:  # (N, 1, 1), one value an image
        values = torch.tensor(values, dtype=torch.float64)
        return values.to(device, non_blocking=True)[:, None, None]

    start, end = column(starts), column(ends)
    in_size = column(in_sizes)
    scale = (end - start) / out_size
    width = torch.clamp(scale, min=1.0)
    centres = start + (torch.arange(out_size, dtype=torch.float64, device=device)[:, None]
                       + 0.5) * scale  # (N, out, 1)
    pixels = torch.arange(padded_size, dtype=torch.float64, device=device)  # (P,)
    first = torch.floor(centres - width + 0.5).clamp(min=0)
    last = torch.minimum(torch.floor(centres + width + 0.5), in_size)
    weights = (1 - ((pixels + 0.5 - centres) / width).abs()).clamp(min=0)
    weights *= (pixels >= first) & (pixels < last)
    totals = weights.sum(dim=2, keepdim=True)
    weights /= torch.where(totals > 0, totals, 1.0)
    return weights.to(torch.float32)


class DeviceCrops:
    """Turns a loader's batches of encoded crops into crops on `device`: uint8 (N, 3, S, S), or
    where `preprocess` lights or subtracts the per-pixel mean, float32 as decode.to_tensor makes
    them (lit, then centred)."""

    def __init__(self, device: torch.device, image_size: int,
                 decoder: BatchDecoder | None = None, preprocess: Preprocess = PLAIN) -> None:
        self.device, self.image_size, self.preprocess = device, image_size, preprocess
        self.decoder = decoder if decoder is not None else nvjpeg_decoder(device)
        self.by_pillow = 0  # images the decoder refused, decoded by Pillow instead
        self._warned = False
        if self.decoder is None:
            raise ValueError(f"decode: gpu needs torchvision's nvJPEG decoder on a CUDA device; "
                             f"{device} has none: set decode to cpu (or auto)")

    def __call__(self, crops: Sequence[EncodedCrop]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(crops, kept, skipped): the batch's crops on the device, the positions of the images
        that decoded (their labels' index), and how many could not be decoded."""
        images = self._decode([torch.frombuffer(bytearray(crop.data), dtype=torch.uint8)
                               for crop in crops])
        kept = [i for i, image in enumerate(images) if image is not None]
        if kept:
            out = resample_batch([images[i] for i in kept], [crops[i].box for i in kept],
                                 self.image_size, [crops[i].flip for i in kept])
        else:
            out = torch.empty((0, 3, self.image_size, self.image_size), dtype=torch.uint8,
                              device=self.device)
        if self.preprocess.lighting or self.preprocess.pixel_mean:
            out = self._preprocessed(out, [crops[i].lighting for i in kept])
        return out, torch.tensor(kept, dtype=torch.long), len(crops) - len(kept)

    def _preprocessed(self, crops: torch.Tensor,
                      shifts: list[tuple[float, float, float] | None]) -> torch.Tensor:
        """decode.to_tensor's arithmetic on the device: pixels in [0, 1], plus each crop's
        lighting shift, minus the per-pixel mean (or normalised with the channel mean and std)."""
        pixels = crops.float() / 255.0
        if any(shift is not None for shift in shifts):
            rgb = torch.tensor([shift or (0.0, 0.0, 0.0) for shift in shifts], dtype=torch.float32)
            pixels += rgb.to(self.device).view(-1, 3, 1, 1)
        if self.preprocess.pixel_mean:
            mean = torch.from_numpy(self.preprocess.statistics.mean_image)  # (S, S, 3)
            return pixels - mean.permute(2, 0, 1).to(self.device)
        return channel_normalised(pixels)

    def _decode(self, datas: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """All at once where the decoder takes the whole batch; else one by one, and what it
        refuses by Pillow (moved to the device), None where that fails too. Images Pillow had
        to decode are counted (`by_pillow`); a batch of several that the decoder refused
        entirely is warned about once, as a run decoding on the CPU while it says gpu."""
        if not datas:
            return []
        with contextlib.suppress(RuntimeError, ValueError):
            return list(self.decoder(datas))
        images: list[torch.Tensor | None] = []
        refused = 0
        for data in datas:
            try:
                images.append(self.decoder([data])[0])
            except (RuntimeError, ValueError):
                refused += 1
                image = pillow_decode(data)
                images.append(None if image is None else image.to(self.device))
        self.by_pillow += refused
        if refused == len(datas) > 1 and not self._warned:
            self._warned = True
            warnings.warn(f"decode: gpu: the GPU decoder refused all {refused} images of a "
                          "batch; Pillow decoded them in the training process. If that goes on, "
                          "set decode to cpu (its loader workers decode in parallel)",
                          RuntimeWarning, stacklevel=2)
        return images
