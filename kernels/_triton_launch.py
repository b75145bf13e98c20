"""How a planned launch reaches the GPU: launches as data, launch templates, and template launches
that skip Triton's per-call binding.

`kernel[grid](*args)` (Triton's JITFunction.run) works out on every call what a template fixes
once: it binds and specializes each argument, builds a cache key, finds the binary and builds
launch metadata, then calls the binary's launcher. With the launcher itself stood in for
(benchmarks/bench_host.py --launches stand-in), that took ~20 µs of host time per launch on a
2-core cloud CPU, six launches a fused layer then (four now): more than all the rest of the
layer's host path. A template's launches differ only in their tensors' addresses and in its
float scalars, so a template keeps the compiled kernel that its first launch returned, and its
later launches call that kernel's launcher themselves, with the arguments JITFunction.run would
pass it, for as long as JITFunction.run would pick that same binary and do nothing else besides:
- the tensors have the dtypes and the alignment (16 bytes or not) that the binary was compiled
  for: all that Triton specializes a pointer on. Callers keep each template to one set of both
  (the plans' keys in _triton_impl.py hold every tensor's dtype and whether all are aligned), and
  only the templates of plans whose tensors are all aligned launch directly. The template
  fixes the integer arguments, whose values Triton specializes on too, and the compile-time
  constants; the scalars are floats, which Triton does not specialize on;
- the current device is the one the binary was loaded on;
- no launch hook is installed (profilers such as Proton get JITFunction.run's metadata), nor a
  pre-run hook on the kernel;
- RESNET_ABLATE_DIRECT_LAUNCH is not "0" (every launch through JITFunction.run, a fallback).
What a call's launches share (the current device and stream, whether hooks are installed) is read
once per call, for all of them (`launch_stream`): JITFunction.run reads it at every launch.
Otherwise the launch goes through JITFunction.run, as every launch did before. (What a binary's
compilation options are, Triton's debug and instrumentation knobs among them, is read at its
first launch: changing them later in a process needs RESNET_ABLATE_DIRECT_LAUNCH=0.) Fresh
tensors count as aligned: PyTorch's allocators align them to 64 bytes (CPU) and 512 (CUDA).
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from triton import knobs
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

DIRECT_LAUNCHES = os.environ.get("RESNET_ABLATE_DIRECT_LAUNCH", "1") != "0"


class KernelLaunch(NamedTuple):
    """One kernel launch as data: the kernel, its grid, runtime arguments and compile-time
    constants; what `plan_forward` and `plan_backward` describe, for the ahead-of-time check."""

    kernel: Any  # a triton.JITFunction
    grid: tuple[int, ...]
    args: tuple[Any, ...]
    constexprs: dict[str, Any] = {}  # never mutated
    num_warps: int = 4


class LaunchStream(NamedTuple):
    """Where a call's direct launches go: the current device, as Triton reads it, and that
    device's current stream (a CUDA stream's handle)."""

    device: int
    handle: int


def launch_stream(last: LaunchTemplate) -> LaunchStream | None:
    """What a call's launches may launch directly on, read once for all of them; None where they
    go through JITFunction.run: before `last`, the call's last template, has its binary (so on a
    signature's first call, and always under the interpreter, whose launches never return one),
    with direct launches off, or with a launch hook installed."""
    if last.compiled is None or not DIRECT_LAUNCHES or not _hooks_idle():
        return None
    active = driver.active
    device = active.get_current_device()
    return LaunchStream(device, active.get_current_stream(device))


class _Compiled(NamedTuple):
    """What a template's later launches reuse from its first: the binary's launcher, the device
    it was loaded on, and the launch arguments that never change."""

    launcher: Any  # the CompiledKernel's `run`, a property that Triton would look up each time
    device: int
    grid: tuple[int, int, int]
    binary: tuple[Any, Any]  # the kernel's function handle and packed metadata
    constants: tuple[Any, ...]  # the compile-time constants' values, in parameter order


@dataclass(eq=False, slots=True)
class LaunchTemplate:
    """A launch as a signature fixes it, less what each call brings: its tensors, which lead the
    arguments, and its float scalars (eps; momentum and unbias), which sit between `head` and
    `tail`. Built on a signature's first call, so that later calls only fill it in and launch.
    Every call of one template brings tensors of the same dtypes and alignment (see above)."""

    kernel: Any  # a triton.JITFunction
    grid: tuple[int, ...]
    head: tuple[Any, ...]
    tail: tuple[Any, ...]
    constexprs: dict[str, Any]  # never mutated
    num_warps: int
    # Whether its launches may skip JITFunction.run: only where every call's tensors are aligned.
    direct: bool = True
    # Whether its warps may be tuned (an elementwise pass, _triton_tuning.py), and were.
    tunable: bool = False
    tuned: bool = False
    compiled: _Compiled | None = field(default=None, repr=False)

    def __call__(self, stream: LaunchStream | None, tensors: tuple[Any, ...],
                 *scalars: float) -> None:
        """Launch it with this call's tensors and scalars, directly on `stream` where it allows
        (`launch_stream`), else through JITFunction.run."""
        compiled = self.compiled
        if (compiled is not None and stream is not None and stream.device == compiled.device
                and not self.kernel.pre_run_hooks):
            # No launch metadata and no hooks: _hooks_idle held when `stream` was read.
            compiled.launcher(*compiled.grid, stream.handle, *compiled.binary, None, None, None,
                              *tensors, *self.head, *scalars, *self.tail, *compiled.constants)
            return
        kernel = self.kernel[self.grid](*tensors, *self.head, *scalars, *self.tail,
                                        **self.constexprs, num_warps=self.num_warps)
        if (compiled is None and self.direct and kernel is not None
                and isinstance(self.kernel, JITFunction)):
            self.compiled = self._compiled(kernel)

    def bind(self, stream: LaunchStream | None, tensors: tuple[Any, ...],
             *scalars: float) -> KernelLaunch:
        """The launch that `self(stream, tensors, *scalars)` would make, as data."""
        return KernelLaunch(self.kernel, self.grid, (*tensors, *self.head, *scalars, *self.tail),
                            self.constexprs, self.num_warps)

    def _compiled(self, kernel: Any) -> _Compiled | None:
        """What later launches reuse. JITFunction.run passes the launcher every argument in
        parameter order, the constants' values included, which the kernels here declare after
        their runtime arguments (None where a kernel does not, or a constant has no value)."""
        params = self.kernel.params
        first_constant = next((i for i, p in enumerate(params) if p.is_constexpr), len(params))
        constants = []
        for p in params[first_constant:]:
            value = self.constexprs.get(p.name, p.default)
            if not p.is_constexpr or value is inspect.Parameter.empty:
                return None
            constants.append(value)
        grid = (*self.grid, 1, 1)[:3]
        return _Compiled(kernel.run, driver.active.get_current_device(), grid,
                         (kernel.function, kernel.packed_metadata), tuple(constants))


def through_jit_only(templates: Any) -> None:
    """Have these templates launch through JITFunction.run only: their calls' tensors need not
    all be aligned, so that one call's binary may not suit the next."""
    for template in templates:
        if isinstance(template, LaunchTemplate):
            template.direct = False


def _hooks_idle() -> bool:
    """No launch hook installed: JITFunction.run would then build metadata that nobody reads."""
    runtime = knobs.runtime
    for hook in (runtime.launch_enter_hook, runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return False
    return True
