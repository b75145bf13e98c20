"""Host cost of one fused BatchNorm + add + ReLU layer (forward + backward) beside eager PyTorch's.

    python benchmarks/bench_host.py                  # any machine: Triton launches counted, not run
    python benchmarks/bench_host.py --launches stand-in   # any machine: Triton's launch path timed
    python benchmarks/bench_host.py --device cuda    # on a GPU: real launches, host-bound sizes

A layer's host cost is what the CPU spends to issue it: argument checks, autograd, choosing and
describing launches, allocating outputs, and the launch calls. On a GPU it is paid every step
whatever the batch, and on the small CIFAR networks it can exceed the kernels' own time. For each
ResNet-56 (CIFAR, N=128) and ResNet-50 (ImageNet, N=256) activation shape, with a residual (a
block's last BN) and without (BN + ReLU), the benchmark times forward + backward (autograd's
engine included, gradients taken with autograd.grad) of:

- `fused` (default `--device cpu`): `fused_batch_norm` on the Triton backend, on CPU tensors of
  the layer's C, H, W and layout with N=2 (N changes only the grid sizes, not the host path),
  with every Triton launch counted instead of run. Included: everything of the fused layer's
  host path but the launches themselves (Triton's launcher: argument binding, specialization
  key, the driver call); `launches` says how many there are, so that a GPU's per-launch cost can
  be added to it. With `--launches stand-in` the launches are timed too, through Triton's own
  launch path for an H100 with a stand-in for the driver's launcher (benchmarks/triton_stand_in.py:
  all of Triton's host work but the launcher's C code), as the kernels make them: each template's
  later launches call the compiled kernel's launcher directly (kernels/_triton_launch.py).
- `fused_jit_launches` (with `--launches stand-in` and on CUDA): the same, every launch through
  Triton's JITFunction.run, as before templates launched directly.
- `eager`: `relu(F.batch_norm(...) + residual)` (no residual: `relu(F.batch_norm(...))`) on CPU
  tensors of shape (2, 8, 1, 1): ATen's real dispatch and autograd (which do not depend on the
  shape), plus CPU compute of 16 values per op, small but not nothing (so this figure is, if
  anything, high).
- `python_function_floor`: a Python autograd.Function with the fused op's inputs that only
  allocates its outputs and gradients, on the fused provider's tensors, applied as the fused op's
  eager path applies its own (the C++ apply, one differentiable output): what any layer written
  in Python as one autograd node pays before doing anything.
- On `--device cuda`, all run for real on (2, C, 4, 4) tensors, with one synchronize per block of
  iterations: such small kernels hide behind the host's work, so the wall time per layer is the
  host cost including every launch (Triton's launcher and CUDA's included).

Each figure is the fastest block's mean microseconds per layer (CPU time on a CPU, wall time on
CUDA): interference only ever adds time, so the least disturbed block estimates the cost itself;
rows go to benchmarks/results/host.csv with the machine named.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from _results import RESULTS, append_rows, device_name, source_commit, timestamp, triton_version

# (model, N, C, H, W, residual): every BN of the network has one of these shapes and kinds.
CIFAR = [("resnet56", 128, c, hw, hw, residual) for c, hw in ((16, 32), (32, 16), (64, 8))
         for residual in (True, False)]
IMAGENET = [("resnet50", 256, 64, 112, 112, False)] + [
    ("resnet50", 256, c, hw, hw, residual)
    for c, hw in ((256, 56), (512, 28), (1024, 14), (2048, 7)) for residual in (True, False)
]
# ATen's dispatch does not depend on C, its CPU compute does (bf16 channels_last batch norm on a
# CPU takes hundreds of microseconds at C=2048): the eager CPU figure uses a few channels.
EAGER_CPU_CHANNELS = 8
LAYOUTS = {"channels_last": torch.channels_last, "nchw": torch.contiguous_format}


def _layer_inputs(shape, dtype, device, memory_format, residual: bool):
    x = torch.randn(shape, dtype=dtype, device=device).to(memory_format=memory_format)
    channels = shape[1]
    params = [torch.ones(channels, device=device, requires_grad=True),
              torch.zeros(channels, device=device, requires_grad=True)]
    stats = [torch.zeros(channels, device=device), torch.ones(channels, device=device)]
    r = torch.randn_like(x).requires_grad_() if residual else None
    grad = torch.randn_like(x)
    return x.requires_grad_(), r, params, stats, grad


def _step(provider: str, x, r, params, stats, grad, forward_only: bool = False
          ) -> Callable[[], None]:
    """One layer's forward + backward; gradients taken with autograd.grad (no accumulation).
    With `forward_only`, the forward alone (its graph recorded, then dropped unused)."""
    from resnet_ablate.kernels import _triton_launch, fused_batch_norm
    from resnet_ablate.kernels._eager import without_python_wrapper

    leaves = [t for t in (x, r, *params) if t is not None]
    weight, bias = params
    running_mean, running_var = stats

    def backward(out: torch.Tensor) -> None:
        if not forward_only:
            torch.autograd.grad(out, leaves, grad)

    def fused() -> None:
        backward(fused_batch_norm(x, running_mean, running_var, weight, bias, True, 0.1, 1e-5,
                                  residual=r))

    def fused_jit_launches() -> None:
        _triton_launch.DIRECT_LAUNCHES = False
        try:
            fused()
        finally:
            _triton_launch.DIRECT_LAUNCHES = True

    def eager() -> None:
        out = F.batch_norm(x, running_mean, running_var, weight, bias, True, 0.1, 1e-5)
        if r is not None:
            out = out + r
        backward(F.relu(out))

    # Applied as the fused op's eager path applies its own Function.
    no_op_layer = without_python_wrapper(_NoOpLayer)

    def floor() -> None:
        backward(no_op_layer(x, weight, bias, r))

    return {"fused": fused, "fused_jit_launches": fused_jit_launches, "eager": eager,
            "python_function_floor": floor}[provider]


def _microseconds(steps: dict[str, Callable[[], None]], device: torch.device, iterations: int,
                  blocks: int) -> dict[str, float]:
    """The fastest block's mean time per step, the providers' blocks interleaved so that a
    machine's changing load has the same chances to spare each. Interference (other processes,
    a virtual machine's neighbours, which slow even a process's own CPU time by half or more
    here) only ever adds time, so the least disturbed block is the best estimate of the cost
    itself, as timeit's documentation advises. On a CPU the time is the process's CPU time (one
    thread does all the work); on CUDA it is wall time, since autograd's device thread and the
    GPU's queue take part."""
    clock = time.process_time if device.type == "cpu" else time.perf_counter
    for step in steps.values():
        for _ in range(max(3, iterations // 10)):
            step()
    _synchronize(device)
    per_block: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(blocks):
        for name, step in steps.items():
            start = clock()
            for _ in range(iterations):
                step()
            _synchronize(device)
            per_block[name].append((clock() - start) / iterations * 1e6)
    return {name: min(times) for name, times in per_block.items()}


class _NoOpLayer(torch.autograd.Function):
    """A Python autograd.Function that allocates the fused op's outputs and gradients and does
    nothing else: the floor under any layer written as one (as the fused op's eager path is)."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual):
        mean, var = weight.new_empty(weight.shape), weight.new_empty(weight.shape)
        ctx.save_for_backward(x, weight, mean, var)
        ctx.has_residual = residual is not None
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, _, _ = ctx.saved_tensors
        return (torch.empty_like(x), torch.empty_like(weight), torch.empty_like(weight),
                torch.empty_like(grad_out) if ctx.has_residual else None)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _LaunchCounter:
    """Replaces the Triton launch of every planned kernel by a count (CPU runs only)."""

    def __init__(self) -> None:
        from resnet_ablate.kernels import _triton_launch

        self.count = 0

        def counted(template, stream, tensors, *scalars) -> None:
            self.count += 1

        _triton_launch.LaunchTemplate.__call__ = counted

    def launches(self, step: Callable[[], None]) -> int:
        self.count = 0
        step()
        return self.count


class _StandInCounter:
    """Counts the launches the stand-in launcher receives (`--launches stand-in`)."""

    def __init__(self, stand_in) -> None:
        self.stand_in = stand_in

    def launches(self, step: Callable[[], None]) -> int:
        self.stand_in.launches = []
        step()
        count, self.stand_in.launches = len(self.stand_in.launches), None
        return count


def _measure(case, layout: str, dtype, device: torch.device, iterations: int, blocks: int,
             counter: _LaunchCounter | _StandInCounter | None) -> list[dict[str, object]]:
    """`counter`: a _LaunchCounter where the launches are counted and not run, a _StandInCounter
    where they are timed through the stand-in, None on CUDA."""
    model, n, c, h, w, residual = case
    on_cpu = device.type == "cpu"
    timed = not isinstance(counter, _LaunchCounter)
    shapes = {"fused": (2, c, h, w) if on_cpu else (2, c, 4, 4)}
    if timed:  # also every launch through Triton's JITFunction.run, as before templates
        shapes["fused_jit_launches"] = shapes["fused"]
    shapes["eager"] = (2, EAGER_CPU_CHANNELS, 1, 1) if on_cpu else (2, c, 4, 4)
    shapes["python_function_floor"] = shapes["fused"]
    steps, launches = {}, ""
    for provider, shape in shapes.items():
        inputs = _layer_inputs(shape, dtype, device, LAYOUTS[layout], residual)
        steps[provider] = _step(provider, *inputs)
        if provider == "fused" and counter is not None:
            launches = counter.launches(steps[provider])
    figures = _microseconds(steps, device, iterations, blocks)
    return [{
        "timestamp": timestamp(), "machine": device_name(device), "commit": source_commit(),
        "torch": torch.__version__, "triton": triton_version(), "model": model,
        "shape": f"{n}x{c}x{h}x{w}", "measured_shape": "x".join(map(str, shapes[provider])),
        "layout": layout, "dtype": str(dtype).removeprefix("torch."), "residual": residual,
        "provider": provider, "host_us_fwd_bwd": round(us, 2),
        "launches": launches if provider == "fused" else "",
        "launches_timed": timed,
        "fused_over_eager": round(figures["fused"] / figures["eager"], 3),
    } for provider, us in figures.items()]


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--launches", choices=["counted", "stand-in"], default="counted",
                        help="on a CPU: count the Triton launches (default), or time them "
                             "through Triton's launch path with a stand-in launcher")
    parser.add_argument("--models", default="resnet56,resnet50")
    parser.add_argument("--layouts", default="channels_last,nchw")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--csv", default=RESULTS / "host.csv")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    stand_in = device.type == "cpu" and args.launches == "stand-in"
    counted = device.type == "cpu" and not stand_in
    if counted:
        # The Triton backend takes CPU tensors only where the interpreter is on; the launches
        # never run here (they are counted), so the interpreter is never entered.
        os.environ["TRITON_INTERPRET"] = "1"
    torch.set_num_threads(1)  # host cost is one thread's; tiny CPU ops must not fan out
    counter = None
    if stand_in:  # Triton's compiled path: the interpreter would replace it
        os.environ.pop("TRITON_INTERPRET", None)
        import triton_stand_in

        counter = _StandInCounter(triton_stand_in.install())
    from resnet_ablate.kernels import set_backend

    set_backend("triton")
    if counted:
        counter = _LaunchCounter()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    cases = [case for case in CIFAR + IMAGENET if case[0] in args.models.split(",")]
    print(f"{'model':9} {'shape':16} {'layout':14} {'res':5} {'launches':>8} "
          f"{'fused us':>9} {'jit us':>9} {'eager us':>9} {'floor us':>9} {'fused/eager':>11}")
    for case in cases:
        for layout in args.layouts.split(","):
            case_rows = _measure(case, layout, dtype, device, args.iterations, args.blocks,
                                 counter)
            by = {row["provider"]: row for row in case_rows}
            print(f"{case[0]:9} {by['fused']['shape']:16} {layout:14} {str(case[5]):5} "
                  f"{by['fused']['launches']!s:>8} "
                  f"{by['fused']['host_us_fwd_bwd']:9.1f} "
                  # counted launches: nothing timed through JITFunction.run
                  f"{_us(by.get('fused_jit_launches', {}).get('host_us_fwd_bwd')):>9} "
                  f"{by['eager']['host_us_fwd_bwd']:9.1f} "
                  f"{by['python_function_floor']['host_us_fwd_bwd']:9.1f} "
                  f"{by['eager']['fused_over_eager']:11.2f}")
            append_rows(args.csv, case_rows)  # as it goes: a run cut short keeps its cases
    return 0


if __name__ == "__main__":
    sys.exit(main())
