"""How fast is a trial: the project's training loop against the plain loop a user would write.

    python benchmarks/bench_trial.py                 # CPU: digits, ResNet-20 and -56, batch 32
    python benchmarks/bench_trial.py --device cuda   # GPU: CIFAR-sized ResNet-20/56/110 (batch 128)
                                                     #      and ResNet-50 at 224 (batch 256)
    python benchmarks/bench_trial.py --small         # seconds: checks that the script works

Every loop trains the same architecture from the same initial weights on the same in-memory data
(already on the device, no augmentation) with the same batch, optimizer settings and number of
epochs, in one process, measured side by side. Only training is timed (evaluation excluded), and
where a case trains several epochs only those after the first: the first holds one-off costs
that later epochs do not pay (a CUDA graph's eager warm-up steps and its capture: an estimated
10-15% of two epochs of ResNet-20 on a GPU), which a trial's 164 epochs amortize. Each variant but
project+compile first trains a few untimed batches, so that Triton's JIT compilation and cuDNN's
first calls fall outside the timed run (project+compile reports compilation apart).

Variants, each adding one thing to the one before it, so that each ratio isolates one effect:
- plain:   the loop a user would write: the unfused model (nn.BatchNorm2d + ReLU + add), fp32,
           NCHW, torch.optim.SGD and cuDNN with their defaults, `loss.item()` and the error count
           read every step.
- tuned:   the loop a good engineer writes by hand: the unfused model with the device's precision
           (bf16 autocast on CUDA, fp32 on a CPU), channels_last, fused SGD, cuDNN's autotuning
           (as a trial has it), running sums kept on the device (no host sync per step).
           tuned / plain: what hand-tuning gives.
- tuned+kernels: the same hand-tuned loop on the fused model. tuned+kernels / tuned: what the
           fused BatchNorm + add + ReLU kernels add.
- project: `resnet_ablate.train.train` on the fused model with the device's defaults but eager
           steps (`cuda_graphs: false`; the default, auto, replays CUDA graphs on a GPU).
           project / tuned+kernels: what the trial loop costs or adds over a hand-written loop.
- project+graphs (CUDA only), project+compile: `cuda_graphs: true` (what auto gives a GPU
           trial) and `compile: true`, each against project.
- project+nchw, project+bf16: `memory_format: nchw` and `precision: bf16` (opt-ins on a CPU).

Each row (images/s, peak memory, ratio to plain and to tuned, device, versions, commit) is appended
to benchmarks/results/trial.csv as each variant's last run finishes.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from _results import (append_rows, results_csv, device_name, peak_memory_mb, reset_peak_memory,
                      run_context, synchronize, timed_epochs)

from resnet_ablate.arch import ResNetArch
from resnet_ablate.data import DataBundle, SyntheticSpec, load_dataset
from resnet_ablate.models import build
from resnet_ablate.train import TrainRecipe, train

VARIANTS = ("plain", "tuned", "tuned+kernels", "project", "project+nchw", "project+bf16",
            "project+compile", "project+graphs")
DEFAULT_VARIANTS = {"cpu": ("plain", "tuned", "tuned+kernels", "project", "project+nchw"),
                    "cuda": ("plain", "tuned", "tuned+kernels", "project", "project+compile",
                             "project+graphs")}
HAND_WRITTEN = ("plain", "tuned", "tuned+kernels")
WARMUP_BATCHES = 4  # untimed batches before each eager variant: JIT compilation and first calls


@dataclass(frozen=True)
class Case:
    name: str
    arch: ResNetArch
    batch: int
    epochs: int
    data: str  # "digits" or "synthetic"
    synthetic: SyntheticSpec | None = None
    lr: float = 0.1


def cases(device: torch.device, small: bool) -> list[Case]:
    cifar = lambda depth: ResNetArch(family="cifar", depth=depth, shortcut="A")  # noqa: E731
    if small:
        tiny = SyntheticSpec(num_classes=10, channels=3, image_size=8, train_size=64, test_size=16)
        # A low rate: 4 steps at 0.1 can leave the deeper net worse than guessing (stopped as
        # diverged); the small cases check that the script works, not how fast it learns.
        return [Case(f"resnet{d}-8px", cifar(d), 16, 1, "synthetic", tiny, lr=0.01)
                for d in (20, 56)]
    if device.type != "cuda":
        return [Case(f"resnet{d}-digits", cifar(d), 32, 3, "digits") for d in (20, 56)]
    # 50 steps an epoch: the second, the one timed, long enough for a GPU's clock (ResNet-20
    # replayed from a graph: about 0.13 s on an H200, 50 replays) and the whole step within the
    # GPU check's limit
    cifar_sized = SyntheticSpec(num_classes=10, channels=3, image_size=32, train_size=6_400,
                                test_size=256)
    imagenet_sized = SyntheticSpec(num_classes=1000, channels=3, image_size=224,
                                   train_size=2_560, test_size=256)
    resnet50 = ResNetArch(family="imagenet", depth=50, shortcut="B")
    return [
        *(Case(f"resnet{d}-cifar", cifar(d), 128, 2, "synthetic", cifar_sized) for d in (20, 56, 110)),
        Case("resnet50-224", resnet50, 256, 2, "synthetic", imagenet_sized),
    ]


def load(case: Case) -> DataBundle:
    if case.data == "digits":
        return load_dataset("digits")
    data = load_dataset("synthetic", synthetic=case.synthetic)
    return dataclasses.replace(data, augmentation=None)


def subset(data: DataBundle, images: int) -> DataBundle:
    """The first `images` training images (the same batch shapes): what a warm-up trains on."""
    return dataclasses.replace(data, train_x=data.train_x[:images], train_y=data.train_y[:images])


def hand_loop(case: Case, data: DataBundle, device: torch.device, seed: int,
              variant: str) -> tuple[float, float, dict]:
    """(images/s, 0 compile seconds, execution) of a hand-written loop: plain, tuned or
    tuned+kernels (see the module's description)."""
    tuned = variant != "plain"
    # cuDNN autotuning, as a trial sets it (train()) and a good engineer does; the plain loop
    # keeps PyTorch's default (set each time: the flag is the process's, and train() sets it)
    torch.backends.cudnn.benchmark = tuned and device.type == "cuda"
    torch.manual_seed(seed)
    model = build(case.arch.replace(fused=variant == "tuned+kernels"),
                  num_classes=data.num_classes, in_channels=data.in_channels)
    memory_format = torch.channels_last if tuned else torch.contiguous_format
    model = model.to(device, memory_format=memory_format).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=case.lr, momentum=0.9, weight_decay=1e-4,
                                fused=tuned or None)
    bf16 = tuned and device.type == "cuda" and torch.cuda.is_bf16_supported()
    train_x = data.train_x.to(device).contiguous(memory_format=memory_format)
    train_y = data.train_y.to(device)
    count = train_x.shape[0]
    generator = torch.Generator().manual_seed(seed)
    loss_sum = torch.zeros((), device=device)
    wrong = torch.zeros((), dtype=torch.int64, device=device)
    epoch_seconds = []
    for _ in range(case.epochs):
        order = torch.randperm(count, generator=generator).to(device)
        synchronize(device)
        started = time.perf_counter()
        for start in range(0, count, case.batch):
            index = order[start : start + case.batch]
            images, labels = train_x[index], train_y[index]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(images)
                loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=tuned)
            loss.backward()
            optimizer.step()
            if tuned:  # device-side sums, read once an epoch
                loss_sum += loss.detach().float() * labels.shape[0]
                wrong += (logits.detach().argmax(dim=1) != labels).sum()
                continue
            running = loss.item() * labels.shape[0]
            if not math.isfinite(running):
                raise RuntimeError("the plain loop diverged")
            wrong += (logits.argmax(dim=1) != labels).sum().item()
        if tuned and not math.isfinite(loss_sum.item()):  # the epoch's one host read
            raise RuntimeError(f"the {variant} loop diverged")
        synchronize(device)
        epoch_seconds.append(time.perf_counter() - started)
    execution = {"precision": "bf16" if bf16 else "fp32",
                 "memory_format": "channels_last" if tuned else "nchw"}
    return steady_rate(count, epoch_seconds), 0.0, execution


def steady_rate(images_per_epoch: float, epoch_seconds: list[float]) -> float:
    """Images/s of the epochs after the first (of the only one, where there is one)."""
    timed = timed_epochs(epoch_seconds)
    return images_per_epoch * len(timed) / sum(timed)


def project_loop(case: Case, data: DataBundle, device: torch.device, seed: int,
                 variant: str, compile_backend: str) -> tuple[float, float, dict]:
    """(images/s of training, compile seconds, execution) of resnet_ablate's own loop."""
    recipe = TrainRecipe(epochs=case.epochs, batch_size=case.batch, lr=case.lr, augment=False,
                         milestones=(), compile=variant == "project+compile",
                         cuda_graphs=variant == "project+graphs",
                         memory_format="nchw" if variant == "project+nchw" else "channels_last",
                         precision="bf16" if variant == "project+bf16" else "auto")

    def fused_model() -> torch.nn.Module:
        return build(case.arch.replace(fused=True), num_classes=data.num_classes,
                     in_channels=data.in_channels)

    if not recipe.compile:  # Triton's JIT and cuDNN's first calls, outside the timed run
        warmup = dataclasses.replace(recipe, epochs=1)
        train(fused_model, subset(data, WARMUP_BATCHES * case.batch), warmup, seed=seed,
              device=device)
    result = train(fused_model, data, recipe, seed=seed, device=device, compile_backend=compile_backend)
    if not result.ok:
        raise RuntimeError(f"{variant} did not complete: {result.reason}")
    epoch_seconds = [record.train_seconds for record in result.history]
    images_per_epoch = result.images_per_second * sum(epoch_seconds) / len(epoch_seconds)
    return (steady_rate(images_per_epoch, epoch_seconds), result.compile_seconds,
            result.execution.stored())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="one tiny case: checks the script works")
    parser.add_argument("--cases", nargs="+",
                        help="case names to run, in this order (default: all for the device)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS,
                        help="default: plain, tuned, tuned+kernels, project, and project+nchw on a "
                             "CPU, project+compile and project+graphs on CUDA")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--tuned-cases", nargs="+",
                        help="the cases tuned and tuned+kernels run on (default: every case)")
    parser.add_argument("--compile-cases", nargs="+",
                        help="the cases project+compile runs on (default: every case)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on a CPU (a trial's)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs of each variant, interleaved; the best is kept")
    parser.add_argument("--csv", default=None,
                        help="default: benchmarks/results/, a scratch folder with --small")
    args = parser.parse_args(argv)
    args.csv = args.csv or results_csv("trial.csv", args.small)
    device_type = torch.device(args.device).type
    if args.variants is None:
        args.variants = list(DEFAULT_VARIANTS.get(device_type, DEFAULT_VARIANTS["cpu"]))
    if "project+graphs" in args.variants and device_type != "cuda":
        parser.error(f"--variants project+graphs needs --device cuda, not {args.device}")
    # First: every ratio is taken against it, and each row is written as its variant ends
    args.variants = ["plain", *(v for v in args.variants if v != "plain")]
    return args


@dataclass(frozen=True)
class Measured:
    images_per_second: float
    compile_seconds: float
    execution: dict
    peak_memory_mb: float


def run_variant(case: Case, data: DataBundle, device: torch.device, seed: int, variant: str,
                compile_backend: str) -> Measured:
    """One timed run of `variant`, after its untimed warm-up."""
    if variant in HAND_WRITTEN:
        hand_loop(case, subset(data, WARMUP_BATCHES * case.batch), device, seed, variant)
        reset_peak_memory(device)
        measured = hand_loop(case, data, device, seed, variant)
    else:
        reset_peak_memory(device)
        measured = project_loop(case, data, device, seed, variant, compile_backend)
    return Measured(*measured, peak_memory_mb=peak_memory_mb(device))


def variant_row(case: Case, data: DataBundle, variant: str, best: dict[str, Measured],
                repeats: int, device: torch.device) -> dict:
    """A variant's row, its rate with its ratios to plain and to tuned (where measured before
    it: they run first), printed too."""
    m = best[variant]
    plain = best["plain"].images_per_second
    tuned = best["tuned"].images_per_second if "tuned" in best else None
    extra = f"  (compiled in {m.compile_seconds:.1f} s)" if m.compile_seconds else ""
    vs_tuned = f"  x{m.images_per_second / tuned:5.2f} vs tuned" if tuned else ""
    print(f"  {variant:16s} {m.images_per_second:10.0f} images/s  "
          f"x{m.images_per_second / plain:5.2f} vs plain{vs_tuned}"
          f"  [{m.execution.get('precision')}, {m.execution.get('memory_format')}]"
          f"  {m.peak_memory_mb:.0f} MB{extra}", flush=True)
    return {
        **run_context(device), "case": case.name, "batch": case.batch,
        "epochs": case.epochs, "train_images": data.train_x.shape[0], "variant": variant,
        "timed_epochs": len(timed_epochs(range(case.epochs))),
        "precision": m.execution.get("precision"),
        "memory_format": m.execution.get("memory_format"),
        "images_per_second": round(m.images_per_second, 1),
        "ratio_vs_plain": round(m.images_per_second / plain, 3),
        "ratio_vs_tuned": round(m.images_per_second / tuned, 3) if tuned else "",
        "compile_seconds": round(m.compile_seconds, 2), "repeats": repeats,
        "peak_memory_mb": m.peak_memory_mb,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    available = {c.name: c for c in cases(device, args.small)}
    unknown = [name for name in args.cases or () if name not in available]
    if unknown:
        raise SystemExit(f"bench_trial: --cases {' '.join(unknown)}: not a case here; the cases "
                         f"for {device.type}{' --small' if args.small else ''} are "
                         f"{', '.join(available)}")
    # In the order given: a step cut short by its time limit keeps the cases run first.
    selected = [available[name] for name in args.cases] if args.cases else list(available.values())
    print(f"device: {device_name(device)}; torch {torch.__version__}", file=sys.stderr, flush=True)
    rows: list[dict] = []
    for case in selected:
        data = load(case)
        only_on = {"project+compile": args.compile_cases, "tuned": args.tuned_cases,
                   "tuned+kernels": args.tuned_cases}
        variants = [v for v in args.variants
                    if only_on.get(v) is None or case.name in only_on[v]]
        print(f"\n{case.name}, batch {case.batch}, {case.epochs} epochs of "
              f"{data.train_x.shape[0]} images, {device_name(device)}", flush=True)
        best: dict[str, Measured] = {}
        for repeat in range(args.repeats):
            for variant in variants:  # interleaved, so drift in the machine hits all alike
                print(f"[{case.name}] {variant} run {repeat + 1}/{args.repeats}",
                      file=sys.stderr, flush=True)
                measured = run_variant(case, data, device, repeat, variant, args.compile_backend)
                if variant not in best or measured.images_per_second > best[variant].images_per_second:
                    best[variant] = measured
                if repeat == args.repeats - 1:  # its best known: written at once, so that a
                    # run cut short keeps it
                    row = variant_row(case, data, variant, best, args.repeats, device)
                    append_rows(args.csv, [row])
                    rows.append(row)
    return rows


if __name__ == "__main__":
    main()
