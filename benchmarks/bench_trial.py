"""How fast is a trial: the project's training loop against the plain loop a user would write.

    python benchmarks/bench_trial.py                 # CPU: digits, ResNet-20 and -56, batch 32
    python benchmarks/bench_trial.py --device cuda   # GPU: CIFAR-sized ResNet-20/56/110 (batch 128)
                                                     #      and ResNet-50 at 224 (batch 256)
    python benchmarks/bench_trial.py --small         # seconds: checks that the script works

Both loops train the same architecture from the same initial weights on the same in-memory data
(already on the device, no augmentation) with the same batch, optimizer settings and number of
epochs, in one process, measured side by side. Only training is timed (evaluation excluded).

- plain:   the unfused model (nn.BatchNorm2d + ReLU + add), fp32, NCHW, torch.optim.SGD with its
           defaults, `loss.item()` and the error count read every step.
- project: `resnet_ablate.train.train` on the fused model with the device's defaults (channels_last;
           bf16 autocast on CUDA, fp32 on a CPU; fused SGD; no host sync per step).
- project+nchw: the project's loop with `memory_format: nchw`, what channels_last is worth.
- project+bf16: the project's loop with `precision: bf16` (the default on CUDA; on a CPU, what the
           opt-in is worth there: it rounds the convolutions' inputs, which moves results).
- project+compile, project+graphs (CUDA only, or when asked for): `compile: true` (compile time
           reported apart) and `cuda_graphs: true` (CUDA only).

Each row (images/s, ratio to plain, device, versions, commit) is appended to
benchmarks/results/trial.csv as each case finishes.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import platform
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from _results import (RESULTS, append_rows, device_name, source_commit, synchronize, timestamp,
                      triton_version)

import resnet_ablate
from resnet_ablate.arch import ResNetArch
from resnet_ablate.data import DataBundle, SyntheticSpec, load_dataset
from resnet_ablate.models import build
from resnet_ablate.train import TrainRecipe, train

VARIANTS = ("plain", "project", "project+nchw", "project+bf16", "project+compile",
            "project+graphs")
DEFAULT_VARIANTS = {"cpu": ("plain", "project", "project+nchw"),
                    "cuda": ("plain", "project", "project+compile", "project+graphs")}


@dataclass(frozen=True)
class Case:
    name: str
    arch: ResNetArch
    batch: int
    epochs: int
    data: str  # "digits" or "synthetic"
    synthetic: SyntheticSpec | None = None


def cases(device: torch.device, small: bool) -> list[Case]:
    cifar = lambda depth: ResNetArch(family="cifar", depth=depth, shortcut="A")  # noqa: E731
    if small:
        tiny = SyntheticSpec(num_classes=10, channels=3, image_size=8, train_size=64, test_size=16)
        return [Case("resnet20-8px", cifar(20), 16, 1, "synthetic", tiny)]
    if device.type != "cuda":
        return [Case(f"resnet{d}-digits", cifar(d), 32, 3, "digits") for d in (20, 56)]
    cifar_sized = SyntheticSpec(num_classes=10, channels=3, image_size=32, train_size=12_800,
                                test_size=256)
    imagenet_sized = SyntheticSpec(num_classes=1000, channels=3, image_size=224,
                                   train_size=2_560, test_size=256)
    resnet50 = ResNetArch(family="imagenet", depth=50, shortcut="B")
    return [
        *(Case(f"resnet{d}-cifar", cifar(d), 128, 3, "synthetic", cifar_sized) for d in (20, 56, 110)),
        Case("resnet50-224", resnet50, 256, 2, "synthetic", imagenet_sized),
    ]


def load(case: Case) -> DataBundle:
    if case.data == "digits":
        return load_dataset("digits")
    data = load_dataset("synthetic", synthetic=case.synthetic)
    return dataclasses.replace(data, augmentation=None)


def plain_loop(case: Case, data: DataBundle, device: torch.device, seed: int) -> float:
    """Images/s of the loop a user would write: unfused, fp32, NCHW, two host reads per step."""
    torch.manual_seed(seed)
    model = build(case.arch.replace(fused=False), num_classes=data.num_classes,
                  in_channels=data.in_channels).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    train_x, train_y = data.train_x.to(device), data.train_y.to(device)
    count = train_x.shape[0]
    generator = torch.Generator().manual_seed(seed)
    seconds = 0.0
    for _ in range(case.epochs):
        order = torch.randperm(count, generator=generator).to(device)
        synchronize(device)
        started = time.perf_counter()
        loss_sum, wrong = 0.0, 0
        for start in range(0, count, case.batch):
            index = order[start : start + case.batch]
            images, labels = train_x[index], train_y[index]
            logits = model(images)
            loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * labels.shape[0]
            if not math.isfinite(loss_sum):
                raise RuntimeError("the plain loop diverged")
            wrong += (logits.argmax(dim=1) != labels).sum().item()
        synchronize(device)
        seconds += time.perf_counter() - started
    return count * case.epochs / seconds


def project_loop(case: Case, data: DataBundle, device: torch.device, seed: int,
                 variant: str, compile_backend: str) -> tuple[float, float, dict]:
    """(images/s of training, compile seconds, execution) of resnet_ablate's own loop."""
    recipe = TrainRecipe(epochs=case.epochs, batch_size=case.batch, lr=0.1, augment=False,
                         milestones=(), compile=variant == "project+compile",
                         cuda_graphs=variant == "project+graphs",
                         memory_format="nchw" if variant == "project+nchw" else "channels_last",
                         precision="bf16" if variant == "project+bf16" else "auto")

    def fused_model() -> torch.nn.Module:
        return build(case.arch.replace(fused=True), num_classes=data.num_classes,
                     in_channels=data.in_channels)

    result = train(fused_model, data, recipe, seed=seed, device=device, compile_backend=compile_backend)
    if not result.ok:
        raise RuntimeError(f"{variant} did not complete: {result.reason}")
    return result.images_per_second, result.compile_seconds, dict(result.execution)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="one tiny case: checks the script works")
    parser.add_argument("--cases", nargs="+", help="case names to run (default: all for the device)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS,
                        help="default: plain, project and project+nchw on a CPU; plain, project, "
                             "project+compile and project+graphs on CUDA")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on a CPU (a trial's)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs of each variant, interleaved; the best is kept")
    parser.add_argument("--csv", default=RESULTS / "trial.csv")
    args = parser.parse_args(argv)
    device_type = torch.device(args.device).type
    if args.variants is None:
        args.variants = list(DEFAULT_VARIANTS.get(device_type, DEFAULT_VARIANTS["cpu"]))
    if "project+graphs" in args.variants and device_type != "cuda":
        parser.error(f"--variants project+graphs needs --device cuda, not {args.device}")
    if "plain" not in args.variants:
        args.variants = ["plain", *args.variants]  # every ratio is taken against it
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    name = device_name(device)
    selected = [c for c in cases(device, args.small) if not args.cases or c.name in args.cases]
    print(f"device: {name}; torch {torch.__version__}", file=sys.stderr, flush=True)
    rows: list[dict] = []
    commit = source_commit()
    for case in selected:
        data = load(case)
        best: dict[str, tuple[float, float, dict]] = {}
        for repeat in range(args.repeats):
            for variant in args.variants:  # interleaved, so drift in the machine hits all alike
                print(f"[{case.name}] {variant} run {repeat + 1}/{args.repeats}",
                      file=sys.stderr, flush=True)
                if variant == "plain":
                    measured = (plain_loop(case, data, device, seed=repeat), 0.0, {
                        "precision": "fp32", "memory_format": "nchw"})
                else:
                    measured = project_loop(case, data, device, repeat, variant, args.compile_backend)
                if variant not in best or measured[0] > best[variant][0]:
                    best[variant] = measured
        baseline = best["plain"][0]
        print(f"\n{case.name}, batch {case.batch}, {case.epochs} epochs of "
              f"{data.train_x.shape[0]} images, {name}")
        case_rows = []
        for variant, (images_per_second, compile_seconds, execution) in best.items():
            ratio = images_per_second / baseline
            extra = f"  (compiled in {compile_seconds:.1f} s)" if compile_seconds else ""
            print(f"  {variant:16s} {images_per_second:10.0f} images/s  x{ratio:5.2f} vs plain"
                  f"  [{execution.get('precision')}, {execution.get('memory_format')}]{extra}")
            case_rows.append({
                "timestamp": timestamp(), "device": name, "torch": torch.__version__,
                "triton": triton_version(), "resnet_ablate": resnet_ablate.__version__,
                "python": platform.python_version(), "case": case.name, "batch": case.batch,
                "epochs": case.epochs, "train_images": data.train_x.shape[0], "variant": variant,
                "precision": execution.get("precision"),
                "memory_format": execution.get("memory_format"),
                "images_per_second": round(images_per_second, 1),
                "ratio_vs_plain": round(ratio, 3), "compile_seconds": round(compile_seconds, 2),
                "repeats": args.repeats, "commit": commit,
            })
        append_rows(args.csv, case_rows)  # as each case ends: a run cut short keeps these
        rows.extend(case_rows)
    return rows


if __name__ == "__main__":
    main()
