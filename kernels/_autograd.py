"""What the fused op's two autograd paths share: the custom op's registered autograd (traced and
compiled code, batch_norm.py) and the eager path's Function (_eager.py). The forward's and
backward's bodies around an implementation (empty batches answered here, once), what a forward
saves for its backward, and the gradients a backward returns, double backward included.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from . import _torch_impl
from ._contract import Implementation, RunningUpdate


class SavedMeta(NamedTuple):
    """What a backward needs to know of its forward besides the saved tensors and eps: fixed by
    the call's signature (the eager path keeps one per signature, _eager.py)."""

    relu: bool
    batch_stats: bool  # normalized with the batch's statistics (training), else the running ones
    residual_dtype: torch.dtype | None  # None: no residual
    weight_dtype: torch.dtype | None
    bias_dtype: torch.dtype | None
    # (grad_out, x, relu_mask, weight, stats, eps, batch_stats, residual_grad) -> the gradients of
    # input, residual, weight and bias: the backward op, or the eager call's (_eager.py)
    backward: Callable[..., tuple]


def stats_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def gradient_will_be_taken(x: torch.Tensor, weight: torch.Tensor | None,
                           bias: torch.Tensor | None, residual: torch.Tensor | None) -> bool:
    """Whether autograd will record this call: only then is a packed ReLU mask worth writing,
    and anything worth saving."""
    return torch.is_grad_enabled() and (
        x.requires_grad
        or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad)
        or (residual is not None and residual.requires_grad))


def forward_body(implementation: Implementation, x, weight, bias, residual, running_mean,
                 running_var, eps, relu, pack_relu_mask, update: RunningUpdate | None = None):
    """The forward op's body, which the eager path calls too (with the running-stat `update`
    folded in)."""
    if x.numel() == 0:  # an empty batch: F.batch_norm's results, whatever the implementation
        stats = None if running_mean is not None else torch.full(
            (2 * x.shape[1],), float("nan"), dtype=stats_dtype(x), device=x.device)
        return torch.empty_like(x), stats, None
    return implementation.forward(x, weight, bias, residual, running_mean, running_var, eps, relu,
                                  pack_relu_mask, update)


def backward_body(implementation: Implementation, grad_out, x, relu_mask, weight, stats, eps,
                  batch_stats, residual_grad):
    """The backward op's body, which the eager path calls too."""
    if x.numel() == 0:  # nothing flowed through: empty input gradients, zero parameter ones
        zeros = torch.zeros(x.shape[1], dtype=stats_dtype(x), device=x.device)
        grad_residual = torch.empty_like(grad_out, dtype=x.dtype) if residual_grad else None
        return torch.empty_like(x), grad_residual, zeros, zeros.clone()
    return implementation.backward(grad_out, x, relu_mask, weight, stats, eps, batch_stats,
                                   residual_grad)


def save_for_backward(ctx, meta: SavedMeta, eps: float, x, weight, bias, residual, running_mean,
                      running_var, out, stats, relu_mask) -> None:
    """Saves what the backward reads (called only where autograd records the call)."""
    if not meta.batch_stats:
        # A copy: a later training forward updates the running statistics in place, which must
        # neither change this backward nor trip autograd's version check (nn.BatchNorm2d does not).
        stats = torch.cat((running_mean.detach(), running_var.detach()))
    relu = meta.relu
    ctx.save_for_backward(x, (out if relu_mask is None else relu_mask) if relu else None, weight,
                          stats)
    ctx.meta, ctx.eps = meta, eps
    if relu:  # what the ReLU's decisions depend on, for a double backward (see `gradients`)
        ctx.relu_operands = bias, residual if residual is not None and residual.requires_grad \
            else None


def gradients(ctx, grad_out: torch.Tensor) -> tuple:
    """The gradients of x, weight, bias and residual, from `ctx.meta.backward`. With
    `create_graph=True` (grad mode on in a backward) they are built from differentiable torch ops
    instead, so that they can be differentiated again, as nn.BatchNorm2d's can."""
    x, relu_mask, weight, stats = ctx.saved_tensors
    meta: SavedMeta = ctx.meta
    # The residual's gradient (the masked grad_out) is computed with a ReLU, where the residual
    # needs one; without a ReLU it is grad_out itself.
    wanted = meta.residual_dtype is not None and meta.relu and ctx.needs_input_grad[3]
    arguments = (grad_out, x, relu_mask, weight, stats, ctx.eps, meta.batch_stats, wanted)
    if torch.is_grad_enabled():  # connected to bias and residual too, with derivative 0
        relu_operands = ctx.relu_operands if meta.relu else (None, None)
        computed = _torch_impl.differentiable_backward(*arguments, *relu_operands)
    else:
        computed = meta.backward(*arguments)
    return _returned_gradients(meta, computed, wanted, grad_out)


def _returned_gradients(meta: SavedMeta, computed: tuple, residual_grad: bool,
                        grad_out: torch.Tensor) -> tuple:
    """An implementation's (input, residual, weight, bias) gradients as autograd takes them: in
    the order of the inputs (x, weight, bias, residual), each in its input's dtype, None for an
    input that was None or needs none."""
    grad_input, grad_residual, grad_weight, grad_bias = computed
    if meta.residual_dtype is not None and not meta.relu:
        grad_residual = grad_out  # without ReLU the residual's gradient is grad_out itself
    elif not residual_grad:
        grad_residual = None
    return (grad_input, _as(grad_weight, meta.weight_dtype), _as(grad_bias, meta.bias_dtype),
            _as(grad_residual, meta.residual_dtype))


def _as(gradient: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    """The gradient in its input's dtype (None where the input was None)."""
    if gradient is None or dtype is None:
        return None
    return gradient if gradient.dtype == dtype else gradient.to(dtype)


def dtype_of(t: torch.Tensor | None) -> torch.dtype | None:
    return None if t is None else t.dtype
