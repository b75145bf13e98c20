"""Autotuning where a GPU timing decides: the warps of the elementwise passes (opt-in).

The plans (_triton_impl.py) pick every launch's tiles and warps from the shapes alone. For the two
elementwise passes, normalize (forward) and elementwise (backward), how many warps a program runs
with is a free choice: each element's arithmetic is the same whatever the warps (neither pass has a
floating-point reduction; the mask's bits are summed as integers, exactly), so the choice moves
time, never bits. With autotuning on, a template of either pass, on its first launch on a GPU, is
also launched with each of `WARPS` and timed with CUDA events on the call's own tensors (both
passes only read their inputs and write their outputs, so repeating them leaves the same
results), and keeps the fastest: each candidate compiles once (Triton's cache keeps the
binaries), so the first step of a network pays for that. The reductions are not tuned: their
warps and split sizes decide the order of their sums, so their bits (_triton_sizing.py).

Off unless RESNET_ABLATE_AUTOTUNE=1 is set before the kernels are imported, or `ENABLED` is set
here: benchmarks/bench_batch_norm_act.py measures the tuned kernels beside the untuned ones
(`fused_tuned`), which is what can say whether it should be on by default. Never during a CUDA
graph's capture, whose launches may not be timed: a template captured first is tuned on its first
launch outside a capture.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from ._triton_launch import LaunchStream, LaunchTemplate, launch_stream

ENABLED = os.environ.get("RESNET_ABLATE_AUTOTUNE", "0") == "1"
WARPS = (2, 4, 8, 16)
REPETITIONS = 20  # launches per candidate timed, after one that compiles and warms it

Timer = Callable[[Callable[[], None]], float]


def cuda_milliseconds(run: Callable[[], None]) -> float:
    """Mean milliseconds of `run` over REPETITIONS launches on the current stream."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(REPETITIONS):
        run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / REPETITIONS


def launch(template: LaunchTemplate, stream: LaunchStream | None, tensors: tuple[Any, ...],
           *scalars: float) -> None:
    """A plan's `launch` with autotuning on: the launch, then, the first time a tunable template
    launches on a GPU outside a capture, its tuning."""
    template(stream, tensors, *scalars)
    if template.tunable and not template.tuned and _can_time(tensors[0]):
        tune(template, tensors, scalars, cuda_milliseconds)


def tune(template: LaunchTemplate, tensors: tuple[Any, ...], scalars: tuple[float, ...],
         timer: Timer) -> dict[int, float]:
    """Time `template` with each of WARPS (and its own warps) on these tensors and keep the
    fastest (the first of equals); its timings by warps. A candidate the device cannot run
    (Triton's OutOfResources, a failed compile) is skipped, as Triton's own autotuner skips it;
    the template's own warps ran before, so one always remains. Its next launch compiles or finds
    the chosen binary: the reset of `compiled` keeps direct launches off the last candidate's."""
    template.tuned = True  # first: neither a failure here nor another thread tunes it again
    own = template.num_warps
    timings = {}
    for warps in sorted({*WARPS, own}):
        template.num_warps, template.compiled = warps, None
        try:
            template(None, tensors, *scalars)  # compiles the candidate, outside the timing
        except Exception:
            if warps == own:
                raise
            continue
        stream = launch_stream(template)  # then timed as a plan launches it: directly

        def run() -> None:
            template(stream, tensors, *scalars)

        timings[warps] = timer(run)
    template.num_warps, template.compiled = min(timings, key=timings.get), None
    return timings


def _can_time(x: torch.Tensor) -> bool:
    return x.is_cuda and not torch.cuda.is_current_stream_capturing()
