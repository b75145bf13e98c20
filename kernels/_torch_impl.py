"""The PyTorch path of the fused BatchNorm: the same contract as the Triton one, on ATen's kernels.

It is the op's reference and runs where the op must stay one node but Triton cannot run (CPU under
`torch.compile` or tracing, float64 for gradcheck). The forward computes what the Triton kernels
compute, in the same order: statistics taken around a first value (a constant channel's mean is
exact), `(x - mean) * scale + bias` (no cancellation when |mean| >> std), the residual added and
the ReLU applied in float32, one rounding at the end; so both paths give the same numbers within
float32 rounding. The backward is ATen's `native_batch_norm_backward` around the ReLU mask.
"""

from __future__ import annotations

from typing import NoReturn

import torch

from ._contract import RunningUpdate
from ._layout import channel_view_shape, reduce_dims

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
    pack_relu_mask: bool = False,
    update: RunningUpdate | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, None]:
    """`Implementation.forward` in _contract.py; it keeps no packed mask (the backward reads
    the output), which costs nothing on a CPU."""
    acc = _compute_dtype(x)
    xc = x.to(acc)
    stats = None
    if running_mean is None:
        mean, var = _batch_stats(xc)
        stats = torch.cat((mean, var))
        if update is not None:
            update_running_stats(*update[:2], stats, *update[2:])
    else:
        mean, var = running_mean.to(acc), running_var.to(acc)
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.to(acc)
    shift = bias.to(acc) if bias is not None else None
    if eps == 0:  # an infinite scale where var is 0: the Triton kernels' _infinite_scale_terms
        shift = torch.zeros_like(mean) if shift is None else shift
        infinite = scale.isinf()
        mean, shift = mean.masked_fill(infinite, 0), torch.where(infinite, shift - mean * scale, shift)
    view = channel_view_shape(x)
    y = (xc - mean.view(view)) * scale.view(view)
    if shift is not None:
        y = y + shift.view(view)
    if residual is not None:
        y = y + residual.to(acc)
    if relu:
        y = torch.relu(y)
    return _in_layout_of(y, x), stats, None


def prepare_forward(*signature) -> None:
    """`Implementation.prepare_forward`: nothing to work out ahead, every call runs `forward`."""
    return None


def prepare_backward(*signature) -> None:
    """`Implementation.prepare_backward`: every call runs `backward`."""
    return None


def run_prepared_forward(*arguments) -> NoReturn:
    raise AssertionError("nothing is prepared for the PyTorch implementation")


run_prepared_backward = run_prepared_forward


def relu_mask_bytes(x: torch.Tensor, residual: torch.Tensor | None) -> int:
    """`Implementation.relu_mask_bytes` in _contract.py: this path writes no packed mask."""
    return 0


def unpack_relu_mask(packed: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The packed ReLU mask of a forward of x as a bool tensor shaped like x: bit j of byte k
    is the element 8k + j of x in memory order, counted from x's first element (x dense, so
    offsets run 0 to numel - 1)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = packed.unsqueeze(1).bitwise_right_shift(shifts).bitwise_and_(1).bool().flatten()
    return bits.as_strided(x.shape, x.stride())


def _gradient_passes(relu_mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Where threshold_backward lets the gradient through: a packed mask's set bits, or where
    the output is positive or NaN."""
    if relu_mask.dtype == torch.uint8:
        return unpack_relu_mask(relu_mask, x)
    return ~(relu_mask <= 0)


def _batch_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance, summed around each channel's first value (when
    finite), as the Triton kernels do: a constant channel's mean is exact, an inf gives an inf mean
    and a NaN variance (what a sum over the channel gives), and the variance is a second pass.
    Below float64, the sums are float64's, as ATen's CPU kernel's are: values near the float
    range (3e38) neither overflow an offset nor the sum, and tiny ones lose nothing to
    underflow; the statistics are then rounded to the input's compute dtype."""
    dims = reduce_dims(x)
    view = channel_view_shape(x)
    wide = x if x.dtype == torch.float64 else x.double()
    first = wide[0].reshape(x.shape[1], -1)[:, 0]  # sample 0, first position, per channel
    shift = torch.where(first.isfinite(), first, 0.0)
    mean = shift + (wide - shift.view(view)).mean(dims)
    var = (wide - mean.view(view)).square().mean(dims)
    return mean.to(x.dtype), var.to(x.dtype)


def backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    relu_mask: torch.Tensor | None,
    weight: torch.Tensor | None,
    stats: torch.Tensor,
    eps: float,
    batch_stats: bool,
    residual_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """`Implementation.backward` in _contract.py."""
    acc = _compute_dtype(x)
    gz = grad_out.to(acc)
    if relu_mask is not None:  # ReLU: the gradient flows where the output is positive
        gz = gz.masked_fill(~_gradient_passes(relu_mask, x), 0)
    mean, var = _mean_and_var(stats, x.shape[1], acc)
    invstd = torch.rsqrt(var + eps)
    # Dense: ATen's CPU backward misreads a strided weight beside a channels_last input (the
    # input's gradient 3.5 off in tests/test_eager_calls.py, PyTorch 2.13).
    weight = weight.to(acc).contiguous() if weight is not None else None
    # One layout for both: ATen's CPU backward misreads a gradient whose layout differs from the
    # input's (an NCHW gradient for a channels_last input of width 1 gave wrong gradients).
    layout = _shared_layout(x)
    gz, wide = gz.contiguous(memory_format=layout), x.to(acc).contiguous(memory_format=layout)
    if batch_stats:
        grad_in, grad_weight, grad_bias = aten.native_batch_norm_backward(
            gz, wide, weight, None, None, mean, invstd, True, eps, [True, True, True]
        )
    else:
        grad_in, grad_weight, grad_bias = aten.native_batch_norm_backward(
            gz, wide, weight, mean, var, None, None, False, eps, [True, True, True]
        )
    grad_residual = _in_layout_of(gz, grad_out) if residual_grad else None
    return _in_layout_of(grad_in, x), grad_residual, grad_weight, grad_bias


def _shared_layout(x: torch.Tensor) -> torch.memory_format:
    """The layout that the backward gives its input and gradient: channels_last where x is
    (4-d), else the contiguous one."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
            and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _mean_and_var(stats: torch.Tensor, channels: int,
                  dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The means and the variances a `stats` tensor holds (see _contract.py), in `dtype`."""
    mean, var = stats[:channels], stats[channels:2 * channels]
    return (mean, var) if dtype is None else (mean.to(dtype), var.to(dtype))


def update_running_stats(running_mean: torch.Tensor, running_var: torch.Tensor,
                         stats: torch.Tensor, momentum: float, unbias: float) -> None:
    """`Implementation.update_running_stats` in _contract.py."""
    mean, var = _mean_and_var(stats, running_mean.numel())
    # Blended in the wider of the statistics' dtypes and rounded once into the running one's, as
    # ATen and the Triton kernels do: 16-bit running statistics blended in their own dtype
    # overflowed (a batch variance above 65504 in float16) and were rounded twice (an audit).
    # (In float32 the same ops, the same bits.)
    for running, batch in ((running_mean, mean), (running_var, var * unbias)):
        wide = torch.promote_types(running.dtype, batch.dtype)
        running.copy_(running.to(wide).mul(1 - momentum).add_(batch.to(wide), alpha=momentum))


def differentiable_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    relu_mask: torch.Tensor | None,
    weight: torch.Tensor | None,
    stats: torch.Tensor,
    eps: float,
    batch_stats: bool,
    residual_grad: bool,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """`backward` written in differentiable torch ops, for double backward (`create_graph=True`),
    whichever implementation ran the forward.

    With batch statistics, mean and variance are taken again from x here, so that the second
    derivative sees how they depend on x (the saved ones are constants to autograd). The ReLU
    mask is a constant, as in threshold_backward's own derivative; where there is one, the
    gradients still depend on the ReLU's input (x's normalization, `bias`, `residual`) with
    derivative 0, as threshold_backward's do on its output argument: nn.BatchNorm2d + ReLU's
    gradients are connected to every operand, and so are these.
    """
    acc = _compute_dtype(x)
    gz = grad_out.to(acc)
    if relu_mask is not None:
        gz = gz.masked_fill(~_gradient_passes(relu_mask, x), 0)
    xc = x.to(acc)
    dims = reduce_dims(x)
    view = channel_view_shape(x)
    if batch_stats:
        mean = xc.mean(dims)
        var = xc.var(dims, unbiased=False)
    else:
        mean, var = _mean_and_var(stats, x.shape[1])
    invstd = torch.rsqrt(var.to(acc) + eps)
    x_hat = (xc - mean.to(acc).view(view)) * invstd.view(view)
    if relu_mask is not None:
        gz = gz + _zero_through_relu_input(x_hat, view, weight, bias, residual)
    elif not batch_stats:
        # In eval without a ReLU the input gradient (gz * scale) does not depend on x at all, but
        # nn.BatchNorm2d's is still connected to x: differentiating it again gives None or zeros
        # there, where an unconnected one raises (an audit: affine=False in eval).
        gz = gz + torch.ops.aten.threshold_backward(torch.zeros_like(x_hat), x_hat, 0)
    grad_bias = gz.sum(dims)
    grad_weight = (gz * x_hat).sum(dims)
    scale = invstd if weight is None else invstd * weight.to(acc)
    if batch_stats:
        count = x.numel() // x.shape[1]
        gz_centred = gz - (grad_bias / count).view(view) - x_hat * (grad_weight / count).view(view)
        grad_in = gz_centred * scale.view(view)
    else:
        grad_in = gz * scale.view(view)
    grad_residual = gz.to(x.dtype) if residual_grad else None
    return grad_in.to(x.dtype), grad_residual, grad_weight, grad_bias


def _zero_through_relu_input(x_hat: torch.Tensor, view: list[int], weight: torch.Tensor | None,
                             bias: torch.Tensor | None,
                             residual: torch.Tensor | None) -> torch.Tensor:
    """Zeros that depend on the ReLU's input (derivative 0): threshold_backward of zeros."""
    relu_input = x_hat if weight is None else x_hat * weight.to(x_hat.dtype).view(view)
    if bias is not None:
        relu_input = relu_input + bias.to(x_hat.dtype).view(view)
    if residual is not None:
        relu_input = relu_input + residual.to(x_hat.dtype)
    return torch.ops.aten.threshold_backward(torch.zeros_like(relu_input), relu_input, 0)
