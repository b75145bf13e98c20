"""Compile the real kernel launches of ResNet-50 and ResNet-56 training steps for sm_90, with no GPU.

Run as a script, `python compile_kernels_for_hopper.py [shard shards]` for every `shards`-th case
(tests/test_kernels.py runs shards side by side, in processes without TRITON_INTERPRET, since the
interpreter replaces the compiler). For every fused epilogue of the two networks (bf16, NCHW and
channels_last), `plan_forward` and `plan_backward` describe the launches of a training forward
and backward on meta tensors, and each launch is compiled ahead of time with its arguments
specialized by Triton's own JIT rules. The epilogues: ResNet-50 (ImageNet, N=256) ends each
bottleneck with BN + residual + ReLU at 256x56x56, 512x28x28, 1024x14x14 and 2048x7x7, and its
stem and inner convolutions with BN + ReLU at 64x112x112, 64x56x56, 128x56x56, 128x28x28,
256x28x28, 256x14x14, 512x14x14 and 512x7x7; ResNet-56 (CIFAR, N=128) has both kinds at 16x32x32,
32x16x16 and 64x8x8, and 5 of its seeds stacked into one model at 80x32x32, 160x16x16 and 320x8x8.
Reduction grids are sized by the runtime's one-wave rule, from the registers of
these sm_90 binaries.

The statistics pass is compiled twice, with the running-stat update (eager mode) and without
(compiled code, which updates them in a launch of its own). It prints one JSON line per launch: the
grid, registers, shared memory, local memory (spills), CTAs per SM and waves, the barriers in the
loops of a reduction's merge; for each activation tensor, and apart from them for the packed ReLU
mask (the forward writes it, the backward reads it where it would read the output), the widths in
bytes of its global loads and stores, traced in the PTX from the kernel parameter each address
derives from; and the SASS instructions per activation element of the kernel's main loop (of its
whole body where it has no loop), from the binary's disassembly. This is the evidence, short of a
GPU, that activation traffic moves in 16-byte vectors, that nothing spills, that every reduction
runs in one wave, and how much work each element costs.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import subprocess
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

assert os.environ.get("TRITON_INTERPRET") != "1", "the interpreter cannot compile kernels"

from resnet_ablate.kernels import _triton_impl as kernels  # noqa: E402
from resnet_ablate.kernels._contract import RunningUpdate  # noqa: E402
from resnet_ablate.kernels._occupancy import HOPPER as HOPPER_SM  # noqa: E402
from resnet_ablate.kernels._occupancy import ctas_per_sm  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
# (name, shape, residual): every distinct fused epilogue of the two networks' training steps.
CASES = [
    *((f"resnet50 {c}x{hw}x{hw} +residual", (256, c, hw, hw), True)
      for c, hw in ((256, 56), (512, 28), (1024, 14), (2048, 7))),
    *((f"resnet50 {c}x{hw}x{hw}", (256, c, hw, hw), False)
      for c, hw in ((64, 112), (64, 56), (128, 56), (128, 28), (256, 28), (256, 14), (512, 14),
                    (512, 7))),
    *((f"resnet56 {c}x{hw}x{hw}{suffix}", (128, c, hw, hw), residual)
      for c, hw in ((16, 32), (32, 16), (64, 8))
      for residual, suffix in ((True, " +residual"), (False, ""))),
    # 5 seeds of ResNet-56 stacked into one model (seed_stack.py, resources.stack_seeds): the
    # same epilogues over 5x the channels, 80 of them not a power of two.
    *((f"5 stacked resnet56 {5 * c}x{hw}x{hw}{suffix}", (128, 5 * c, hw, hw), residual)
      for c, hw in ((16, 32), (32, 16), (64, 8))
      for residual, suffix in ((True, " +residual"), (False, ""))),
]
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
ACTIVATIONS = {"x_ptr", "residual_ptr", "out_ptr", "grad_ptr", "grad_input_ptr", "grad_residual_ptr"}
# The packed ReLU mask: written by the forward, read by the backward through `out_ptr` (PACKED).
MASKS = {"relu_mask_ptr"}
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
_BACKEND = make_backend(HOPPER)


def compile_launch(kernel, args, constexprs, num_warps):
    """The sm_90 binary of one launch, specialized as Triton's JIT specializes it at run time."""
    binder = create_function_from_signature(kernel.signature, kernel.params, _BACKEND)
    options = {**constexprs, "num_warps": num_warps}
    bound, specialization, parsed = binder(*args, **options)
    parsed, signature, constants, attrs = kernel._pack_args(_BACKEND, options, bound,
                                                            specialization, parsed)
    return triton.compile(ASTSource(kernel, signature, constants, attrs), target=HOPPER,
                          options=parsed.__dict__)


def _cuobjdump(compiled, option: str) -> str:
    return _cuobjdump_binary(compiled.asm["cubin"], option)


# A folder the shards share (tests/test_kernels.py sets it): each distinct binary's report is
# made by the first shard to ask for it and read by the others. cuobjdump spends about half a
# second starting, whatever the binary, and the shards' cases share many binaries.
SHARED_REPORTS = os.environ.get("HOPPER_REPORTS_FOLDER")


@functools.lru_cache(maxsize=None)
def _cuobjdump_binary(cubin: bytes, option: str) -> str:
    """cuobjdump's report, once per distinct binary: most launches share one with another."""
    if SHARED_REPORTS is None:
        return _run_cuobjdump(cubin, option)
    report = Path(SHARED_REPORTS) / f"{hashlib.sha256(cubin).hexdigest()}{option}.txt"
    try:  # the first to create the claim makes the report; the others wait for it
        os.close(os.open(report.with_suffix(".claim"), os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        deadline = time.monotonic() + 300
        failed = report.with_suffix(".failed")
        while not report.exists():
            if failed.exists():
                raise RuntimeError(f"the shard that claimed {report} failed: "
                                   f"{failed.read_text()}") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"no shard wrote {report}") from None
            time.sleep(0.02)
        return report.read_text()
    try:
        text = _run_cuobjdump(cubin, option)
    except Exception as error:  # noqa: BLE001 - told to the shards waiting for it, then raised
        report.with_suffix(".failed").write_text(repr(error))
        raise
    written = report.with_suffix(".partial")
    written.write_text(text)
    written.rename(report)  # whole or not at all: a reader never sees half a report
    return text


def _run_cuobjdump(cubin: bytes, option: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(CUOBJDUMP), option, f.name], capture_output=True, text=True,
                              check=True).stdout


def resources(compiled) -> dict[str, int]:
    """REG, SHARED, LOCAL and STACK of the binary, as cuobjdump reports them."""
    report = _cuobjdump(compiled, "-res-usage")
    line = next(l for l in report.splitlines() if "REG:" in l)
    return {key: int(value) for key, value in re.findall(r"(REG|SHARED|LOCAL|STACK):(\d+)", line)}


def reduction_programs(kernel, args, constexprs, num_warps, device):
    """The runtime's one-wave rule, on the registers of the sm_90 binary."""
    used = resources(compile_launch(kernel, args, constexprs, num_warps))
    return HOPPER_SM.sms * ctas_per_sm(used["REG"], num_warps, used["SHARED"])


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);")


def main_loop_instructions(sass: str) -> tuple[int, bool]:
    """(instructions, looped): the SASS instructions of the kernel's main loop (`main_loop`), or
    of its whole body (up to its last EXIT) where no loop loads from global memory."""
    body = main_loop(sass)
    if body is not None:
        return len(body), True
    code = [(int(address, 16), text.strip()) for address, text in _SASS_LINE.findall(sass)]
    last_exit = max(a for a, t in code if t.endswith("EXIT"))
    return sum(1 for a, t in code if a <= last_exit and t != "NOP"), False


def main_loop(sass: str) -> list[str] | None:
    """The instructions of the kernel's main loop: the largest span from a backward branch's
    target to that branch that holds a global load (None where no loop loads). A reduction's
    loops after its first atomic are its last program's merge of the slots
    (_triton_finalize.py), not the main loop."""
    code = [(int(address, 16), text.strip()) for address, text in _SASS_LINE.findall(sass)]
    merge = min((a for a, t in code if re.search(r"\bATOMG?\b", t)), default=None)
    loops = []
    for address, text in code:
        target = re.search(r"\bBRA\s+(?:`?\(?)0x([0-9a-f]+)", text)
        if merge is not None and address > merge:
            break
        if target and int(target.group(1), 16) < address:
            start = int(target.group(1), 16)
            body = [t for a, t in code if start <= a <= address]
            if any(t.split()[0].lstrip("@!P0123456789 ").startswith("LDG")
                   or " LDG" in t for t in body):
                loops.append(body)
    return max(loops, key=len, default=None)


def loop_load_bytes(sass: str) -> int:
    """Bytes one thread loads from global memory in an iteration of the main loop: what it can
    keep in flight, since a load waits only where its value is first used."""
    total = 0
    for text in main_loop(sass) or []:
        opcode = next((token for token in text.split() if token.startswith("LDG")), None)
        if opcode is not None:
            total += 16 if ".128" in opcode else 8 if ".64" in opcode else 4
    return total


def merge_loop_barriers(sass: str) -> int | None:
    """Barriers (BAR.SYNC) inside the loops of a reduction's merge, the code after its first
    atomic (None for a kernel without one): a barrier there is paid once per block of slots, and
    the merge runs in one program while the others have finished. The statistics pass's merge
    once reduced each block of 16 slots in 7 block reductions, ~9.5 us a block on an H200."""
    code = [(int(address, 16), text.strip()) for address, text in _SASS_LINE.findall(sass)]
    merge = min((a for a, t in code if re.search(r"\bATOMG?\b", t)), default=None)
    if merge is None:
        return None
    barriers = set()
    for address, text in code:
        target = re.search(r"\bBRA\s+(?:`?\(?)0x([0-9a-f]+)", text)
        if address > merge and target and merge < int(target.group(1), 16) < address:
            start = int(target.group(1), 16)
            barriers |= {a for a, t in code if start <= a <= address and "BAR.SYNC" in t}
    return len(barriers)


def elements_per_thread(launch) -> int:
    """Activation elements one thread handles per loop iteration: a tile's share, times the
    tiles a step loads where a kernel loads several at once (the statistics pass)."""
    constexprs = launch.constexprs
    lanes = constexprs["SPAN"] if "SPAN" in constexprs else \
        constexprs["BLOCK_R"] * constexprs["BLOCK_C"]
    return max(1, lanes // (32 * launch.num_warps)) * constexprs.get("TILES_PER_STEP", 1)


_INSTRUCTION = re.compile(r"^(?:@!?%p\d+\s+)?([a-z][\w.]*)\s+(.*);$")
_REGISTER = re.compile(r"%[a-z]+\d+")


def access_widths(ptx: str, param_names: list[str]) -> dict[str, list[int]]:
    """For each kernel parameter, the byte widths of the global loads and stores whose address
    derives from it (a flow-insensitive trace of PTX registers back to `ld.param`)."""
    sources: dict[str, set[str]] = defaultdict(set)
    lines = [line.strip() for line in ptx.splitlines()]
    for _ in range(4):  # loops carry addresses around: iterate to a fixed point
        changed = False
        for line in lines:
            match = _INSTRUCTION.match(line)
            if not match:
                continue
            op, operands = match.groups()
            if op.startswith("ld.param"):
                index = re.search(r"_param_(\d+)", operands)
                if index:
                    target = _REGISTER.findall(operands)[0]
                    name = param_names[int(index.group(1))]
                    changed |= name not in sources[target]
                    sources[target].add(name)
                continue
            if op.startswith(("ld.global", "st.global")):
                continue
            registers = _REGISTER.findall(operands)
            if not registers:
                continue
            if operands.startswith("{"):
                targets = _REGISTER.findall(operands[: operands.index("}")])
            else:
                targets = registers[:1]
            inputs = set().union(*(sources[r] for r in registers if r not in targets))
            for target in targets:
                if not inputs <= sources[target]:
                    sources[target] |= inputs
                    changed = True
        if not changed:
            break
    widths: dict[str, list[int]] = defaultdict(list)
    for line in lines:
        match = _INSTRUCTION.match(line)
        if not match or not match.group(1).startswith(("ld.global", "st.global")):
            continue
        op, operands = match.groups()
        address = re.search(r"\[\s*(%[a-z]+\d+)", operands).group(1)
        vector = int(re.search(r"\.v(\d)", op).group(1)) if ".v" in op else 1
        bits = int(re.search(r"\.[bfus](\d+)(?:\s|$)", op + " ").group(1))
        for name in sources[address]:
            widths[name].append(vector * bits // 8)
    return dict(widths)


def describe(shape_name: str, layout: str, step: str, launch) -> dict[str, object]:
    kernel = launch.kernel
    compiled = compile_launch(kernel, launch.args, launch.constexprs, launch.num_warps)
    used = resources(compiled)
    ctas = ctas_per_sm(used["REG"], launch.num_warps, used["SHARED"])
    programs = 1
    for size in launch.grid:
        programs *= size
    names = list(kernel.signature.parameters)
    runtime_names = [n for n, p in zip(names, kernel.params) if not p.is_constexpr]
    widths = access_widths(compiled.asm["ptx"], _ptx_param_names(compiled, names, runtime_names))
    masks = MASKS | ({"out_ptr"} if launch.constexprs.get("PACKED") else set())
    activations = {n: sorted(set(w)) for n, w in widths.items()
                   if n in ACTIVATIONS and n not in masks}
    mask_bytes = {n: sorted(set(w)) for n, w in widths.items() if n in masks}
    per_element = None
    sass = _cuobjdump(compiled, "-sass")
    if activations:
        instructions, looped = main_loop_instructions(sass)
        per_element = {"instructions": instructions, "looped": looped,
                       "elements_per_thread": elements_per_thread(launch),
                       "per_element": instructions / elements_per_thread(launch),
                       # bytes an SM's programs load in one iteration of their main loops
                       "loop_load_bytes_per_sm": loop_load_bytes(sass) * 32 * launch.num_warps
                       * ctas}
    return {
        "shape": shape_name, "layout": layout, "step": step, "kernel": kernel.fn.__name__,
        "grid": list(launch.grid), "num_warps": launch.num_warps, "registers": used["REG"],
        "shared": used["SHARED"], "local": used["LOCAL"], "stack": used["STACK"],
        "ctas_per_sm": ctas, "waves": programs / (HOPPER_SM.sms * ctas),
        "activation_bytes": activations, "mask_bytes": mask_bytes,
        "mask_packing": launch.constexprs.get("MASK_PACKING"), "sass": per_element,
        "merge_loop_barriers": merge_loop_barriers(sass),
    }


def _ptx_param_names(compiled, names, runtime_names) -> list[str]:
    """PTX parameters in order: the runtime arguments that were not specialized into constants."""
    constants = {name for (index,), _ in compiled.src.constants.items()
                 for name in [names[index]]}
    return [n for n in runtime_names if n not in constants]


def main(shard: int = 0, shards: int = 1) -> None:
    """Describe the launches of every `shards`-th (case, layout) from `shard` on (shards compile
    apart). The layouts alternate, so that two shards take one each: their kernels share few
    binaries, where two shards by case compiled 34 of their 114 binaries both (80 compiles in
    all now; on two idle cores the test took 56 s, now 50, and the CPU time it takes from the
    other tests running beside it in CI is a third less)."""
    pairs = [(case, layout) for case in CASES for layout in LAYOUTS.items()]
    for (case, shape, residual), (layout, memory_format) in pairs[shard::shards]:
        x = torch.empty(shape, dtype=torch.bfloat16, device="meta").to(memory_format=memory_format)
        channels = torch.empty(shape[1], device="meta")
        # A training step's forward: batch statistics, running statistics updated.
        update = RunningUpdate(torch.empty_like(channels), torch.empty_like(channels), 0.1,
                               1.0)
        forward = kernels.plan_forward(x, channels, channels, x if residual else None, None,
                                       None, 1e-5, True, True, update,
                                       reduction_programs=reduction_programs)
        # The backward reads the packed ReLU mask where the forward wrote one.
        relu_mask = forward.relu_mask if forward.relu_mask is not None else x
        backward = kernels.plan_backward(x, x, relu_mask, channels, forward.stats, 1e-5, True,
                                         residual, reduction_programs=reduction_programs)
        # Compiled code's forward (the custom op) updates the running statistics in a launch
        # of its own: its statistics pass is the variant without the update, sized as the
        # variant with it is (one geometry serves both).
        compiled_forward = kernels.plan_forward(x, channels, channels,
                                                x if residual else None, None, None, 1e-5,
                                                True, True, None,
                                                reduction_programs=reduction_programs)
        for step, launches in (("forward", forward.launches),
                               ("forward without update", compiled_forward.launches[:1]),
                               ("backward", backward.launches)):
            for launch in launches:
                print(json.dumps(describe(case, layout, step, launch)), flush=True)


if __name__ == "__main__":
    import sys

    main(*(int(a) for a in sys.argv[1:3]))  # [shard shards]
