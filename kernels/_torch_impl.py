"""The PyTorch path of the fused BatchNorm: the same contract as the Triton one, on ATen's kernels.

It runs wherever Triton does not (CPU tensors without the interpreter, float64 for gradcheck). The
BatchNorm itself is ATen's `native_batch_norm` and `native_batch_norm_backward`, which are fast on
CPU; the residual add, ReLU and ReLU mask are a few elementwise ops around them. Low-precision
activations are computed in float32 and rounded once at the end, like the Triton kernels, so both
paths give the same numbers.
"""

from __future__ import annotations

import torch

aten = torch.ops.aten


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32


def _in_layout_of(result: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`result` with the dtype and strides of `like` (the custom ops promise both)."""
    if result.dtype == like.dtype and result.stride() == like.stride():
        return result
    converted = torch.empty_like(like)
    converted.copy_(result)
    return converted


def forward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    eps: float,
    relu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """See `batch_norm_act` in batch_norm.py for the contract."""
    acc = _compute_dtype(x)
    xc = x.to(acc)
    channels = x.shape[1]
    weight = weight.to(acc) if weight is not None else None
    bias = bias.to(acc) if bias is not None else None
    if running_mean is None:
        # ATen returns invstd, not the variance; with momentum 1 it writes the batch mean and the
        # unbiased variance into these scratch "running" buffers, which gives the variance exactly.
        batch_mean = torch.zeros(channels, dtype=acc, device=x.device)
        unbiased_var = torch.ones(channels, dtype=acc, device=x.device)
        y, _, _ = aten.native_batch_norm(xc, weight, bias, batch_mean, unbiased_var, True, 1.0, eps)
        count = x.numel() // channels
        saved_mean, saved_var = batch_mean, unbiased_var * ((count - 1) / count)
    else:
        y, _, _ = aten.native_batch_norm(
            xc, weight, bias, running_mean.to(acc), running_var.to(acc), False, 0.0, eps
        )
        saved_mean, saved_var = x.new_empty(0, dtype=acc), x.new_empty(0, dtype=acc)
    if residual is not None:
        y = y + residual.to(acc)
    if relu:
        y = torch.relu(y)
    return _in_layout_of(y, x), saved_mean, saved_var


def backward(
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
    """See `batch_norm_act_backward` in batch_norm.py for the contract."""
    acc = _compute_dtype(x)
    gz = grad_out.to(acc)
    if out is not None:  # ReLU: the gradient flows where the output is positive
        gz = gz.masked_fill(out <= 0, 0)
    mean, var = mean.to(acc), var.to(acc)
    invstd = torch.rsqrt(var + eps)
    weight = weight.to(acc) if weight is not None else None
    if batch_stats:
        grad_in, grad_weight, grad_bias = aten.native_batch_norm_backward(
            gz, x.to(acc), weight, None, None, mean, invstd, True, eps, [True, True, True]
        )
    else:
        grad_in, grad_weight, grad_bias = aten.native_batch_norm_backward(
            gz, x.to(acc), weight, mean, var, None, None, False, eps, [True, True, True]
        )
    grad_residual = _in_layout_of(gz, grad_out) if residual_grad else x.new_empty(0)
    return _in_layout_of(grad_in, x), grad_residual, grad_weight, grad_bias
