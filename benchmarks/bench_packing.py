"""Trials packed on one device: aggregate images/s with 1, 2, 4 and 8 trials training at once.

    python benchmarks/bench_packing.py --device cuda                 # 1, 2, 4, 8 CIFAR-sized trials
    python benchmarks/bench_packing.py --small --trials 1 2          # tiny: checks the script works

A small CIFAR trial leaves a large GPU mostly idle (its kernels are short and its step waits on
the host), so several trials sharing the GPU, as a study does with `resources.gpus` 0.5, 0.25 or
0.125, can train more images per second together than one alone. Each trial here is its own
process (as a study's Ray workers are), runs the project's training loop (`resnet_ablate.train`)
on in-memory synthetic CIFAR-sized data, first trains a few untimed batches (Triton's JIT, cuDNN's
first calls), then waits at a barrier so that all the trials' timed runs start together. The
aggregate rate is every trial's images over the span from the first start to the last finish.

Each row (trials per device, the matching `resources.gpus`, aggregate and per-trial images/s, the
speed-up over one trial, the largest trial's peak memory) is appended to
benchmarks/results/packing.csv as each packing finishes.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import queue
import sys
import time
from dataclasses import dataclass

import torch

from _results import RESULTS, append_rows, peak_memory_mb, reset_peak_memory, run_context

BARRIER_TIMEOUT_S = 600  # every trial must be ready by then (import, data, warm-up)


@dataclass(frozen=True)
class TrialConfig:
    device: str
    depth: int
    image_size: int
    train_images: int
    batch: int
    epochs: int
    cuda_graphs: bool
    threads: int
    lr: float


@dataclass(frozen=True)
class TrialTiming:
    started: float  # time.time() at both ends: comparable across processes
    finished: float
    images: int
    images_per_second: float
    peak_memory_mb: float


def _train_one(config: TrialConfig, barrier, results) -> None:
    """One trial's process: warm up, wait for the others, then train timed."""
    torch.set_num_threads(config.threads)
    from resnet_ablate.arch import ResNetArch
    from resnet_ablate.data import SyntheticSpec, load_dataset
    from resnet_ablate.models import build
    from resnet_ablate.train import TrainRecipe, train

    device = torch.device(config.device)
    spec = SyntheticSpec(num_classes=10, channels=3, image_size=config.image_size,
                         train_size=config.train_images, test_size=config.batch)
    data = dataclasses.replace(load_dataset("synthetic", synthetic=spec), augmentation=None)
    arch = ResNetArch(family="cifar", depth=config.depth, shortcut="A", fused=True)
    recipe = TrainRecipe(epochs=config.epochs, batch_size=config.batch, lr=config.lr,
                         augment=False, milestones=(), cuda_graphs=config.cuda_graphs)

    def model() -> torch.nn.Module:
        return build(arch, num_classes=data.num_classes, in_channels=data.in_channels)

    warmup = dataclasses.replace(data, train_x=data.train_x[: 4 * config.batch],
                                 train_y=data.train_y[: 4 * config.batch])
    train(model, warmup, dataclasses.replace(recipe, epochs=1), seed=0, device=device)
    reset_peak_memory(device)
    barrier.wait(timeout=BARRIER_TIMEOUT_S)
    started = time.time()
    result = train(model, data, recipe, seed=0, device=device)
    finished = time.time()
    if not result.ok:
        raise RuntimeError(f"a packed trial did not complete: {result.reason}")
    results.put(TrialTiming(started, finished, config.train_images * config.epochs,
                            result.images_per_second, peak_memory_mb(device)))


def run_packing(config: TrialConfig, trials: int) -> list[TrialTiming]:
    """`trials` processes training at once; their timings, or an error naming what failed (as
    soon as one trial fails: the others, waiting for it at the barrier, are stopped)."""
    context = multiprocessing.get_context("spawn")  # CUDA cannot be forked into children
    barrier, results = context.Barrier(trials), context.Queue()
    processes = [context.Process(target=_train_one, args=(config, barrier, results))
                 for _ in range(trials)]
    for process in processes:
        process.start()
    timings: list[TrialTiming] = []
    deadline = time.monotonic() + BARRIER_TIMEOUT_S + 600
    try:
        while len(timings) < trials:
            try:
                timings.append(results.get(timeout=1))
            except queue.Empty:
                failed = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
                if failed or time.monotonic() > deadline:
                    raise RuntimeError(f"{len(failed)} of {trials} packed trials failed (exit "
                                       f"codes {failed}), {len(timings)} finished") from None
    finally:
        for process in processes:
            if len(timings) < trials:
                process.kill()
            process.join(timeout=60)
    return timings


def packing_row(config: TrialConfig, trials: int, timings: list[TrialTiming],
                one_trial_rate: float | None) -> dict:
    span = max(t.finished for t in timings) - min(t.started for t in timings)
    aggregate = sum(t.images for t in timings) / span
    return {
        "model": f"resnet{config.depth}", "image_size": config.image_size, "batch": config.batch,
        "train_images": config.train_images, "epochs": config.epochs,
        "cuda_graphs": config.cuda_graphs, "trials_per_device": trials,
        "gpus_per_trial": round(1 / trials, 4), "wall_seconds": round(span, 3),
        "aggregate_images_per_s": round(aggregate, 1),
        "per_trial_images_per_s": round(sum(t.images_per_second for t in timings) / trials, 1),
        "speedup_vs_one_trial": round(aggregate / (one_trial_rate or aggregate), 3),
        "peak_memory_mb": max(t.peak_memory_mb for t in timings),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="tiny trials: checks the script works")
    parser.add_argument("--trials", type=int, nargs="+", default=[1, 2, 4, 8],
                        help="trials per device to measure (1 is always measured first)")
    parser.add_argument("--depth", type=int, default=56, help="CIFAR ResNet depth (6n+2)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--cuda-graphs", action="store_true", help="each trial with cuda_graphs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per trial")
    parser.add_argument("--csv", default=RESULTS / "packing.csv")
    args = parser.parse_args(argv)
    if any(n < 1 for n in args.trials):
        parser.error(f"--trials takes counts of 1 or more, not {args.trials}")
    args.trials = sorted({1, *args.trials})  # the speed-ups are taken against one trial
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    config = TrialConfig(device=args.device, depth=args.depth,
                         image_size=8 if args.small else 32,
                         train_images=64 if args.small else 10_240, batch=16 if args.small else 128,
                         epochs=1 if args.small else args.epochs, cuda_graphs=args.cuda_graphs,
                         threads=args.threads, lr=0.01 if args.small else 0.1)
    context = run_context(torch.device(args.device))
    print(f"device: {context['device']}; resnet{config.depth}, {config.train_images} images x "
          f"{config.epochs} epochs per trial", file=sys.stderr, flush=True)
    rows: list[dict] = []
    one_trial_rate = None
    for trials in args.trials:
        print(f"[{trials} trial(s) at once]", file=sys.stderr, flush=True)
        row = {**context, **packing_row(config, trials, run_packing(config, trials),
                                        one_trial_rate)}
        one_trial_rate = one_trial_rate or row["aggregate_images_per_s"]
        print(f"  {trials} trial(s) per device (gpus {row['gpus_per_trial']}): "
              f"{row['aggregate_images_per_s']:.0f} images/s together, "
              f"x{row['speedup_vs_one_trial']:.2f} vs one trial", flush=True)
        append_rows(args.csv, [row])  # as it goes: a run cut short keeps what it measured
        rows.append(row)
    return rows


if __name__ == "__main__":
    main()
