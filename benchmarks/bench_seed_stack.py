"""Seeds stacked into one model: images/s of K seeds trained at once against one seed alone.

    python benchmarks/bench_seed_stack.py --device cuda       # ResNet-20/56/110, 1 and 5 seeds
    python benchmarks/bench_seed_stack.py --small             # tiny: checks the script works

A CIFAR trial on a large GPU is bound by launch latency (each of its hundreds of kernels does
microseconds of work), even replayed from a CUDA graph; separate trials sharing the GPU as
processes time-slice it, and through MPS gained 2.48x at 8 trials on an H200. `stack_models`
(resnet_ablate/seed_stack.py) trains the K seeds of one configuration in the same launches
instead: grouped convolutions, BatchNorm over K*C channels, one batched classifier.

Each case trains with the project's training step (`resnet_ablate.train.step.Step`: fused
kernels, the device's precision, channels_last, fused SGD, a whole step replayed from a CUDA graph
on a GPU) on in-memory synthetic CIFAR-sized data on the device, each seed drawing its own random
batch every step; one seed is the architecture's own model. Each first trains untimed steps (the
graph's capture, Triton's JIT, cuDNN's first calls). Given each seed's labels, (batch, K), the
step (`seeds=K`) trains on the sum of the seeds' losses: each seed as it would train alone.

With `--convolutions grouped dense`, each stacked case runs twice: with grouped convolutions
(`stack_models`' own) and with each turned into a dense one whose weight is block-diagonal (the
seeds' blocks on the diagonal, zeros elsewhere, their gradients masked to zero so that they stay
zero under SGD): K times the FLOPs of the grouped one, in the dense kernels cuDNN tunes best. A
measurement, not a mode of the toolkit: a dense convolution would carry a diverged seed's NaN
into the others (NaN times 0).

ResNet-110 trains as Table 6's spec trains it, with the paper's warm-up (`warmup_from_depth:
110`), whose end each seed reaches at its own step: its stacked seeds step at a rate each
(`SeedSGD`, train/seed_sgd.py: a few foreach kernels where fused SGD is one), as train_seeds
steps them; the `rates` column says which optimizer a case ran.

Each row (depth, seeds, convolutions, rates, images/s of all seeds together, the ratio to one
seed, peak memory) is appended to benchmarks/results/seed_stack.csv as each case finishes; a case
that fails is named at the end (exit status 1) after the others have run.
"""

from __future__ import annotations

import argparse
import time
import traceback

import torch
from torch import nn

from _results import (append_rows, results_csv, device_name, peak_memory_mb, reset_peak_memory,
                      run_context, synchronize)

from resnet_ablate.execution import Execution
from resnet_ablate.models import cifar_resnet
from resnet_ablate.recipe import TrainRecipe
from resnet_ablate.replicas import Replicas
from resnet_ablate.seed_stack import stack_models
from resnet_ablate.train.step import GRAPH_WARMUP_STEPS, Step

IMAGES_ON_DEVICE = 4096  # synthetic images each step draws its batches from
# The depth from which Table 6's spec (studies/cifar10_depth.yaml) warms up, as the paper does.
WARMUP_FROM_DEPTH = 110


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--depths", type=int, nargs="+", help="CIFAR ResNet depths (6n+2)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 5],
                        help="seeds trained at once, one case each (1: the model alone)")
    parser.add_argument("--convolutions", nargs="+", default=["grouped"],
                        choices=["grouped", "dense"],
                        help="how stacked seeds convolve (see above); one case each")
    parser.add_argument("--batch", type=int, help="images per seed per step")
    parser.add_argument("--steps", type=int, help="timed steps per case")
    parser.add_argument("--small", action="store_true", help="tiny sizes: checks the script")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--csv", default=None,
                        help="default: benchmarks/results/, a scratch folder with --small")
    args = parser.parse_args(argv)
    args.csv = args.csv or results_csv("seed_stack.csv", args.small)
    cuda = args.device.startswith("cuda")
    if args.small:
        defaults = dict(depths=[8], batch=8, steps=3, image_size=8)
    else:
        defaults = dict(depths=[20, 56, 110] if cuda else [20], batch=128 if cuda else 32,
                        steps=50 if cuda else 3, image_size=32)
    for name in ("depths", "batch", "steps"):
        if getattr(args, name) is None:
            setattr(args, name, defaults[name])
    args.image_size = defaults["image_size"]
    if any(s < 1 for s in args.seeds) or args.batch < 1 or args.steps < 1:
        parser.error("--seeds, --batch and --steps take positive counts")
    args.seeds = sorted(set(args.seeds))  # one seed first: the ratios are taken against it
    return args


def execution_for(device: torch.device) -> Execution:
    """What a study's trial resolves on this device: bf16 and CUDA graphs on a GPU."""
    cuda = device.type == "cuda"
    return Execution(str(device), "bf16" if cuda else "fp32", "channels_last", compile=False,
                     cuda_graphs=cuda)


def block_diagonal_(model: nn.Module) -> nn.Module:
    """Each grouped convolution of a stacked model made dense, its weight block-diagonal: the
    groups' blocks on the diagonal, zeros elsewhere, whose gradients a hook masks to zero. The
    mask is the convolution's buffer (`block_mask`), read by the hook when it runs, so that it
    moves with the model: bound to the hook, it stayed on the CPU when the model moved to the
    GPU, where the first backward then failed (a CUDA gradient times a CPU mask)."""
    for name, conv in list(model.named_modules()):
        if not isinstance(conv, nn.Conv2d) or conv.groups == 1:
            continue
        groups, out_per, in_per = conv.groups, conv.out_channels // conv.groups, \
            conv.in_channels // conv.groups
        dense = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                          conv.padding, conv.dilation, 1, conv.bias is not None,
                          conv.padding_mode).to(conv.weight.device, conv.weight.dtype)
        mask = torch.zeros_like(dense.weight)
        for g in range(groups):
            mask[g * out_per:(g + 1) * out_per, g * in_per:(g + 1) * in_per] = 1
        with torch.no_grad():
            dense.weight.zero_()
            for g in range(groups):
                rows = slice(g * out_per, (g + 1) * out_per)
                dense.weight[rows, g * in_per:(g + 1) * in_per] = conv.weight[rows]
            if conv.bias is not None:
                dense.bias.copy_(conv.bias)
        dense.register_buffer("block_mask", mask, persistent=False)
        dense.weight.register_hook(lambda grad, dense=dense: grad * dense.block_mask)
        parent, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent), attribute, dense)
    return model


def measure(depth: int, seeds: int, convolutions: str, args: argparse.Namespace,
            device: torch.device) -> dict:
    """Images/s of `seeds` seeds of ResNet-`depth` trained at once (all seeds' images)."""
    models = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        models.append(cifar_resnet(depth, num_classes=10))
    model = models[0] if seeds == 1 else stack_models(models)
    if seeds > 1 and convolutions == "dense":
        block_diagonal_(model)
    execution = execution_for(device)
    model = model.to(device, memory_format=execution.torch_memory_format)
    # Table 6's spec warms ResNet-110 up: stacked, its seeds then step at a rate each.
    rate_per_seed = seeds > 1 and depth >= WARMUP_FROM_DEPTH
    step = Step(model, TrainRecipe(batch_size=args.batch), execution, Replicas(),
                seeds=None if seeds == 1 else seeds, rate_per_seed=rate_per_seed)
    generator = torch.Generator(device).manual_seed(0)
    size = args.image_size
    images = torch.randn(IMAGES_ON_DEVICE, 3, size, size, device=device, generator=generator)
    labels = torch.randint(0, 10, (IMAGES_ON_DEVICE,), device=device, generator=generator)

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        """Each seed's own batch, stacked along the channels (one seed: the batch itself)."""
        index = torch.randint(0, IMAGES_ON_DEVICE, (seeds, args.batch), device=device,
                              generator=generator)
        chosen = images[index].transpose(0, 1).flatten(1, 2)  # (batch, seeds * 3, H, W)
        targets = labels[index].T  # (batch, seeds)
        if seeds == 1:
            targets = targets[:, 0]
        return chosen.contiguous(memory_format=execution.torch_memory_format), targets

    step.start_epoch()
    for _ in range(GRAPH_WARMUP_STEPS + 2):  # eager warm-up, the graph's capture, one replay
        step(*batch(), 1.0)
    synchronize(device)
    reset_peak_memory(device)
    started = time.perf_counter()
    for _ in range(args.steps):
        step(*batch(), 1.0)
    step.loss_sum.sum().item()  # waits for the device
    seconds = time.perf_counter() - started
    return {"depth": depth, "seeds": seeds, "convolutions": convolutions if seeds > 1 else "",
            "rates": "per seed" if rate_per_seed else "one",
            "image_size": size, "batch": args.batch,
            "steps": args.steps, "cuda_graphs": execution.cuda_graphs,
            "precision": execution.precision,
            "images_per_second": round(seeds * args.batch * args.steps / seconds, 1),
            "peak_memory_mb": peak_memory_mb(device)}


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # as a trial sets it
    print(f"device: {device_name(device)}; seeds {args.seeds} of ResNet-{args.depths}, batch "
          f"{args.batch} per seed, {args.steps} timed steps", flush=True)
    rows: list[dict] = []
    failed: list[str] = []
    for depth in args.depths:
        one = None  # one seed's images/s at this depth, the ratios' base
        for seeds in args.seeds:
            for convolutions in args.convolutions if seeds > 1 else ["grouped"]:
                case = f"resnet{depth}, {seeds} seed(s), {convolutions}"
                print(f"[{case}]", flush=True)
                try:
                    m = measure(depth, seeds, convolutions, args, device)
                except Exception as error:  # one case's failure costs only its own row
                    traceback.print_exc()
                    failed.append(f"{case}: {type(error).__name__}: {error}")
                    continue
                if seeds == 1:
                    one = m["images_per_second"]
                ratio = round(m["images_per_second"] / one, 3) if one else ""
                how = f" ({m['convolutions']} convolutions)" if m["convolutions"] else ""
                print(f"  resnet{depth}: {m['seeds']} seed(s) at once{how}: "
                      f"{m['images_per_second']:.0f} images/s together"
                      + (f", x{ratio:.2f} vs one seed" if one else ""), flush=True)
                row = {**run_context(device), **m, "ratio_vs_one_seed": ratio}
                append_rows(args.csv, [row])  # as each case ends: a run cut short keeps these
                rows.append(row)
    if failed:
        raise SystemExit(f"{len(failed)} case(s) failed (the others' rows are written):\n  "
                         + "\n  ".join(failed))
    return rows


if __name__ == "__main__":
    main()
