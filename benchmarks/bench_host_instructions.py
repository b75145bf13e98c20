"""Host cost of one fused BatchNorm + add + ReLU layer in instructions, which a machine's load does
not move, beside eager PyTorch's.

    python benchmarks/bench_host_instructions.py     # needs valgrind; any machine, no GPU

bench_host.py times a layer's host path in CPU microseconds, the fastest of several blocks; on a
shared machine that figure drifts by tens of percent from case to case, more than the changes it
is meant to judge. This benchmark counts the instructions instead, with valgrind's callgrind: the
same total run after run for the same code and inputs, whatever else the machine is doing. Each
provider of bench_host.py (`fused` with Triton's launches through its real launch path and the
stand-in launcher, `eager`, `python_function_floor`) runs in a process of its own under callgrind
twice, warmed up and then for `--steps` and `--steps + --extra` forward + backward steps; the
difference over `--extra` steps is one step's instructions, free of start-up and warm-up.
Instructions are not time (a cycle issues several, fewer where Python's dispatch branches), so
the ratio is a repeatable proxy for bench_host.py's, not a substitute. Rows go to
benchmarks/results/host_instructions.csv.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

PROVIDERS = ("fused", "eager", "python_function_floor")
WARM_UP_STEPS = 30


def _child(provider: str, steps: int, shape: tuple[int, ...], layout: str, residual: bool) -> None:
    """Run one provider's layer `steps` times after warm-up (what callgrind counts)."""
    os.environ.pop("TRITON_INTERPRET", None)  # Triton's compiled launch path, stood in for
    import torch

    import bench_host
    import triton_stand_in

    torch.set_num_threads(1)
    triton_stand_in.install()
    from resnet_ablate.kernels import set_backend

    set_backend("triton")
    if provider == "eager":
        shape = (2, bench_host.EAGER_CPU_CHANNELS, 1, 1)
    inputs = bench_host._layer_inputs(shape, torch.bfloat16, torch.device("cpu"),
                                      bench_host.LAYOUTS[layout], residual)
    step = bench_host._step(provider, *inputs)
    for _ in range(WARM_UP_STEPS + steps):
        step()


def _instructions(provider: str, steps: int, args: argparse.Namespace) -> int:
    """Instructions callgrind counts over a child's whole run."""
    with tempfile.TemporaryDirectory() as folder:
        command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={folder}/out",
                   sys.executable, __file__, "--child", provider, str(steps),
                   "--shape", args.shape, "--layout", args.layout]
        if args.residual:
            command.append("--residual")
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{provider} under callgrind failed:\n{done.stderr[-2000:]}")
        found = re.search(r"Collected : (\d+)", done.stderr)
        if found is None:
            raise RuntimeError(f"callgrind printed no total for {provider}")
        return int(found.group(1))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="2x32x16x16",
                        help="the fused layer's N x C x H x W (a ResNet-56 stage-2 layer)")
    parser.add_argument("--layout", choices=["channels_last", "nchw"], default="channels_last")
    parser.add_argument("--residual", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--extra", type=int, default=500)
    parser.add_argument("--child", nargs=2, metavar=("PROVIDER", "STEPS"), help=argparse.SUPPRESS)
    parser.add_argument("--csv", default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shape = tuple(int(size) for size in args.shape.split("x"))
    if args.child:
        _child(args.child[0], int(args.child[1]), shape, args.layout, args.residual)
        return 0
    import torch

    from _results import RESULTS, append_rows, run_context

    runs = [(provider, steps) for provider in PROVIDERS
            for steps in (args.steps, args.steps + args.extra)]
    print(f"{len(runs)} runs under callgrind, {os.cpu_count()} at a time (a minute or two each)")
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        totals = dict(zip(runs, pool.map(lambda run: _instructions(*run, args), runs)))
    per_step = {provider: (totals[provider, args.steps + args.extra]
                           - totals[provider, args.steps]) / args.extra
                for provider in PROVIDERS}
    rows = []
    for provider, instructions in per_step.items():
        rows.append({**run_context(torch.device("cpu")), "shape": args.shape,
                     "layout": args.layout, "residual": args.residual, "provider": provider,
                     "instructions_fwd_bwd": round(instructions),
                     "over_eager": round(instructions / per_step["eager"], 3)})
        print(f"{provider:22} {instructions / 1e3:8.1f}k instructions per forward + backward, "
              f"{instructions / per_step['eager']:.2f}x eager")
    append_rows(args.csv or RESULTS / "host_instructions.csv", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
