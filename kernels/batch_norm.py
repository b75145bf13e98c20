"""Fused BatchNorm + residual add + ReLU as PyTorch custom ops with autograd.

`fused_batch_norm` has the signature and semantics of `torch.nn.functional.batch_norm`, then adds
`residual` and applies ReLU. Underneath are two functional custom ops, so that `torch.compile` sees
them as single nodes (no graph break) and fvcore's tracer counts one named op:

- `resnet_ablate::batch_norm_act(x, weight, bias, residual, running_mean, running_var, eps, relu)`
  returns `(out, mean, var)`. With running statistics it normalizes with them (eval) and returns
  empty `mean`/`var`; without, it normalizes with the batch statistics and returns them (biased
  variance, fp32) for backward and for the running-stat update.
- `resnet_ablate::batch_norm_act_backward(...)` returns the gradients of input, residual, weight
  and bias.

The running-stat update is a third op, `resnet_ablate::update_running_stats_`, which mutates the
running statistics in place (one kernel launch on CUDA): an op that mutates its inputs cannot
carry an autograd formula, so it cannot be part of `batch_norm_act`. Both implementations keep PyTorch's
semantics at the edges: NaN and inf propagate, an empty batch gives empty outputs and zero
parameter gradients (handled here, once), and outputs take the strides the fake kernels promise.

Which implementation runs (the "backend"):
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


def _triton_can_run(device: torch.device) -> bool:
    return _triton_impl is not None and (device.type == "cuda" or TRITON_INTERPRETED)


def _implementation(x: torch.Tensor) -> Implementation:
    """The module (_triton_impl or _torch_impl) that runs the custom op on this input."""
    if _backend == "torch":
        return _torch_impl
    if _backend == "triton":
        if not _triton_can_run(x.device):
            raise RuntimeError(
                f"kernel backend 'triton' cannot run on {x.device.type} tensors: it needs CUDA, "
                "or TRITON_INTERPRET=1 set before resnet_ablate.kernels is imported"
            )
        if x.dtype == torch.float64:
            raise RuntimeError("kernel backend 'triton' supports float32, float16 and bfloat16")
        return _triton_impl
    # "auto" never picks the interpreter: it is a test vehicle, thousands of times slower.
    if x.device.type == "cuda" and x.dtype != torch.float64 and _triton_impl is not None:
        return _triton_impl
    return _torch_impl


def _runs_inline(x: torch.Tensor) -> bool:
    """Whether `fused_batch_norm` skips the custom op and calls ATen's ops directly.

    Only in eager mode under "auto" where the op would run its PyTorch implementation: there the
    op's wrapper (custom-op dispatch, an autograd Function, checks) costs more than it saves on the
    small tensors of CIFAR and digits networks. Under tracing and compilation the op stays, so that
    `torch.compile` sees one node and fvcore counts a fused model as it counts an unfused one.
    """
    return (
        _backend == "auto"
        and _implementation(x) is _torch_impl
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
    )


@torch.library.custom_op("resnet_ablate::batch_norm_act", mutates_args=())
def batch_norm_act(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    eps: float,
    relu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns `(out, mean, var)`; see `Implementation.forward` in _contract.py."""
    if x.numel() == 0:  # an empty batch: F.batch_norm's results, whatever the implementation
        stats_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        stats_size = 0 if running_mean is not None else x.shape[1]
        nan = torch.full((stats_size,), float("nan"), dtype=stats_dtype, device=x.device)
        return torch.empty_like(x), nan, nan.clone()
    return _implementation(x).forward(x, weight, bias, residual, running_mean, running_var, eps, relu)


@batch_norm_act.register_fake
def _(x, weight, bias, residual, running_mean, running_var, eps, relu):
    stats_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    stats_size = 0 if running_mean is not None else x.shape[1]
    return (
        torch.empty_like(x),
        x.new_empty(stats_size, dtype=stats_dtype),
        x.new_empty(stats_size, dtype=stats_dtype),
    )


@torch.library.custom_op("resnet_ablate::batch_norm_act_backward", mutates_args=())
def batch_norm_act_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    out: torch.Tensor | None,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    eps: float,
    batch_stats: bool,
    residual_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of input, residual (empty unless `residual_grad`), weight and bias; see
    `Implementation.backward` in _contract.py."""
    if x.numel() == 0:  # nothing flowed through: empty input gradients, zero parameter ones
        stats_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        zeros = torch.zeros(x.shape[1], dtype=stats_dtype, device=x.device)
        grad_residual = torch.empty_like(grad_out, dtype=x.dtype) if residual_grad else x.new_empty(0)
        return torch.empty_like(x), grad_residual, zeros, zeros.clone()
    return _implementation(x).backward(
        grad_out, x, out, weight, mean, var, eps, batch_stats, residual_grad
    )


@batch_norm_act_backward.register_fake
def _(grad_out, x, out, weight, mean, var, eps, batch_stats, residual_grad):
    stats_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    channels = x.shape[1]
    grad_residual = torch.empty_like(grad_out, dtype=x.dtype) if residual_grad else x.new_empty(0)
    return (
        torch.empty_like(x),
        grad_residual,
        x.new_empty(channels, dtype=stats_dtype),
        x.new_empty(channels, dtype=stats_dtype),
    )


@torch.library.custom_op(
    "resnet_ablate::update_running_stats_", mutates_args=("running_mean", "running_var")
)
def update_running_stats_(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    momentum: float,
    unbias: float,
) -> None:
    """`running = (1 - momentum) * running + momentum * batch`, the variance times `unbias`
    (count / (count - 1)), in place: one kernel for both vectors where the Triton kernels run.

    An op of its own because an op that mutates its inputs cannot carry an autograd formula,
    which `batch_norm_act` needs; the running statistics need none.
    """
    _implementation(running_mean).update_running_stats(
        running_mean, running_var, mean, var, momentum, unbias
    )


@update_running_stats_.register_fake
def _(running_mean, running_var, mean, var, momentum, unbias):
    return None


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, residual, running_mean, running_var, eps, relu = inputs
    out, mean, var = output
    ctx.mark_non_differentiable(mean, var)
    ctx.batch_stats = running_mean is None
    if not ctx.batch_stats:
        # Copies: a later training forward updates the running statistics in place, which must
        # neither change this backward nor trip autograd's version check (nn.BatchNorm2d does not).
        mean, var = running_mean.detach().clone(), running_var.detach().clone()
    ctx.eps = eps
    ctx.relu = relu
    ctx.has_residual = residual is not None
    ctx.residual_dtype = residual.dtype if residual is not None else None
    ctx.weight_dtype = weight.dtype if weight is not None else None
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.save_for_backward(x, out if relu else None, weight, mean, var)


def _backward(ctx, grad_out, _grad_mean, _grad_var):
    x, out, weight, mean, var = ctx.saved_tensors
    residual_grad = ctx.has_residual and ctx.relu and ctx.needs_input_grad[3]
    grad_input, grad_residual, grad_weight, grad_bias = batch_norm_act_backward(
        grad_out, x, out, weight, mean, var, ctx.eps, ctx.batch_stats, residual_grad
    )
    if ctx.has_residual and not ctx.relu:
        grad_residual = grad_out  # without ReLU the residual's gradient is grad_out itself
    elif not residual_grad:
        grad_residual = None
    if grad_residual is not None:
        grad_residual = grad_residual.to(ctx.residual_dtype)
    grad_weight = grad_weight.to(ctx.weight_dtype) if ctx.weight_dtype is not None else None
    grad_bias = grad_bias.to(ctx.bias_dtype) if ctx.bias_dtype is not None else None
    return grad_input, grad_weight, grad_bias, grad_residual, None, None, None, None


batch_norm_act.register_autograd(_backward, setup_context=_setup_context)


def _check_channel_vector(name: str, t: torch.Tensor | None, channels: int) -> None:
    if t is not None and t.numel() != channels:
        raise RuntimeError(f"{name} should contain {channels} elements not {t.numel()}")


def fused_batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    residual: torch.Tensor | None = None,
    relu: bool = True,
) -> torch.Tensor:
    """`F.batch_norm(input, ...)`, then `+ residual` when given, then ReLU when `relu`.

    Same positional signature, semantics and errors as `torch.nn.functional.batch_norm`: in
    training the batch statistics normalize and, when running statistics are given, update them in
    place (momentum, unbiased variance); in eval the running statistics normalize.
    """
    if _runs_inline(input):
        return _batch_norm_add_relu_inline(
            input, running_mean, running_var, weight, bias, training, momentum, eps, residual, relu
        )
    if input.dim() < 2:
        raise ValueError(f"expected an input of shape (N, C, ...), got size {list(input.shape)}")
    if training and eps <= 0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    channels = input.shape[1]
    if training and input.numel() // channels == 1:
        raise ValueError(
            "Expected more than 1 value per channel when training, "
            f"got input size {input.size()}"
        )
    if not training and (running_mean is None or running_var is None):
        raise RuntimeError(
            f"running_{'mean' if running_mean is None else 'var'} must be defined in evaluation mode"
        )
    for name, t in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):
        _check_channel_vector(name, t, channels)
    _check_residual(input, residual)

    if training:
        out, batch_mean, batch_var = batch_norm_act(
            input, weight, bias, residual, None, None, eps, relu
        )
        count = input.numel() // channels
        if running_mean is not None and running_var is not None and count > 0:
            update_running_stats_(running_mean, running_var, batch_mean, batch_var, momentum,
                                  count / (count - 1))
        return out
    out, _, _ = batch_norm_act(input, weight, bias, residual, running_mean, running_var, eps, relu)
    return out


def _check_residual(input: torch.Tensor, residual: torch.Tensor | None) -> None:
    """The residual is added as `out += residual` adds it: same shape and device, any floating
    dtype (the sum is rounded to the input's dtype; the residual's gradient has its own dtype)."""
    if residual is None:
        return
    if residual.shape != input.shape:
        raise ValueError(
            f"residual must have the input's shape {list(input.shape)}, got {list(residual.shape)}"
        )
    if not residual.is_floating_point():
        raise TypeError(f"residual must be a floating-point tensor, got {residual.dtype}")
    if residual.device != input.device:
        raise RuntimeError(
            f"residual is on {residual.device} but the input is on {input.device}; move it there"
        )


def _batch_norm_add_relu_inline(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    residual: torch.Tensor | None,
    relu: bool,
) -> torch.Tensor:
    """The unfused module's arithmetic: F.batch_norm, then the add and ReLU in place on its output.

    F.batch_norm does its own checks (with PyTorch's wording) and the running-stat update; its
    output is a fresh tensor that its backward does not read, so writing into it is safe.
    """
    _check_residual(input, residual)
    out = torch.nn.functional.batch_norm(
        input, running_mean, running_var, weight, bias, training, momentum, eps
    )
    if residual is not None:
        out.add_(residual)
    return out.relu_() if relu else out
