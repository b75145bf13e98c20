"""The reductions as a training step launches them, for sizing their splits to one wave.

`call_geometry` (_triton_geometry.py) sizes a reduction from the registers of the binary it will
launch, compiled ahead of its first launch: these give that launch's kernel, arguments (tensors
of the right dtypes and alignment, provisional sizes) and compile-time constants.
"""

from __future__ import annotations

import torch

from ._triton_geometry import (STATISTICS_TILES_PER_STEP, SpanTiling, finalize_slots,
                               is_packed_mask, relu_mask_packing)
from ._triton_rows import _backward_reduce_kernel, _batch_stats_kernel
from ._triton_spans import _span_backward_reduce_kernel, _span_batch_stats_kernel
from ._triton_tiles import MASK_NONE


def statistics_reduction(shape, dense, buffers):
    """The forward's statistics pass as a training step with running statistics launches it
    (without them, the same registers on every ResNet sm_90 launch: one geometry serves both)."""
    x = dense[0]
    channels = x.shape[1]
    stats = torch.empty(6 * channels, dtype=torch.float32, device=x.device)  # one split's
    counters = torch.zeros(shape.col_blocks, dtype=torch.int32, device=x.device)
    tensors = (x, stats, counters, stats, stats)
    finalize = dict(UPDATE_RUNNING=True, BLOCK_S=finalize_slots(shape.block_c))
    if isinstance(shape, SpanTiling):
        provisional = (*tensors, channels, shape.samples, 1, 0.1, 1.0)
        return (_span_batch_stats_kernel, provisional,
                dict(shape.constexprs(), **finalize, TILES_PER_STEP=STATISTICS_TILES_PER_STEP),
                shape.num_warps)
    # The split does not change the binary (unspecialized), so any split measures it.
    provisional = (*tensors, channels, shape.positions, shape.l_blocks, shape.tiles, 1,
                   *shape.strides[0], 0.1, 1.0)
    return (_batch_stats_kernel, provisional,
            dict(finalize, BLOCK_R=shape.block_r, BLOCK_C=shape.block_c,
                 TILES_PER_STEP=shape.stats_tiles_per_step), shape.stats_warps)


def backward_reduction(shape, dense, buffers, *, relu_mask: torch.Tensor | None):
    """The backward's reduce pass, reading `relu_mask` (packed, the output, or None: no ReLU)."""
    x, grad_out, _ = dense
    channels = x.shape[1]
    relu, residual_grad = relu_mask is not None, buffers[1] is not None
    vector = torch.empty(3 * channels, dtype=torch.float32, device=x.device)  # one split's
    counters = torch.zeros(shape.col_blocks, dtype=torch.int32, device=x.device)
    grad_residual = buffers[1] if residual_grad else grad_out
    span, tiling = (shape, None) if isinstance(shape, SpanTiling) else (None, shape)
    packing = relu_mask_packing(x, span, tiling) if is_packed_mask(relu_mask) else MASK_NONE
    constexprs = dict(RELU=relu, PACKED=is_packed_mask(relu_mask), MASK_PACKING=packing,
                      STORE_GRAD_RESIDUAL=residual_grad, BLOCK_S=finalize_slots(shape.block_c))
    common = (grad_out, relu_mask if relu else grad_out, x, vector, vector, grad_residual,
              counters, vector, vector, channels)
    if isinstance(shape, SpanTiling):
        return (_span_backward_reduce_kernel, (*common, shape.samples, 1, 1e-5),
                dict(constexprs, **shape.constexprs()), shape.num_warps)
    sx, sg, so, _, sdr = shape.strides
    return (_backward_reduce_kernel,
            (*common, shape.positions, shape.l_blocks, shape.tiles, 1, *sg, *so, *sx, *sdr, 1e-5),
            dict(constexprs, BLOCK_R=shape.block_r, BLOCK_C=shape.block_c), shape.num_warps)
