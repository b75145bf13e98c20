"""Launch plans: a call's launches as its signature (the geometry's, plus its optional tensors and
flags) fixes them, worked out on the signature's first call and kept for the process. Later calls
allocate their outputs and one buffer per reduction, and launch the templates with them and their
scalars (_triton_impl.py). A plan's key holds every tensor's dtype and whether all are 16-byte
aligned: a template's launches share one binary (_triton_launch.py). Which launches a plan holds,
and the bytes each moves: _triton_impl.py's docstring.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from ._contract import RunningUpdate
from ._layout import aligned
from ._signature_cache import SignatureCache
from ._triton_geometry import (
    STATISTICS_TILES_PER_STEP, Geometry, call_geometry, finalize_slots, is_packed_mask,
    tensor_signature,
)
from ._triton_launch import LaunchTemplate, through_jit_only
from ._triton_rows import (
    _backward_elementwise_kernel, _backward_reduce_kernel, _batch_stats_kernel, _forward_kernel,
)
from ._triton_sizing import backward_reduction, statistics_reduction
from ._triton_spans import (
    _span_backward_elementwise_kernel, _span_backward_reduce_kernel, _span_batch_stats_kernel,
    _span_forward_kernel,
)
from ._triton_tiles import MASK_NONE


class ForwardPlan(NamedTuple):
    geometry: Geometry
    statistics: LaunchTemplate | None  # the statistics pass (training only)
    normalize: LaunchTemplate
    counters: dict[int, torch.Tensor]  # the statistics pass's, per stream
    stats_size: int  # fp32 values: mean and var (2C), then four planes of [splits, C] slots
    mask_bytes: int  # of the packed ReLU mask (0: none is written)
    floats: torch.Tensor  # empty, fp32 on the call's device: `new_empty` allocates like it
    bytes: torch.Tensor  # likewise uint8


_FORWARD_PLANS: SignatureCache[tuple, ForwardPlan] = SignatureCache()


def _make_forward_plan(x, weight, bias, residual, out, batch_stats: bool, mask: bool,
                       relu: bool, eps: float, update: bool, reduction_programs,
                       all_aligned: bool) -> ForwardPlan:
    """`mask`: whether a packed ReLU mask is wanted. Where not all tensors are aligned, the plan's
    launches go through JITFunction.run only (set before any other thread can find the plan)."""
    constexprs = dict(HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
                      HAS_RESIDUAL=residual is not None, RELU=relu, EPS_ZERO=eps == 0,
                      MASK_PACKING=mask)
    key = (tensor_signature(x), tensor_signature(residual), batch_stats, reduction_programs)
    geometry = call_geometry(key, (x, residual), (out,),
                             statistics_reduction if batch_stats else None)
    channels = x.shape[1]
    span, tiling = geometry.span, geometry.tiling
    statistics = None
    if batch_stats and span is not None:
        statistics = LaunchTemplate(
            _span_batch_stats_kernel, (span.col_blocks, geometry.splits),
            (channels, span.samples, geometry.per_split), (),
            dict(span.constexprs(), UPDATE_RUNNING=update, BLOCK_S=finalize_slots(span.block_c),
                 TILES_PER_STEP=STATISTICS_TILES_PER_STEP), span.num_warps)
    elif batch_stats:
        statistics = LaunchTemplate(
            _batch_stats_kernel, (tiling.col_blocks, geometry.splits),
            (channels, tiling.positions, tiling.l_blocks, tiling.tiles, geometry.per_split,
             *tiling.strides[0]), (),
            dict(UPDATE_RUNNING=update, BLOCK_R=tiling.block_r, BLOCK_C=tiling.block_c,
                 BLOCK_S=finalize_slots(tiling.block_c),
                 TILES_PER_STEP=tiling.stats_tiles_per_step), tiling.stats_warps)
    packing = geometry.mask_packing if constexprs["MASK_PACKING"] else MASK_NONE
    constexprs = dict(constexprs, MASK_PACKING=packing, BATCH_STATS=batch_stats)
    if span is not None:
        normalize = LaunchTemplate(_span_forward_kernel, (span.col_blocks, span.samples),
                                   (channels,), (), dict(constexprs, **span.constexprs()),
                                   span.num_warps, tunable=True)
    else:
        normalize = LaunchTemplate(
            _forward_kernel, (tiling.tiles, tiling.col_blocks),
            (channels, tiling.positions, tiling.l_blocks),
            tuple(s for strides in tiling.strides for s in strides),
            dict(constexprs, BLOCK_R=tiling.block_r, BLOCK_C=tiling.block_c), tiling.num_warps,
            tunable=True)
    plan = ForwardPlan(geometry, statistics, normalize, {}, (2 + 4 * geometry.splits) * channels,
                        x.numel() // 8 if packing else 0, _prototype(x, torch.float32),
                        _prototype(x, torch.uint8))
    if not all_aligned:
        through_jit_only(plan)
    return plan


def _prototype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An empty tensor of `dtype` on x's device, whose `new_empty` allocates a call's buffers: it
    parses fewer arguments than `torch.empty(size, dtype=..., device=...)`, every call."""
    return torch.empty(0, dtype=dtype, device=x.device)


def forward_plan(x, weight, bias, residual, running_mean, running_var, eps: float, relu: bool,
                 pack_relu_mask: bool, update: RunningUpdate | None,
                 reduction_programs) -> ForwardPlan:
    """The plan of this call's signature, made on its first call (per-channel tensors dense)."""
    batch_stats = running_mean is None
    running = () if update is None else update[:2]
    all_aligned = aligned(x, residual, weight, bias, running_mean, running_var, *running)
    # Every tensor's dtype and whether all are aligned: a template's launches share one binary
    # (_triton_launch.py). All are on x's device (_checks.py), and a residual has x's shape. One
    # flat tuple: nested tuples hash and compare slower.
    key = (x.shape, x.stride(), x.dtype, x.device,
           None if residual is None else residual.stride(),
           None if residual is None else residual.dtype,
           None if weight is None else weight.dtype, None if bias is None else bias.dtype,
           None if batch_stats else running_mean.dtype, None if batch_stats else running_var.dtype,
           None if update is None else running[0].dtype,
           None if update is None else running[1].dtype,
           relu, pack_relu_mask, eps == 0, all_aligned, reduction_programs)
    plan = _FORWARD_PLANS.get(key)
    if plan is None:  # (the output takes the input's strides, as the fake kernel promises)
        plan = _FORWARD_PLANS[key] = _make_forward_plan(
            x, weight, bias, residual, torch.empty_like(x), batch_stats, relu and pack_relu_mask,
            relu, eps, update is not None, reduction_programs, all_aligned)
    return plan


class BackwardPlan(NamedTuple):
    geometry: Geometry
    reduce: LaunchTemplate
    elementwise: LaunchTemplate
    counters: dict[int, torch.Tensor]  # the reduce pass's, per stream
    sums: int  # fp32 values of the reduce pass's buffer: C, then two planes of [splits, C]
    channels: int
    packed: bool  # the ReLU mask is the packed one (else the output, or there is no ReLU)
    floats: torch.Tensor  # as ForwardPlan's


_BACKWARD_PLANS: SignatureCache[tuple, BackwardPlan] = SignatureCache()


def _make_backward_plan(geometry_key: tuple, x, grad_out, relu_mask, grad_input,
                        grad_residual, has_weight: bool, batch_stats: bool) -> BackwardPlan:
    relu, packed = relu_mask is not None, is_packed_mask(relu_mask)
    residual_grad = grad_residual is not None
    out = None if packed else relu_mask  # the output, a tensor of x's shape, where it is the mask
    geometry = call_geometry(geometry_key, (x, grad_out, out), (grad_input, grad_residual),
                             functools.partial(backward_reduction, relu_mask=relu_mask))
    channels = x.shape[1]
    # Where this call's tiles hold whole bytes of the packed mask, they read a byte per 8 values.
    packing = geometry.mask_packing if packed else MASK_NONE
    span, tiling = geometry.span, geometry.tiling
    reduce_constexprs = dict(RELU=relu, PACKED=packed, MASK_PACKING=packing,
                             STORE_GRAD_RESIDUAL=residual_grad,
                             BLOCK_S=finalize_slots((span or tiling).block_c))
    elementwise_constexprs = dict(HAS_WEIGHT=has_weight, BATCH_STATS=batch_stats,
                                  RELU=relu and not residual_grad, PACKED=packed,
                                  MASK_PACKING=packing)
    count = x.numel() // channels
    if span is not None:
        reduce = LaunchTemplate(
            _span_backward_reduce_kernel, (span.col_blocks, geometry.splits),
            (channels, span.samples, geometry.per_split), (),
            dict(reduce_constexprs, **span.constexprs()), span.num_warps)
        elementwise = LaunchTemplate(
            _span_backward_elementwise_kernel, (span.col_blocks, span.samples), (channels, count),
            (), dict(elementwise_constexprs, **span.constexprs()), span.num_warps, tunable=True)
    else:
        sx, sg, so, sdi, sdr = tiling.strides
        blocks = dict(BLOCK_R=tiling.block_r, BLOCK_C=tiling.block_c)
        walk = (tiling.positions, tiling.l_blocks)
        reduce = LaunchTemplate(
            _backward_reduce_kernel, (tiling.col_blocks, geometry.splits),
            (channels, *walk, tiling.tiles, geometry.per_split, *sg, *so, *sx, *sdr), (),
            dict(reduce_constexprs, **blocks), tiling.num_warps)
        # With a residual, the elementwise pass reads the masked gradient the reduce pass wrote.
        elementwise = LaunchTemplate(
            _backward_elementwise_kernel, (tiling.tiles, tiling.col_blocks),
            (channels, *walk, count), (*(sdr if residual_grad else sg), *so, *sx, *sdi),
            dict(elementwise_constexprs, **blocks), tiling.num_warps, tunable=True)
    return BackwardPlan(geometry, reduce, elementwise, {}, channels * (1 + 2 * geometry.splits),
                         channels, packed, _prototype(x, torch.float32))


def backward_plan(grad_out, x, relu_mask, weight, stats, batch_stats: bool, residual_grad: bool,
                  reduction_programs) -> BackwardPlan:
    """The plan of this backward's signature, made on its first call (the weight dense)."""
    all_aligned = aligned(x, grad_out, relu_mask, weight, stats)
    # As the forward's key; the mask is packed (its shape follows from x's) or the output.
    key = (x.shape, x.stride(), x.dtype, x.device, grad_out.shape, grad_out.stride(),
           grad_out.dtype, None if relu_mask is None else relu_mask.dtype,
           None if relu_mask is None else relu_mask.stride(), residual_grad,
           None if weight is None else weight.dtype, stats.dtype, batch_stats, all_aligned,
           reduction_programs)
    plan = _BACKWARD_PLANS.get(key)
    if plan is None:
        geometry_key = (tensor_signature(x), tensor_signature(grad_out),
                        tensor_signature(relu_mask), residual_grad, reduction_programs)
        # Gradients take the strides the fake kernel promises, whatever copies compute them.
        grad_residual = torch.empty_like(grad_out, dtype=x.dtype) if residual_grad else None
        plan = _make_backward_plan(geometry_key, x, grad_out, relu_mask, torch.empty_like(x),
                              grad_residual, weight is not None, batch_stats)
        if not all_aligned:  # before any other thread can find the plan
            through_jit_only(plan)
        _BACKWARD_PLANS[key] = plan
    return plan
