"""The contract both implementations of the fused ops follow (_triton_impl and _torch_impl).

batch_norm.py registers the custom ops and backends.py picks an implementation per call; each
implementation is a module with these four functions. Shapes: x is (N, C, *spatial), viewed as
(N, C, L) with L the product of the spatial sizes; statistics are per channel, in float32 (float64
for float64), and travel as one `stats` tensor: the C means, then the C variances (an
implementation may keep scratch after them). One tensor rather than two: on the eager path each
allocation is a noticeable share of a layer's host time.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch


class RunningUpdate(NamedTuple):
    """A training forward's update of the running statistics, done in place with the batch's:
    `running = (1 - momentum) * running + momentum * batch`, the variance times `unbias`
    (count / (count - 1)) first."""

    running_mean: torch.Tensor
    running_var: torch.Tensor
    momentum: float
    unbias: float


class Implementation(Protocol):
    def forward(
        self,
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
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """`(out, stats, relu_mask)`. `out = (x - mean) * weight / sqrt(var + eps) + bias`, then
        `+ residual`, then ReLU when `relu`; the sum is taken in float32 and rounded once to x's
        dtype, and `out` has x's strides (as `torch.empty_like(x)`). Without running statistics
        (training) mean and var are the batch's (biased variance) and `stats` holds them for
        backward (at least 2C values: the means, then the variances); with them (eval) they
        normalize and `stats` is None. N is never 0 here (batch_norm.py answers empty batches
        itself). NaN and inf propagate as through F.batch_norm + add + relu.
        With `update` (training only) the running statistics are updated from the batch's, as
        `update_running_stats` would; the eager path passes it, the custom op cannot (an op with
        an autograd formula may not mutate its inputs).

        `relu_mask` is the packed ReLU mask, for backward in place of `out`: with `pack_relu_mask`
        and `relu`, `relu_mask_bytes(x, residual)` bytes (uint8), bit j of byte k set where the
        output at element 8k + j of x, counted in memory from x's first element, is positive or
        NaN (see `_torch_impl.unpack_relu_mask`); None where that is 0 or not asked for."""
        ...

    def relu_mask_bytes(self, x: torch.Tensor, residual: torch.Tensor | None) -> int:
        """Size of the packed ReLU mask `forward` writes for these tensors when asked for one:
        x.numel() / 8, or 0 where it writes none (then backward reads the output). From shapes,
        strides and dtypes alone, so that the fake kernel gives the same answer."""
        ...

    def backward(
        self,
        grad_out: torch.Tensor,
        x: torch.Tensor,
        relu_mask: torch.Tensor | None,
        weight: torch.Tensor | None,
        stats: torch.Tensor,
        eps: float,
        batch_stats: bool,
        residual_grad: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """Gradients of x, residual, weight and bias. `relu_mask` is None without ReLU; with it,
        the forward's packed ReLU mask (uint8) where it wrote one, else its output (the gradient
        passes where out > 0 or is NaN, as threshold_backward lets it). `stats` holds the C means
        then the C variances that normalized x. With `batch_stats` they were the batch's and x's
        gradient includes their derivative; else they were constants. The residual's gradient
        (the masked grad_out, in x's dtype with grad_out's strides) is computed only when
        `residual_grad`, else None is returned; grad_input has x's strides."""
        ...

    def prepare_forward(
        self,
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
    ) -> object | None:
        """What `forward` works out from these arguments' signature (shapes, strides, dtypes,
        devices, alignment, which are None, the flags; not the tensors' values or addresses, nor
        eps's or the update's values), for `run_prepared_forward` to run later calls of that
        signature with; None where such calls go through `forward` (the eager path keeps one per
        signature, _eager.py). Never called for an empty batch, nor for eps <= 0."""
        ...

    def run_prepared_forward(
        self,
        prepared: object,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        residual: torch.Tensor | None,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        eps: float,
        momentum: float,
        unbias: float,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """`forward` of a call whose signature `prepared` was made for: in training the running
        statistics given are updated (momentum, unbias) and may be None; in eval they normalize;
        `pack_relu_mask` and `relu` as prepared."""
        ...

    def prepare_backward(
        self,
        grad_out: torch.Tensor,
        x: torch.Tensor,
        relu_mask: torch.Tensor | None,
        weight: torch.Tensor | None,
        stats: torch.Tensor,
        batch_stats: bool,
        residual_grad: bool,
    ) -> object | None:
        """As `prepare_forward`, for `backward` (eps aside)."""
        ...

    def run_prepared_backward(
        self,
        prepared: object,
        grad_out: torch.Tensor,
        x: torch.Tensor,
        relu_mask: torch.Tensor | None,
        weight: torch.Tensor | None,
        stats: torch.Tensor,
        eps: float,
        residual_grad: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """`backward` of a call whose signature `prepared` was made for."""
        ...

    def update_running_stats(
        self,
        running_mean: torch.Tensor,
        running_var: torch.Tensor,
        stats: torch.Tensor,
        momentum: float,
        unbias: float,
    ) -> None:
        """In place: running = (1 - momentum) * running + momentum * batch statistic (`stats`:
        the means, then the variances), the variance multiplied by `unbias` (count / (count - 1))
        first."""
        ...
