"""Parameters and FLOPs of a model, counted with fvcore, fused ops included.

fvcore traces the model with the JIT tracer and counts each operator with a handle; one
multiply-add is one FLOP (the convention of the ResNet paper's "FLOPs" column). Its defaults leave
a few operators of residual networks uncounted, so `profile` adds handles for them:

- `resnet_ablate::batch_norm_act` (the fused BN [+ residual] [+ ReLU]; the JIT tracer names it
  exactly so): counted as fvcore counts the unfused `aten::batch_norm` + `aten::add_` + `aten::relu_`
  it replaces, so a fused and an unfused model count the same.
- `aten::add` / `aten::add_` (the residual add): one FLOP per output element, fvcore's own rule for
  elementwise ops (as for pooling and upsampling).
- `aten::pad` (option A's zero channels): zero, data movement like fvcore's ignored
  `aten::constant_pad_nd`.
- `aten::max_pool2d`: zero, like ReLU and clamp in fvcore's ignore list (comparisons, no
  multiply-adds).

Whatever is still uncounted is listed in `ModelProfile.unsupported`, never silently dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from fvcore.nn import FlopCountAnalysis
from fvcore.nn.jit_handles import batchnorm_flop_jit, elementwise_flop_counter, get_shape
from torch import nn

FUSED_OP = "resnet_ablate::batch_norm_act"

CONVENTION = (
    "fvcore, per sample, inference (eval mode): 1 multiply-add = 1 FLOP; BatchNorm 2 per element "
    "(affine) or 1; residual add 1 per element; ReLU and max-pool 0; adaptive average pool 1 per "
    "input element; the fused BN+add+ReLU op counts as its unfused parts"
)


def _prod(shape: Sequence[int] | None) -> int:
    total = 1
    for size in shape or ():
        total *= size
    return total


def _fused_batch_norm_act_flops(inputs: list[Any], outputs: list[Any]) -> int:
    """fvcore's count for batch_norm, plus the residual add (ReLU counts zero, as in fvcore)."""
    x, weight, _bias, residual, running_mean = inputs[:5]
    numel = _prod(get_shape(x))
    has_affine = get_shape(weight) is not None
    # The op normalizes with batch statistics exactly when it is given no running statistics.
    training = get_shape(running_mean) is None
    if training:
        bn = numel * (5 if has_affine else 4)  # fvcore's norm_flop_counter
    else:
        bn = numel * (2 if has_affine else 1)  # fvcore's batchnorm_flop_jit, eval branch
    add = numel if get_shape(residual) is not None else 0
    return bn + add


def _zero_flops(inputs: list[Any], outputs: list[Any]) -> int:
    return 0


FLOP_HANDLES = {
    FUSED_OP: _fused_batch_norm_act_flops,
    "aten::batch_norm": batchnorm_flop_jit,
    "aten::add": elementwise_flop_counter(0, 1),
    "aten::add_": elementwise_flop_counter(0, 1),
    "aten::max_pool2d": _zero_flops,
    # Option A's zero padding: data movement, like aten::constant_pad_nd in fvcore's ignore list.
    "aten::pad": _zero_flops,
}


@dataclass(frozen=True)
class ModelProfile:
    """What `profile` counted. FLOPs are per sample; see `convention`."""

    input_shape: tuple[int, ...]
    params: int
    trainable_params: int
    flops: int
    flops_by_operator: tuple[tuple[str, int], ...]
    unsupported: tuple[tuple[str, int], ...]
    convention: str = CONVENTION

    @property
    def gflops(self) -> float:
        return self.flops / 1e9

    @property
    def mparams(self) -> float:
        return self.params / 1e6

    def __str__(self) -> str:
        missing = f", uncounted ops: {dict(self.unsupported)}" if self.unsupported else ""
        return f"{self.mparams:.2f}M params, {self.gflops:.3g} GFLOPs for input {list(self.input_shape)}{missing}"


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Parameters of `model`, each shared tensor counted once."""
    seen: dict[int, int] = {}
    for p in model.parameters():
        if not trainable_only or p.requires_grad:
            seen[id(p)] = p.numel()
    return sum(seen.values())


def profile(model: nn.Module, input_shape: Sequence[int]) -> ModelProfile:
    """Parameters and FLOPs of `model` on one sample of `input_shape` (no batch dimension).

    E.g. `profile(resnet50(), (3, 224, 224))`. The model is traced in eval mode (inference FLOPs,
    as the paper counts them) on a zero input of its parameters' device and dtype, then put back
    in the mode it was in.
    """
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s < 1 for s in shape):
        raise ValueError(
            f"input_shape must be the positive sizes of one sample, e.g. (3, 32, 32); got {list(input_shape)}"
        )
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    example = torch.zeros((1, *shape), device=device, dtype=dtype)

    was_training = model.training
    model.eval()
    try:
        analysis = FlopCountAnalysis(model, (example,))
        analysis.set_op_handle(**FLOP_HANDLES)
        # Reported in the result instead of logged, so callers decide what to do with them.
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        analysis.tracer_warnings("none")
        with torch.no_grad():
            total = int(analysis.total())
            by_operator = tuple(sorted((op, int(n)) for op, n in analysis.by_operator().items()))
            unsupported = tuple(sorted((op, int(n)) for op, n in analysis.unsupported_ops().items()))
    finally:
        model.train(was_training)
    return ModelProfile(
        input_shape=shape,
        params=count_parameters(model),
        trainable_params=count_parameters(model, trainable_only=True),
        flops=total,
        flops_by_operator=by_operator,
        unsupported=unsupported,
    )
