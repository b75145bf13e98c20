"""The GPU check's one-page summary: every ratio it measured against its goal, and the paper's
Table 6 projected from the measured rates, read from the CSVs that benchmarks/gpu_check.sh wrote.

    python benchmarks/gpu_summary.py OUT_FOLDER            # writes OUT_FOLDER/summary.md
    python benchmarks/gpu_summary.py OUT_FOLDER --check    # also exits 1 when a step broke
    python benchmarks/gpu_summary.py OUT_FOLDER --readme README.md   # fills "GPU figures"

The ratios, each isolating one effect (bench_trial.py's variants add one thing at a time):
hand-tuning (tuned / plain), the fused kernels in a trial (tuned+kernels / tuned), the trial loop
over a hand-written one (project / tuned+kernels), CUDA graphs and torch.compile (each against
project); the kernels alone (bench_batch_norm_act.py: forward+backward against eager and
torch.compile, bandwidth as a share of the device's peak; bench_kernel_passes.py: each kernel
against a copy measured in the same run, and the split and warps that would serve it best); the
loader against the step; trials
packed on one device (bench_packing.py).

Table 6 projection: ResNet-20/32/44/56/110 x 5 seeds x 164 epochs of CIFAR-10's 50,000 training
images (evaluation left out). Each depth's time per image is the affine fit in depth of the
measured cases (time per image grows with the number of layers), the project's rate is its
fastest study-ready variant (project or project+graphs; compile's per-trial compile time is left
out of it), sped up by the best packing's aggregate gain (measured on one depth), and the plain
loop runs one trial at a time. FLOPs are 2 per multiply-add of the convolutions and the
classifier, backward twice forward: about 1.4e17 for the table.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from resnet_ablate.study.advice import fastest_packing

TABLE6_DEPTHS = (20, 32, 44, 56, 110)
TABLE6_SEEDS, TABLE6_EPOCHS, CIFAR10_TRAIN_IMAGES = 5, 164, 50_000
TABLE6_GOAL_MINUTES = 30
BF16_PEAK_TFLOPS = {"H100": 989, "H200": 989}  # dense bf16, the vendor's datasheet
# Steps that must write rows; the host-cost step is optional (its benchmark may be absent).
REQUIRED_STEPS = ("tests", "trial", "kernels", "kernel_passes", "seed_stack", "packing",
                  "loader", "packing_stacks", "trial_compile")
# README's "GPU figures" section lies between these two lines; --readme fills it.
README_START, README_END = "<!-- gpu-figures:start -->", "<!-- gpu-figures:end -->"


@dataclass(frozen=True)
class Ratio:
    name: str
    value: float | None
    goal: str  # ">= 1.2", "<= 30", or "" for a figure shown without a goal
    meaning: str

    @property
    def verdict(self) -> str:
        if self.value is None:
            return "not measured"
        if not self.goal:
            return "-"
        sign, bound = self.goal.split()
        met = self.value >= float(bound) if sign == ">=" else self.value <= float(bound)
        return "met" if met else "missed"


def read_rows(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def cifar_resnet_macs(depth: int) -> int:
    """Multiply-adds of a CIFAR ResNet's convolutions and classifier for one 32x32 image (the
    paper's option A shortcuts add none): 3 stages of n = (depth-2)/6 blocks of two 3x3 convs at
    16, 32 and 64 channels on 32x32, 16x16 and 8x8, each later stage's first conv taking half
    the channels at its stride."""
    n = (depth - 2) // 6
    macs = 3 * 16 * 9 * 32 * 32  # the first conv
    for stage, (channels, side) in enumerate(((16, 32), (32, 16), (64, 8))):
        per_conv = channels * channels * 9 * side * side
        macs += 2 * n * per_conv - (per_conv // 2 if stage else 0)
    return macs + 64 * 10


def table6_flops() -> float:
    """Table 6's training FLOPs as a GPU's peak counts them: 2 a multiply-add (forward + backward
    3x the forward). The paper's FLOPs, and the dry run's, count 1 a multiply-add."""
    images = TABLE6_SEEDS * TABLE6_EPOCHS * CIFAR10_TRAIN_IMAGES
    return sum(2 * 3 * cifar_resnet_macs(d) * images for d in TABLE6_DEPTHS)


def seconds_per_image(rates: Mapping[int, float], depth: int) -> float | None:
    """Seconds per image at `depth`: measured, or the least-squares line through the measured
    depths (a single measured depth scales in proportion to the depth)."""
    if depth in rates:
        return 1 / rates[depth]
    if not rates:
        return None
    points = [(d, 1 / r) for d, r in rates.items()]
    if len(points) == 1:
        (d0, t0), = points
        return t0 * depth / d0
    mean_d = statistics.fmean(d for d, _ in points)
    mean_t = statistics.fmean(t for _, t in points)
    slope = sum((d - mean_d) * (t - mean_t) for d, t in points) / sum(
        (d - mean_d) ** 2 for d, _ in points)
    return max(mean_t + slope * (depth - mean_d), min(t for _, t in points))


def rates_by_depth(trial_rows: Sequence[Mapping[str, str]], variants: Sequence[str]
                   ) -> dict[int, float]:
    """Images/s per CIFAR depth, the fastest of `variants` measured on every depth."""
    by_variant: dict[str, dict[int, float]] = {}
    for row in trial_rows:
        if row["variant"] in variants and row["case"].startswith("resnet"):
            depth = int(row["case"].removeprefix("resnet").split("-")[0])
            if row["case"].endswith("-224"):
                continue  # an ImageNet case, not a CIFAR depth
            rate = float(row["images_per_second"])
            by_variant.setdefault(row["variant"], {})[depth] = max(
                rate, by_variant.get(row["variant"], {}).get(depth, 0.0))
    depths = set.intersection(*(set(r) for r in by_variant.values())) if by_variant else set()
    return {d: max(r[d] for r in by_variant.values() if d in r) for d in depths}


def table6_minutes(rates: Mapping[int, float], packing_gain: float = 1.0) -> float | None:
    images = TABLE6_SEEDS * TABLE6_EPOCHS * CIFAR10_TRAIN_IMAGES
    per_image = [seconds_per_image(rates, d) for d in TABLE6_DEPTHS]
    if any(t is None for t in per_image):
        return None
    return sum(t * images for t in per_image) / packing_gain / 60


def stacking_gains(rows: Sequence[Mapping[str, str]], seeds: int = TABLE6_SEEDS,
                   convolutions: str = "grouped") -> dict[int, float]:
    """Per CIFAR depth, `seeds` seeds trained as one stacked model against one seed alone
    (bench_seed_stack.py's ratio, both measured in one run), with `convolutions`: grouped ones
    are what resources.stack_seeds runs; dense block-diagonal ones are a measurement only."""
    return {int(r["depth"]): float(r["ratio_vs_one_seed"]) for r in rows
            if int(r["seeds"]) == seeds and r.get("ratio_vs_one_seed")
            and r.get("convolutions", "grouped") == convolutions}


# The project's loop as a study runs it: `cuda_graphs: auto` replays CUDA graphs on a GPU where a
# step can be captured (in-memory data, one process), so project+graphs where it was measured.
AS_RUN = ("project+graphs", "project")


def trial_ratio(rows: Sequence[Mapping[str, str]], numerator: str | Sequence[str],
                denominator: str) -> float | None:
    """Geometric mean over cases of numerator / denominator images/s, where both ran; a
    sequence of numerators takes, case by case, the first of them measured."""
    cases: dict[str, dict[str, float]] = {}
    for row in rows:
        cases.setdefault(row["case"], {})[row["variant"]] = float(row["images_per_second"])
    numerators = (numerator,) if isinstance(numerator, str) else tuple(numerator)
    ratios = []
    for variants in cases.values():
        found = next((variants[n] for n in numerators if n in variants), None)
        if found is not None and denominator in variants:
            ratios.append(found / variants[denominator])
    return statistics.geometric_mean(ratios) if ratios else None


def packing_rows(rows: Sequence[Mapping[str, str]], mps: bool = False, stacked: bool = False
                 ) -> tuple[list[Mapping[str, str]], bool]:
    """The packing rows of trials with CUDA graphs where any were measured (as the Table 6
    projection runs each trial, gpu_check.sh's packing step), else those without; and which.
    Those that shared the GPU through MPS (`mps`) or those that did not; those whose processes
    each trained a stack of seeds (`stacked`: bench_packing.py --stack-seeds, its speed-ups over
    one stack) or one seed (rows from before the column count as one)."""
    rows = [r for r in rows if (r.get("mps") == "True") == mps
            and (int(r.get("stack_seeds") or 1) > 1) == stacked]
    graphs = [r for r in rows if r.get("cuda_graphs") == "True"]
    return (graphs, True) if graphs else (rows, False)


def best_packing(rows: Sequence[Mapping[str, str]]) -> tuple[int, float] | None:
    """(trials per device, speed-up over one trial) of the fastest packing measured among
    `rows` (of one kind: `packing_rows`): the packing that `resnet-ablate run --dry-run`
    recommends once entered in MEASURED_PACKINGS."""
    if not rows:
        return None
    by_trials = {int(r["trials_per_device"]): r for r in rows}
    trials = fastest_packing({n: float(r["aggregate_images_per_s"]) for n, r in by_trials.items()})
    return trials, float(by_trials[trials]["speedup_vs_one_trial"])


def packing_entry(device: str, rows: Sequence[Mapping[str, str]], packed: tuple[int, float],
                  graphs: bool, mps: bool) -> str:
    """The MEASURED_PACKINGS entry (resnet_ablate/study/advice.py) of the best packing among
    `rows`, with the CPU threads and the model its trials ran where they are not the entry's
    defaults (1, ResNet-56; rows from before the threads column ran 1)."""
    row = {int(r["trials_per_device"]): r for r in rows}[packed[0]]  # best_packing's: the last
    extras = ", mps=True" if mps else ""
    threads = int(row.get("threads_per_trial") or 1)
    if threads != 1:
        extras += f", cpus={threads}"
    model = row.get("model", "resnet56").replace("resnet", "ResNet-")
    if model != "ResNet-56":
        extras += f", model={model!r}"
    return (f"    PackingMeasurement({device!r}, {packed[0]}, {packed[1]:.2f}, "
            f"cuda_graphs={graphs}{extras})")


def kernel_figures(rows: Sequence[Mapping[str, str]]) -> dict[str, float | None]:
    """Forward+backward speed-ups (geometric means over shapes, and the worst shape against
    torch.compile) and the forward pass's median share of the peak bandwidth."""
    both = [r for r in rows if r["pass"] == "forward+backward"]

    def values(column: str, passes=both) -> list[float]:
        return [float(r[column]) for r in passes if r.get(column)]

    def geomean(column: str) -> float | None:
        return statistics.geometric_mean(values(column)) if values(column) else None

    shares = values("pct_peak", [r for r in rows if r["pass"] == "forward"])
    return {"vs_eager": geomean("speedup_vs_eager"), "vs_compile": geomean("speedup_vs_compile"),
            "min_vs_compile": min(values("speedup_vs_compile"), default=None),
            "forward_pct_peak": statistics.median(shares) if shares else None}


def host_figures(rows: Sequence[Mapping[str, str]]
                 ) -> tuple[list[float], list[float], list[float]]:
    """bench_host.py's microseconds per fused layer, fused over eager for each layer, and each
    layer's time with every launch through Triton's JITFunction.run over its time with the
    templates' direct launches (the rows of one model, shape, layout and residual paired)."""
    by_layer: dict[tuple, dict[str, float]] = {}
    for row in rows:
        if row.get("host_us_fwd_bwd"):
            layer = tuple(row.get(k) for k in ("model", "shape", "layout", "dtype", "residual"))
            by_layer.setdefault(layer, {})[row.get("provider", "")] = float(row["host_us_fwd_bwd"])

    def over(numerator: str, denominator: str) -> list[float]:
        return [p[numerator] / p[denominator] for p in by_layer.values()
                if {numerator, denominator} <= set(p)]

    fused = [p["fused"] for p in by_layer.values() if "fused" in p]
    return fused, over("fused", "eager"), over("fused_jit_launches", "fused")


def table6_packing(best: tuple[int, float] | None,
                   through_mps: tuple[int, float] | None) -> str:
    """What the project's Table 6 row assumes of single trials packed on the GPU (`--steps
    packing,packing_mps` measures them; a run without them projects one trial at a time)."""
    if best is None:
        return "projected, one trial at a time (no packing of single trials measured)"
    return "projected, best packing" + (" (through MPS)" if best is through_mps else "")


def best_loader(rows: Sequence[Mapping[str, str]], column: str,
                decode: str = "cpu") -> float | None:
    """The best over loader workers of a bench_loader.py ratio, for one way of decoding (rows
    before a column was measured leave it blank)."""
    values = [float(r[column]) for r in rows
              if (r.get("decode") or "cpu") == decode and r.get(column)]
    return max(values) if values else None


def ratios(out: Path) -> list[Ratio]:
    """Every ratio of the run against its goal: the project's targets on one H100/H200 (README's
    for the kernels and the trial), and 30 minutes for Table 6."""
    trial, packing = read_rows(out / "trial.csv"), read_rows(out / "packing.csv")
    kernels = kernel_figures(read_rows(out / "batch_norm_act.csv"))
    loader_rows = read_rows(out / "loader.csv")
    decode = read_rows(out / "loader_decode.csv")  # bench_loader.py's crops per core, if any
    cores = min((int(r["cores_per_gpu"]) for r in decode if r.get("cores_per_gpu")), default=None)
    host = read_rows(out / "host.csv")
    fused_host, fused_over_eager, jit_over_direct = host_figures(host)
    packed = best_packing(packing_rows(packing)[0])
    through_mps = best_packing(packing_rows(packing, mps=True)[0])
    best_packed = max((p for p in (packed, through_mps) if p), key=lambda p: p[1], default=None)
    project = rates_by_depth(trial, ("project", "project+graphs"))
    stack_rows = read_rows(out / "seed_stack.csv")
    stacking = stacking_gains(stack_rows)
    dense = stacking_gains(stack_rows, convolutions="dense")
    dense_over_grouped = [dense[d] / stacking[d] for d in dense if d in stacking]
    stacked = {d: rate * stacking[d] for d, rate in project.items() if d in stacking}
    # Stacks packed on the GPU (through MPS where measured so): what the depths' stacks gain
    # running side by side, as a study's 5 stacks of Table 6 would.
    stacks_packed = max((p for p in (best_packing(packing_rows(packing, mps, stacked=True)[0])
                                     for mps in (True, False)) if p),
                        key=lambda p: p[1], default=None)
    return [
        Ratio("tuned / plain", trial_ratio(trial, "tuned", "plain"), "",
              "what a hand-tuned loop gives (bf16, channels_last, fused SGD, no syncs)"),
        Ratio("tuned+kernels / tuned", trial_ratio(trial, "tuned+kernels", "tuned"), ">= 1.1",
              "what the fused kernels add to a trial"),
        Ratio("project / tuned+kernels", trial_ratio(trial, "project", "tuned+kernels"),
              ">= 0.95", "what the trial loop costs over a hand-written one"),
        Ratio("project as run / plain", trial_ratio(trial, AS_RUN, "plain"), ">= 3",
              "the trial loop as a study runs it (CUDA graphs where measured) against the loop a "
              "user would write"),
        Ratio("project as run / tuned", trial_ratio(trial, AS_RUN, "tuned"), ">= 1.1",
              "the same against what a good engineer writes"),
        Ratio("project / plain", trial_ratio(trial, "project", "plain"), "",
              "the trial loop launched step by step (cuda_graphs: false)"),
        Ratio("project+graphs / project", trial_ratio(trial, "project+graphs", "project"),
              ">= 1.2", "what CUDA graphs add"),
        Ratio("project+compile / project", trial_ratio(trial, "project+compile", "project"),
              ">= 1.0", "what torch.compile adds (its compile time apart)"),
        Ratio("kernels fwd+bwd / eager", kernels["vs_eager"], ">= 1.5",
              "the fused op alone, geometric mean over shapes"),
        Ratio("kernels fwd+bwd / compile", kernels["vs_compile"], ">= 1.15",
              "the fused op against torch.compile of the same epilogue"),
        Ratio("kernels fwd+bwd / compile, worst shape", kernels["min_vs_compile"], ">= 1.0", ""),
        Ratio("kernels forward, % of peak bandwidth (median)", kernels["forward_pct_peak"],
              ">= 85", "from the byte model in bench_batch_norm_act.py"),
        Ratio("loader / step (best workers)", best_loader(loader_rows, "loader_over_step"),
              ">= 1.0", "the loader alone against the step alone"),
        Ratio("training fed by the loader / step alone (best workers)",
              best_loader(loader_rows, "fed_over_step"), ">= 0.95",
              "how little training waits for data (bench_loader.py)"),
        Ratio("loader: CPU cores to feed one GPU (best crop)", cores, "",
              "decoding and cropping at the GPU's training rate (bench_loader.py)"),
        Ratio("loader / step, decode: gpu (best workers)",
              best_loader(loader_rows, "loader_over_step", "gpu"), ">= 1.0",
              "nvJPEG decoding and cropping on the GPU (train.decode: gpu)"),
        Ratio("training fed by the loader / step alone, decode: gpu (best workers)",
              best_loader(loader_rows, "fed_over_step", "gpu"), ">= 0.95",
              "the GPU decoding between the steps"),
        Ratio("host us per layer, fused fwd+bwd (median)",
              statistics.median(fused_host) if fused_host else None, "",
              "what the CPU spends to issue one fused layer (bench_host.py)"),
        Ratio("host: fused / eager per layer (median)",
              statistics.median(fused_over_eager) if fused_over_eager else None, "<= 1.0",
              "the fused layer's host path against eager PyTorch's"),
        Ratio("host: launches through Triton's JIT / direct (median)",
              statistics.median(jit_over_direct) if jit_over_direct else None, "",
              "what the templates' direct launches save per layer"),
        Ratio("packing: best aggregate / one trial", packed[1] if packed else None, ">= 1.5",
              f"at {packed[0]} trials per device" if packed else "trials sharing the device"),
        Ratio("packing through MPS: best aggregate / one trial",
              through_mps[1] if through_mps else None, ">= 1.5",
              f"at {through_mps[0]} trials per device" if through_mps else
              "trials sharing the device through CUDA's MPS"),
        Ratio("Table 6, project (minutes)",
              table6_minutes(project, best_packed[1] if best_packed else 1.0),
              f"<= {TABLE6_GOAL_MINUTES}", table6_packing(best_packed, through_mps)),
        Ratio(f"seeds stacked: {TABLE6_SEEDS} as one / one seed (median over depths)",
              statistics.median(stacking.values()) if stacking else None, ">= 1.5",
              "one configuration's seeds in the same launches, grouped convolutions as "
              "resources.stack_seeds runs them (bench_seed_stack.py)"),
        Ratio("seeds stacked: dense block-diagonal / grouped convolutions (median)",
              statistics.median(dense_over_grouped) if dense_over_grouped else None, "",
              "a measurement only (a dense convolution would carry a diverged seed's NaN into "
              "the others): what cuDNN's dense kernels would give instead"),
        Ratio("stacks packed: best aggregate / one stack",
              stacks_packed[1] if stacks_packed else None, "",
              f"at {stacks_packed[0]} stacks per device (bench_packing.py --stack-seeds)"
              if stacks_packed else "stacks of seeds sharing the device"),
        Ratio(f"Table 6, project, {TABLE6_SEEDS} seeds stacked (minutes)",
              table6_minutes(stacked, stacks_packed[1] if stacks_packed else 1.0)
              if stacked else None, f"<= {TABLE6_GOAL_MINUTES}",
              "projected: each depth's seeds as one model (the trial's rate times the stacking "
              "gain measured at that depth), the depths' stacks packed as measured"
              + ("" if stacks_packed else " (not measured: one depth at a time)")),
        Ratio("Table 6, plain loop (minutes)",
              table6_minutes(rates_by_depth(trial, ("plain",))), "",
              "projected, one trial at a time"),
    ]


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"


def step_table(steps: Sequence[Mapping[str, str]]) -> list[str]:
    lines = ["| step | exit | seconds | rows written |", "| --- | --- | --- | --- |"]
    lines += [f"| {s['step']} | {s['exit_code']} | {s['seconds']} | {s['rows']} |" for s in steps]
    total = sum(float(s["seconds"]) for s in steps)
    return lines + [f"| total | | {total:.0f} | |"]


def broken_steps(steps: Sequence[Mapping[str, str]]) -> list[str]:
    """Steps that failed, wrote no rows, or never ran (required ones); the optional host step
    counts only when it ran, and a step left out by `gpu_check.sh --steps` not at all."""
    seen = {s["step"]: s for s in steps}
    broken = [name for name in REQUIRED_STEPS if name not in seen]
    for step in steps:
        skipped = (step["exit_code"] == "skipped" and step["step"] not in REQUIRED_STEPS
                   or step["exit_code"] == "not selected")
        if not skipped and (step["exit_code"] != "0" or int(step["rows"] or 0) == 0):
            broken.append(step["step"])
    return broken


def pass_table(rows: Sequence[Mapping[str, str]]) -> list[str]:
    """bench_kernel_passes.py's kernels, each as planned: the median share, over shapes, of the
    copy bandwidth measured in the same run and of the vendor's peak; and on the swept shapes
    the best variant's gain over the planned launch (median over shapes); and how far apart the
    timing's rounds were, as a share of the time (median over shapes: where it nears 100%, the
    cold L2's flush varied as much as the kernel took; inf, the median shape's round was at or
    below zero)."""
    planned = [r for r in rows if r.get("default") == "True"]
    if not planned:
        return []
    lines = ["| kernel | % of copy (median) | % of peak (median) | best variant on swept shapes "
             "| its gain (median) | rounds' spread, % of the time (median) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for kernel in dict.fromkeys(r["pass"] for r in planned):
        own = [r for r in planned if r["pass"] == kernel]
        gains: dict[str, list[float]] = {}
        swept = {r["shape"] for r in rows if r["pass"] == kernel and r["default"] != "True"}
        for shape in swept:
            variants = [r for r in rows if r["pass"] == kernel and r["shape"] == shape]
            base = next((float(r["cold_us"]) for r in variants if r["default"] == "True"), None)
            for r in variants:
                if base and float(r["cold_us"]) > 0:
                    name = f"{r['num_warps']} warps"
                    if r.get("waves"):  # a reduction: its waves, and its warps
                        name = f"{r['waves']} wave{'s' * (r['waves'] != '1')}, {name}"
                    if r.get("tiles_per_step"):  # the statistics pass: the tiles a step loads
                        name = f"{name}, {r['tiles_per_step']} tiles a step"
                    if r.get("small_layer_steps") == "1":  # its waves however small the layer
                        name = f"{name}, whatever the layer's size"
                    gains.setdefault(name, []).append(base / float(r["cold_us"]))
        best = max(gains, key=lambda n: statistics.median(gains[n]), default=None)
        copy = statistics.median(float(r["pct_copy"]) for r in own)
        peak = [float(r["pct_peak"]) for r in own if r.get("pct_peak")]
        # (A median round at or below zero, floored: the noise is all there is, counted as
        # an infinite share.)
        spread = [100 * (float(r["cold_us_high"]) - float(r["cold_us_low"])) / float(r["cold_us"])
                  if float(r["cold_us"]) > 0 else math.inf for r in own if r.get("cold_us_low")]
        lines.append(f"| {kernel} | {copy:.0f} | {fmt(statistics.median(peak)) if peak else '-'} "
                     f"| {best or '-'} | {fmt(statistics.median(gains[best])) if best else '-'} "
                     f"| {fmt(statistics.median(spread)) if spread else '-'} |")
    copy_gbps = statistics.median(float(r["copy_gbps"]) for r in planned)
    return ["Each kernel alone (bench_kernel_passes.py; CUDA graph replays, cold L2; a copy of "
            f"the activation reached {copy_gbps:,.0f} GB/s, median over shapes):", "", *lines, "",
            *small_layer_lines(rows)]


def small_layer_lines(rows: Sequence[Mapping[str, str]]) -> list[str]:
    """What the small-layer split (SMALL_LAYER_STEPS) buys the statistics pass: its planned
    time against one wave whatever the size, on the swept shapes where the two differ."""
    def one_wave(r):
        return (r["pass"] == "statistics" and r.get("small_layer_steps") == "1"
                and r.get("waves") == "1" and r["default"] != "True")
    gains = {}
    for r in rows:
        planned = next((p for p in rows if p["default"] == "True" and p["shape"] == r["shape"]
                        and p["pass"] == "statistics"), None)
        if one_wave(r) and planned and float(planned["cold_us"]) > 0:
            gains[r["shape"]] = float(r["cold_us"]) / float(planned["cold_us"])
    if not gains:
        return []
    each = ", ".join(f"{shape} {fmt(gain)}x" for shape, gain in gains.items())
    return ["The statistics pass of a small layer at one wave whatever its size takes "
            f"{fmt(statistics.median(gains.values()))}x the time of its planned fewer programs "
            f"(SMALL_LAYER_STEPS; median over {len(gains)} shape{'s' * (len(gains) > 1)}: "
            f"{each}).", ""]


def epoch_table(trial_rows: Sequence[Mapping[str, str]]) -> list[str]:
    """Seconds per CIFAR-10 epoch (50,000 images) at each Table 6 depth, measured (m) or from the
    line through the measured depths: what the projection adds up."""
    loops = {"project (fastest of project, project+graphs)": ("project", "project+graphs"),
             "plain loop": ("plain",)}
    rates = {name: rates_by_depth(trial_rows, variants) for name, variants in loops.items()}
    if not any(rates.values()):
        return []
    lines = ["| seconds per epoch | " + " | ".join(f"ResNet-{d}" for d in TABLE6_DEPTHS) + " |",
             "| --- |" + " --- |" * len(TABLE6_DEPTHS)]
    for name, by_depth in rates.items():
        cells = []
        for depth in TABLE6_DEPTHS:
            per_image = seconds_per_image(by_depth, depth)
            cells.append("-" if per_image is None else
                         f"{per_image * CIFAR10_TRAIN_IMAGES:.3g}{' (m)' if depth in by_depth else ''}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + ["", "Table 6 adds these up over 5 seeds x 164 epochs; the project's total is "
                    "divided by the best packing's gain (measured on one depth, applied to all); "
                    "with seeds stacked, each depth's rate is the trial's times the stacking gain "
                    "measured there, divided by the gain of stacks packed side by side where it "
                    "was measured (else one depth at a time); the plain loop runs one trial at a "
                    "time. Evaluation is left out.", ""]


def summary_markdown(out: Path) -> str:
    machine = (out / "machine.txt").read_text().strip() if (out / "machine.txt").exists() else "?"
    steps = read_rows(out / "steps.csv")
    figures = ratios(out)
    project_minutes = next(r.value for r in figures if r.name == "Table 6, project (minutes)")
    lines = [f"# GPU check: {machine.splitlines()[0] if machine else '?'}", "",
             *(f"    {line}" for line in machine.splitlines()), ""]
    if "no GPU" in machine:
        lines += ["Rehearsal on a CPU, on tiny sizes: these figures show that every step runs and "
                  "that this summary reads its rows, not how fast anything is on a GPU.", ""]
    lines += [
             "| ratio | measured | goal | verdict | what it says |",
             "| --- | --- | --- | --- | --- |",
             *(f"| {r.name} | {fmt(r.value)} | {r.goal or '-'} | {r.verdict} | {r.meaning} |"
               for r in figures), ""]
    lines += pass_table(read_rows(out / "kernel_passes.csv"))
    lines += epoch_table(read_rows(out / "trial.csv"))
    peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in machine), None)
    if project_minutes and peak:
        flops = table6_flops()
        achieved = flops / (project_minutes * 60) / 1e12
        lines.append(f"Table 6 ({flops:.2g} FLOPs, 2 a multiply-add) in {project_minutes:.1f} "
                     f"min is {achieved:.0f} TFLOP/s, {100 * achieved / peak:.1f}% of the bf16 "
                     "peak.")
        lines.append("")
    device = machine.splitlines()[0].split(",")[0].strip() if machine else "?"
    entries = []
    for mps in (False, True):
        packing, graphs = packing_rows(read_rows(out / "packing.csv"), mps=mps)
        packed = best_packing(packing)
        if packed and "no GPU" not in machine:
            entries.append(packing_entry(device, packing, packed, graphs, mps))
    if entries:
        lines += ["For `--dry-run` to recommend these packings, add to MEASURED_PACKINGS in "
                  "resnet_ablate/study/advice.py:", "", *entries, ""]
    stacking = stacking_gains(read_rows(out / "seed_stack.csv"))
    if stacking and "no GPU" not in machine:
        lines += ["For `--dry-run` to advise on resources.stack_seeds, add to MEASURED_STACKINGS "
                  "in resnet_ablate/study/advice.py:", "",
                  f"    StackingMeasurement({device!r}, {TABLE6_SEEDS}, "
                  f"{statistics.median(stacking.values()):.2f})", ""]
    broken = broken_steps(steps)
    lines += ["## Steps", "", *step_table(steps), "",
              f"Broken steps: {', '.join(broken)}." if broken else "Every step wrote its rows.",
              "", "Method: see benchmarks/gpu_summary.py; raw rows in the CSVs beside this file."]
    return "\n".join(lines) + "\n"


def fill_readme(readme: Path, summary: str) -> None:
    """Put a GPU run's summary between README's "GPU figures" markers (a rehearsal's never)."""
    if "Rehearsal on a CPU" in summary:
        raise ValueError("this summary is a CPU rehearsal's: README's GPU figures take a GPU run's")
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        raise ValueError(f"{readme}: no {README_START} ... {README_END} lines to fill")
    head, rest = text.split(README_START, 1)
    body = summary.replace("# GPU check: ", "Measured on ", 1)
    readme.write_text(f"{head}{README_START}\n{body}{README_END}{rest.split(README_END, 1)[1]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the folder gpu_check.sh wrote its CSVs to")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when a step failed or wrote no rows")
    parser.add_argument("--readme", type=Path, help="also fill this README's GPU figures section")
    args = parser.parse_args(argv)
    text = summary_markdown(args.out)
    (args.out / "summary.md").write_text(text)
    print(text)
    if args.readme:
        try:
            fill_readme(args.readme, text)
        except ValueError as error:
            parser.error(str(error))
    broken = broken_steps(read_rows(args.out / "steps.csv"))
    if args.check and broken:
        print(f"gpu_summary: broken steps: {', '.join(broken)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
