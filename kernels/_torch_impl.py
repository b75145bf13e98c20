"""The PyTorch path of the fused BatchNorm: the same math and the same contract as the Triton one.

It runs wherever Triton does not (CPU tensors without the interpreter, float64 for gradcheck) and
doubles as a readable statement of what the kernels compute. Statistics are kept in float32 (float64
for float64 inputs) whatever the activation dtype, as PyTorch's own BatchNorm does.
"""

from __future__ import annotations

import torch

from ._layout import channel_view_shape, reduce_dims


def _accumulation_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


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
    acc = _accumulation_dtype(x)
    shape = channel_view_shape(x)
    xf = x.to(acc)
    if running_mean is None:
        var, mean = torch.var_mean(xf, dim=reduce_dims(x), correction=0)
        saved_mean, saved_var = mean, var
    else:
        mean, var = running_mean.to(acc), running_var.to(acc)
        saved_mean = saved_var = x.new_empty(0, dtype=acc)
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.to(acc)
    y = (xf - mean.view(shape)) * scale.view(shape)
    if bias is not None:
        y = y + bias.to(acc).view(shape)
    if residual is not None:
        y = y + residual.to(acc)
    if relu:
        y = torch.relu(y)
    out = torch.empty_like(x)
    out.copy_(y)
    return out, saved_mean, saved_var


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
    acc = _accumulation_dtype(x)
    shape = channel_view_shape(x)
    dims = reduce_dims(x)
    gz = grad_out.to(acc)
    if out is not None:  # ReLU: the gradient flows where the output is positive
        gz = gz.masked_fill(out <= 0, 0)
    invstd = torch.rsqrt(var.to(acc) + eps)
    x_centered = x.to(acc) - mean.to(acc).view(shape)
    sum_gz = gz.sum(dims)
    sum_gz_xc = (gz * x_centered).sum(dims)
    scale = invstd if weight is None else invstd * weight.to(acc)
    if batch_stats:
        count = x.numel() // x.shape[1]
        grad_in = (
            gz
            - (sum_gz / count).view(shape)
            - x_centered * (invstd * invstd * sum_gz_xc / count).view(shape)
        ) * scale.view(shape)
    else:
        grad_in = gz * scale.view(shape)
    grad_input = torch.empty_like(x)
    grad_input.copy_(grad_in)
    if residual_grad:
        grad_residual = torch.empty_like(grad_out, dtype=x.dtype)
        grad_residual.copy_(gz)
    else:
        grad_residual = x.new_empty(0)
    return grad_input, grad_residual, sum_gz_xc * invstd, sum_gz
