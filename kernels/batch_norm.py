"""Fused BatchNorm + residual add + ReLU as PyTorch custom ops with autograd.

`fused_batch_norm` has the signature and semantics of `torch.nn.functional.batch_norm`, then adds
`residual` and applies ReLU. Underneath are two functional custom ops, so that `torch.compile` sees
them as single nodes (no graph break) and fvcore's tracer counts one named op:

- `resnet_ablate::batch_norm_act(x, weight, bias, residual, running_mean, running_var, eps, relu,
  pack_relu_mask)` returns `(out, stats, relu_mask)`. With running statistics it normalizes
  with them (eval) and returns an empty `stats`; without, it normalizes with the batch
  statistics and returns them for backward and for the running-stat update: `stats` is the C
  means, then the C biased variances (fp32). `relu_mask` is the ReLU's decisions packed one bit
  per element, which backward reads instead of the output (1/16 of a bf16 output's bytes), where
  the Triton kernels can write it and a gradient will be taken; else it is empty and backward
  reads the output.
- `resnet_ablate::batch_norm_act_backward(...)` returns the gradients of input, residual, weight
  and bias.

The running-stat update is a third op, `resnet_ablate::update_running_stats_`, which mutates the
running statistics in place (one kernel launch on CUDA): an op that mutates its inputs cannot
carry an autograd formula, so it cannot be part of `batch_norm_act`. Both implementations keep PyTorch's
semantics at the edges: NaN and inf propagate, an empty batch gives empty outputs and zero
parameter gradients (handled here, once), and outputs take the strides the fake kernels promise.
One exception: an infinite scale with eps > 0 (an infinite weight, or one that overflows times
1/sqrt(var + eps)) gives +-inf where ATen's `x * scale + (bias - mean * scale)` gives NaN for
some elements (inf - inf); the kernels take ATen's form only where eps == 0 makes such a scale
a zero variance's, and keep the common path free of the test elsewhere.
Arguments are checked up front, in F.batch_norm's words (_checks.py): on the eager path once per
call signature (_eager.py).

In eager mode the ops' dispatch is skipped (_eager.py): one autograd.Function calls the same
implementation with the same autograd context (_autograd.py), the running-stat update joins the
forward (on the Triton path, its statistics launch), and what a call's signature decides is
worked out on its first call. The custom ops are what tracing and compilation see. Gradients
taken with `create_graph=True` come from differentiable torch ops, so double backward works.

Which implementation runs (the "backend") is backends.py's choice.
"""

from __future__ import annotations

import torch

from . import _torch_impl
from ._autograd import (
    SavedMeta, backward_body, dtype_of, forward_body, gradient_will_be_taken, gradients,
    save_for_backward, stats_dtype,
)
from ._checks import check_arguments, check_one_dimensional, check_types, checked_residual
from ._eager import fused_batch_norm_eager
from .backends import get_backend
from .backends import implementation as _implementation


def _runs_inline(x: torch.Tensor, eager: bool) -> bool:
    """Whether `fused_batch_norm` skips the custom op and calls ATen's ops directly.

    In eager mode under "auto" where the op would run its PyTorch implementation: there the op's
    wrapper (custom-op dispatch, autograd Function, checks) costs more than it saves on CIFAR's
    small tensors. Under functorch's transforms (torch.func's grad, jacrev, vmap) on every backend:
    PyTorch gives an op's registered autograd no functorch support, and ATen's ops have rules
    there. Under tracing and compilation the op stays: `torch.compile` sees one node, and fvcore
    counts a fused model as an unfused one. (`eager`, from `_is_eager`, rules all three out.)"""
    if eager:
        return get_backend() == "auto" and _implementation(x) is _torch_impl
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    return torch._C._are_functorch_transforms_active() or (
        get_backend() == "auto" and _implementation(x) is _torch_impl)


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
    pack_relu_mask: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns `(out, stats, relu_mask)`; see `Implementation.forward` in _contract.py."""
    out, stats, relu_mask = forward_body(_implementation(x), x, weight, bias, residual,
                                         running_mean, running_var, eps, relu, pack_relu_mask)
    # An op returns tensors, of the sizes its fake kernel gives (an implementation's stats may
    # carry scratch after the 2C statistics).
    stats = x.new_empty(0, dtype=stats_dtype(x)) if stats is None else stats[:2 * x.shape[1]]
    return out, stats, x.new_empty(0, dtype=torch.uint8) if relu_mask is None else relu_mask


@batch_norm_act.register_fake
def _(x, weight, bias, residual, running_mean, running_var, eps, relu, pack_relu_mask):
    stats_size = 0 if running_mean is not None else 2 * x.shape[1]
    mask_bytes = (_implementation(x).relu_mask_bytes(x, residual)
                  if relu and pack_relu_mask and x.numel() else 0)
    return (
        torch.empty_like(x),
        x.new_empty(stats_size, dtype=stats_dtype(x)),
        x.new_empty(mask_bytes, dtype=torch.uint8),
    )


@torch.library.custom_op("resnet_ablate::batch_norm_act_backward", mutates_args=())
def batch_norm_act_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    relu_mask: torch.Tensor | None,
    weight: torch.Tensor | None,
    stats: torch.Tensor,
    eps: float,
    batch_stats: bool,
    residual_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of input, residual (empty unless `residual_grad`), weight and bias; see
    `Implementation.backward` in _contract.py."""
    grad_input, grad_residual, grad_weight, grad_bias = backward_body(
        _implementation(x), grad_out, x, relu_mask, weight, stats, eps, batch_stats, residual_grad)
    if grad_residual is None:
        grad_residual = x.new_empty(0)
    return grad_input, grad_residual, grad_weight, grad_bias


@batch_norm_act_backward.register_fake
def _(grad_out, x, relu_mask, weight, stats, eps, batch_stats, residual_grad):
    channels = x.shape[1]
    grad_residual = torch.empty_like(grad_out, dtype=x.dtype) if residual_grad else x.new_empty(0)
    return (
        torch.empty_like(x),
        grad_residual,
        x.new_empty(channels, dtype=stats_dtype(x)),
        x.new_empty(channels, dtype=stats_dtype(x)),
    )


@torch.library.custom_op(
    "resnet_ablate::update_running_stats_", mutates_args=("running_mean", "running_var")
)
def update_running_stats_(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    stats: torch.Tensor,
    momentum: float,
    count: int,
) -> None:
    """`running = (1 - momentum) * running + momentum * batch`, the variance times count /
    (count - 1) (`count`: values per channel), in place, from the batch's `stats` (the means,
    then the variances, as `batch_norm_act` returns them): one kernel where Triton runs.

    An op of its own: an op that mutates its inputs cannot carry the autograd formula that
    `batch_norm_act` needs. It takes the count, which torch.compile keeps symbolic with dynamic
    shapes, not a float made of it: a guard on its value, a graph per batch size."""
    _implementation(running_mean).update_running_stats(running_mean, running_var, stats, momentum,
                                                       count / (count - 1))


@update_running_stats_.register_fake
def _(running_mean, running_var, stats, momentum, count):
    return None


def _setup_context(ctx, inputs, output) -> None:
    ctx.mark_non_differentiable(*output[1:])  # the statistics and the packed mask
    out, stats, relu_mask = output
    x, weight, bias, residual, running_mean, running_var, eps, relu, _ = inputs
    # (Autograd sets an op's context up only where it records the call: a backward may follow.)
    meta = SavedMeta(relu, running_mean is None, dtype_of(residual), dtype_of(weight),
                     dtype_of(bias), batch_norm_act_backward)
    save_for_backward(ctx, meta, eps, x, weight, bias, residual, running_mean, running_var, out,
                      stats, relu_mask if relu_mask.numel() else None)


def _backward(ctx, grad_out, _grad_stats, _grad_mask):
    return (*gradients(ctx, grad_out), None, None, None, None, None)


batch_norm_act.register_autograd(_backward, setup_context=_setup_context)


def _is_eager(x: torch.Tensor) -> bool:
    """A plain tensor with no tracer, compiler, dispatch mode or functorch transform looking on."""
    return (
        type(x) is torch.Tensor
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and torch._C._len_torch_dispatch_stack() == 0
        and not torch._C._are_functorch_transforms_active()
    )


def _exporting_to_onnx(eager: bool) -> bool:
    """Whether an ONNX exporter (either one) is tracing this call. ONNX has no fused op, but the
    inline path's ATen ops export as BatchNormalization, Add and Relu: a fused model exports as it
    stands. (Checked off the eager path only: exporters trace, eager calls must not pay.)"""
    return not eager and torch.onnx.is_in_onnx_export()


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
    place (momentum, unbiased variance); in eval the running statistics normalize. The residual
    has the input's shape or broadcasts to it, as in `out += residual`. Per-channel tensors must
    be 1-D (F.batch_norm takes other shapes of C elements in its forward, and fails on them in
    training or backward).
    """
    eager = _is_eager(input)
    if not eager:  # (the eager path asks on a signature's first call)
        check_types(input, running_mean, running_var, weight, bias, training, residual,
                    relu)
    if _runs_inline(input, eager) or _exporting_to_onnx(eager):
        return _batch_norm_add_relu_inline(
            input, running_mean, running_var, weight, bias, training, momentum, eps, residual, relu
        )
    if eager:
        return fused_batch_norm_eager(input, running_mean, running_var, weight, bias, training,
                                      momentum, eps, residual, relu)
    momentum = check_arguments(input, running_mean, running_var, weight, bias, training,
                               momentum, eps)
    residual = checked_residual(input, residual)
    # Not under the JIT tracer, whose check reruns the model with gradients off and would see
    # another graph: its traces count FLOPs, they do not train.
    pack_relu_mask = relu and gradient_will_be_taken(input, weight, bias, residual) \
        and not torch.jit.is_tracing()
    if not training:
        return batch_norm_act(input, weight, bias, residual, running_mean, running_var, eps, relu,
                              pack_relu_mask)[0]
    out, stats, _ = batch_norm_act(input, weight, bias, residual, None, None, eps, relu,
                                   pack_relu_mask)
    count = input.numel() // max(input.shape[1], 1)  # no channels: an empty output
    if running_mean is not None and count > 0:
        update_running_stats_(running_mean, running_var, stats, momentum, count)
    return out


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
    output is a fresh tensor that its backward does not read, so writing into it is safe."""
    if type(relu) is not bool:  # (F.batch_norm checks the rest; it has no relu)
        check_types(input, running_mean, running_var, weight, bias, training, residual, relu)
    try:
        checked_residual(input, residual)  # broadcasting is out.add_'s own
        check_one_dimensional(input.shape[1] if input.dim() > 1 else 0, running_mean,
                              running_var, weight, bias)
        # Dense copies (the weight's differentiable): ATen's CPU backward misreads a strided
        # weight beside a channels_last input and gradient (the input's gradient 3.5 off,
        # PyTorch 2.13), and in eval strided running statistics (thousands off); training
        # updates those in place.
        if weight is not None and not weight.is_contiguous():
            weight = weight.contiguous()
        if not training and running_mean is not None and running_var is not None:
            running_mean, running_var = running_mean.contiguous(), running_var.contiguous()
    except AttributeError:  # an argument that is no tensor: named, in F.batch_norm's words
        check_types(input, running_mean, running_var, weight, bias, training, residual,
                    relu)
        raise
    out = torch.nn.functional.batch_norm(
        input, running_mean, running_var, weight, bias, training, momentum, eps
    )
    if residual is not None:  # out of place under vmap, where the residual may be batched
        out = (out + residual).to(out.dtype) if torch._C._are_functorch_transforms_active() \
            else out.add_(residual)
    return out.relu_() if relu else out
