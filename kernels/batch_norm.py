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
Arguments are checked once, up front, in F.batch_norm's words (_checks.py).

In eager mode the ops' dispatch is skipped: `_EagerBatchNormAct` calls the same implementation
with the same autograd context, and the running-stat update joins the forward (on the Triton
path, its statistics launch). The custom ops are what tracing and compilation see. Gradients
taken with `create_graph=True` come from differentiable torch ops, so double backward works.

Which implementation runs (the "backend") is backends.py's choice.
"""

from __future__ import annotations

import torch

from . import _torch_impl
from ._checks import check_arguments, checked_residual
from ._contract import RunningUpdate
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
    out, stats, relu_mask = _forward(_implementation(x), x, weight, bias, residual, running_mean,
                                     running_var, eps, relu, pack_relu_mask)
    # An op returns tensors, of the sizes its fake kernel gives (an implementation's stats may
    # carry scratch after the 2C statistics).
    stats = x.new_empty(0, dtype=_stats_dtype(x)) if stats is None else stats[:2 * x.shape[1]]
    return out, stats, x.new_empty(0, dtype=torch.uint8) if relu_mask is None else relu_mask


def _stats_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _forward(implementation, x, weight, bias, residual, running_mean, running_var, eps, relu,
             pack_relu_mask, update=None):
    """The op's body, which the eager path calls too (with the running-stat `update` folded in)."""
    if x.numel() == 0:  # an empty batch: F.batch_norm's results, whatever the implementation
        stats = None if running_mean is not None else torch.full(
            (2 * x.shape[1],), float("nan"), dtype=_stats_dtype(x), device=x.device)
        return torch.empty_like(x), stats, None
    return implementation.forward(x, weight, bias, residual, running_mean, running_var, eps, relu,
                                  pack_relu_mask, update)


@batch_norm_act.register_fake
def _(x, weight, bias, residual, running_mean, running_var, eps, relu, pack_relu_mask):
    stats_size = 0 if running_mean is not None else 2 * x.shape[1]
    mask_bytes = (_implementation(x).relu_mask_bytes(x, residual)
                  if relu and pack_relu_mask and x.numel() else 0)
    return (
        torch.empty_like(x),
        x.new_empty(stats_size, dtype=_stats_dtype(x)),
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
    grad_input, grad_residual, grad_weight, grad_bias = _backward_impl(
        _implementation(x), grad_out, x, relu_mask, weight, stats, eps, batch_stats, residual_grad)
    if grad_residual is None:
        grad_residual = x.new_empty(0)
    return grad_input, grad_residual, grad_weight, grad_bias


def _backward_impl(implementation, grad_out, x, relu_mask, weight, stats, eps, batch_stats,
                   residual_grad):
    """The backward op's body, which the eager path calls too."""
    if x.numel() == 0:  # nothing flowed through: empty input gradients, zero parameter ones
        zeros = torch.zeros(x.shape[1], dtype=_stats_dtype(x), device=x.device)
        grad_residual = torch.empty_like(grad_out, dtype=x.dtype) if residual_grad else None
        return torch.empty_like(x), grad_residual, zeros, zeros.clone()
    return implementation.backward(grad_out, x, relu_mask, weight, stats, eps, batch_stats,
                                   residual_grad)


@batch_norm_act_backward.register_fake
def _(grad_out, x, relu_mask, weight, stats, eps, batch_stats, residual_grad):
    channels = x.shape[1]
    grad_residual = torch.empty_like(grad_out, dtype=x.dtype) if residual_grad else x.new_empty(0)
    return (
        torch.empty_like(x),
        grad_residual,
        x.new_empty(channels, dtype=_stats_dtype(x)),
        x.new_empty(channels, dtype=_stats_dtype(x)),
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
    # (Autograd sets an op's context up only where it records the call: a backward may follow.)
    _save_for_backward(ctx, inputs, out, stats, relu_mask if relu_mask.numel() else None, None,
                       True)


def _save_for_backward(ctx, inputs, out, stats, relu_mask, implementation, gradient) -> None:
    """Saves what the backward reads. `implementation` is the eager path's, whose backward it
    calls directly; None for the custom op's, whose backward is the backward op. `gradient`:
    whether autograd records the call: else nothing will read what is saved, and nothing is."""
    if not gradient:
        return
    x, weight, bias, residual, running_mean, running_var, eps, relu = inputs[:8]
    batch_stats = running_mean is None
    if not batch_stats:
        # A copy: a later training forward updates the running statistics in place, which must
        # neither change this backward nor trip autograd's version check (nn.BatchNorm2d does not).
        stats = torch.cat((running_mean.detach(), running_var.detach()))
    ctx.save_for_backward(x, (out if relu_mask is None else relu_mask) if relu else None, weight,
                          stats)
    ctx.meta = (eps, relu, batch_stats, None if residual is None else residual.dtype,
                None if weight is None else weight.dtype, None if bias is None else bias.dtype,
                implementation)
    if relu:  # what the ReLU's decisions depend on, for a double backward (see _gradients)
        ctx.relu_operands = bias, residual if residual is not None and residual.requires_grad \
            else None


def _gradients(ctx, grad_out: torch.Tensor) -> tuple:
    """The gradients of x, weight, bias and residual: from the backward op, or in eager mode the
    implementation's backward itself. With `create_graph=True` (grad mode on in a backward) they
    are built from differentiable torch ops instead, so that they can be differentiated again, as
    nn.BatchNorm2d's can."""
    x, relu_mask, weight, stats = ctx.saved_tensors
    eps, relu, batch_stats, residual_dtype, weight_dtype, bias_dtype, implementation = ctx.meta
    residual_grad = residual_dtype is not None and relu and ctx.needs_input_grad[3]
    arguments = (grad_out, x, relu_mask, weight, stats, eps, batch_stats, residual_grad)
    if torch.is_grad_enabled():  # connected to bias and residual too, with derivative 0
        relu_operands = ctx.relu_operands if relu else (None, None)
        gradients = _torch_impl.differentiable_backward(*arguments, *relu_operands)
    elif implementation is None:
        gradients = batch_norm_act_backward(*arguments)
    else:
        gradients = _backward_impl(implementation, *arguments)
    grad_input, grad_residual, grad_weight, grad_bias = gradients
    if residual_dtype is not None and not relu:
        grad_residual = grad_out  # without ReLU the residual's gradient is grad_out itself
    elif not residual_grad:
        grad_residual = None
    return (grad_input, _as(grad_weight, weight_dtype), _as(grad_bias, bias_dtype),
            _as(grad_residual, residual_dtype))


def _as(gradient: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    """The gradient in its input's dtype (None where the input was None)."""
    if gradient is None or dtype is None:
        return None
    return gradient if gradient.dtype == dtype else gradient.to(dtype)


def _backward(ctx, grad_out, _grad_stats, _grad_mask):
    return (*_gradients(ctx, grad_out), None, None, None, None, None)


batch_norm_act.register_autograd(_backward, setup_context=_setup_context)


class _EagerBatchNormAct(torch.autograd.Function):
    """`batch_norm_act` with its autograd, minus the custom-op dispatch around it.

    In eager mode nothing needs the op to be one graph node, and its dispatch (schema binding,
    redispatch below autograd, the generated Function) is most of a layer's host time once the
    launch plans are cached; this Function calls the implementation directly, with the same
    context and gradients. Autograd sees only what it differentiates: the output alone (the
    statistics and the mask only go to the backward), and as inputs the four tensors with
    gradients, the rest in one tuple (running statistics, eps, relu, the running-stat update,
    whether autograd records the call, and the implementation, chosen once by the caller).
    Tracing and compilation keep the custom op (see `_is_eager`).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, residual, rest):
        # forward(ctx, ...) rather than a separate setup_context: apply() then binds no signature.
        running_mean, running_var, eps, relu, update, gradient, implementation = rest
        # The packed ReLU mask is worth writing only where a backward will read it.
        out, stats, relu_mask = _forward(implementation, x, weight, bias, residual, running_mean,
                                         running_var, eps, relu, relu and gradient, update)
        _save_for_backward(ctx, (x, weight, bias, residual, *rest), out, stats, relu_mask,
                           implementation, gradient)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        return (*_gradients(ctx, grad_out), None)


def _without_python_wrapper(function: type[torch.autograd.Function]):
    """`function.apply` minus `Function.apply`'s Python wrapper, which binds default arguments
    (the eager Function has none) and unwraps dead functorch wrappers (there are none outside
    functorch transforms, which `_is_eager` rules out) before calling the C++ apply that builds
    the graph node: that apply itself, bound to `function` (`function.apply` where a PyTorch has
    no such method). That saves a few microseconds a layer, where eager PyTorch's own ops
    set the budget."""
    c_apply = vars(torch._C._FunctionBase).get("apply")
    return function.apply if c_apply is None else c_apply.__get__(None, function)


_eager_apply = _without_python_wrapper(_EagerBatchNormAct)


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


def _gradient_will_be_taken(x: torch.Tensor, weight: torch.Tensor | None,
                            bias: torch.Tensor | None, residual: torch.Tensor | None,
                            eager: bool) -> bool:
    """Whether autograd will record this call: only then is a packed ReLU mask worth writing.
    (Never under the JIT tracer, whose check reruns the model with gradients off and would see
    another graph; its traces count FLOPs, they do not train. `eager` rules the tracer out.)"""
    return torch.is_grad_enabled() and (
        x.requires_grad
        or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad)
        or (residual is not None and residual.requires_grad)
    ) and (eager or not torch.jit.is_tracing())


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
    has the input's shape or broadcasts to it, as in `out += residual`.
    """
    eager = _is_eager(input)
    if _runs_inline(input, eager) or _exporting_to_onnx(eager):
        return _batch_norm_add_relu_inline(
            input, running_mean, running_var, weight, bias, training, momentum, eps, residual, relu
        )
    momentum = check_arguments(input, running_mean, running_var, weight, bias, training,
                               momentum, eps)
    residual = checked_residual(input, residual)
    gradient = _gradient_will_be_taken(input, weight, bias, residual, eager)
    pack_relu_mask = relu and gradient
    if not training:
        if eager:
            return _eager_apply(input, weight, bias, residual,
                                (running_mean, running_var, eps, relu, None, gradient,
                                 _implementation(input)))
        return batch_norm_act(input, weight, bias, residual, running_mean, running_var, eps, relu,
                              pack_relu_mask)[0]
    count = input.numel() // max(input.shape[1], 1)  # no channels: an empty output
    if eager:  # the update rides along with the forward
        update = None
        if running_mean is not None and count > 0:
            update = RunningUpdate(running_mean, running_var, momentum, count / (count - 1))
        return _eager_apply(input, weight, bias, residual,
                            (None, None, eps, relu, update, gradient, _implementation(input)))
    out, stats, _ = batch_norm_act(input, weight, bias, residual, None, None, eps, relu,
                                   pack_relu_mask)
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
    checked_residual(input, residual)  # broadcasting is out.add_'s own
    out = torch.nn.functional.batch_norm(
        input, running_mean, running_var, weight, bias, training, momentum, eps
    )
    if residual is not None:  # out of place under vmap, where the residual may be batched
        out = (out + residual).to(out.dtype) if torch._C._are_functorch_transforms_active() \
            else out.add_(residual)
    return out.relu_() if relu else out
