"""Time one training step (forward + backward + SGD) of fused vs unfused vs torch.compile ResNets.

    python benchmarks/bench_train_step.py              # ResNet-56 (CIFAR, batch 128), ResNet-50 (batch 64)
    python benchmarks/bench_train_step.py --small      # tiny CPU run that checks the script works

Providers, all measured in the same run on the same machine, ratios against "unfused":
- unfused:          nn.BatchNorm2d + ReLU + add, eager
- fused:            the fused BN + add + ReLU op, eager
- compile-unfused:  torch.compile of the unfused model (left out by --small unless asked for)
- compile-fused:    torch.compile of the fused model (the fused op is one graph node)

Each row goes to a CSV (appended) with the device name and library versions, so figures from
different machines are never compared by accident. --small uses tiny batches and images, a few
iterations, and torch.compile's "aot_eager" backend (graph capture and AOT autograd without C++
code generation, which alone takes minutes on a CPU); its figures only say that the script works.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from _results import append_rows, results_csv, device_name, synchronize, timestamp, triton_version

import resnet_ablate
from resnet_ablate.kernels import get_backend
from resnet_ablate.models import ResNet, resnet50, resnet56

PROVIDERS = ("unfused", "fused", "compile-unfused", "compile-fused")


@dataclass(frozen=True)
class Case:
    model: str
    build: Callable[..., ResNet]
    batch: int
    image_size: int
    num_classes: int


def cases(small: bool) -> list[Case]:
    if small:
        return [Case("resnet56", resnet56, 4, 16, 10), Case("resnet50", resnet50, 2, 64, 10)]
    return [Case("resnet56", resnet56, 128, 32, 10), Case("resnet50", resnet50, 64, 224, 1000)]


@dataclass(frozen=True)
class Row:
    timestamp: str
    device: str
    torch: str
    triton: str
    resnet_ablate: str
    python: str
    kernel_backend: str
    compile_backend: str
    dtype: str
    channels_last: bool
    model: str
    batch: int
    image_size: int
    provider: str
    iters: int
    ms_median: float
    ms_mean: float
    ms_min: float
    ratio_vs_unfused: float


def kernel_implementation(device: torch.device) -> str:
    """Which code the fused op runs here: the backend setting resolved for this device."""
    backend = get_backend()
    if backend == "auto":
        # "auto" runs Triton on CUDA; on a CPU, ATen's ops inline in eager and the custom op's
        # PyTorch implementation under torch.compile.
        backend = "triton" if device.type == "cuda" else "aten-inline"
    return f"{backend}-interpreted" if backend == "triton" and device.type != "cuda" else backend


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def time_train_step(
    case: Case, provider: str, args: argparse.Namespace, device: torch.device
) -> list[float]:
    """Milliseconds per step over `args.iters` steps, after `args.warmup` untimed ones."""
    torch.manual_seed(0)
    fused = provider in ("fused", "compile-fused")
    model = case.build(fused=fused, num_classes=case.num_classes).to(device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    step_model = torch.compile(model, backend=args.compile_backend) if provider.startswith("compile") else model
    x = torch.randn(case.batch, 3, case.image_size, case.image_size, device=device)
    x = x.to(memory_format=memory_format)
    y = torch.randint(0, case.num_classes, (case.batch,), device=device)
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.dtype)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = F.cross_entropy(step_model(x), y)
        loss.backward()
        optimizer.step()

    started = time.perf_counter()
    for i in range(args.warmup):
        step()
        log(f"    warmup {i + 1}/{args.warmup} ({time.perf_counter() - started:.1f}s)")
    synchronize(device)
    times = []
    for i in range(args.iters):
        begin = time.perf_counter()
        step()
        synchronize(device)
        times.append((time.perf_counter() - begin) * 1e3)
        if (i + 1) % max(1, args.iters // 5) == 0 or i + 1 == args.iters:
            log(f"    step {i + 1}/{args.iters}: {times[-1]:.1f} ms")
    return times


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny batches and images, few iterations (CPU check)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iters", type=int, help="timed steps (default 50, --small 3)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 10, --small 1)")
    parser.add_argument("--models", nargs="+", choices=("resnet56", "resnet50"), default=["resnet56", "resnet50"])
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS,
                        help="default: all; --small leaves out compile-unfused to stay well under a minute")
    parser.add_argument("--compile-backend", help="torch.compile backend (default inductor, --small aot_eager)")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="autocast dtype")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--csv", type=Path, default=None,
                        help="default: benchmarks/results/, a scratch folder with --small")
    args = parser.parse_args(argv)
    args.csv = args.csv or results_csv("train_step.csv", args.small)
    args.iters = args.iters or (3 if args.small else 50)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.small else 10)
    args.compile_backend = args.compile_backend or ("aot_eager" if args.small else "inductor")
    if args.providers is None:
        args.providers = [p for p in PROVIDERS if not (args.small and p == "compile-unfused")]
    if "unfused" not in args.providers:
        args.providers = ["unfused", *args.providers]  # the baseline every ratio is taken against
    return args


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    device = torch.device(args.device)
    name = device_name(device)
    log(f"device: {name}; torch {torch.__version__}; fused op runs {kernel_implementation(device)}; "
        f"compile backend {args.compile_backend}")
    selected = [c for c in cases(args.small) if c.model in args.models]
    rows: list[Row] = []
    total = len(selected) * len(args.providers)
    done = 0
    for case in selected:
        medians: dict[str, tuple[float, float, float]] = {}
        for provider in args.providers:
            done += 1
            log(f"[{done}/{total}] {case.model} batch {case.batch} {case.image_size}px: {provider}")
            times = time_train_step(case, provider, args, device)
            medians[provider] = (statistics.median(times), statistics.fmean(times), min(times))
        baseline = medians["unfused"][0]
        print(f"\n{case.model}, batch {case.batch}, {case.image_size}x{case.image_size}, {args.dtype}, {name}")
        case_rows: list[Row] = []
        for provider, (median, mean, fastest) in medians.items():
            print(f"  {provider:16s} {median:9.2f} ms   x{baseline / median:5.2f} vs unfused")
            case_rows.append(Row(
                timestamp=timestamp(),
                device=name, torch=torch.__version__, triton=triton_version(),
                resnet_ablate=resnet_ablate.__version__, python=platform.python_version(),
                kernel_backend=kernel_implementation(device), compile_backend=args.compile_backend, dtype=args.dtype,
                channels_last=args.channels_last, model=case.model, batch=case.batch,
                image_size=case.image_size, provider=provider, iters=args.iters,
                ms_median=round(median, 3), ms_mean=round(mean, 3), ms_min=round(fastest, 3),
                ratio_vs_unfused=round(baseline / median, 4),
            ))
        append_rows(args.csv, [asdict(r) for r in case_rows])  # a run cut short keeps these
        rows.extend(case_rows)
    return rows


if __name__ == "__main__":
    main()
