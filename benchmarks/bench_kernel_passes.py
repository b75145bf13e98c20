"""Each kernel of the fused op alone, on the GPU's clock: where a layer's time goes, and what the
reductions' split and the elementwise passes' warps change.

    python benchmarks/bench_kernel_passes.py            # CUDA: every ResNet-50 and -56 shape
    python benchmarks/bench_kernel_passes.py --small    # a CPU: one tiny shape, a stand-in driver

A training layer (bf16, channels_last) launches four kernels: statistics and normalize forward,
reduce and elementwise backward. `plan_forward` and `plan_backward` describe them as data; each
is launched on its own, timed from CUDA graph replays with a cold L2 (_gpu_timing.py; the
median round, with the lowest and highest beside it: cold_us_low, cold_us_high), and scored
by the bytes it must move: every activation-sized tensor it takes is read or written once (the
packed ReLU mask at its eighth of a byte an element). Beside them, in the same run, a copy of the
activation (read once, written once) gives the bandwidth this device reaches in practice: each
kernel's GB/s is reported as a share of it and of the vendor's peak.

Variants, on a few shapes (`SWEPT`): the reductions at a quarter, half, 2 and 4 waves of programs
(their default is one wave, `_triton_geometry.py`: more programs give more loads in flight but
more partial sums for the last program to merge and a second wave's tail; fewer, a shorter merge,
which on an H200 took most of a small layer's statistics pass), each whatever the layer's size;
the statistics pass at one wave whatever the size (SMALL_LAYER_STEPS = 1: how it ran before
0.4.1, where a small layer's now runs fewer programs), at 8 warps rather than its planned 16
(fewer registers a program, so more programs and loads in flight on each SM) and loading 1 or 2
tiles a step rather than its planned 4 (fewer loads in flight: 1 is how it ran until the second
H200 lease, at 12% of a copy's bandwidth, median over shapes), and the elementwise
passes at 4, 8 and 16 warps (what RESNET_ABLATE_AUTOTUNE would choose among). On a CPU (the GPU check's rehearsal) each launch
goes through Triton's own launch path for an H100, compiled for sm_90 by the installed Triton,
to a stand-in for the CUDA driver that records it and runs nothing (triton_stand_in.py), on one
tiny shape, timed by the clock: the rows prove the script and that its Triton compiles every
variant, not how fast anything is. (Not the interpreter: Triton 3.6's, the GPU machine's, fails
with numpy 2.4 and later.)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

import torch

CUDA = torch.cuda.is_available()
if not CUDA:  # the stand-in driver (see above), the interpreter off before the kernels import
    os.environ.pop("TRITON_INTERPRET", None)
    import triton_stand_in

    triton_stand_in.install()

from _gpu_timing import GraphTimes, graph_times  # noqa: E402
from _results import append_rows, results_csv, run_context  # noqa: E402
from bench_batch_norm_act import PEAK_BANDWIDTH_GBPS, SHAPE_SETS, Shape  # noqa: E402
from resnet_ablate.kernels import _triton_geometry  # noqa: E402
from resnet_ablate.kernels._triton_geometry import RowTiling, programs_in_one_wave  # noqa: E402
from resnet_ablate.kernels._triton_impl import plan_backward, plan_forward  # noqa: E402

PASS_NAMES = {"_batch_stats_kernel": "statistics", "_forward_kernel": "normalize",
              "_backward_reduce_kernel": "backward reduce",
              "_backward_elementwise_kernel": "backward elementwise"}
REDUCTIONS = ("statistics", "backward reduce")
WAVES = (0.25, 0.5, 2, 4)  # besides the planned one
WARPS = (4, 8, 16)
STATISTICS_WARPS = 8  # against the planned 16: half the registers a program, more programs an SM
# Tiles a step of the statistics pass loads at once, against the planned 4 (bytes in flight)
STATISTICS_TILES = (1, 2)
SWEPT = ["64x64x112x112", "64x256x56x56+res", "64x1024x14x14+res", "64x512x7x7",
         "128x16x32x32+res", "128x32x16x16+res", "128x64x8x8+res"]


def shape_name(shape: Shape) -> str:
    dims, residual = shape
    return "x".join(map(str, dims)) + ("+res" if residual else "")


def layer_launches(shape: Shape, dtype: torch.dtype, device: torch.device, waves: float,
                   statistics_warps: int | None = None, small_layer_steps: int | None = None):
    """A training layer's launches (kernel, pass name, launch) and its input, the statistics and
    reductions sized to `waves` waves of programs, the statistics pass at `statistics_warps`
    warps where given (its wave then sized for them) instead of its planned 16 on full tiles, and
    with `small_layer_steps` in place of SMALL_LAYER_STEPS where given."""
    dims, residual = shape
    x = torch.randn(dims, device=device, dtype=dtype).to(memory_format=torch.channels_last)
    r = torch.randn_like(x) if residual else None
    grad = torch.randn_like(x)
    weight, bias = torch.rand(dims[1], device=device) + 0.5, torch.randn(dims[1], device=device)

    def programs(*args, **kwargs) -> int:
        return max(1, round(waves * programs_in_one_wave(*args, **kwargs)))

    planned, planned_steps = RowTiling.stats_warps, _triton_geometry.SMALL_LAYER_STEPS
    if statistics_warps is not None:  # a fresh `programs` keeps these plans apart from others
        RowTiling.stats_warps = property(lambda tiling: statistics_warps)
    if small_layer_steps is not None:
        _triton_geometry.SMALL_LAYER_STEPS = small_layer_steps
    try:
        forward = plan_forward(x, weight, bias, r, None, None, 1e-5, True, pack_relu_mask=True,
                               reduction_programs=programs)
    finally:
        RowTiling.stats_warps, _triton_geometry.SMALL_LAYER_STEPS = planned, planned_steps
    mask = forward.relu_mask if forward.relu_mask is not None else forward.out
    backward = plan_backward(grad, x, mask, weight, forward.stats, 1e-5, True, residual,
                             reduction_programs=programs)
    launches = [*forward.launches, *backward.launches]
    return [(PASS_NAMES.get(launch.kernel.fn.__name__, launch.kernel.fn.__name__), launch)
            for launch in launches], x


def run_launch(launch) -> Callable[[], None]:
    def run() -> None:
        launch.kernel[launch.grid](*launch.args, **launch.constexprs, num_warps=launch.num_warps)
    return run


def bytes_moved(launch, x: torch.Tensor) -> int:
    """Each activation-sized tensor the launch takes, once (the packed mask's size is its own)."""
    seen, total = set(), 0
    for arg in launch.args:
        if isinstance(arg, torch.Tensor) and arg.data_ptr() not in seen:
            seen.add(arg.data_ptr())
            size = arg.numel() * arg.element_size()
            if size >= x.numel() * x.element_size() // 64:  # leaves out the per-channel vectors
                total += size
    return total


def milliseconds(fn: Callable[[], None]) -> GraphTimes:
    """Cold and warm ms of one call: graph replays on CUDA, the clock on a CPU (all the same)."""
    if CUDA:
        return graph_times(fn)
    fn()
    start = time.perf_counter()
    fn()
    ms = (time.perf_counter() - start) * 1e3
    return GraphTimes(cold_ms=ms, warm_ms=ms, cold_low_ms=ms, cold_high_ms=ms)


def measure_shape(shape: Shape, dtype, device, sweep: bool, context: dict, peak) -> list[dict]:
    """Every launch of the layer as planned; where `sweep`, also the reductions at more waves and
    the statistics pass at one wave however small the layer and at fewer warps (each plan's
    passes: VARIED), and the elementwise passes at each of WARPS."""
    rows = []
    copy_gbps = None
    planned_grids = {}
    plans = [(1, None, None)] + ([(w, None, 1) for w in WAVES] + [(1, None, 1),
                                                                  (1, STATISTICS_WARPS, None)]
                                 if sweep else [])
    for waves, statistics_warps, small_layer_steps in plans:
        launches, x = layer_launches(shape, dtype, device, waves, statistics_warps,
                                     small_layer_steps)
        if copy_gbps is None:
            target = torch.empty_like(x)
            cold = milliseconds(lambda: target.copy_(x)).cold_ms
            copy_gbps = 2 * x.numel() * x.element_size() / (cold * 1e-3) / 1e9
        planned = (waves, statistics_warps, small_layer_steps) == (1, None, None)
        varied = REDUCTIONS if waves != 1 else ("statistics",)
        for pass_name, launch in launches:
            reduction = pass_name in REDUCTIONS
            if planned:
                planned_grids[pass_name] = launch.grid
            elif pass_name not in varied or (statistics_warps is None
                                             and launch.grid == planned_grids[pass_name]):
                continue  # not what this plan changes, or (a large layer) nothing changed
            steps = small_layer_steps or _triton_geometry.SMALL_LAYER_STEPS
            for variant in _variants(launch, sweep and planned, reduction):
                row = {**context, "shape": shape_name(shape), "dtype": str(dtype).split(".")[-1],
                       "pass": pass_name, "grid": "x".join(map(str, launch.grid)),
                       "waves": waves if reduction else "", "num_warps": variant.num_warps,
                       "tiles_per_step": variant.constexprs.get("TILES_PER_STEP", ""),
                       "small_layer_steps": steps if pass_name == "statistics" else "",
                       "default": planned and variant == launch,
                       **timed(variant, x, copy_gbps, peak)}
                rows.append(row)
                print(f"{row['shape']:>18} {pass_name:>21} {row['grid']:>9} "
                      f"{row['waves'] or '':>5} {variant.num_warps:>5} {row['cold_us']:>9.1f} "
                      f"{row['warm_us']:>9.1f} {row['gbps']:>8.1f} {row['pct_copy']:>7.1f}"
                      + ("" if row["default"] else "  (variant)"))
    return rows


def _variants(launch, sweep: bool, reduction: bool) -> list:
    """The launch, and where swept: an elementwise pass at each of WARPS, the statistics pass
    loading each of STATISTICS_TILES tiles a step (on the planned grid)."""
    variants = [launch]
    if sweep and not reduction:
        variants += [launch._replace(num_warps=w) for w in WARPS if w != launch.num_warps]
    planned_tiles = launch.constexprs.get("TILES_PER_STEP")
    if sweep and planned_tiles is not None:
        variants += [launch._replace(constexprs={**launch.constexprs, "TILES_PER_STEP": tiles})
                     for tiles in STATISTICS_TILES if tiles != planned_tiles]
    return variants


def timed(launch, x: torch.Tensor, copy_gbps: float, peak: float | None) -> dict:
    """A launch's columns: its times, the bytes it moves, and its GB/s against the copy's."""
    times = milliseconds(run_launch(launch))
    cold = times.cold_ms
    moved = bytes_moved(launch, x)
    gbps = moved / (cold * 1e-3) / 1e9 if cold > 0 else float("nan")
    return {"cold_us": round(cold * 1e3, 2), "warm_us": round(times.warm_ms * 1e3, 2),
            "cold_us_low": round(times.cold_low_ms * 1e3, 2),
            "cold_us_high": round(times.cold_high_ms * 1e3, 2),
            "mb_moved": round(moved / 2**20, 2), "gbps": round(gbps, 1),
            "copy_gbps": round(copy_gbps, 1), "pct_copy": round(100 * gbps / copy_gbps, 1),
            "pct_peak": round(100 * gbps / peak, 1) if peak else ""}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="one tiny shape (a CPU's default)")
    parser.add_argument("--no-sweep", action="store_true", help="each kernel as planned only")
    parser.add_argument("--csv", default=None,
                        help="default: benchmarks/results/, a scratch folder with --small")
    args = parser.parse_args(argv)
    args.csv = args.csv or results_csv("kernel_passes.csv", args.small)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if CUDA else "cpu")
    small = args.small or not CUDA
    shapes = SHAPE_SETS["small"][:1] if small else SHAPE_SETS["resnet"]
    swept = {shape_name(s) for s in shapes} if small else set(SWEPT)
    dtype = torch.float32 if small else torch.bfloat16
    context = run_context(device)
    peak = next((gbps for key, gbps in PEAK_BANDWIDTH_GBPS.items()
                 if CUDA and key in torch.cuda.get_device_name()), None)
    print(f"device: {context['device']} | peak {peak or 'unknown'} GB/s | {dtype} channels_last")
    print(f"{'shape':>18} {'pass':>21} {'grid':>9} {'waves':>5} {'warps':>5} {'cold us':>9} "
          f"{'warm us':>9} {'GB/s':>8} {'% copy':>7}")
    for index, shape in enumerate(shapes, 1):
        sweep = not args.no_sweep and shape_name(shape) in swept
        append_rows(args.csv, measure_shape(shape, dtype, device, sweep, context, peak))
        print(f"[{index}/{len(shapes)} shapes done]", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
