"""Is the image-folder loader ever the bottleneck? First, training crops per second on one CPU
core and the cores that feed a GPU at `--gpu-images-per-s` (bench_decode.py: the old two-step
crop against the box-first uint8 one the loaders make now); then images/s of the data pipeline
alone (decode, augment, collate, in loader workers) against images/s of the train step alone
(forward, backward, SGD on batches already decoded, as a trial steps: the device's precision,
channels_last, fused SGD), per number of loader workers, measured side by side in one run; then
the two together, training on each batch as the loader hands it on (`fed_over_step`: 1 when
training never waits for data); on a GPU with torchvision's nvJPEG, the same with `decode: gpu`
(workers read files and draw boxes, the GPU decodes and crops between the steps: the `decode`
column). A pass is timed from the end of its workers' first round (their start-up, and the
batches they hand on at once then), so --batches must exceed the most workers measured.

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
from PIL import Image

import bench_decode
from _results import RESULTS, append_rows, device_name, source_commit, synchronize, timestamp
from resnet_ablate import ResNetArch, build
from resnet_ablate.data.decode import normalise
from resnet_ablate.data.device_decode import DeviceCrops, nvjpeg_decoder
from resnet_ablate.data.folders import load_image_folder
from resnet_ablate.execution import resolve_execution
from resnet_ablate.recipe import TrainRecipe
from resnet_ablate.replicas import Replicas
from resnet_ablate.train.step import Step


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


def timed_from(workers: int) -> int:
    """Batches a pass takes before its clock starts: the workers' first round, which holds their
    start-up (a process each) and ends with several batches at once, not the rate they keep."""
    return max(workers, 1)


def loader_rate(data, batch_size: int, batches: int, workers: int, device: torch.device,
                device_crops=None, train_step=None) -> float:
    """Images/s of one pass of the training loader (at most `batches` batches), timed from the
    end of its workers' first round; with `device_crops` (decode: gpu), its workers read files
    and draw boxes, and the device decodes and crops each batch, the time until the device is
    done included. With `train_step`, each batch is also trained on as it arrives (on the
    device, normalised there, as a trial's feed does): the rate of training fed by the loader."""
    # Pinned batches for a GPU, as a trial's feed asks for them (its copies then overlap)
    loader = data.train_loader(batch_size, 1, torch.Generator().manual_seed(0),
                               encoded=device_crops is not None,
                               pin_memory=device.type == "cuda")
    started, images = None, 0
    for index, (x, y, _) in enumerate(loader, start=1):
        if device_crops is not None:
            x, kept, _ = device_crops(x)
            y = y[kept]  # the images it decoded
        if train_step is not None:
            train_step(x, y)
        if index == timed_from(workers):
            synchronize(device)
            started = time.perf_counter()
        elif started is not None:
            images += x.shape[0]
        if index == batches:
            break
    if started is None or images == 0:
        raise SystemExit(f"bench_loader: --batches {batches} leaves no batch to time after the "
                         f"{timed_from(workers)} of {workers} workers' first round")
    synchronize(device)
    return images / (time.perf_counter() - started)


class TrialStep:
    """The train step as a trial runs it on streamed data (resnet_ablate.train.step.Step, with
    the recipe's defaults resolved as a trial's are: the device's precision, channels_last, no
    CUDA graphs for streamed data; fused SGD, no host syncs), on uint8 crops normalised on the
    device as the trial's feed does."""

    def __init__(self, model, batch_size: int, device: torch.device) -> None:
        recipe = TrainRecipe(batch_size=batch_size)
        execution = resolve_execution(recipe, device, in_memory=False)
        self.step = Step(model, recipe, execution, Replicas())
        self.device, self.memory_format = device, execution.torch_memory_format
        self.step.start_epoch()

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x = x.to(self.device, non_blocking=True)
        if x.dtype == torch.uint8:
            x = normalise(x)
        self.step(x.contiguous(memory_format=self.memory_format),
                  y.to(self.device, non_blocking=True), 1.0)


def step_rate(train_step: TrialStep, images: torch.Tensor, labels: torch.Tensor,
              steps: int) -> float:
    """Images/s of the train step alone, on one batch already on the device."""
    for _ in range(3):  # warm-up: Triton's JIT, cuDNN's autotuning
        train_step(images, labels)
    synchronize(train_step.device)
    started = time.perf_counter()
    for _ in range(steps):
        train_step(images, labels)
    synchronize(train_step.device)
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
    most = max(args.workers)
    if args.batches <= timed_from(most):
        raise SystemExit(f"bench_loader: --batches {args.batches} leaves no batch to time after "
                         f"the {timed_from(most)} of {most} workers' first round")
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # as a trial sets it
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
        train_step = TrialStep(model, args.batch_size, device)
        generator = torch.Generator().manual_seed(0)
        x, y, _ = next(iter(first.train_loader(args.batch_size, 1, generator)))
        step = step_rate(train_step, x.to(device), y.to(device), max(10, args.batches // 2))
        # decode: gpu where the device has a GPU JPEG decoder (torchvision's nvJPEG), beside cpu.
        decodes = {"cpu": None}
        if nvjpeg_decoder(device) is not None:
            decodes["gpu"] = DeviceCrops(device, args.image_size)
            encoded, _, _ = next(iter(first.train_loader(args.batch_size, 1, generator,
                                                         encoded=True)))
            decodes["gpu"](encoded)  # nvJPEG's start-up outside every timed pass
        for (decode, device_crops), workers in itertools.product(decodes.items(), args.workers):
            data = load_image_folder(root, image_size=args.image_size, loader_workers=workers)
            rate = loader_rate(data, args.batch_size, args.batches, workers, device, device_crops)
            fed = loader_rate(data, args.batch_size, args.batches, workers, device, device_crops,
                              train_step)
            row = {
                "timestamp": timestamp(), "commit": source_commit(), "device": device_name(device),
                "model": f"resnet{args.depth}", "image_size": args.image_size,
                "batch_size": args.batch_size, "loader_workers": workers,
                "loader_images_per_s": round(rate, 1), "step_images_per_s": round(step, 1),
                "loader_over_step": round(rate / step, 3),
                "source": args.root or "generated 426x320 JPEGs", "decode": decode,
                "fed_images_per_s": round(fed, 1), "fed_over_step": round(fed / step, 3),
                "step_precision": train_step.step.execution.precision,
            }
            print(f"decode {decode}, loader workers {workers}: loader {rate:.0f} images/s, train "
                  f"step {step:.0f} images/s: loader/step {rate / step:.2f}x; training fed by "
                  f"the loader {fed:.0f} images/s ({fed / step:.2f}x the step alone)", flush=True)
            append_rows(args.csv, [row])  # as it goes: a run cut short keeps what it measured
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
