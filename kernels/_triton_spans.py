"""The span kernels: NCHW maps whose rows are not 16-byte aligned (14x14 and 7x7 in bf16).

A row of L=49 bf16 values starts wherever the previous one ended, so row tiles can only use 2-byte
accesses. In an NCHW tensor the BLOCK_C*L values of BLOCK_C consecutive channels of one sample are
contiguous, though, and start aligned when BLOCK_C*L and C*L are multiples of 8: a span tile reads
them as one flat vector (16-byte accesses), with each lane's channel `j // L` (L a compile-time
constant: a multiply, not a division). Per-channel values are computed once per program for its
BLOCK_C channels and spread to the lanes (tl.gather), and per-channel sums come from the lanes in
one segmented scan per program, read at each channel's last lane.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._triton_finalize import _finalize_statistics, _finalize_sums, _last_to_finish
from ._triton_tiles import (
    _channel_scale, _lane_summary, _normalize_terms, _passed_by_mask, _relu_passes,
    _shifted_step, _store_summary, _store_sums, _welford_combine,
)


@triton.jit
def _span_lanes(C, L: tl.constexpr, BLOCK_C: tl.constexpr, SPAN: tl.constexpr,
                EVEN_C: tl.constexpr):
    """Lane offsets within the span of channel block program_id(0), their channels and mask.

    With EVEN_C (BLOCK_C divides C) the mask is a compile-time bound, uniform over each run of 8
    lanes, which is what lets the compiler issue 16-byte accesses under it.
    """
    lanes = tl.arange(0, SPAN)
    channels = tl.program_id(0) * BLOCK_C + lanes // L
    if EVEN_C:
        return lanes, channels, lanes < BLOCK_C * L
    return lanes, channels, (lanes < BLOCK_C * L) & (channels < C)


@triton.jit
def _span_base(n, C, L: tl.constexpr, BLOCK_C: tl.constexpr):
    """Offset of the span of sample `n` and channel block program_id(0), in 64 bits."""
    n64 = tl.zeros([], dtype=tl.int64) + n  # a loop index may be a plain int
    return n64 * C * L + tl.program_id(0) * (BLOCK_C * L)


@triton.jit
def _step_spans(first, last, C, lanes, lane_mask, L: tl.constexpr, BLOCK_C: tl.constexpr,
                STEP: tl.constexpr):
    """Offsets and mask of the spans of samples first..first + STEP (those before `last`),
    [SPAN, STEP] (the samples along the last axis, as _step_tiles lays its tiles)."""
    samples = first + tl.arange(0, STEP)
    offsets = lanes[:, None] \
        + (samples.to(tl.int64) * C * L + tl.program_id(0) * (BLOCK_C * L))[None, :]
    return offsets, lane_mask[:, None] & (samples < last)[None, :]


@triton.jit
def _merge_segments(key_a, count_a, mean_a, m2_a, odd_a, key_b, count_b, mean_b, m2_b, odd_b):
    """tl.associative_scan's combine for per-channel summaries: lanes of one channel (equal keys)
    merge with Chan's formulas, a lane of the next channel starts afresh."""
    count, mean, m2, odd = _welford_combine(count_a, mean_a, m2_a, odd_a,
                                            count_b, mean_b, m2_b, odd_b)
    same = key_a == key_b
    return (key_b, tl.where(same, count, count_b), tl.where(same, mean, mean_b),
            tl.where(same, m2, m2_b), tl.where(same, odd, odd_b))


@triton.jit
def _add_segments(key_a, g_a, gx_a, key_b, g_b, gx_b):
    """tl.associative_scan's combine for per-channel sums of two values."""
    same = key_a == key_b
    return key_b, tl.where(same, g_a + g_b, g_b), tl.where(same, gx_a + gx_b, gx_b)


@triton.jit
def _last_lanes(lanes, lane_mask, L: tl.constexpr):
    """The last lane of each channel: after a segmented scan it holds the channel's total."""
    return lane_mask & (lanes % L == L - 1)


@triton.jit
def _per_lane(values, L: tl.constexpr, BLOCK_C: tl.constexpr, SPAN: tl.constexpr):
    """Per-channel values of the block, [BLOCK_C], spread to the lanes each channel owns."""
    return tl.gather(values, tl.minimum(tl.arange(0, SPAN) // L, BLOCK_C - 1), 0)


@triton.jit(do_not_specialize=["samples", "samples_per_split"])
def _span_batch_stats_kernel(
    x_ptr, stats_ptr, counters_ptr, running_mean_ptr, running_var_ptr,
    C, samples, samples_per_split, momentum, unbias,
    UPDATE_RUNNING: tl.constexpr, L: tl.constexpr, BLOCK_C: tl.constexpr, SPAN: tl.constexpr,
    EVEN_C: tl.constexpr, BLOCK_S: tl.constexpr, TILES_PER_STEP: tl.constexpr,
):
    """_batch_stats_kernel on span tiles: a slot per program, merged by the last to finish. A
    step loads the span tiles of TILES_PER_STEP samples at once, for the bytes in flight that
    _batch_stats_kernel's steps keep."""
    lanes, channels, lane_mask = _span_lanes(C, L, BLOCK_C, SPAN, EVEN_C)
    split = tl.program_id(1)
    first = split * samples_per_split
    last = tl.minimum(first + samples_per_split, samples)
    # Every lane sees every sample of the range: one count for all, and sums around each lane's
    # first value, the next step's load issued before this one's arithmetic.
    offsets, mask = _step_spans(first, last, C, lanes, lane_mask, L, BLOCK_C, TILES_PER_STEP)
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
    leading = tl.sum(tl.where((tl.arange(0, TILES_PER_STEP) == 0)[None, :],
                              x.to(tl.float32), 0.0), 1)
    shift = tl.where(tl.abs(leading) < float("inf"), leading, 0.0)
    sums = tl.zeros([SPAN], dtype=tl.float32)
    squares = tl.zeros([SPAN], dtype=tl.float32)
    for n in range(first, last, TILES_PER_STEP):
        offsets, next_mask = _step_spans(n + TILES_PER_STEP, last, C, lanes, lane_mask, L,
                                         BLOCK_C, TILES_PER_STEP)
        x_next = tl.load(x_ptr + offsets, mask=next_mask, other=0.0)
        sums, squares = _shifted_step(shift, sums, squares, x.to(tl.float32), mask)
        x, mask = x_next, next_mask
    count = tl.zeros([SPAN], dtype=tl.float32) + tl.maximum(last - first, 0).to(tl.float32)
    count, mean, m2, odd = _lane_summary(count, shift, sums, squares)
    # One segmented scan merges each channel's lanes; its last lane stores the channel's summary.
    _, count, mean, m2, odd = tl.associative_scan((lanes // L, count, mean, m2, odd), 0,
                                                  _merge_segments)
    _store_summary(stats_ptr + 2 * C, split * C + channels, C, _last_lanes(lanes, lane_mask, L),
                   count, mean, m2, odd)
    if _last_to_finish(counters_ptr):
        cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        _finalize_statistics(stats_ptr, running_mean_ptr, running_var_ptr, cols, cols < C, C,
                             momentum, unbias, UPDATE_RUNNING, BLOCK_S, BLOCK_C)


@triton.jit
def _span_forward_kernel(
    x_ptr, residual_ptr, out_ptr, mean_ptr, var_ptr, weight_ptr, bias_ptr, relu_mask_ptr, C, eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    RELU: tl.constexpr, EPS_ZERO: tl.constexpr, MASK_PACKING: tl.constexpr,
    BATCH_STATS: tl.constexpr, L: tl.constexpr, BLOCK_C: tl.constexpr, SPAN: tl.constexpr,
    EVEN_C: tl.constexpr,
):
    lanes, channels, lane_mask = _span_lanes(C, L, BLOCK_C, SPAN, EVEN_C)
    offsets = _span_base(tl.program_id(1), C, L, BLOCK_C) + lanes
    # Mean, scale and shift once per channel of the block (a square root and a division for
    # BLOCK_C channels, not for every lane), then spread to the lanes.
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    mean, scale, shift = _normalize_terms(mean_ptr, var_ptr, weight_ptr, bias_ptr, cols, col_mask,
                                          C, eps, HAS_WEIGHT, HAS_BIAS, EPS_ZERO, BATCH_STATS)
    x = tl.load(x_ptr + offsets, mask=lane_mask).to(tl.float32)
    y = (x - _per_lane(mean, L, BLOCK_C, SPAN)) * _per_lane(scale, L, BLOCK_C, SPAN)
    if HAS_BIAS or EPS_ZERO:
        y += _per_lane(shift, L, BLOCK_C, SPAN)
    if HAS_RESIDUAL:
        y += tl.load(residual_ptr + offsets, mask=lane_mask).to(tl.float32)
    if RELU:
        y = tl.where(y < 0, 0.0, y)
    stored = y.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offsets, stored, mask=lane_mask)
    if MASK_PACKING != 0:  # MASK_ALONG_SPAN: bytes of 8 lanes, all of one channel block
        weighted = _relu_passes(stored) << (lanes % 8)
        packed = tl.sum(tl.reshape(weighted, [SPAN // 8, 8]), 1)
        firsts = 8 * tl.arange(0, SPAN // 8)
        where = firsts < BLOCK_C * L
        if not EVEN_C:
            where = where & (tl.program_id(0) * BLOCK_C + firsts // L < C)
        tl.store(relu_mask_ptr + ((_span_base(tl.program_id(1), C, L, BLOCK_C) + firsts) >> 3),
                 packed.to(tl.uint8), mask=where)


@triton.jit
def _span_masked_grad(grad_ptr, out_ptr, base, lanes, lane_mask, C, RELU: tl.constexpr,
                      PACKED: tl.constexpr, MASK_PACKING: tl.constexpr, L: tl.constexpr,
                      BLOCK_C: tl.constexpr, SPAN: tl.constexpr, EVEN_C: tl.constexpr):
    """_masked_grad for span tiles, whose tensors all share x's offsets (`base` + `lanes`)."""
    offsets = base + lanes
    g = tl.load(grad_ptr + offsets, mask=lane_mask, other=0.0).to(tl.float32)
    if RELU:
        if PACKED and MASK_PACKING != 0:  # a byte per 8 lanes
            firsts = 8 * tl.arange(0, SPAN // 8)
            where = firsts < BLOCK_C * L
            if not EVEN_C:
                where = where & (tl.program_id(0) * BLOCK_C + firsts // L < C)
            packed = tl.load(out_ptr + ((base + firsts) >> 3), mask=where, other=0).to(tl.int32)
            bits = tl.reshape((packed[:, None] >> tl.arange(0, 8)[None, :]) & 1, [SPAN])
            g = tl.where(bits == 0, 0.0, g)
        elif PACKED:
            g = _passed_by_mask(g, out_ptr, offsets, lane_mask)
        else:
            g = tl.where(tl.load(out_ptr + offsets, mask=lane_mask, other=0.0) <= 0, 0.0, g)
    return g


@triton.jit(do_not_specialize=["samples", "samples_per_split"])
def _span_backward_reduce_kernel(
    grad_ptr, out_ptr, x_ptr, stats_ptr, sums_ptr, grad_residual_ptr, counters_ptr,
    grad_weight_ptr, grad_bias_ptr,
    C, samples, samples_per_split, eps,
    RELU: tl.constexpr, PACKED: tl.constexpr, MASK_PACKING: tl.constexpr,
    STORE_GRAD_RESIDUAL: tl.constexpr, L: tl.constexpr, BLOCK_C: tl.constexpr, SPAN: tl.constexpr,
    EVEN_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """_backward_reduce_kernel on span tiles."""
    lanes, channels, lane_mask = _span_lanes(C, L, BLOCK_C, SPAN, EVEN_C)
    mean = tl.load(stats_ptr + channels, mask=lane_mask, other=0.0).to(tl.float32)
    split = tl.program_id(1)
    first = split * samples_per_split
    last = tl.minimum(first + samples_per_split, samples)
    sums_g = tl.zeros([SPAN], dtype=tl.float32)
    sums_gx = tl.zeros([SPAN], dtype=tl.float32)
    for n in range(first, last):
        base = _span_base(n, C, L, BLOCK_C)
        offsets = base + lanes
        g = _span_masked_grad(grad_ptr, out_ptr, base, lanes, lane_mask, C, RELU, PACKED,
                              MASK_PACKING, L, BLOCK_C, SPAN, EVEN_C)
        x = tl.load(x_ptr + offsets, mask=lane_mask, other=0.0).to(tl.float32)
        sums_g += g
        sums_gx += g * tl.where(lane_mask, x - mean, 0.0)
        if STORE_GRAD_RESIDUAL:
            tl.store(grad_residual_ptr + offsets, g.to(grad_residual_ptr.dtype.element_ty),
                     mask=lane_mask)
    _, sums_g, sums_gx = tl.associative_scan((lanes // L, sums_g, sums_gx), 0, _add_segments)
    _store_sums(sums_ptr, split * C + channels, C, _last_lanes(lanes, lane_mask, L), sums_g,
                sums_gx)
    if _last_to_finish(counters_ptr):
        cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        _finalize_sums(sums_ptr, stats_ptr, grad_weight_ptr, grad_bias_ptr, cols, cols < C, C,
                       eps, BLOCK_S, BLOCK_C)


@triton.jit
def _span_backward_elementwise_kernel(
    grad_ptr, out_ptr, x_ptr, stats_ptr, weight_ptr, sum_g_ptr, sum_gx_ptr, grad_input_ptr,
    C, count, eps,
    HAS_WEIGHT: tl.constexpr, BATCH_STATS: tl.constexpr, RELU: tl.constexpr,
    PACKED: tl.constexpr, MASK_PACKING: tl.constexpr, L: tl.constexpr, BLOCK_C: tl.constexpr,
    SPAN: tl.constexpr,
    EVEN_C: tl.constexpr,
):
    lanes, channels, lane_mask = _span_lanes(C, L, BLOCK_C, SPAN, EVEN_C)
    base = _span_base(tl.program_id(1), C, L, BLOCK_C)
    offsets = base + lanes
    # The per-channel coefficients once per channel of the block, then spread to the lanes.
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    mean, invstd, scale = _channel_scale(stats_ptr, stats_ptr + C, weight_ptr, cols, col_mask,
                                         eps, HAS_WEIGHT)
    g = _span_masked_grad(grad_ptr, out_ptr, base, lanes, lane_mask, C, RELU, PACKED,
                          MASK_PACKING, L, BLOCK_C, SPAN, EVEN_C)
    if BATCH_STATS:
        x = tl.load(x_ptr + offsets, mask=lane_mask).to(tl.float32)
        mean_g = tl.load(sum_g_ptr + cols, mask=col_mask, other=0.0) / count
        mean_gx = tl.load(sum_gx_ptr + cols, mask=col_mask, other=0.0) / count
        projection = _per_lane(invstd * invstd * mean_gx, L, BLOCK_C, SPAN)
        centred = x - _per_lane(mean, L, BLOCK_C, SPAN)
        grad_input = g - _per_lane(mean_g, L, BLOCK_C, SPAN) - centred * projection
        grad_input *= _per_lane(scale, L, BLOCK_C, SPAN)
    else:
        grad_input = g * _per_lane(scale, L, BLOCK_C, SPAN)
    tl.store(grad_input_ptr + offsets, grad_input.to(grad_input_ptr.dtype.element_ty),
             mask=lane_mask)
