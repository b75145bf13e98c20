"""What does a data-parallel trial cost and buy? The same trial run once in one process and once
as a data-parallel run of several replicas on Ray Train, side by side in one run: the call's wall
time, the trial's own time (as it records it: training, evaluation and, data-parallel, a
checkpoint after each epoch), what Ray Train adds around it (starting and stopping the
replicas), and training images/s.

    python benchmarks/bench_data_parallel.py                           # 2 CPU replicas, digits
    python benchmarks/bench_data_parallel.py --gpus --replicas 8 --depth 56 --epochs 4

On CPUs the one-process trial gets all the replicas' CPUs as torch threads, so the comparison is
of the same machine used two ways. On GPUs the one-process trial gets one GPU, each replica one.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import ray
import torch

from _results import RESULTS, append_rows, source_commit, timestamp
from resnet_ablate import ResNetArch
from resnet_ablate.recipe import TrainRecipe
from resnet_ablate.data_parallel import run_data_parallel_trial
from resnet_ablate.record import Status, TrialTask
from resnet_ablate.study.cluster import start_local_ray
from resnet_ablate.worker import run_trial


def timed_trial(task: TrialTask) -> tuple[float, dict]:
    """Seconds the trial took from launch to its outcome, and the outcome's stored record."""
    started = time.perf_counter()
    if task.replicas > 1:
        ref = run_data_parallel_trial.remote(task, None)
    else:
        options = {"num_cpus": task.threads, "num_gpus": int(task.use_gpu)}
        ref = run_trial.options(**options).remote(task, None)
    outcome = ray.get(ref)
    if outcome.status != Status.COMPLETED:
        raise RuntimeError(f"the trial {outcome.status}: {outcome.reason}")
    return time.perf_counter() - started, outcome.attributes()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--gpus", action="store_true", help="a GPU per replica (else CPUs)")
    parser.add_argument("--depth", type=int, default=20, help="CIFAR ResNet depth")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--csv", default=RESULTS / "data_parallel.csv")
    args = parser.parse_args(argv)

    cpus = os.cpu_count() or 2
    threads = max(1, cpus // args.replicas) if not args.gpus else 2
    # Eager steps both ways: replicas never replay CUDA graphs, so the one-process trial does not
    # either (under the default, auto, it would on a GPU), and the two differ in one thing only.
    recipe = TrainRecipe(epochs=args.epochs, batch_size=args.batch_size, lr=0.05,
                         cuda_graphs=False)
    base = TrialTask(trial_number=0, arch=ResNetArch(family="cifar", depth=args.depth).to_dict(),
                     seed=0, dataset={"name": "digits"}, recipe=recipe.to_dict(),
                     threads=threads * (1 if args.gpus else args.replicas), use_gpu=args.gpus,
                     keep_weights=False)
    parallel = dataclasses.replace(base, trial_number=1, threads=threads, replicas=args.replicas,
                                   cpus_per_replica=threads, max_restarts=0)
    # The Ray a study's driver starts: how it starts decides what Ray Train adds to each trial
    # (data_parallel._trainer_class).
    start_local_ray(cpus)
    rows = []
    try:
        for name, task in (("one process", base), (f"{args.replicas} replicas", parallel)):
            print(f"{name}: training ResNet-{args.depth} for {args.epochs} epochs ...", flush=True)
            wall, outcome = timed_trial(task)
            training = outcome["wall_seconds"]
            rows.append({
                "timestamp": timestamp(), "commit": source_commit(),
                "device": outcome["device"], "run": name,
                "replicas": task.replicas, "threads_per_process": task.threads,
                "model": f"resnet{args.depth}", "epochs": args.epochs,
                "batch_size": args.batch_size, "call_seconds": round(wall, 2),
                "training_seconds": round(training, 2),
                "overhead_seconds": round(wall - training, 2),
                "train_images_per_s": round(outcome["images_per_second"], 1),
                "final_test_error": round(outcome["curves"][-1]["test_error"], 4),
                "torch": torch.__version__, "ray": ray.__version__,
            })
            print(f"{name}: {wall:.1f} s in all, {training:.1f} s training "
                  f"({outcome['images_per_second']:.0f} images/s), {wall - training:.1f} s "
                  "around it", flush=True)
    finally:
        ray.shutdown()
    one, many = rows
    print(f"{many['run']} vs one process: "
          f"{many['train_images_per_s'] / one['train_images_per_s']:.2f}x the training images/s; "
          f"the trial's own time (training, evaluation, a checkpoint each epoch) "
          f"{many['training_seconds'] / one['training_seconds']:.2f}x; the whole call "
          f"{many['call_seconds'] / one['call_seconds']:.2f}x, Ray Train's start and stop "
          f"{many['overhead_seconds']:.0f} s of it")
    append_rows(args.csv, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
