"""`FusedBatchNorm2d`: a drop-in `nn.BatchNorm2d` whose forward also adds a residual and applies ReLU."""

from __future__ import annotations

import torch
from torch import nn

from .batch_norm import fused_batch_norm


class FusedBatchNorm2d(nn.BatchNorm2d):
    """`nn.BatchNorm2d` + optional residual add + optional ReLU in one fused op.

    Parameters, buffers and state_dict are exactly `nn.BatchNorm2d`'s, so its checkpoints load;
    `relu` is a constructor choice, not state. `forward(x, residual=None)` returns
    `relu(bn(x) + residual)` (ReLU only when `relu=True`).
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        relu: bool = True,
        bias: bool = True,
    ) -> None:
        # nn.BatchNorm2d's arguments in its order, so that positional calls mean the same;
        # `relu` is keyword-only (it took `device`'s place, where None turned the ReLU off).
        # nn.BatchNorm2d takes `bias` only from PyTorch 2.12 on: the bias is dropped here, on
        # every version, as its bias=False leaves it (a registered parameter that is None).
        if not isinstance(relu, bool):  # ("no" was taken as true: an audit)
            raise TypeError(f"FusedBatchNorm2d(): argument 'relu' must be bool, not "
                            f"{type(relu).__name__}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        if not bias:
            self.bias = None
        self.relu = relu

    def reset_parameters(self) -> None:
        """nn.BatchNorm2d's, for a module without a bias too (before PyTorch 2.12 its
        reset_parameters assumes that an affine module has one)."""
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None, *,
                relu: bool | None = None) -> torch.Tensor:
        """BatchNorm, then `+ residual` where given, then ReLU where `relu` (default: the
        module's own `relu`)."""
        if isinstance(input, torch.fx.Proxy):
            raise TypeError(_SYMBOLIC_TRACING)
        self._check_input_dim(input)
        # The momentum and batch-statistics choices below are nn.BatchNorm2d's, step for step.
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                momentum = 1.0 / float(self.num_batches_tracked)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        return fused_batch_norm(
            input,
            self.running_mean if track else None,
            self.running_var if track else None,
            self.weight,
            self.bias,
            use_batch_stats,
            momentum,
            self.eps,
            residual=residual,
            relu=self.relu if relu is None else relu,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, relu={self.relu}"


# torch.fx's symbolic tracing would trace into the forward, whose checks and running-stat update
# need real tensors: a leaf module it can call, as it calls nn.BatchNorm2d.
_SYMBOLIC_TRACING = (
    "FusedBatchNorm2d cannot be traced into by torch.fx's symbolic tracing: trace it as a leaf "
    "module (a Tracer whose is_leaf_module is true for it; torchvision's create_feature_extractor "
    "takes tracer_kwargs={'leaf_modules': [FusedBatchNorm2d]}), or call resnet_ablate.unfuse(model) "
    "first")
