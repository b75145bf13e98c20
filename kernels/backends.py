"""Which implementation runs the fused ops (the "backend").

- `"auto"` (default): CUDA tensors run the compiled Triton kernels. Elsewhere (CPU, float64) the
  fused op buys nothing, so in eager mode `fused_batch_norm` runs ATen's batch norm with the add and
  ReLU in place under native autograd: exactly what the unfused module computes, and as fast. When
  traced or compiled (`torch.compile`, `torch.export`, the JIT tracer that fvcore counts with) it
  stays one custom op, on its PyTorch implementation.
- `"triton"`: the custom op on the Triton kernels (compiled on CUDA, or through Triton's
  interpreter on CPU when `TRITON_INTERPRET=1` was set before import).
- `"torch"`: the custom op on its PyTorch implementation, everywhere: the op's reference.
Choose with the environment variable `RESNET_ABLATE_BACKEND`, `set_backend(name)`, or the
`use_backend(name)` context manager.
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from collections.abc import Iterator
from typing import Literal

import torch

from . import _torch_impl
from ._contract import Implementation

try:
    from . import _triton_impl
except ImportError:  # no Triton wheel for this platform: the PyTorch path still works
    _triton_impl = None

Backend = Literal["auto", "triton", "torch"]
BACKENDS: tuple[str, ...] = ("auto", "triton", "torch")
TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def interpreter_fails_with_numpy(triton_version: str, numpy_version: str) -> bool:
    """Whether Triton's interpreter fails on some shapes with this numpy: Triton 3.6's turns a
    one-element array into a loop bound with int(), which numpy 2.4 made an error; from 3.7 on it
    squeezes the array first."""
    def release(version: str) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    return release(triton_version) < (3, 7) and release(numpy_version) >= (2, 4)


if TRITON_INTERPRETED and _triton_impl is not None:
    import numpy
    import triton

    if interpreter_fails_with_numpy(triton.__version__, numpy.__version__):
        warnings.warn(
            f"Triton {triton.__version__}'s interpreter (TRITON_INTERPRET=1) fails on some shapes "
            f"with numpy {numpy.__version__} (\"only 0-dimensional arrays can be converted to Python "
            "scalars\"): install triton>=3.7 or numpy<2.4 to run the kernels through it",
            RuntimeWarning, stacklevel=2)


def _validated_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; valid: {', '.join(BACKENDS)}")
    return name  # type: ignore[return-value]


_backend: Backend = _validated_backend(os.environ.get("RESNET_ABLATE_BACKEND", "auto"))


def get_backend() -> Backend:
    """The backend chosen for fused BatchNorm ops: "auto", "triton" or "torch"."""
    return _backend


def set_backend(name: Backend) -> None:
    """Choose the implementation of the fused ops for this process (see module docstring)."""
    global _backend
    _backend = _validated_backend(name)


@contextlib.contextmanager
def use_backend(name: Backend) -> Iterator[None]:
    """Run the enclosed code with the given backend, then restore the previous one."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def _triton_can_run(x: torch.Tensor) -> bool:
    return _triton_impl is not None and (x.is_cuda or TRITON_INTERPRETED)


def implementation(x: torch.Tensor) -> Implementation:
    """The module (_triton_impl or _torch_impl) that runs the custom op on this input."""
    if _backend == "torch":
        return _torch_impl
    if _backend == "triton":
        if not _triton_can_run(x):
            raise RuntimeError(
                f"kernel backend 'triton' cannot run on {x.device.type} tensors: it needs CUDA, "
                "or TRITON_INTERPRET=1 set before resnet_ablate.kernels is imported"
            )
        if x.dtype == torch.float64:
            raise RuntimeError("kernel backend 'triton' supports float32, float16 and bfloat16")
        return _triton_impl
    # "auto" never picks the interpreter: it is a test vehicle, thousands of times slower.
    if x.is_cuda and x.dtype != torch.float64 and _triton_impl is not None:
        return _triton_impl
    return _torch_impl
