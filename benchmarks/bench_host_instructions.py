"""Host cost of one fused BatchNorm + add + ReLU layer in instructions, which a machine's load does
not move, beside eager PyTorch's.

    python benchmarks/bench_host_instructions.py     # needs valgrind; any machine, no GPU
    python benchmarks/bench_host_instructions.py --forward-only   # the forward's share

bench_host.py times a layer's host path in CPU microseconds, the fastest of several blocks; on a
shared machine that figure drifts by tens of percent from case to case, more than the changes it is
meant to judge. This benchmark counts the instructions instead, with valgrind's callgrind: the same
total run after run for the same code and inputs, whatever else the machine is doing. Each provider
of bench_host.py (`fused` with Triton's launches through its real launch path and the stand-in
launcher, `eager`, `python_function_floor`) runs in a process of its own under callgrind,
`--repeats` times: warmed up, then `--steps` forward + backward steps, counted alone (callgrind
zeroes its counts as the child calls os.getppid just before them and dumps them as it calls
os.getpgrp just after), so start-up and warm-up, whose counts vary from run to run by more than a
step's, stay out. Python's hash seed is fixed (PYTHONHASHSEED=0), so that dictionaries and sets
probe alike in every run. The figure is the main thread's count, which does all of a layer's work
here (autograd runs a CPU backward on the calling thread): on the development machine two runs side
by side came out within a few instructions a step of each other (another clone in another virtual
environment within 0.4%), where all threads together varied by up to a sixth of a step from run to
run, as other threads wake and wait for as long as the run takes. What other threads did in the
counted steps is recorded beside it (`other_threads_most`), and the figure is the fewest of
`--repeats` runs, with their spread. Instructions are not time (a cycle issues several, fewer where
Python's dispatch branches), so the ratio is a repeatable proxy for bench_host.py's, not a
substitute. Rows go to benchmarks/results/host_instructions.csv.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PROVIDERS = ("fused", "eager", "python_function_floor")
WARM_UP_STEPS = 30


def _child(provider: str, steps: int, shape: tuple[int, ...], layout: str, residual: bool,
           import_from: str | None, forward_only: bool) -> None:
    """Run one provider's layer `steps` times after warm-up (what callgrind counts)."""
    os.environ.pop("TRITON_INTERPRET", None)  # Triton's compiled launch path, stood in for
    import torch

    import bench_host
    import triton_stand_in

    torch.set_num_threads(1)
    triton_stand_in.install()
    import resnet_ablate
    from resnet_ablate import kernels
    from resnet_ablate.kernels import set_backend

    if import_from:  # both halves of the package from there, not the installed ones
        for module in (resnet_ablate, kernels):
            if not Path(module.__file__).resolve().is_relative_to(Path(import_from).resolve()):
                raise SystemExit(f"{module.__name__} came from {module.__file__}, not from "
                                 f"{import_from}: copy the other version's kernels/ folder in as "
                                 "resnet_ablate/kernels there")
    set_backend("triton")
    if provider == "eager":
        shape = (2, bench_host.EAGER_CPU_CHANNELS, 1, 1)
    inputs = bench_host._layer_inputs(shape, torch.bfloat16, torch.device("cpu"),
                                      bench_host.LAYOUTS[layout], residual)
    step = bench_host._step(provider, *inputs, forward_only=forward_only)
    for _ in range(WARM_UP_STEPS):
        step()
    os.getppid()  # callgrind zeroes its counts here (--zero-before)
    for _ in range(steps):
        step()
    os.getpgrp()  # and dumps them here (--dump-before)


def _instructions(provider: str, args: argparse.Namespace) -> tuple[float, float]:
    """Instructions per step that callgrind counts over a child's counted steps: (the main
    thread's, every other thread's)."""
    with tempfile.TemporaryDirectory() as folder:
        command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={folder}/out",
                   "--separate-threads=yes", "--zero-before=os_getppid",
                   "--dump-before=os_getpgrp", sys.executable, __file__, "--child", provider,
                   str(args.steps), "--shape", args.shape, "--layout", args.layout]
        if args.residual:
            command.append("--residual")
        if args.import_from:
            command += ["--import-from", args.import_from]
        if args.forward_only:
            command.append("--forward-only")
        done = subprocess.run(command, capture_output=True, text=True,
                              env={**os.environ, "PYTHONHASHSEED": "0"})
        if done.returncode != 0:
            raise RuntimeError(f"{provider} under callgrind failed:\n{done.stderr[-2000:]}")
        # One file per thread and dump: out.<dump>-<thread>, and out-<thread> at exit. Exactly
        # one dump, the counted steps' (else something else called os.getpgrp too).
        dumps = {path.name.split(".")[1].split("-")[0] for path in Path(folder).glob("out.*-*")}
        if dumps != {"1"}:
            raise RuntimeError(f"callgrind dumped {len(dumps)} counts of {provider}'s run, not "
                               "the counted steps' alone (no os_getpgrp symbol in this Python, "
                               "or another caller of os.getpgrp)")
        counts = {int(path.name.rsplit("-", 1)[1]): _summary(path)
                  for path in Path(folder).glob("out.1-*")}
        main_thread = counts.pop(1, 0)
        # Without the zeroing (no os_getppid symbol) the dump would hold start-up and warm-up
        # too, all of the run but its exit; the steps alone are a fifth of it at 300 steps.
        collected = re.search(r"Collected : (\d+)", done.stderr)
        if collected is None or main_thread > 0.9 * int(collected.group(1)):
            raise RuntimeError(f"callgrind's count of {provider}'s steps holds nearly all of its "
                               "run: was it zeroed at os_getppid?")
        return main_thread / args.steps, sum(counts.values()) / args.steps


def _summary(path: Path) -> int:
    """The events a callgrind dump counted."""
    found = re.search(r"^summary: (\d+)", path.read_text(), re.M)
    return int(found.group(1)) if found else 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="2x32x16x16",
                        help="the fused layer's N x C x H x W (a ResNet-56 stage-2 layer)")
    parser.add_argument("--layout", choices=["channels_last", "nchw"], default="channels_last")
    parser.add_argument("--residual", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--steps", type=int, default=300, help="counted steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per provider")
    parser.add_argument("--providers", default=",".join(PROVIDERS),
                        help=f"comma-separated, of {', '.join(PROVIDERS)} "
                             "(eager: the ratios' base)")
    parser.add_argument("--import-from", default=None, metavar="DIR",
                        help="import resnet_ablate from DIR, to count two versions side by side: "
                             "a copy of another version's resnet_ablate/ with its top-level "
                             "kernels/ copied in as resnet_ablate/kernels (checked)")
    parser.add_argument("--forward-only", action="store_true",
                        help="count forwards alone (each graph recorded, then dropped): with a "
                             "run without it, how a step splits between forward and backward")
    parser.add_argument("--child", nargs=2, metavar=("PROVIDER", "STEPS"), help=argparse.SUPPRESS)
    parser.add_argument("--csv", default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shape = tuple(int(size) for size in args.shape.split("x"))
    if args.import_from:
        sys.path.insert(0, args.import_from)
    if args.child:
        _child(args.child[0], int(args.child[1]), shape, args.layout, args.residual,
               args.import_from, args.forward_only)
        return 0
    import torch

    from _results import RESULTS, append_rows, run_context

    providers = args.providers.split(",")
    runs = [provider for provider in providers for _ in range(args.repeats)]
    print(f"{len(runs)} runs under callgrind, {os.cpu_count()} at a time (a minute or two each)")
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        counts = list(pool.map(lambda provider: _instructions(provider, args), runs))
    by_provider = {provider: sorted(c[0] for p, c in zip(runs, counts) if p == provider)
                   for provider in providers}
    others = {provider: max(c[1] for p, c in zip(runs, counts) if p == provider)
              for provider in providers}
    per_step = {provider: c[0] for provider, c in by_provider.items()}
    eager = per_step.get("eager")
    rows = []
    for provider, instructions in per_step.items():
        spread = by_provider[provider][-1] - by_provider[provider][0]
        ratio = round(instructions / eager, 3) if eager else None
        rows.append({**run_context(torch.device("cpu")), "shape": args.shape,
                     "layout": args.layout, "residual": args.residual, "provider": provider,
                     # Forwards alone in a column of their own: a step's split, not a step.
                     ("instructions_forward" if args.forward_only else "instructions_fwd_bwd"):
                         round(instructions),
                     "spread_across_runs": round(spread), "runs": args.repeats,
                     "other_threads_most": round(others[provider]),
                     "over_eager": ratio, "package": args.import_from or "installed"})
        counted = "forward" if args.forward_only else "forward + backward"
        print(f"{provider:22} {instructions / 1e3:8.1f}k instructions per {counted} "
              f"(runs within {spread:.0f} of each other; other threads at most "
              f"{others[provider] / 1e3:.1f}k)" + (f", {ratio:.2f}x eager" if ratio else ""))
    append_rows(args.csv or RESULTS / "host_instructions.csv", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
