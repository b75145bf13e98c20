"""Fused BatchNorm + add + ReLU vs eager PyTorch vs torch.compile, measured side by side.

    python benchmarks/bench_batch_norm_act.py                      # GPU: ResNet-50 epilogue shapes
    python benchmarks/bench_batch_norm_act.py --shape-set resnet   # every ResNet-50 and -56 shape
    python benchmarks/bench_batch_norm_act.py --small              # CPU: a few small shapes
    python benchmarks/bench_batch_norm_act.py --tuned              # GPU: autotuned kernels too

For every shape, dtype and layout it times forward, backward and forward+backward of the three
providers in the same process (on CUDA from graph replays with a cold L2: the kernels' time, not
the host's, which bench_host.py measures; _gpu_timing.py), prints ms, effective bandwidth from the
byte model below, its share of the device's peak bandwidth, and the fused provider's speed-up over
eager and over torch.compile, and writes every row to a CSV together with the device name,
library versions and peak memory.
torch.compile compiles once per shape (static shapes), outside the timed region: each provider
runs once before it is timed. With --tuned (CUDA only), a fourth provider, `fused_tuned`, is the
fused op with autotuning on (kernels/_triton_tuning.py: the elementwise passes' warps timed on the
device, which compiles each candidate once per shape and pass, so the run takes longer); its
untimed first call tunes.

Byte model (the minimum traffic of a two-pass BatchNorm in training, per element of the activation;
statistics vectors are negligible): forward reads x twice and the residual once and writes the output
and the ReLU mask packed one bit per element (4 passes and a mask pass; 3 without a residual);
backward reads grad_out, the mask and x and writes grad_residual in its reduction pass, then reads
grad_residual and x and writes grad_input (6 passes and a mask pass; without a residual the second
pass reads grad_out, the mask and x again and writes grad_input: 5 and two mask passes). A mask pass
moves an eighth of a byte per element: 1/16 of a bf16 pass. Where the fused op keeps no mask (the
PyTorch path; fp32 NCHW 14x14), its backward reads the output instead: 4 + 7 passes with a
residual, 3 + 7 without. All providers of a row are scored against the fused op's model, so GB/s
compare directly.

Shape sets: "epilogue", the four ResNet-50 stage outputs (with a residual) at batch 64 and 256;
"resnet", every BatchNorm + ReLU shape of ResNet-50 (batch 64, 224 px: the stem, and each stage's
inner layers without a residual and its output with one) and of ResNet-56 (batch 128, 32 px: each
stage with and without a residual); "small", two tiny shapes for a CPU.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import triton

from _gpu_timing import graph_times
from _results import append_rows, results_csv, peak_memory_mb, reset_peak_memory, run_context
from resnet_ablate.kernels import _triton_tuning, fused_batch_norm, use_backend
from resnet_ablate.kernels._triton_impl import relu_mask_bytes

# (N, C, H, W), with a residual added before the ReLU or not.
Shape = tuple[tuple[int, int, int, int], bool]
SHAPE_SETS: dict[str, list[Shape]] = {
    "epilogue": [((n, c, hw, hw), True) for n in (64, 256)
                 for c, hw in ((256, 56), (512, 28), (1024, 14), (2048, 7))],
    "resnet": [((64, 64, 112, 112), False),  # ResNet-50's stem
               *(((64, width, hw, hw), residual) for width, hw in
                 ((64, 56), (128, 28), (256, 14), (512, 7))
                 for residual, width in ((False, width), (True, 4 * width))),
               *(((128, c, hw, hw), residual) for c, hw in ((16, 32), (32, 16), (64, 8))
                 for residual in (False, True))],  # ResNet-56
    "small": [((8, 64, 16, 16), True), ((8, 256, 7, 7), True), ((8, 64, 16, 16), False)],
}
# (activation passes, packed-mask passes) per pass of the byte model, with a residual or not;
# where the fused op keeps no packed mask, its backward reads the output.
PASSES = {True: {"forward": (4, 1), "backward": (6, 1), "forward+backward": (10, 2)},
          False: {"forward": (3, 1), "backward": (5, 2), "forward+backward": (8, 3)}}
PASSES_READING_OUTPUT = {True: {"forward": (4, 0), "backward": (7, 0), "forward+backward": (11, 0)},
                         False: {"forward": (3, 0), "backward": (7, 0), "forward+backward": (10, 0)}}
PEAK_BANDWIDTH_GBPS = {  # vendor figures for HBM bandwidth
    "H200": 4800, "H100 SXM": 3350, "H100 80GB HBM3": 3350, "H100 PCIe": 2000, "H100": 3350,
    "A100-SXM4-80GB": 2039, "A100-PCIE-80GB": 1935, "A100": 1555, "L40S": 864, "A10": 600,
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def eager_epilogue(x, running_mean, running_var, weight, bias, residual):
    y = F.batch_norm(x, running_mean, running_var, weight, bias, True, 0.1, 1e-5)
    return F.relu(y if residual is None else y + residual)


def fused_epilogue(x, running_mean, running_var, weight, bias, residual):
    return fused_batch_norm(x, running_mean, running_var, weight, bias, True, 0.1, 1e-5,
                            residual=residual)


def peak_bandwidth_gbps(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, gbps in PEAK_BANDWIDTH_GBPS.items():
        if key in name:
            return gbps
    return None


def time_ms(fn, device: torch.device, reps: int) -> float:
    if device.type == "cuda":
        return triton.testing.do_bench(fn, warmup=25, rep=reps * 10)
    fn()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def measure(provider_fn, inputs, grad, device, reps, timing: str) -> dict[str, float]:
    x, rm, rv, w, b, r = inputs
    differentiable = tuple(t for t in (x, w, b, r) if t is not None)

    def forward():
        return provider_fn(x, rm, rv, w, b, r)

    if timing == "graph":
        # The kernels' own time: backward as forward+backward less forward. No autograd graph
        # from outside the capture may be alive: its nodes (the leaves' AccumulateGrad among
        # them) belong to another stream, which a captured backward would have to wait on.
        forward_ms = graph_times(forward).cold_ms
        both_ms = graph_times(lambda: torch.autograd.grad(forward(), differentiable, grad)).cold_ms
        return {"forward": forward_ms, "backward": max(both_ms - forward_ms, 0.0),
                "forward+backward": both_ms}
    out = forward()

    def backward():
        torch.autograd.grad(out, differentiable, grad, retain_graph=True)

    def forward_backward():
        torch.autograd.grad(forward(), differentiable, grad)

    return {
        "forward": time_ms(forward, device, reps),
        "backward": time_ms(backward, device, reps),
        "forward+backward": time_ms(forward_backward, device, reps),
    }


def measure_providers(providers, inputs, grad, device, reps, timing: str,
                      compile_backend: str) -> dict[str, dict[str, float]]:
    timings = {}
    for name, fn in providers.items():
        if name == "compile":
            # A fresh cache per shape: the recompile limit is never reached, and the first
            # (untimed) call of measure() compiles.
            torch._dynamo.reset()
            fn = torch.compile(eager_epilogue, fullgraph=True, dynamic=False,
                               backend=compile_backend)
        _triton_tuning.ENABLED = name == "fused_tuned"
        try:
            timings[name] = measure(fn, inputs, grad, device, reps, timing)
        finally:
            _triton_tuning.ENABLED = False
    return timings


def make_inputs(shape, with_residual, dtype, channels_last, device):
    channels = shape[1]
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(shape, device=device, dtype=dtype).to(memory_format=memory_format)
    residual = torch.randn_like(x).requires_grad_() if with_residual else None
    grad = torch.randn_like(x)
    weight = torch.rand(channels, device=device) + 0.5
    bias = torch.randn(channels, device=device)
    running_mean = torch.zeros(channels, device=device)
    running_var = torch.ones(channels, device=device)
    for t in (x, weight, bias):
        t.requires_grad_()
    return (x, running_mean, running_var, weight, bias, residual), grad


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="small shapes (default without CUDA)")
    parser.add_argument("--shape-set", choices=SHAPE_SETS,
                        help="default: epilogue on CUDA, small on a CPU or with --small")
    parser.add_argument("--dtypes", default=None, help="comma list of bf16,fp16,fp32")
    parser.add_argument("--layouts", default="channels_last,nchw")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    parser.add_argument("--tuned", action="store_true",
                        help="also the fused op with autotuning on (CUDA only)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend (aot_eager on a CPU skips C++ code generation)")
    parser.add_argument("--timing", choices=("graph", "launch"), default=None,
                        help="graph (CUDA's default): the kernels' own time, from CUDA graph "
                             "replays with a cold L2 (_gpu_timing.py); launch: call by call, "
                             "host cost included where it exceeds the kernels' (a CPU's only)")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--peak-gbps", type=float, default=None, help="override the peak bandwidth")
    parser.add_argument("--csv", default=None, help="default: benchmarks/results/, a scratch "
                        "folder for small shapes")
    return parser.parse_args(argv)


def config_rows(shape: Shape, dtype_name: str, layout: str, timings: dict[str, dict[str, float]],
                element_bytes: int, peak: float | None, memory_mb: float,
                context: dict[str, str], packed_mask: bool = True,
                timing: str = "launch") -> list[dict]:
    """One row per pass: each provider's ms, the fused provider's GB/s and its speed-ups.
    `element_bytes` is the activation's size in bytes (all its elements); `packed_mask`, whether
    the fused op keeps the packed ReLU mask for these tensors."""
    (dims, residual), rows = shape, []
    elements = 1
    for size in dims:
        elements *= size
    model = PASSES if packed_mask else PASSES_READING_OUTPUT
    for pass_name, (passes, mask_passes) in model[residual].items():
        ms = {name: t[pass_name] for name, t in timings.items()}
        moved = passes * element_bytes + mask_passes * elements / 8
        gbps = moved / (ms["fused"] * 1e-3) / 1e9
        rows.append({
            **context, "shape": "x".join(map(str, dims)), "residual": residual,
            "dtype": dtype_name, "layout": layout, "pass": pass_name, "timing": timing,
            # Six significant digits: a microsecond kernel keeps its ratio in the file.
            **{f"{n}_ms": float(f"{v:.6g}") for n, v in ms.items()},
            "fused_gbps": round(gbps, 1),
            "pct_peak": round(100 * gbps / peak, 1) if peak else "",
            "speedup_vs_eager": float(f"{ms['eager'] / ms['fused']:.4g}"),
            "speedup_vs_compile": float(f"{ms['compile'] / ms['fused']:.4g}") if "compile" in ms else "",
            # What autotuning adds: the untuned fused op's time over the tuned one's.
            "tuned_speedup": (float(f"{ms['fused'] / ms['fused_tuned']:.4g}")
                              if "fused_tuned" in ms else ""),
            "peak_memory_mb": memory_mb,
        })
        line = (f"{rows[-1]['shape']:>18} {'+res' if residual else '':>4} {dtype_name:>5} "
                f"{layout:>13} {pass_name:>16} " + " ".join(f"{v:>11.4f}" for v in ms.values())
                + f" {gbps:>10.1f} {rows[-1]['pct_peak'] or '-':>6} "
                f"{rows[-1]['speedup_vs_eager']:>7.2f}x")
        if "compile" in ms:
            line += f" {rows[-1]['speedup_vs_compile']:>9.2f}x"
        print(line)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    small = args.small or device.type != "cuda"
    args.csv = args.csv or results_csv("batch_norm_act.csv", small)  # small shapes: a check
    shapes = SHAPE_SETS[args.shape_set or ("small" if small else "epilogue")]
    dtype_names = (args.dtypes or ("fp32" if small else "bf16,fp16,fp32")).split(",")
    reps = args.reps or (5 if small else 20)
    timing = args.timing or ("graph" if device.type == "cuda" else "launch")
    if timing == "graph" and device.type != "cuda":
        print("--timing graph needs CUDA", file=sys.stderr)
        return 2
    context = run_context(device)
    peak = peak_bandwidth_gbps(device, args.peak_gbps)
    # On a CPU the fused provider is the PyTorch path: the Triton interpreter is not worth timing.
    backend = "triton" if device.type == "cuda" else "torch"
    providers = {"fused": fused_epilogue, "eager": eager_epilogue}
    if not args.no_compile:
        providers["compile"] = None  # compiled for each configuration: see below
    if args.tuned and backend == "triton":
        providers["fused_tuned"] = fused_epilogue  # after `fused`, which keeps untuned plans
    elif args.tuned:
        print("--tuned: no autotuning off a GPU (the fused provider is the PyTorch path here)")
    configs = list(itertools.product(shapes, dtype_names, args.layouts.split(",")))
    print(f"device: {context['device']} | torch {torch.__version__} | triton {triton.__version__} | "
          f"peak {peak or 'unknown'} GB/s | fused backend: {backend} | timing: {timing}")
    print(f"{'shape':>18} {'':>4} {'dtype':>5} {'layout':>13} {'pass':>16} "
          + " ".join(f"{p + ' ms':>11}" for p in providers)
          + f" {'fused GB/s':>10} {'% peak':>6} {'vs eager':>8}"
          + (f" {'vs compile':>10}" if "compile" in providers else ""))
    failed: list[str] = []
    with use_backend(backend):
        for index, (shape, dtype_name, layout) in enumerate(configs, 1):
            inputs, grad = make_inputs(*shape, DTYPES[dtype_name], layout == "channels_last", device)
            reset_peak_memory(device)
            row_timing = timing
            try:
                timings = measure_providers(providers, inputs, grad, device, reps, timing,
                                            args.compile_backend)
            except RuntimeError as error:  # a provider that a CUDA graph cannot capture
                if timing != "graph":
                    raise
                print(f"graph capture failed ({str(error).splitlines()[0]}): this shape is "
                      "timed launch by launch", file=sys.stderr)
                row_timing = "launch (graph capture failed)"
                # A failed capture can leave the process on its side stream (back to the default
                # one here) and the CUDA generator bound to it, which torch.compile then trips
                # on: the compiled provider is left out of the launch-by-launch timing.
                torch.cuda.set_stream(torch.cuda.default_stream(device))
                launched = {name: fn for name, fn in providers.items() if name != "compile"}
                try:  # (a failed capture can leave CUDA unusable: then this fails too)
                    torch.cuda.synchronize()
                    timings = measure_providers(launched, inputs, grad, device, reps, "launch",
                                                args.compile_backend)
                except Exception as again:  # this configuration's rows only are lost
                    print(f"{shape} {dtype_name} {layout}: failed launch by launch too "
                          f"({type(again).__name__}: {str(again).splitlines()[0]})",
                          file=sys.stderr, flush=True)
                    failed.append(f"{shape} {dtype_name} {layout}")
                    continue
            element_bytes = inputs[0].numel() * inputs[0].element_size()
            packed_mask = backend == "triton" and relu_mask_bytes(inputs[0], inputs[5]) > 0
            # As it goes: a run cut short keeps what it measured.
            append_rows(args.csv, config_rows(shape, dtype_name, layout, timings, element_bytes,
                                              peak, peak_memory_mb(device), context,
                                              packed_mask, row_timing))
            print(f"[{index}/{len(configs)} configurations done]", file=sys.stderr, flush=True)
    if failed:
        print(f"{len(failed)} configuration(s) not measured: {'; '.join(failed)}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
