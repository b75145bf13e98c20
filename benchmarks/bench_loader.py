"""Is the image-folder loader ever the bottleneck? First, training crops per second on one CPU
core and the cores that feed a GPU at `--gpu-images-per-s` (bench_decode.py: the old two-step
crop against the box-first uint8 one the loaders make now); then images/s of the data pipeline
alone (decode, augment, collate, in loader workers) against images/s of the train step alone
(forward, backward, SGD on batches already decoded), per number of loader workers, measured side
by side in one run; on a GPU with torchvision's nvJPEG, the same with `decode: gpu` (workers
read files and draw boxes, the GPU decodes and crops: the `decode` column).

    python benchmarks/bench_loader.py                         # a generated folder, 0/1/2 workers
    python benchmarks/bench_loader.py --root data/imagenette2-320 --image-size 224 --device cuda

The generated folder holds JPEGs of the size Imagenette's 320-px variant has. A ratio
loader/step above 1 means the loader keeps up: training never waits for data.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import bench_decode
from _results import RESULTS, append_rows, device_name, source_commit, timestamp
from resnet_ablate import ResNetArch, build
from resnet_ablate.data.decode import normalise
from resnet_ablate.data.device_decode import DeviceCrops, nvjpeg_decoder
from resnet_ablate.data.folders import load_image_folder


def generate_folder(root: Path, classes: int, per_class: int, size: tuple[int, int]) -> Path:
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", max(1, per_class // 10))):
        for c in range(classes):
            folder = root / split / f"class{c:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
    return root


def loader_rate(data, batch_size: int, batches: int, device_crops=None) -> float:
    """Images/s of one pass of the training loader (at most `batches` batches); with
    `device_crops` (decode: gpu), its workers read files and draw boxes, and the device decodes
    and crops each batch, the time until the device is done included."""
    loader = data.train_loader(batch_size, 1, torch.Generator().manual_seed(0),
                               encoded=device_crops is not None)
    started, images = time.perf_counter(), 0
    for index, (x, _, _) in enumerate(loader):
        if device_crops is not None:
            x = device_crops(x)[0]
        images += x.shape[0]
        if index + 1 == batches:
            break
    if device_crops is not None and device_crops.device.type == "cuda":
        torch.cuda.synchronize(device_crops.device)
    return images / (time.perf_counter() - started)


def step_rate(model, images: torch.Tensor, labels: torch.Tensor, steps: int, device) -> float:
    """Images/s of the train step alone, on one batch already on the device."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()

    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()

    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * images.shape[0] / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", help="an image folder (default: a generated one)")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--depth", type=int, default=18, help="ImageNet ResNet depth")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--csv", default=RESULTS / "loader.csv")
    parser.add_argument("--decode-size", type=int, default=224,
                        help="the crop size of the cores-per-GPU figure: the training size "
                             "(the loader's own timing uses --image-size)")
    parser.add_argument("--decode-seconds", type=float, default=2.0,
                        help="per way of cropping, for the crops/s per core (0: skip it)")
    parser.add_argument("--gpu-images-per-s", type=float, default=3000.0,
                        help="a GPU's training rate to feed (3,000: ResNet-50 in bf16 on an H100)")
    parser.add_argument("--decode-csv", help="default: loader_decode.csv beside --csv")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.decode_seconds > 0:
        threads = torch.get_num_threads()
        bench_decode.measure(image_size=args.decode_size, images=24, seconds=args.decode_seconds,
                             gpu_images_per_s=args.gpu_images_per_s,
                             csv=args.decode_csv or Path(args.csv).with_name("loader_decode.csv"))
        torch.set_num_threads(threads)

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.root) if args.root else generate_folder(
            Path(scratch), classes=10, per_class=max(8, args.batches * args.batch_size // 10 + 1),
            size=(426, 320))
        first = load_image_folder(root, image_size=args.image_size, loader_workers=0)
        model = build(ResNetArch(family="imagenet", depth=args.depth),
                      num_classes=first.num_classes).to(device, memory_format=torch.channels_last)
        x, y, _ = next(iter(first.train_loader(args.batch_size, 1, torch.Generator().manual_seed(0))))
        # Loaders hand uint8 crops on; the device normalises them, as a trial's feed does.
        x = normalise(x.to(device)).contiguous(memory_format=torch.channels_last)
        y = y.to(device)
        step = step_rate(model, x, y, max(2, args.batches // 3), device)
        rows = []
        # decode: gpu where the device has a GPU JPEG decoder (torchvision's nvJPEG), beside cpu.
        decodes = {"cpu": None}
        if nvjpeg_decoder(device) is not None:
            decodes["gpu"] = DeviceCrops(device, args.image_size)
        for (decode, device_crops), workers in itertools.product(decodes.items(), args.workers):
            data = load_image_folder(root, image_size=args.image_size, loader_workers=workers)
            if device_crops is not None:  # nvJPEG's and CUDA's start-up outside the timed pass
                loader_rate(data, args.batch_size, 1, device_crops)
            rate = loader_rate(data, args.batch_size, args.batches, device_crops)
            rows.append({
                "timestamp": timestamp(), "commit": source_commit(), "device": device_name(device),
                "model": f"resnet{args.depth}", "image_size": args.image_size,
                "batch_size": args.batch_size, "loader_workers": workers,
                "loader_images_per_s": round(rate, 1), "step_images_per_s": round(step, 1),
                "loader_over_step": round(rate / step, 3),
                "source": args.root or "generated 426x320 JPEGs", "decode": decode,
            })
            print(f"decode {decode}, loader workers {workers}: loader {rate:.0f} images/s, train "
                  f"step {step:.0f} images/s: loader/step {rate / step:.2f}x", flush=True)
    append_rows(args.csv, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
