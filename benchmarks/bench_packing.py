"""Trials packed on one device: aggregate images/s with 1, 2, 4 and 8 trials training at once.

    python benchmarks/bench_packing.py --device cuda                 # 1, 2, 4, 8 CIFAR-sized trials
    python benchmarks/bench_packing.py --small --trials 1 2          # tiny: checks the script works

A small CIFAR trial leaves a large GPU mostly idle (its kernels are short and its step waits on
the host), so several trials sharing the GPU, as a study does with `resources.gpus` 0.5, 0.25 or
0.125, can train more images per second together than one alone. Each trial here is its own
process (as a study's Ray workers are), runs the project's training loop (`resnet_ablate.train`)
on in-memory synthetic CIFAR-sized data, first trains a few untimed batches (Triton's JIT, cuDNN's
first calls), then waits at a barrier so that all the trials' runs start together, and again at
the end of their first epochs. Each run is timed from there (where it trains more than one
epoch): the first holds what a trial pays once (building the model, the data's copy to the
device, a CUDA graph's warm-up and capture), mostly host work that packed trials overlap with
each other's GPU work, so that timed from the start a packing's gain would be overstated where a
trial's 164 epochs amortize it. The aggregate rate is every trial's timed images over the span
from the first timed start to the last finish.

Each row (trials per device, the matching `resources.gpus`, aggregate and per-trial images/s, the
speed-up over one trial, the largest trial's peak memory) is appended to
benchmarks/results/packing.csv as each packing finishes.

With `--stack-seeds K` each packed process trains K seeds of its trial stacked into one model
(`train_seeds`, as a study with `resources.stack_seeds: K` runs a grid point's seeds), and the
speed-ups are over one such stack: what packing adds on top of stacking (Table 6 has 5 depths,
each a stack of 5 seeds).

With `--mps` the trials share the GPU through CUDA's Multi-Process Service, started for the run
and stopped after it (`nvidia-cuda-mps-control -d`, then `quit`; the node's operator would run it
for a study's Ray workers), also where a timeout's SIGTERM ends the run; a daemon that a killed
run left is stopped first. Where the daemon does not start or a process cannot start CUDA
through it, its log is printed, the trials run without it, and the rows' `mps` column says so.
Without it, processes time-slice the GPU: on an H200, 8 ResNet-56 trials replayed from CUDA
graphs trained only 1.10x one trial's images/s (3.61x without graphs, whose host gaps the others
fill). MPS lets their kernels run side by side.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import multiprocessing
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from _results import (append_rows, results_csv, peak_memory_mb, reset_peak_memory, run_context,
                      timed_epochs)

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
    stack_seeds: int = 1  # seeds trained as one stacked model in each process (train_seeds)


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
    from resnet_ablate.train import TrainRecipe, train, train_seeds

    device = torch.device(config.device)
    spec = SyntheticSpec(num_classes=10, channels=3, image_size=config.image_size,
                         train_size=config.train_images, test_size=config.batch)
    data = dataclasses.replace(load_dataset("synthetic", synthetic=spec), augmentation=None)
    arch = ResNetArch(family="cifar", depth=config.depth, shortcut="A", fused=True)
    recipe = TrainRecipe(epochs=config.epochs, batch_size=config.batch, lr=config.lr,
                         augment=False, milestones=(), cuda_graphs=config.cuda_graphs)

    def model() -> torch.nn.Module:
        return build(arch, num_classes=data.num_classes, in_channels=data.in_channels)

    ended: dict[int, float] = {}  # each epoch's end (its first seed's record, when stacked)
    timing = False

    def on_epoch(*arguments) -> None:  # train's (record) or train_seeds' (index, record)
        epoch = arguments[-1].epoch
        if timing and epoch == 1 and epoch not in ended and config.epochs > 1:
            barrier.wait(timeout=BARRIER_TIMEOUT_S)  # every trial's timed epochs start together
        ended.setdefault(epoch, time.time())

    def run(data, recipe) -> list:
        if config.stack_seeds == 1:
            return [train(model, data, recipe, seed=0, device=device, on_epoch=on_epoch)]
        return train_seeds(model, data, recipe, seeds=range(config.stack_seeds), device=device,
                           on_epoch=on_epoch)

    warmup = dataclasses.replace(data, train_x=data.train_x[: 4 * config.batch],
                                 train_y=data.train_y[: 4 * config.batch])
    run(warmup, dataclasses.replace(recipe, epochs=1))
    ended.clear()
    timing = True
    reset_peak_memory(device)
    barrier.wait(timeout=BARRIER_TIMEOUT_S)
    started = time.time()
    trained = run(data, recipe)
    finished = time.time()
    if not all(result.ok for result in trained):
        raise RuntimeError("a packed trial did not complete: "
                           f"{next(r.reason for r in trained if not r.ok)}")
    results.put(timed_run(trained, ended.get(1, started), started, finished,
                          peak_memory_mb(device)))


def timed_run(trained: list, first_epoch_end: float, started: float, finished: float,
              peak_memory: float) -> TrialTiming:
    """A trial's timing (each of its seeds' results, one where not stacked) from the end of its
    first epoch, where it trained more than one (see the description), else from `started`: the
    images of the epochs after the first over their train_seconds (a stack's epochs are one
    run's, the same train_seconds in every seed's history; a seed's images/s is its own)."""
    history = trained[0].history
    timed = timed_epochs(history)
    per_epoch = trained[0].images_per_second * sum(r.train_seconds for r in history) / len(history)
    images = round(len(trained) * per_epoch * len(timed))
    return TrialTiming(first_epoch_end if len(history) > 1 else started, finished, images,
                       images / sum(record.train_seconds for record in timed), peak_memory)


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
        "timed_epochs": len(timed_epochs(range(config.epochs))),
        "cuda_graphs": config.cuda_graphs, "stack_seeds": config.stack_seeds,
        "threads_per_trial": config.threads, "trials_per_device": trials,
        "gpus_per_trial": round(1 / trials, 4), "wall_seconds": round(span, 3),
        "aggregate_images_per_s": round(aggregate, 1),
        "per_trial_images_per_s": round(sum(t.images_per_second for t in timings) / trials, 1),
        "speedup_vs_one_trial": round(aggregate / (one_trial_rate or aggregate), 3),
        "peak_memory_mb": max(t.peak_memory_mb for t in timings),
    }


MPS_CONTROL = "nvidia-cuda-mps-control"
# One folder for the daemon's pipe and log, the same in every run: a daemon that a killed run
# left behind (it runs in a session of its own, so a step's timeout does not reach it) is found
# there and stopped before another starts on the same GPU.
MPS_FOLDER = os.path.join(tempfile.gettempdir(), "resnet-ablate-mps")
MPS_VARIABLES = ("CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY")
# Within the GPU check's step limits (a minute and more), with the 10 s its timeout gives a step
# after SIGTERM: a probe that hangs falls back in time, a quit that hangs is left before the kill.
PROBE_TIMEOUT_S = 20
CONTROL_TIMEOUT_S = 8


def cuda_starts(environment: dict[str, str]) -> bool:
    """Whether a new process with `environment` starts CUDA (through the MPS server, where the
    environment names the daemon's pipe)."""
    probe = "import torch; torch.zeros(1, device='cuda'); torch.cuda.synchronize()"
    try:
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                              env=environment, timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0


@contextlib.contextmanager
def mps_daemon(control: str = MPS_CONTROL, folder: str = MPS_FOLDER,
               probe: Callable[[dict[str, str]], bool] = cuda_starts) -> Iterator[bool]:
    """CUDA's Multi-Process Service for the trials started inside (they find its pipe through
    CUDA_MPS_PIPE_DIRECTORY, which their spawned processes inherit), stopped after them, also
    when the run is ended by SIGTERM (a step's timeout). Yields whether MPS runs: where the
    daemon does not start or a process cannot start CUDA through it, the daemon's log is printed
    and the trials share the GPU without it (said, and recorded in the rows' `mps` column).
    Every command to the daemon names `folder`: never the system's own daemon."""
    binary = shutil.which(control)
    if binary is None:
        raise SystemExit(f"--mps: {control} is not on the PATH (it comes with the NVIDIA driver); "
                         "measure without --mps")
    ours = {**os.environ, **{name: folder for name in MPS_VARIABLES}}
    pipe = os.path.join(folder, "control")
    # SIGTERM ends Python without running `finally`; as SystemExit it runs it.
    terminated = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    saved = {name: os.environ.get(name) for name in MPS_VARIABLES}
    started = False
    try:
        if os.path.exists(pipe):  # left by an earlier run: stopped, and its pipe gone, first
            _control(binary, "quit", ours)
            _wait_gone(pipe)
        os.makedirs(folder, exist_ok=True)
        started = _control(binary, "-d", ours)
        running = started and probe(ours)
        if running:
            os.environ.update({name: folder for name in MPS_VARIABLES})
        else:
            if started:
                started = not _control(binary, "quit", ours)
            print("--mps: the MPS daemon did not start, or a process could not start CUDA "
                  "through it; the trials share the GPU without it. Its log:\n"
                  + _logs(folder), file=sys.stderr, flush=True)
        yield running
    finally:
        if started:
            _control(binary, "quit", ours)
        signal.signal(signal.SIGTERM, terminated)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(folder, ignore_errors=True)


def _control(binary: str, command: str, environment: dict[str, str]) -> bool:
    """`-d` (start the daemon) or a command on its stdin (`quit`); whether it succeeded in time."""
    arguments, stdin = ([binary, "-d"], None) if command == "-d" else ([binary], command + "\n")
    try:
        done = subprocess.run(arguments, input=stdin, text=True, capture_output=True,
                              env=environment, timeout=CONTROL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        print(f"--mps: {os.path.basename(binary)} {command} took over {CONTROL_TIMEOUT_S} s",
              file=sys.stderr, flush=True)
        return False
    return done.returncode == 0


def _wait_gone(path: str, seconds: float = CONTROL_TIMEOUT_S) -> None:
    deadline = time.monotonic() + seconds
    while os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.1)


def _logs(folder: str) -> str:
    """The daemon's own logs in `folder` (control.log, server.log), for a failure's reason."""
    texts = []
    for name in ("control.log", "server.log"):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            with open(path, errors="replace") as log:
                texts.append(f"{name}:\n{log.read()[-4000:]}")
    return "\n".join(texts) or "(no log written)"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="tiny trials: checks the script works")
    parser.add_argument("--trials", type=int, nargs="+", default=[1, 2, 4, 8],
                        help="trials per device to measure (1 is always measured first)")
    parser.add_argument("--depth", type=int, default=56, help="CIFAR ResNet depth (6n+2)")
    parser.add_argument("--epochs", type=int, default=2,
                        help="epochs per trial, timed from the first's end (default 2)")
    parser.add_argument("--cuda-graphs", action="store_true", help="each trial with cuda_graphs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per trial")
    parser.add_argument("--train-images", type=int,
                        help="images per epoch of each trial (or seed): 10,240, 64 with --small")
    parser.add_argument("--stack-seeds", type=int, default=1,
                        help="seeds each packed process trains stacked into one model")
    parser.add_argument("--mps", action="store_true",
                        help="share the GPU through CUDA's MPS daemon, started for the run")
    parser.add_argument("--csv", default=None,
                        help="default: benchmarks/results/, a scratch folder with --small")
    args = parser.parse_args(argv)
    args.csv = args.csv or results_csv("packing.csv", args.small)
    if any(n < 1 for n in args.trials):
        parser.error(f"--trials takes counts of 1 or more, not {args.trials}")
    if args.train_images is not None and args.train_images < 1:
        parser.error(f"--train-images takes a count of 1 or more, not {args.train_images}")
    if args.stack_seeds < 1:
        parser.error(f"--stack-seeds takes a count of 1 or more, not {args.stack_seeds}")
    args.trials = sorted({1, *args.trials})  # the speed-ups are taken against one trial
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    config = TrialConfig(device=args.device, depth=args.depth,
                         image_size=8 if args.small else 32,
                         train_images=args.train_images or (64 if args.small else 10_240),
                         batch=16 if args.small else 128,
                         epochs=args.epochs, cuda_graphs=args.cuda_graphs,
                         threads=args.threads, lr=0.01 if args.small else 0.1,
                         stack_seeds=args.stack_seeds)
    context = run_context(torch.device(args.device))
    stacked = f", {config.stack_seeds} seeds stacked" if config.stack_seeds > 1 else ""
    print(f"device: {context['device']}; resnet{config.depth}, {config.train_images} images x "
          f"{config.epochs} epochs per trial{stacked}", file=sys.stderr, flush=True)
    with mps_daemon() if args.mps else contextlib.nullcontext(False) as through_mps:
        return measure_packings(config, args.trials, {**context, "mps": through_mps}, args.csv)


def measure_packings(config: TrialConfig, counts: list[int], context: dict, csv) -> list[dict]:
    rows: list[dict] = []
    one_trial_rate = None
    for trials in counts:
        print(f"[{trials} trial(s) at once]", file=sys.stderr, flush=True)
        row = {**context, **packing_row(config, trials, run_packing(config, trials),
                                        one_trial_rate)}
        one_trial_rate = one_trial_rate or row["aggregate_images_per_s"]
        print(f"  {trials} trial(s) per device (gpus {row['gpus_per_trial']}): "
              f"{row['aggregate_images_per_s']:.0f} images/s together, "
              f"x{row['speedup_vs_one_trial']:.2f} vs one trial", flush=True)
        append_rows(csv, [row])  # as it goes: a run cut short keeps what it measured
        rows.append(row)
    return rows


if __name__ == "__main__":
    main()
