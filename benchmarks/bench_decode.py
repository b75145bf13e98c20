"""How many CPU cores feed one GPU? Training crops made per second on one core, on full-size
generated JPEGs (ImageNet's common sizes), for three ways of making a crop, measured side by side
in one run, and the cores a GPU training at a given rate needs from the fastest:

- two-step (before): decode the whole image, resize it whole, cut the crop, normalise to float
  on the CPU (the paper's recipe as written);
- box-first float: the crop's box drawn from the header, the JPEG decoded at the lowest scale
  the crop needs (Pillow's draft), only the box resampled, then normalised on the CPU;
- box-first uint8: the same crop handed on as uint8, normalised on the device (what the
  streamed loaders do now).

Where simplejpeg (libjpeg-turbo without Pillow's image objects) is installed, two more rows time
the JPEG decode alone at half scale, the scale most crops decode at, through Pillow and through
simplejpeg: whether another CPU decoder would shorten a crop enough to be worth a dependency.

    python benchmarks/bench_decode.py                          # 1 core, 3,000 images/s a GPU
    python benchmarks/bench_decode.py --gpu-images-per-s 3000 --image-size 224

bench_loader.py runs it first, then times the loader (its worker processes) against the step.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from _results import RESULTS, append_rows, run_context
from resnet_ablate.data.crops import scaled_size
from resnet_ablate.data.decode import IMAGENET_MEAN, IMAGENET_STD, decode, decode_sample

# ImageNet's commonest sizes (about 80% of its training images are 500 pixels on the longer side).
SIZES = ((500, 375), (375, 500), (500, 333), (500, 400), (333, 500), (640, 480))


def photo_jpeg(width: int, height: int, rng: np.random.Generator) -> bytes:
    """A smooth, photo-like JPEG at quality 90 (noise alone would decode unlike a photograph)."""
    y, x = np.mgrid[0:height, 0:width]
    phase = rng.uniform(0, 6, 3)
    base = np.stack([128 + 100 * np.sin(x / rng.uniform(20, 60) + p) *
                     np.cos(y / rng.uniform(15, 50) - p) for p in phase], -1)
    pixels = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def two_step(data: bytes, size: int, rng: np.random.Generator) -> torch.Tensor:
    """The crop as the loader made it before: the whole image decoded and resized, then cut."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    length = int(rng.integers(round(size * 256 / 224), round(size * 480 / 224) + 1))
    width, height = scaled_size(*image.size, length)
    image = image.resize((width, height), Image.BILINEAR)
    left, top = int(rng.integers(0, width - size + 1)), int(rng.integers(0, height - size + 1))
    image = image.crop((left, top, left + size, top + size))
    if rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    pixels = (pixels - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def pillow_half_decode(data: bytes, size: int, rng: np.random.Generator) -> Image.Image:
    """Only the JPEG decode, at half scale (Pillow's draft), as box-first does for most crops."""
    image = Image.open(io.BytesIO(data))
    image.draft("RGB", (image.size[0] // 2, image.size[1] // 2))
    return image.convert("RGB")


def simplejpeg_half_decode(data: bytes, size: int, rng: np.random.Generator) -> np.ndarray:
    """The same decode through simplejpeg (its DCT scaling picks the same 1/2 scale)."""
    import simplejpeg

    height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    return simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=height // 2,
                                  min_width=width // 2)


def _decoders() -> tuple[tuple[str, object], ...]:
    """The decode-only rows, where simplejpeg is installed to compare Pillow with."""
    if importlib.util.find_spec("simplejpeg") is None:
        return ()
    return (("decode only: pillow, 1/2 scale", pillow_half_decode),
            ("decode only: simplejpeg, 1/2 scale", simplejpeg_half_decode))


def crops_per_second(make, images: list[bytes], size: int, seconds: float) -> float:
    """Crops/s of `make` on this one core, cycling over `images` for about `seconds`."""
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or done < len(images):
        make(images[done % len(images)], size, np.random.default_rng(done))
        done += 1
    return done / (time.perf_counter() - started)


def measure(*, image_size: int, images: int, seconds: float, gpu_images_per_s: float,
            csv: str | Path) -> dict[str, float]:
    """Crops/s per core of each way of cropping, printed and appended to `csv`."""
    torch.set_num_threads(1)  # one core: the figure is per core
    rng = np.random.default_rng(0)
    jpegs = [photo_jpeg(*SIZES[i % len(SIZES)], rng) for i in range(images)]

    def box_first_float(data, size, draws):
        return decode(io.BytesIO(data), image_size=size, augmentation="scale", rng=draws)

    def box_first_uint8(data, size, draws):
        return decode_sample(io.BytesIO(data), image_size=size, augmentation="scale", rng=draws)

    # The load when measured: on a shared machine other processes take cores from this one.
    context = {**run_context(torch.device("cpu")),
               "load_average_1min": round(os.getloadavg()[0], 2), "cpus": os.cpu_count()}
    rows, rates = [], {}
    for name, make in (("two-step float", two_step), ("box-first float", box_first_float),
                       ("box-first uint8", box_first_uint8), *_decoders()):
        rates[name] = crops_per_second(make, jpegs, image_size, seconds)
        decode_only = name.startswith("decode only")  # a part of a crop: no cores per GPU
        cores = "" if decode_only else math.ceil(gpu_images_per_s / rates[name])
        rows.append({**context, "case": name, "image_size": image_size,
                     "crops_per_s_per_core": round(rates[name], 1),
                     "ms_per_crop": round(1000 / rates[name], 3),
                     "gpu_images_per_s": gpu_images_per_s, "cores_per_gpu": cores,
                     "source": f"{images} generated JPEGs, "
                               f"{', '.join(f'{w}x{h}' for w, h in SIZES)}"})
        what = "decodes" if decode_only else f"{image_size}px crops"
        feeds = "" if decode_only else f": {cores} cores feed a GPU at {gpu_images_per_s:.0f} images/s"
        print(f"{name:34s} {rates[name]:7.0f} {what}/s per core ({1000 / rates[name]:.2f} ms)"
              f"{feeds}", flush=True)
    print(f"box-first uint8 / two-step: {rates['box-first uint8'] / rates['two-step float']:.2f}x "
          f"(load average {context['load_average_1min']} on {context['cpus']} CPUs)")
    append_rows(csv, rows)
    return rates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--images", type=int, default=48, help="generated JPEGs to cycle over")
    parser.add_argument("--seconds", type=float, default=4.0, help="per way of cropping")
    parser.add_argument("--gpu-images-per-s", type=float, default=3000.0,
                        help="a GPU's training rate to feed (3,000: ResNet-50 in bf16 on an H100)")
    parser.add_argument("--csv", default=RESULTS / "loader_decode.csv")
    args = parser.parse_args(argv)
    measure(image_size=args.image_size, images=args.images, seconds=args.seconds,
            gpu_images_per_s=args.gpu_images_per_s, csv=args.csv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
