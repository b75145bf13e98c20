"""Triton kernels for BatchNorm + residual add + ReLU, forward and backward.

The functions at the end implement the contract in _contract.py. Every tensor is addressed as a
strided (N, C, L) view (see _layout.py); a kernel argument `s<tensor>_<axis>` is the element stride
of that view for tensor x, r (residual), o (out), g (grad_out), di (grad_input) or dr
(grad_residual) along axis n, c or l. A program works on a tile
of one sample's BLOCK_R consecutive spatial positions by BLOCK_C channels, so a tile's addresses are
`n * stride_n + l * stride_l + c * stride_c` with `n` a scalar: no per-element division, and the
compiler sees which axis is contiguous and vectorizes along it. When every tensor of a launch stores
its samples back to back (channels_last, or N = 1), the launch views them as a single sample of
N*L positions, which makes tiles long for small maps (7x7) too. Tiles are wide in C when C is the
contiguous axis (channels_last) and long in L otherwise (NCHW).

Bytes moved per element, in units of the activation size (the benchmark's byte model), where m is
the packed ReLU mask's eighth of a byte (1/16 of a bf16 value):
- training forward: x read twice (statistics, then normalize), residual read once, out written
  once, the mask written: 4 + m with a residual, 3 + m without;
- eval forward: x and residual read once, out written once (and the mask where a gradient will be
  taken);
- backward with a residual: the reduce pass reads grad_out, the mask and x and writes the
  residual's gradient (grad_out where the ReLU let it through); the elementwise pass reads that
  gradient back with x and writes grad_input: 6 + m. Without a residual the elementwise pass
  reads grad_out, the mask and x again: 5 + 2m.
So a training step with a residual moves 10 + 2m where eager PyTorch moves 16 (1.58x), and 11 if
the backward read the output for the ReLU instead (1.45x): the mask pays for its 1/16 write many
times over. The forward writes it where its tiles own whole bytes of it (_mask_packing: every
ResNet-50 and ResNet-56 shape in bf16 and fp16, NCHW and channels_last; in fp32 all but NCHW
14x14, whose rows of 196 are 16-byte aligned, so row tiles, but not whole bytes of the mask);
elsewhere the backward reads the output.
Instructions per element: an H100 issues ~33e12 thread instructions a second (132 SMs x 4 warp
schedulers x 32 lanes x 1.98 GHz) while its memory moves 3.35e12 bytes, so a kernel holds the byte
model only while it spends at most ~20 SASS instructions per bf16 value it moves per element.
tests/compile_kernels_for_hopper.py counts them in the sm_90 binary of every ResNet-50 and ResNet-56
launch: all fit (the backward reduce takes 12-17.3 for its 2-3 values, the elementwise passes
19-35 for 3, the forward 20-34 for 2-3, the statistics pass 7.6-12.2 for its one: sums around a
per-lane shift, no division, the next tile loaded before the current one is summed, 16 warps where
its tiles are full). A training forward has three launches (statistics, the finalize with the
running-stat update, normalize), a backward three (reduce, finalize, elementwise). The backward
finalize stays a launch of its own: folded into the elementwise pass, each of its programs would
merge the [splits, C] slots of its channels itself, 66 splits x 64 channels x 2 sums x 4 bytes =
34 KB at ResNet-50's 256x56x56 in channels_last, more than the 24 KB of activations the program
moves, to save one launch of a few microseconds (none at all under CUDA graphs).

Reductions are deterministic, with no atomics, and sized to one wave: the launch runs exactly as
many programs as the GPU holds at once (from the compiled kernel's registers, see _occupancy.py),
each walking a fixed range of tiles and accumulating per lane, with one block reduction at the end
into its own slot of a [splits, C] buffer; a finalize kernel merges the slots in a fixed order,
many slots at once. So a shape's results are the same bits run after run on one GPU model and
Triton version; on another GPU (another SM count or occupancy) the split, and so the last bits,
may differ. That is deliberate: a split of fixed size would leave part of a wave idle or add a
tail wave on every GPU but one, and a training run's bits were never portable across GPU models
anyway (cuDNN picks convolution algorithms per GPU). Statistics are Welford summaries (count, mean, M2), made per lane from sums
around the lane's first value (see _lane_summary) and merged with Chan's formulas: exact for a
constant channel, no sum-of-squares cancellation over a channel, and inf and NaN give what a sum
over the channel gives (an inf mean, a NaN variance), kept apart from the finite values. Their
limits, float32's (ATen's CPU kernel sums in float64 instead, and the PyTorch path does too):
- the summaries' means are float32 at the values' offset, so the variance is good to about
  ulp(|mean|) / std relative (1e4 + randn: a few 1e-4; 1e3 + randn: a few 1e-5);
- a channel whose values lie so far apart that their offsets or a lane's sums of them pass the
  float range (3.4e38: values of both signs near it) gets an inf or NaN mean; means near the
  range themselves merge to finite ones (a constant 3e38 channel, or one of 3.0-3.3e38).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

from ._contract import RunningUpdate
from ._layout import Strides3d, spatial_numel, strides_3d
from ._occupancy import cuda_limits, programs_per_wave


@triton.jit
def _offsets(n, positions, cols, stride_n, stride_c, stride_l):
    return (n.to(tl.int64) * stride_n + positions.to(tl.int64)[:, None] * stride_l
            + cols.to(tl.int64)[None, :] * stride_c)


@triton.jit
def _tile(tile, L, l_blocks, BLOCK_R: tl.constexpr):
    """Sample index, positions and their mask of tile number `tile`."""
    n = tile // l_blocks
    start = (tile - n * l_blocks) * BLOCK_R
    positions = start + tl.arange(0, BLOCK_R)
    return n, positions, positions < L


# The packed ReLU mask. Bit j of byte k records whether the output at element offset 8k + j of x
# (x's own memory order, counted from its first element) lets a gradient through: positive or
# NaN, as threshold_backward decides. A forward writes it where its tiles own whole bytes of it
# (see _mask_packing): 1/16 of a bf16 activation's bytes, which the backward reads where it would
# read the whole output. The backward finds each element's bit by its offset in x, so any tiling
# reads it.
MASK_NONE = 0  # no mask: the backward reads the output
MASK_ALONG_POSITIONS = 1  # a byte holds 8 consecutive positions of one channel (NCHW rows)
MASK_ALONG_CHANNELS = 2  # a byte holds 8 consecutive channels of one position (channels_last)
MASK_ALONG_SPAN = 3  # a byte holds 8 consecutive lanes of a span tile (see Spans)


@triton.jit
def _relu_passes(stored):
    """1 where threshold_backward lets the gradient through the stored output (> 0 or NaN)."""
    return tl.where(stored <= 0, 0, 1)


@triton.jit
def _passed_by_mask(g, mask_ptr, x_offsets, mask):
    """`g` where the element's bit in the packed ReLU mask is set, else 0."""
    byte = tl.load(mask_ptr + (x_offsets >> 3), mask=mask, other=0).to(tl.int32)
    return tl.where(((byte >> (x_offsets & 7).to(tl.int32)) & 1) == 0, 0.0, g)


@triton.jit
def _row_mask_bits(mask_ptr, tile, col_start, L, l_blocks, C, sx_n, sx_c, sx_l,
                   PACKING: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """The bits of the packed ReLU mask of row tile `tile` and the BLOCK_C channels from
    `col_start`, [BLOCK_R, BLOCK_C] int32 0/1, from one load per byte (where the tile holds
    whole bytes: _mask_packing of the reading call's tiling)."""
    n = tile // l_blocks
    start = (tile - n * l_blocks) * BLOCK_R
    cols = col_start + tl.arange(0, BLOCK_C)
    if PACKING == 1:  # MASK_ALONG_POSITIONS
        firsts = start + 8 * tl.arange(0, BLOCK_R // 8)
        where = (firsts < L)[:, None] & (cols < C)[None, :]
        offsets = _offsets(n, firsts, cols, sx_n, sx_c, sx_l)
        packed = tl.load(mask_ptr + (offsets >> 3), mask=where, other=0).to(tl.int32)
        bits = (packed[:, None, :] >> tl.arange(0, 8)[None, :, None]) & 1
    else:  # MASK_ALONG_CHANNELS
        positions = start + tl.arange(0, BLOCK_R)
        firsts = col_start + 8 * tl.arange(0, BLOCK_C // 8)
        where = (positions < L)[:, None] & (firsts < C)[None, :]
        offsets = _offsets(n, positions, firsts, sx_n, sx_c, sx_l)
        packed = tl.load(mask_ptr + (offsets >> 3), mask=where, other=0).to(tl.int32)
        bits = (packed[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1
    return tl.reshape(bits, [BLOCK_R, BLOCK_C])


@triton.jit
def _store_row_mask(mask_ptr, passes, tile, col_start, L, l_blocks, C, sx_n, sx_c, sx_l,
                    PACKING: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Packs a row tile's [BLOCK_R, BLOCK_C] ReLU decisions into bytes of 8 along the axis x is
    contiguous in, and stores them at x's offset / 8 (every byte is this tile's alone)."""
    n = tile // l_blocks
    start = (tile - n * l_blocks) * BLOCK_R
    cols = col_start + tl.arange(0, BLOCK_C)
    if PACKING == 1:  # MASK_ALONG_POSITIONS
        weighted = passes << (tl.arange(0, BLOCK_R) % 8)[:, None]
        packed = tl.sum(tl.reshape(weighted, [BLOCK_R // 8, 8, BLOCK_C]), 1)
        firsts = start + 8 * tl.arange(0, BLOCK_R // 8)
        where = (firsts < L)[:, None] & (cols < C)[None, :]
        offsets = _offsets(n, firsts, cols, sx_n, sx_c, sx_l)
    else:  # MASK_ALONG_CHANNELS
        weighted = passes << (tl.arange(0, BLOCK_C) % 8)[None, :]
        packed = tl.sum(tl.reshape(weighted, [BLOCK_R, BLOCK_C // 8, 8]), 2)
        positions = start + tl.arange(0, BLOCK_R)
        firsts = col_start + 8 * tl.arange(0, BLOCK_C // 8)
        where = (positions < L)[:, None] & (firsts < C)[None, :]
        offsets = _offsets(n, positions, firsts, sx_n, sx_c, sx_l)
    tl.store(mask_ptr + (offsets >> 3), packed.to(tl.uint8), mask=where)


@triton.jit
def _welford_combine(count_a, mean_a, m2_a, odd_a, count_b, mean_b, m2_b, odd_b):
    """Chan et al.'s merge of two (count, mean, M2) summaries of finite values, plus the sum of
    the non-finite values each side saw ("odd": 0 when there were none).

    The M2 term multiplies the weight in before the second delta, so that merging into an empty
    summary (weight 0) stays exact however large the mean.
    """
    count = count_a + count_b
    weight_b = tl.where(count > 0, count_b / tl.where(count > 0, count, 1.0), 0.0)
    delta = mean_b - mean_a
    mean = mean_a + delta * weight_b
    m2 = m2_a + m2_b + delta * (delta * (count_a * weight_b))
    return count, mean, m2, odd_a + odd_b


@triton.jit
def _finite_or(value, fallback):
    """`value` where it is finite, else `fallback`."""
    return tl.where(tl.abs(value) < float("inf"), value, fallback)


@triton.jit
def _merge(count, mean, m2, odd, axis: tl.constexpr):
    """Merges many summaries along `axis` at once: n = sum(c); the mean in two passes, a weighted
    mean first and then the weighted mean of the offsets from it (centred terms sum without losing
    digits, and equal means merge exactly: a constant channel stays exact); and
    M2 = sum(M2 + c * (m - mean)^2), where every term is positive, so nothing cancels. Plain sums,
    so it costs what a tl.sum costs (a pairwise combine through tl.reduce interprets far slower)."""
    total = tl.sum(count, axis)
    safe_total = tl.where(total > 0, total, 1.0)
    share = count / tl.expand_dims(safe_total, axis)
    # Counts times means, summed, then divided: exact for tiny means (shares times tiny means
    # would underflow). Where that overflows (means near the float range, 3e38), shares times
    # means instead: the terms of a convex combination never overflow.
    rough = _finite_or(tl.sum(count * mean, axis) / safe_total, tl.sum(share * mean, axis))
    deviation_from_rough = mean - tl.expand_dims(rough, axis)
    # count (share) last: empty summaries add 0
    merged_mean = rough + _finite_or(tl.sum(deviation_from_rough * count, axis) / safe_total,
                                     tl.sum(deviation_from_rough * share, axis))
    deviation = mean - tl.expand_dims(merged_mean, axis)
    # count first: an empty summary (count 0) adds 0 however far its mean is.
    merged_m2 = tl.sum(m2 + (count * deviation) * deviation, axis)
    return total, merged_mean, merged_m2, tl.sum(odd, axis)


@triton.jit
def _shifted_update(shift, sums, squares, x, mask):
    """One value per lane into per-lane sums of d = x - shift and of d^2: an add, a subtract and
    a multiply-add, no division. Lanes outside the tile add 0; an inf or NaN x passes into the
    sums, which is how _lane_summary tells it apart."""
    d = tl.where(mask, x - shift, 0.0)
    return sums + d, squares + d * d


@triton.jit
def _lane_summary(count, shift, sums, squares):
    """Per-lane Welford summaries (count, mean, M2, odd) from sums around the lane's own first
    value `shift`: M2 = sum(d^2) - sum(d)^2 / count loses only digits in proportion to
    count * (mean - shift)^2 / M2, and a lane holds a few dozen values, so one outlier as its
    shift costs a few ulps of that lane's M2, not the channel's (summing a whole channel around
    one value would lose them all). Non-finite sums mean the lane saw an inf or NaN: "odd" carries
    their sum, the finalize gives the channel a sum's statistics (inf mean, NaN variance)."""
    finite = tl.abs(sums) < float("inf")
    safe = tl.where(count > 0, count, 1.0)
    offset = sums / safe
    mean = tl.where(finite, shift + offset, 0.0)
    m2 = tl.where(finite, tl.maximum(squares - sums * offset, 0.0), 0.0)
    return tl.where(finite, count, 0.0), mean, m2, tl.where(finite, 0.0, sums)


@triton.jit
def _first_shift(x, mask, axis: tl.constexpr):
    """Each lane's shift: its first value, or where that is missing or not finite, the mean of
    the finite values of the same channel in the tile (a value of the channel's scale)."""
    usable = mask & (tl.abs(x) < float("inf"))
    found = tl.sum(usable.to(tl.float32), axis)
    typical = tl.sum(tl.where(usable, x, 0.0), axis) / tl.where(found > 0, found, 1.0)
    return tl.where(usable, x, tl.expand_dims(typical, axis))


@triton.jit
def _store_summary(part_ptr, slot, C, mask, count, mean, m2, odd):
    """A reduction program's summary into its slot of the four [splits, C] planes of `part_ptr`
    (count, mean, M2, odd: one buffer, so that a call allocates it once). The splits are the
    launch's second grid dimension."""
    plane = tl.num_programs(1) * C
    tl.store(part_ptr + slot, count, mask=mask)
    tl.store(part_ptr + plane + slot, mean, mask=mask)
    tl.store(part_ptr + 2 * plane + slot, m2, mask=mask)
    tl.store(part_ptr + 3 * plane + slot, odd, mask=mask)


# Tile counts vary with the batch; left unspecialized, they do not change the compiled binary, so
# the registers read from one compilation size every launch of that kernel.
@triton.jit(do_not_specialize=["tiles_total", "tiles_per_split"])
def _batch_stats_partial_kernel(
    x_ptr, part_ptr,
    C, L, l_blocks, tiles_total, tiles_per_split,
    sx_n, sx_c, sx_l,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    split = tl.program_id(1)
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, tiles_total)

    # Per-lane sums around a per-lane shift, no division in the loop, and one block reduction
    # after it. The next tile's load is issued before the current tile's arithmetic, so that a
    # load is always in flight while the lanes add.
    n, positions, position_mask = _tile(first, L, l_blocks, BLOCK_R)
    mask = (position_mask & (positions * 0 + first < last))[:, None] & col_mask[None, :]
    x = tl.load(x_ptr + _offsets(n, positions, cols, sx_n, sx_c, sx_l), mask=mask, other=0.0)
    shift = _first_shift(x.to(tl.float32), mask, 0)
    sums = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    squares = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for tile in range(first, last):
        n, positions, position_mask = _tile(tile + 1, L, l_blocks, BLOCK_R)
        next_mask = (position_mask & (positions * 0 + tile + 1 < last))[:, None] & col_mask[None, :]
        x_next = tl.load(x_ptr + _offsets(n, positions, cols, sx_n, sx_c, sx_l), mask=next_mask)
        sums, squares = _shifted_update(shift, sums, squares, x.to(tl.float32), mask)
        x, mask = x_next, next_mask
    # A lane's count, worked out rather than counted: every tile of the range, less the tail
    # tiles (the last of each sample) where the lane lies past L.
    tail_length = L - (l_blocks - 1) * BLOCK_R
    tails = last // l_blocks - first // l_blocks
    lane_tiles = (last - first) - tl.where(tl.arange(0, BLOCK_R) >= tail_length, tails, 0)
    count = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32) + lane_tiles.to(tl.float32)[:, None]
    count, mean, m2, odd = _lane_summary(count, shift, sums, squares)
    count, mean, m2, odd = _merge(count, mean, m2, odd, 0)
    _store_summary(part_ptr, split * C + cols, C, col_mask, count, mean, m2, odd)


@triton.jit
def _batch_stats_finalize_kernel(
    part_ptr, mean_ptr, var_ptr,
    running_mean_ptr, running_var_ptr, C, num_splits, momentum, unbias,
    UPDATE_RUNNING: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Merges the [num_splits, C] summaries (the four planes of `part_ptr`: count, mean, M2,
    odd), BLOCK_S slots at a time, in a fixed order; with UPDATE_RUNNING also updates the running
    statistics, saving the update its own launch."""
    plane = num_splits * C
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    count = tl.zeros([BLOCK_C], dtype=tl.float32)
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    odd = tl.zeros([BLOCK_C], dtype=tl.float32)
    for start in range(0, num_splits, BLOCK_S):
        slots = start + tl.arange(0, BLOCK_S)
        mask = (slots < num_splits)[:, None] & col_mask[None, :]
        offsets = slots[:, None] * C + cols[None, :]
        block = _merge(
            tl.load(part_ptr + offsets, mask=mask, other=0.0),
            tl.load(part_ptr + plane + offsets, mask=mask, other=0.0),
            tl.load(part_ptr + 2 * plane + offsets, mask=mask, other=0.0),
            tl.load(part_ptr + 3 * plane + offsets, mask=mask, other=0.0), 0,
        )
        count, mean, m2, odd = _welford_combine(count, mean, m2, odd, *block)
    plain = odd == 0  # no inf or NaN in the channel
    mean = tl.where(plain, mean, odd)
    var = tl.where(plain, m2 / count, float("nan"))
    tl.store(mean_ptr + cols, mean, mask=col_mask)
    tl.store(var_ptr + cols, var, mask=col_mask)
    if UPDATE_RUNNING:
        _update_running(running_mean_ptr, running_var_ptr, mean, var, cols, col_mask, momentum,
                        unbias)


@triton.jit
def _update_running(running_mean_ptr, running_var_ptr, mean, var, cols, mask, momentum, unbias):
    """running = (1 - momentum) * running + momentum * batch statistic (variance unbiased)."""
    running_mean = tl.load(running_mean_ptr + cols, mask=mask).to(tl.float32)
    running_var = tl.load(running_var_ptr + cols, mask=mask).to(tl.float32)
    tl.store(running_mean_ptr + cols,
             (running_mean * (1 - momentum) + mean * momentum).to(running_mean_ptr.dtype.element_ty),
             mask=mask)
    tl.store(running_var_ptr + cols,
             (running_var * (1 - momentum) + var * unbias * momentum)
             .to(running_var_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _channel_scale(mean_ptr, var_ptr, weight_ptr, cols, col_mask, eps, HAS_WEIGHT: tl.constexpr):
    """Per-channel mean, invstd and weight * invstd, in fp32."""
    mean = tl.load(mean_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    var = tl.load(var_ptr + cols, mask=col_mask, other=1.0).to(tl.float32)
    invstd = 1.0 / tl.sqrt(var + eps)
    scale = invstd
    if HAS_WEIGHT:
        scale = invstd * tl.load(weight_ptr + cols, mask=col_mask, other=1.0).to(tl.float32)
    return mean, invstd, scale


@triton.jit
def _infinite_scale_terms(mean, scale, shift):
    """Where var + eps is 0 (eval with eps=0) the scale is infinite, and ATen's eval computes
    x * scale + (bias - mean * scale): NaN, or inf where the two terms do not cancel. A centre of
    0 with that shift gives the same; elsewhere mean and shift are returned as they were. Compiled
    in only when eps is 0, so that the usual binaries carry none of it."""
    infinite = tl.abs(scale) == float("inf")
    return tl.where(infinite, 0.0, mean), tl.where(infinite, shift - mean * scale, shift)


@triton.jit
def _forward_kernel(
    x_ptr, residual_ptr, out_ptr, mean_ptr, var_ptr, weight_ptr, bias_ptr, relu_mask_ptr,
    C, L, l_blocks, eps,
    sx_n, sx_c, sx_l, sr_n, sr_c, sr_l, so_n, so_c, so_l,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    RELU: tl.constexpr, EPS_ZERO: tl.constexpr, MASK_PACKING: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    n, positions, position_mask = _tile(tl.program_id(0), L, l_blocks, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    mask = position_mask[:, None] & col_mask[None, :]
    mean, _, scale = _channel_scale(mean_ptr, var_ptr, weight_ptr, cols, col_mask, eps, HAS_WEIGHT)
    shift = tl.zeros_like(mean)
    if HAS_BIAS:
        shift = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    if EPS_ZERO:
        mean, shift = _infinite_scale_terms(mean, scale, shift)

    x = tl.load(x_ptr + _offsets(n, positions, cols, sx_n, sx_c, sx_l), mask=mask).to(tl.float32)
    # (x - mean) * scale rather than x * scale + shift: no cancellation when |mean| >> std.
    y = (x - mean[None, :]) * scale[None, :]
    if HAS_BIAS or EPS_ZERO:
        y += shift[None, :]
    if HAS_RESIDUAL:
        r_offsets = _offsets(n, positions, cols, sr_n, sr_c, sr_l)
        y += tl.load(residual_ptr + r_offsets, mask=mask).to(tl.float32)
    if RELU:
        y = tl.where(y < 0, 0.0, y)  # NaN passes, as in torch.relu (tl.maximum would drop it)
    stored = y.to(out_ptr.dtype.element_ty)
    o_offsets = _offsets(n, positions, cols, so_n, so_c, so_l)
    tl.store(out_ptr + o_offsets, stored, mask=mask)
    if MASK_PACKING != 0:
        _store_row_mask(relu_mask_ptr, _relu_passes(stored), tl.program_id(0),
                        tl.program_id(1) * BLOCK_C, L, l_blocks, C, sx_n, sx_c, sx_l,
                        MASK_PACKING, BLOCK_R, BLOCK_C)


@triton.jit
def _masked_grad(grad_ptr, out_ptr, x_offsets, tile, col_start, n, positions, cols, mask,
                 C, L, l_blocks, sg_n, sg_c, sg_l, so_n, so_c, so_l, sx_n, sx_c, sx_l,
                 RELU: tl.constexpr, PACKED: tl.constexpr, MASK_PACKING: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """grad_out except where the ReLU cut the value (output <= 0): PyTorch's threshold_backward,
    which lets the gradient of a NaN output through. With PACKED, `out_ptr` is the packed ReLU
    mask: read a byte per 8 elements where this call's tiles hold whole bytes (MASK_PACKING),
    else each element's byte at its offset in x."""
    g = tl.load(grad_ptr + _offsets(n, positions, cols, sg_n, sg_c, sg_l), mask=mask, other=0.0)
    g = g.to(tl.float32)
    if RELU:
        if PACKED and MASK_PACKING != 0:
            bits = _row_mask_bits(out_ptr, tile, col_start, L, l_blocks, C, sx_n, sx_c, sx_l,
                                  MASK_PACKING, BLOCK_R, BLOCK_C)
            g = tl.where(bits == 0, 0.0, g)
        elif PACKED:
            g = _passed_by_mask(g, out_ptr, x_offsets, mask)
        else:
            out = tl.load(out_ptr + _offsets(n, positions, cols, so_n, so_c, so_l), mask=mask,
                          other=0.0)
            g = tl.where(out <= 0, 0.0, g)
    return g


@triton.jit(do_not_specialize=["tiles_total", "tiles_per_split"])
def _backward_reduce_kernel(
    grad_ptr, out_ptr, x_ptr, mean_ptr, sums_ptr, grad_residual_ptr,
    C, L, l_blocks, tiles_total, tiles_per_split,
    sg_n, sg_c, sg_l, so_n, so_c, so_l, sx_n, sx_c, sx_l, sdr_n, sdr_c, sdr_l,
    RELU: tl.constexpr, PACKED: tl.constexpr, MASK_PACKING: tl.constexpr,
    STORE_GRAD_RESIDUAL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Per-channel sums of the masked gradient g and of g * (x - mean), into this split's slots
    of `sums_ptr` (see `_store_sums`); with a residual, also
    writes g as the residual's gradient, so that the elementwise pass reads it instead of
    grad_out and the ReLU mask (`out_ptr`: the output, or with PACKED the packed mask)."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    split = tl.program_id(1)
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, tiles_total)
    mean = tl.load(mean_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)

    sums_g = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    sums_gx = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for tile in range(first, last):
        n, positions, position_mask = _tile(tile, L, l_blocks, BLOCK_R)
        mask = position_mask[:, None] & col_mask[None, :]
        x_offsets = _offsets(n, positions, cols, sx_n, sx_c, sx_l)
        g = _masked_grad(grad_ptr, out_ptr, x_offsets, tile, tl.program_id(0) * BLOCK_C, n,
                         positions, cols, mask, C, L, l_blocks, sg_n, sg_c, sg_l, so_n, so_c,
                         so_l, sx_n, sx_c, sx_l, RELU, PACKED, MASK_PACKING, BLOCK_R, BLOCK_C)
        x = tl.load(x_ptr + x_offsets, mask=mask, other=0.0)
        sums_g += g
        sums_gx += g * tl.where(mask, x.to(tl.float32) - mean[None, :], 0.0)
        if STORE_GRAD_RESIDUAL:
            dr_offsets = _offsets(n, positions, cols, sdr_n, sdr_c, sdr_l)
            tl.store(grad_residual_ptr + dr_offsets, g.to(grad_residual_ptr.dtype.element_ty),
                     mask=mask)

    _store_sums(sums_ptr, split * C + cols, C, col_mask, tl.sum(sums_g, axis=0),
                tl.sum(sums_gx, axis=0))


@triton.jit
def _store_sums(sums_ptr, slot, C, mask, sum_g, sum_gx):
    """A backward reduction program's sums into its slots. `sums_ptr` holds, one allocation a
    call: the channels' total of g * (x - mean) (C, which the finalize writes and the elementwise
    pass reads), then the [splits, C] slots of g, then those of g * (x - mean); the splits are
    the launch's second grid dimension."""
    plane = tl.num_programs(1) * C
    tl.store(sums_ptr + C + slot, sum_g, mask=mask)
    tl.store(sums_ptr + C + plane + slot, sum_gx, mask=mask)


@triton.jit
def _sum_slots(part_ptr, cols, col_mask, C, num_splits,
               BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Sum of the [num_splits, C] slots of channels `cols`, BLOCK_S slots at a time, in a fixed
    order (deterministic)."""
    total = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    for start in range(0, num_splits, BLOCK_S):
        slots = start + tl.arange(0, BLOCK_S)
        mask = (slots < num_splits)[:, None] & col_mask[None, :]
        total += tl.load(part_ptr + slots[:, None] * C + cols[None, :], mask=mask, other=0.0)
    return tl.sum(total, axis=0)


@triton.jit
def _backward_finalize_kernel(
    sums_ptr, var_ptr, grad_weight_ptr, grad_bias_ptr,
    C, num_splits, eps,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Sums the reduce pass's slots (`_store_sums`): grad_bias is the sum of g, grad_weight that
    of g * (x - mean) times invstd, which sum also goes to the head of `sums_ptr`."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    sum_g = _sum_slots(sums_ptr + C, cols, col_mask, C, num_splits, BLOCK_S, BLOCK_C)
    sum_gx = _sum_slots(sums_ptr + C + num_splits * C, cols, col_mask, C, num_splits, BLOCK_S,
                        BLOCK_C)
    var = tl.load(var_ptr + cols, mask=col_mask, other=1.0).to(tl.float32)
    invstd = 1.0 / tl.sqrt(var + eps)
    tl.store(grad_weight_ptr + cols, sum_gx * invstd, mask=col_mask)
    tl.store(grad_bias_ptr + cols, sum_g, mask=col_mask)
    tl.store(sums_ptr + cols, sum_gx, mask=col_mask)


@triton.jit
def _backward_elementwise_kernel(
    grad_ptr, out_ptr, x_ptr, mean_ptr, var_ptr, weight_ptr, sum_g_ptr, sum_gx_ptr,
    grad_input_ptr,
    C, L, l_blocks, count, eps,
    sg_n, sg_c, sg_l, so_n, so_c, so_l, sx_n, sx_c, sx_l, sdi_n, sdi_c, sdi_l,
    HAS_WEIGHT: tl.constexpr, BATCH_STATS: tl.constexpr, RELU: tl.constexpr,
    PACKED: tl.constexpr, MASK_PACKING: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """grad_input from the masked gradient: `grad_ptr` is either grad_out (masked here by the
    ReLU mask `out_ptr` when RELU) or the residual's gradient the reduce pass wrote, already
    masked (RELU off)."""
    n, positions, position_mask = _tile(tl.program_id(0), L, l_blocks, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    mask = position_mask[:, None] & col_mask[None, :]
    mean, invstd, scale = _channel_scale(mean_ptr, var_ptr, weight_ptr, cols, col_mask, eps, HAS_WEIGHT)

    x_offsets = _offsets(n, positions, cols, sx_n, sx_c, sx_l)
    g = _masked_grad(grad_ptr, out_ptr, x_offsets, tl.program_id(0), tl.program_id(1) * BLOCK_C,
                     n, positions, cols, mask, C, L, l_blocks, sg_n, sg_c, sg_l, so_n, so_c, so_l,
                     sx_n, sx_c, sx_l, RELU, PACKED, MASK_PACKING, BLOCK_R, BLOCK_C)
    if BATCH_STATS:
        # With x_hat = (x - mean) * invstd and g the masked gradient, BatchNorm's backward is
        #   grad_x = weight * invstd * (g - mean(g) - x_hat * mean(g * x_hat)),
        # the means over the channel's N*L values; sum_g and sum_gx (= sum(g * (x - mean)))
        # come from the reduce pass, so x_hat * mean(g * x_hat) = (x - mean) * invstd^2 * sum_gx / count.
        x = tl.load(x_ptr + x_offsets, mask=mask).to(tl.float32)
        mean_g = tl.load(sum_g_ptr + cols, mask=col_mask, other=0.0) / count
        mean_gx = tl.load(sum_gx_ptr + cols, mask=col_mask, other=0.0) / count
        projection = (x - mean[None, :]) * (invstd * invstd * mean_gx)[None, :]
        grad_input = (g - mean_g[None, :] - projection) * scale[None, :]
    else:
        grad_input = g * scale[None, :]
    di_offsets = _offsets(n, positions, cols, sdi_n, sdi_c, sdi_l)
    tl.store(grad_input_ptr + di_offsets, grad_input.to(grad_input_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _update_running_stats_kernel(
    running_mean_ptr, running_var_ptr, mean_ptr, var_ptr, C, momentum, unbias,
    BLOCK_C: tl.constexpr,
):
    """The running-stat update alone, where it cannot join the finalize (the custom op's path)."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = cols < C
    _update_running(running_mean_ptr, running_var_ptr, tl.load(mean_ptr + cols, mask=mask),
                    tl.load(var_ptr + cols, mask=mask), cols, mask, momentum, unbias)


# ------------------------------------------------------------------------------------------------
# Spans: NCHW maps whose rows are not 16-byte aligned (14x14 and 7x7 in bf16).
#
# A row of L=49 bf16 values starts wherever the previous one ended, so row tiles can only use
# 2-byte accesses. In an NCHW tensor the BLOCK_C*L values of BLOCK_C consecutive channels of one
# sample are contiguous, though, and start aligned when BLOCK_C*L and C*L are multiples of 8: a
# span tile reads them as one flat vector (16-byte accesses), with each lane's channel
# `j // L` (L a compile-time constant: a multiply, not a division). Per-channel values are
# computed once per program for its BLOCK_C channels and spread to the lanes (tl.gather), and
# per-channel sums come from the lanes in one segmented scan per program, read at each channel's
# last lane.


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
def _span_batch_stats_partial_kernel(
    x_ptr, part_ptr, C, samples, samples_per_split,
    L: tl.constexpr, BLOCK_C: tl.constexpr, SPAN: tl.constexpr,
    EVEN_C: tl.constexpr,
):
    lanes, channels, lane_mask = _span_lanes(C, L, BLOCK_C, SPAN, EVEN_C)
    split = tl.program_id(1)
    first = split * samples_per_split
    last = tl.minimum(first + samples_per_split, samples)
    # Every lane sees every sample of the range: one count for all, and sums around each lane's
    # first value, the next sample's load issued before this one's arithmetic.
    x = tl.load(x_ptr + _span_base(first, C, L, BLOCK_C) + lanes,
                mask=lane_mask & (lanes * 0 + first < last), other=0.0)
    shift = x.to(tl.float32)
    shift = tl.where(tl.abs(shift) < float("inf"), shift, 0.0)
    sums = tl.zeros([SPAN], dtype=tl.float32)
    squares = tl.zeros([SPAN], dtype=tl.float32)
    for n in range(first, last):
        x_next = tl.load(x_ptr + _span_base(n + 1, C, L, BLOCK_C) + lanes,
                         mask=lane_mask & (lanes * 0 + n + 1 < last), other=0.0)
        sums, squares = _shifted_update(shift, sums, squares, x.to(tl.float32), lane_mask)
        x = x_next
    count = tl.zeros([SPAN], dtype=tl.float32) + tl.maximum(last - first, 0).to(tl.float32)
    count, mean, m2, odd = _lane_summary(count, shift, sums, squares)
    # One segmented scan merges each channel's lanes; its last lane stores the channel's summary.
    _, count, mean, m2, odd = tl.associative_scan((lanes // L, count, mean, m2, odd), 0,
                                                  _merge_segments)
    _store_summary(part_ptr, split * C + channels, C, _last_lanes(lanes, lane_mask, L), count,
                   mean, m2, odd)


@triton.jit
def _span_forward_kernel(
    x_ptr, residual_ptr, out_ptr, mean_ptr, var_ptr, weight_ptr, bias_ptr, relu_mask_ptr, C, eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    RELU: tl.constexpr, EPS_ZERO: tl.constexpr, MASK_PACKING: tl.constexpr, L: tl.constexpr,
    BLOCK_C: tl.constexpr, SPAN: tl.constexpr, EVEN_C: tl.constexpr,
):
    lanes, channels, lane_mask = _span_lanes(C, L, BLOCK_C, SPAN, EVEN_C)
    offsets = _span_base(tl.program_id(1), C, L, BLOCK_C) + lanes
    # Mean, scale and shift once per channel of the block (a square root and a division for
    # BLOCK_C channels, not for every lane), then spread to the lanes.
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    mean, _, scale = _channel_scale(mean_ptr, var_ptr, weight_ptr, cols, col_mask, eps, HAS_WEIGHT)
    shift = tl.zeros_like(mean)
    if HAS_BIAS:
        shift = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    if EPS_ZERO:
        mean, shift = _infinite_scale_terms(mean, scale, shift)
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
    grad_ptr, out_ptr, x_ptr, mean_ptr, sums_ptr, grad_residual_ptr,
    C, samples, samples_per_split,
    RELU: tl.constexpr, PACKED: tl.constexpr, MASK_PACKING: tl.constexpr,
    STORE_GRAD_RESIDUAL: tl.constexpr, L: tl.constexpr, BLOCK_C: tl.constexpr, SPAN: tl.constexpr,
    EVEN_C: tl.constexpr,
):
    lanes, channels, lane_mask = _span_lanes(C, L, BLOCK_C, SPAN, EVEN_C)
    mean = tl.load(mean_ptr + channels, mask=lane_mask, other=0.0).to(tl.float32)
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


@triton.jit
def _span_backward_elementwise_kernel(
    grad_ptr, out_ptr, x_ptr, mean_ptr, var_ptr, weight_ptr, sum_g_ptr, sum_gx_ptr,
    grad_input_ptr, C, count, eps,
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
    mean, invstd, scale = _channel_scale(mean_ptr, var_ptr, weight_ptr, cols, col_mask, eps,
                                         HAS_WEIGHT)
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


# ------------------------------------------------------------------------------------------------
# Launches: what each call runs, as data, so that the ahead-of-time check compiles exactly these.

FINALIZE_BLOCK_C = 64
FINALIZE_BLOCK_S = 32
# Under the interpreter programs run one after another: few of them keep tests fast.
INTERPRETER_PROGRAMS = 4


class KernelLaunch(NamedTuple):
    """One kernel launch: the kernel, its grid, runtime arguments and compile-time constants.
    (A named tuple: a layer builds seven of these a step, and a tuple is the cheapest to build.)"""

    kernel: Any  # a triton.JITFunction
    grid: tuple[int, ...]
    args: tuple[Any, ...]
    constexprs: dict[str, Any] = {}  # never mutated
    num_warps: int = 4

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.constexprs, num_warps=self.num_warps)


@dataclass(frozen=True)
class _Tiling:
    """How one call walks its tensors: the (samples, positions) view and the tile shape."""

    samples: int  # N, or 1 when every tensor stores its samples back to back
    positions: int  # L, or N*L in that case
    strides: tuple[Strides3d, ...]  # per tensor, in the view above
    block_r: int
    block_c: int
    num_warps: int
    col_blocks: int
    l_blocks: int

    @property
    def tiles(self) -> int:
        return self.samples * self.l_blocks

    @property
    def stats_warps(self) -> int:
        """Warps of the statistics pass: 16 on full tiles, 8 values a thread, so its per-value
        state (shift, two sums) leaves registers for more warps per SM than the other passes."""
        return 16 if self.block_r * self.block_c >= 4096 else self.num_warps

    def split(self, programs: int) -> tuple[int, int]:
        """(tiles per split, splits) for a reduction of at most `programs` programs in all. The
        split depends on shapes and device only, so the reduction order is fixed run to run."""
        splits = max(1, min(self.tiles, programs // self.col_blocks))
        tiles_per_split = triton.cdiv(self.tiles, splits)
        return tiles_per_split, triton.cdiv(self.tiles, tiles_per_split)


def _tiling(x: torch.Tensor, strides: Sequence[Strides3d | None]) -> _Tiling:
    """The tiling for tensors shaped like `x` with these (N, C, L) strides (None: unused tensor)."""
    samples, channels, positions = x.shape[0], x.shape[1], spatial_numel(x)
    used = [s for s in strides if s is not None]
    if samples == 1 or all(s.n == positions * s.l for s in used):
        # Samples back to back: one long sample of N*L positions.
        strides = [None if s is None else Strides3d(0, s.c, s.l) for s in strides]
        positions, samples = samples * positions, 1
    channels_contiguous = used[0].c == 1 and positions > 1
    if channels_contiguous:
        block_c = min(64, triton.next_power_of_2(channels))
        block_r = min(max(16, 4096 // block_c), max(16, triton.next_power_of_2(positions)))
    else:
        block_r = min(1024, max(16, triton.next_power_of_2(positions)))
        block_c = min(triton.next_power_of_2(channels), max(1, 4096 // block_r), 64)
    return _Tiling(
        samples=samples, positions=positions, strides=tuple(s or Strides3d(0, 0, 0) for s in strides),
        block_r=block_r, block_c=block_c, num_warps=8 if block_r * block_c >= 4096 else 4,
        col_blocks=triton.cdiv(channels, block_c), l_blocks=triton.cdiv(positions, block_r),
    )


@dataclass(frozen=True)
class _SpanTiling:
    """Span tiles (see the Spans section): BLOCK_C channels of one sample, read as one flat run."""

    samples: int
    channels: int
    positions: int  # L, a compile-time constant of the span kernels
    block_c: int
    span: int  # lanes: block_c * positions rounded up to a power of two
    num_warps: int
    col_blocks: int

    def split(self, programs: int) -> tuple[int, int]:
        """(samples per split, splits) for a reduction of at most `programs` programs in all."""
        splits = max(1, min(self.samples, programs // self.col_blocks))
        per_split = triton.cdiv(self.samples, splits)
        return per_split, triton.cdiv(self.samples, per_split)

    def constexprs(self) -> dict[str, int | bool]:
        return dict(L=self.positions, BLOCK_C=self.block_c, SPAN=self.span,
                    EVEN_C=self.col_blocks * self.block_c == self.channels)


SPAN_MAX_LANES = 2048


def _span_tiling(x: torch.Tensor, tensors: Sequence[torch.Tensor | None]) -> _SpanTiling | None:
    """Span tiles for NCHW tensors whose rows of L values are not 16-byte aligned, else None."""
    positions = spatial_numel(x)
    if x.dim() < 3 or positions == 1 or positions * x.element_size() % 16 == 0:
        return None
    channels = x.shape[1]
    nchw = (channels * positions, positions, 1)
    if any(strides_3d(t) is None or tuple(strides_3d(t)) != nchw or t.shape != x.shape
           for t in tensors if t is not None):
        return None
    block_c = 1
    while block_c * 2 * positions <= SPAN_MAX_LANES and block_c < min(64, channels):
        block_c *= 2
    span = triton.next_power_of_2(block_c * positions)
    if span > 4 * SPAN_MAX_LANES:
        return None  # rows long enough for row tiles to stay efficient
    return _SpanTiling(samples=x.shape[0], channels=channels, positions=positions, block_c=block_c,
                       span=span,
                       num_warps=8 if span >= 2048 else 4, col_blocks=triton.cdiv(channels, block_c))


def _reduction_programs(kernel: Any, args: tuple[Any, ...], constexprs: dict[str, Any],
                        num_warps: int, device: torch.device) -> int:
    """Programs in one wave of `kernel` on `device` (a handful under the interpreter).

    On CUDA the kernel is compiled for these arguments (Triton caches it) and its registers and
    shared memory are read from the loaded binary. The ahead-of-time check passes a function of
    its own that reads them from a binary compiled for sm_90.
    """
    if device.type != "cuda":
        return INTERPRETER_PROGRAMS
    registers, shared = _compiled_resources(kernel, args, constexprs, num_warps, device)
    return programs_per_wave(registers, num_warps, shared, cuda_limits(device))


_RESOURCES: dict[Any, tuple[int, int]] = {}  # (registers, shared bytes) per kernel specialization


def _compiled_resources(kernel: Any, args: tuple[Any, ...], constexprs: dict[str, Any],
                        num_warps: int, device: torch.device) -> tuple[int, int]:
    # What Triton specializes a binary on: tensor dtypes and alignment, ints equal to 1 or
    # divisible by 16 (the unspecialized tile counts ride along harmlessly).
    key = (kernel.fn.__name__, tuple(sorted(constexprs.items())), num_warps, device.index,
           tuple((a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor)
                 else (a == 1, a % 16 == 0) for a in args
                 if isinstance(a, torch.Tensor) or (isinstance(a, int) and not isinstance(a, bool))))
    if key not in _RESOURCES:
        compiled = kernel.warmup(*args, **constexprs, num_warps=num_warps, grid=(1,))
        compiled._init_handles()  # loads the binary: its register count is known from then on
        _RESOURCES[key] = (compiled.n_regs, compiled.metadata.shared)
    return _RESOURCES[key]


def _dense_like(t: torch.Tensor) -> torch.Tensor:
    """`t` itself when its spatial dims merge into one stride, else a contiguous copy."""
    return t if strides_3d(t) is not None else t.contiguous()


def _writable(t: torch.Tensor) -> torch.Tensor:
    """A buffer the kernel can write for output `t`: t itself, or a contiguous stand-in."""
    return t if strides_3d(t) is not None else torch.empty(t.shape, dtype=t.dtype, device=t.device)


class _LaunchTemplate(NamedTuple):
    """A launch as a signature fixes it, less what each call brings: its tensors, which lead the
    arguments, and its float scalars (eps; momentum and unbias), which sit between `head` and
    `tail`. Built on a signature's first call, so that later calls only fill it in."""

    kernel: Any  # a triton.JITFunction
    grid: tuple[int, ...]
    head: tuple[Any, ...]
    tail: tuple[Any, ...]
    constexprs: dict[str, Any]  # never mutated
    num_warps: int

    def bind(self, tensors: tuple[Any, ...], *scalars: float) -> KernelLaunch:
        return KernelLaunch(self.kernel, self.grid, (*tensors, *self.head, *scalars, *self.tail),
                            self.constexprs, self.num_warps)


def _finalize_template(kernel: Any, channels: int, splits: int,
                       **constexprs: Any) -> _LaunchTemplate:
    """A finalize launch: one program per FINALIZE_BLOCK_C channels, summing every slot."""
    return _LaunchTemplate(kernel, (-(-channels // FINALIZE_BLOCK_C),), (channels, splits), (),
                           dict(constexprs, BLOCK_S=FINALIZE_BLOCK_S, BLOCK_C=FINALIZE_BLOCK_C),
                           4)


# ------------------------------------------------------------------------------------------------
# Geometry: what a call decides from its tensors' shapes, strides, dtypes and device alone (which
# inputs need a dense copy, which outputs a stand-in buffer, the tiling, the reduction's split),
# worked out on a signature's first call and then looked up. Deciding it took most of a layer's
# host time, every call, for the same answer; and a split fixed per signature also fixes the
# reduction order, whatever the alignment of later calls' pointers.


@dataclass(frozen=True)
class _Geometry:
    copies: tuple[bool, ...]  # per input: copy it to a contiguous layout first
    stand_ins: tuple[bool, ...]  # per output: compute it into a contiguous buffer, then copy
    span: _SpanTiling | None  # span tiles, or else
    tiling: _Tiling | None  # row tiles
    per_split: int  # tiles (span: samples) per reduction program, and programs along the split
    splits: int
    mask_packing: int  # how a forward writes the packed ReLU mask (MASK_NONE: it cannot)

    @property
    def reshaped(self) -> bool:
        """Whether any tensor goes through a contiguous copy or stand-in buffer."""
        return any(self.copies) or any(self.stand_ins)


_GEOMETRIES: dict[tuple, _Geometry] = {}


def _signature(t: torch.Tensor | None) -> tuple | None:
    return None if t is None else (t.shape, t.stride(), t.dtype, t.device)


def _tilings(inputs: Sequence[torch.Tensor | None], outputs: Sequence[torch.Tensor | None]):
    """(dense inputs, output buffers, span tiling or None, row tiling or None) of a call."""
    dense = [None if t is None else _dense_like(t) for t in inputs]
    buffers = [None if t is None else _writable(t) for t in outputs]
    x = dense[0]
    span = _span_tiling(x, [*dense, *buffers])
    tiling = None if span is not None else _tiling(
        x, [None if t is None else strides_3d(t) for t in (*dense, *buffers)])
    return dense, buffers, span, tiling


def _is_dense(t: torch.Tensor) -> bool:
    """Whether t's elements fill offsets 0 to numel - 1 of its storage, each once."""
    formats = {4: torch.channels_last, 5: torch.channels_last_3d}
    return t.is_contiguous() or (t.dim() in formats
                                 and t.is_contiguous(memory_format=formats[t.dim()]))


def _mask_packing(x: torch.Tensor, span: _SpanTiling | None, tiling: _Tiling | None) -> int:
    """How a forward's tiles write x's packed ReLU mask: along the axis x is contiguous in,
    where every byte (8 consecutive offsets) lies in one tile; else MASK_NONE, and the backward
    reads the output. x must be dense (a mask of x's offsets has no holes) and not copied (the
    backward finds the bits by the saved x's own offsets)."""
    if x.numel() % 8 or not _is_dense(x):
        return MASK_NONE
    if span is not None:
        whole = span.block_c * span.positions % 8 == 0 and span.channels * span.positions % 8 == 0
        return MASK_ALONG_SPAN if whole else MASK_NONE
    s = tiling.strides[0]
    if (s.c == 1 and x.shape[1] % 8 == 0 and tiling.block_c % 8 == 0
            and s.n % 8 == 0 and s.l % 8 == 0):
        return MASK_ALONG_CHANNELS
    if (s.l == 1 and tiling.positions % 8 == 0 and tiling.block_r % 8 == 0
            and s.n % 8 == 0 and s.c % 8 == 0):
        return MASK_ALONG_POSITIONS
    return MASK_NONE


def relu_mask_bytes(x: torch.Tensor, residual: torch.Tensor | None) -> int:
    """`Implementation.relu_mask_bytes` in _contract.py: x.numel() / 8 where a forward's tiles
    can write x's packed ReLU mask, else 0 (the fake kernel's answer, from shapes and strides)."""
    if x.numel() == 0:
        return 0
    # x stands for the output, which has its strides where a mask can be written at all.
    _, _, span, tiling = _tilings((x, residual), (x,))
    return x.numel() // 8 if _mask_packing(x, span, tiling) != MASK_NONE else 0


def _geometry(key: tuple, inputs: Sequence[torch.Tensor | None],
              outputs: Sequence[torch.Tensor | None],
              reduction: Any | None) -> _Geometry:
    """The cached geometry of a call; `key` ends with the function that sizes reductions.
    `inputs[0]` is x, None stands for a tensor the call does not use; `reduction(tiling or span,
    dense inputs, output buffers)` gives the reduction's (kernel, provisional args, constexprs,
    num_warps), to size its split from (None: no reduction)."""
    found = _GEOMETRIES.get(key)
    if found is not None:
        return found
    dense, buffers, span, tiling = _tilings(inputs, outputs)
    x = dense[0]
    per_split = splits = 0
    if reduction is not None:
        shape = span if span is not None else tiling
        kernel, provisional, constexprs, num_warps = reduction(shape, dense, buffers)
        programs = key[-1](kernel, provisional, constexprs, num_warps, x.device)
        per_split, splits = shape.split(programs)
    found = _Geometry(
        copies=tuple(d is not None and d is not t for d, t in zip(dense, inputs)),
        stand_ins=tuple(b is not None and b is not t for b, t in zip(buffers, outputs)),
        span=span, tiling=tiling, per_split=per_split, splits=splits,
        mask_packing=MASK_NONE if x is not inputs[0] else _mask_packing(x, span, tiling))
    _GEOMETRIES[key] = found
    return found


def _dense_inputs(geometry: _Geometry, *inputs: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [t.contiguous() if copy else t for t, copy in zip(inputs, geometry.copies)]


def _buffer(geometry: _Geometry, index: int, t: torch.Tensor) -> torch.Tensor:
    if not geometry.stand_ins[index]:
        return t
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


# ------------------------------------------------------------------------------------------------
# Plans: a call's launches as its signature (the geometry's, plus which optional tensors and
# flags it has) fixes them, worked out on the signature's first call. A later call allocates its
# outputs, one scratch buffer per reduction, and fills its tensors and scalars into the
# templates: the host path of a layer stays a few allocations and tuple builds.


class ForwardCall(NamedTuple):
    """The launches of one forward and the tensors they fill."""

    launches: list[KernelLaunch]
    out: torch.Tensor
    out_buffer: torch.Tensor
    saved_mean: torch.Tensor
    saved_var: torch.Tensor
    relu_mask: torch.Tensor  # packed (uint8, x.numel() / 8 bytes), or empty where none is written


class _ForwardPlan(NamedTuple):
    geometry: _Geometry
    statistics: _LaunchTemplate | None  # the statistics pass and its finalize (training only)
    finalize: _LaunchTemplate | None
    normalize: _LaunchTemplate
    parts: int  # fp32 values of the statistics pass's slots: four planes of [splits, C]
    mask_bytes: int  # of the packed ReLU mask (0: none is written)


_FORWARD_PLANS: dict[tuple, _ForwardPlan] = {}


def _forward_reduction(shape, dense, buffers):
    x = dense[0]
    channels = x.shape[1]
    parts = torch.empty(channels, dtype=torch.float32, device=x.device)
    if isinstance(shape, _SpanTiling):
        provisional = (x, parts, channels, shape.samples, 1)
        return _span_batch_stats_partial_kernel, provisional, shape.constexprs(), shape.num_warps
    # The split does not change the binary (unspecialized), so any split measures it.
    provisional = (x, parts, channels, shape.positions, shape.l_blocks, shape.tiles, 1,
                   *shape.strides[0])
    return (_batch_stats_partial_kernel, provisional,
            dict(BLOCK_R=shape.block_r, BLOCK_C=shape.block_c), shape.stats_warps)


def _forward_plan(x, residual, out, batch_stats: bool, constexprs: dict[str, Any], update: bool,
                  reduction_programs) -> _ForwardPlan:
    """`constexprs` are the normalize pass's flags, MASK_PACKING true where a mask is wanted."""
    geometry = _geometry((_signature(x), _signature(residual), batch_stats, reduction_programs),
                         (x, residual), (out,), _forward_reduction if batch_stats else None)
    channels = x.shape[1]
    span, tiling = geometry.span, geometry.tiling
    statistics = finalize = None
    if batch_stats and span is not None:
        statistics = _LaunchTemplate(
            _span_batch_stats_partial_kernel, (span.col_blocks, geometry.splits),
            (channels, span.samples, geometry.per_split), (), span.constexprs(), span.num_warps)
    elif batch_stats:
        statistics = _LaunchTemplate(
            _batch_stats_partial_kernel, (tiling.col_blocks, geometry.splits),
            (channels, tiling.positions, tiling.l_blocks, tiling.tiles, geometry.per_split,
             *tiling.strides[0]), (), dict(BLOCK_R=tiling.block_r, BLOCK_C=tiling.block_c),
            tiling.stats_warps)
    if batch_stats:
        finalize = _finalize_template(_batch_stats_finalize_kernel, channels, geometry.splits,
                                      UPDATE_RUNNING=update)
    packing = geometry.mask_packing if constexprs["MASK_PACKING"] else MASK_NONE
    constexprs = dict(constexprs, MASK_PACKING=packing)
    if span is not None:
        normalize = _LaunchTemplate(_span_forward_kernel, (span.col_blocks, span.samples),
                                    (channels,), (), dict(constexprs, **span.constexprs()),
                                    span.num_warps)
    else:
        normalize = _LaunchTemplate(
            _forward_kernel, (tiling.tiles, tiling.col_blocks),
            (channels, tiling.positions, tiling.l_blocks),
            tuple(s for strides in tiling.strides for s in strides),
            dict(constexprs, BLOCK_R=tiling.block_r, BLOCK_C=tiling.block_c), tiling.num_warps)
    return _ForwardPlan(geometry, statistics, finalize, normalize, 4 * geometry.splits * channels,
                        x.numel() // 8 if packing else 0)


def plan_forward(
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
    *,
    reduction_programs=_reduction_programs,
) -> ForwardCall:
    """Allocate a forward's outputs and describe its launches (without running them)."""
    batch_stats = running_mean is None
    key = (x.shape, x.stride(), x.dtype, x.device, _signature(residual), batch_stats,
           weight is not None, bias is not None, relu, pack_relu_mask, eps == 0,
           update is not None, reduction_programs)
    out = torch.empty_like(x)  # the input's strides, as the fake kernel promises
    plan = _FORWARD_PLANS.get(key)
    if plan is None:
        constexprs = dict(HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
                          HAS_RESIDUAL=residual is not None, RELU=relu, EPS_ZERO=eps == 0,
                          MASK_PACKING=relu and pack_relu_mask)
        plan = _FORWARD_PLANS[key] = _forward_plan(x, residual, out, batch_stats, constexprs,
                                                   update is not None, reduction_programs)
    out_buffer = out
    if plan.geometry.reshaped:
        out_buffer = _buffer(plan.geometry, 0, out)
        x, residual = _dense_inputs(plan.geometry, x, residual)
    channels = x.shape[1]
    launches = []
    if batch_stats:
        mean = saved_mean = torch.empty(channels, dtype=torch.float32, device=x.device)
        var = saved_var = torch.empty(channels, dtype=torch.float32, device=x.device)
        parts = torch.empty(plan.parts, dtype=torch.float32, device=x.device)
        running = (mean, var, 0.0, 0.0) if update is None else (
            update.running_mean, update.running_var, float(update.momentum), float(update.unbias))
        launches += [plan.statistics.bind((x, parts)),
                     plan.finalize.bind((parts, mean, var, *running[:2]), *running[2:])]
    else:
        mean, var = running_mean, running_var
        # Two tensors: a custom op's outputs may not alias one another.
        saved_mean = torch.empty(0, dtype=torch.float32, device=x.device)
        saved_var = torch.empty(0, dtype=torch.float32, device=x.device)
    relu_mask = torch.empty(plan.mask_bytes, dtype=torch.uint8, device=x.device)
    launches.append(plan.normalize.bind(
        (x, residual if residual is not None else x, out_buffer, mean, var,
         weight if weight is not None else mean, bias if bias is not None else mean, relu_mask),
        eps))
    return ForwardCall(launches, out, out_buffer, saved_mean, saved_var, relu_mask)


class BackwardCall(NamedTuple):
    """The launches of one backward and the tensors they fill."""

    launches: list[KernelLaunch]
    grad_input: torch.Tensor
    grad_input_buffer: torch.Tensor
    grad_residual: torch.Tensor
    grad_residual_buffer: torch.Tensor
    grad_weight: torch.Tensor
    grad_bias: torch.Tensor


class _BackwardPlan(NamedTuple):
    geometry: _Geometry
    reduce: _LaunchTemplate
    finalize: _LaunchTemplate
    elementwise: _LaunchTemplate
    sums: int  # fp32 values of the reduce pass's buffer: C, then two planes of [splits, C]


_BACKWARD_PLANS: dict[tuple, _BackwardPlan] = {}


def _backward_reduction(shape, dense, buffers, *, relu_mask: torch.Tensor | None):
    x, grad_out, _ = dense
    channels = x.shape[1]
    relu, residual_grad = relu_mask is not None, buffers[1] is not None
    vector = torch.empty(channels, dtype=torch.float32, device=x.device)
    grad_residual = buffers[1] if residual_grad else x.new_empty(0)
    span, tiling = (shape, None) if isinstance(shape, _SpanTiling) else (None, shape)
    packing = _mask_packing(x, span, tiling) if _is_packed(relu_mask) else MASK_NONE
    constexprs = dict(RELU=relu, PACKED=_is_packed(relu_mask), MASK_PACKING=packing,
                      STORE_GRAD_RESIDUAL=residual_grad)
    common = (grad_out, relu_mask if relu else grad_out, x, vector, vector, grad_residual, channels)
    if isinstance(shape, _SpanTiling):
        return (_span_backward_reduce_kernel, (*common, shape.samples, 1),
                dict(constexprs, **shape.constexprs()), shape.num_warps)
    sx, sg, so, _, sdr = shape.strides
    return (_backward_reduce_kernel,
            (*common, shape.positions, shape.l_blocks, shape.tiles, 1, *sg, *so, *sx, *sdr),
            dict(constexprs, BLOCK_R=shape.block_r, BLOCK_C=shape.block_c), shape.num_warps)


def _is_packed(relu_mask: torch.Tensor | None) -> bool:
    """Whether a backward's ReLU mask is the packed one (else the forward's output, or None)."""
    return relu_mask is not None and relu_mask.dtype == torch.uint8


def _backward_plan(key: tuple, x, grad_out, relu_mask, grad_input, grad_residual,
                   has_weight: bool, batch_stats: bool) -> _BackwardPlan:
    relu, packed = relu_mask is not None, _is_packed(relu_mask)
    residual_grad = grad_residual is not None
    out = None if packed else relu_mask  # the output, a tensor of x's shape, where it is the mask
    geometry = _geometry(key[:4] + key[-1:], (x, grad_out, out), (grad_input, grad_residual),
                         functools.partial(_backward_reduction, relu_mask=relu_mask))
    channels = x.shape[1]
    # Where this call's tiles hold whole bytes of the packed mask, they read a byte per 8 values.
    packing = geometry.mask_packing if packed else MASK_NONE
    reduce_constexprs = dict(RELU=relu, PACKED=packed, MASK_PACKING=packing,
                             STORE_GRAD_RESIDUAL=residual_grad)
    elementwise_constexprs = dict(HAS_WEIGHT=has_weight, BATCH_STATS=batch_stats,
                                  RELU=relu and not residual_grad, PACKED=packed,
                                  MASK_PACKING=packing)
    count = x.numel() // channels
    span, tiling = geometry.span, geometry.tiling
    if span is not None:
        reduce = _LaunchTemplate(
            _span_backward_reduce_kernel, (span.col_blocks, geometry.splits),
            (channels, span.samples, geometry.per_split), (),
            dict(reduce_constexprs, **span.constexprs()), span.num_warps)
        elementwise = _LaunchTemplate(
            _span_backward_elementwise_kernel, (span.col_blocks, span.samples), (channels, count),
            (), dict(elementwise_constexprs, **span.constexprs()), span.num_warps)
    else:
        sx, sg, so, sdi, sdr = tiling.strides
        blocks = dict(BLOCK_R=tiling.block_r, BLOCK_C=tiling.block_c)
        walk = (tiling.positions, tiling.l_blocks)
        reduce = _LaunchTemplate(
            _backward_reduce_kernel, (tiling.col_blocks, geometry.splits),
            (channels, *walk, tiling.tiles, geometry.per_split, *sg, *so, *sx, *sdr), (),
            dict(reduce_constexprs, **blocks), tiling.num_warps)
        # With a residual, the elementwise pass reads the masked gradient the reduce pass wrote.
        elementwise = _LaunchTemplate(
            _backward_elementwise_kernel, (tiling.tiles, tiling.col_blocks),
            (channels, *walk, count), (*(sdr if residual_grad else sg), *so, *sx, *sdi),
            dict(elementwise_constexprs, **blocks), tiling.num_warps)
    finalize = _finalize_template(_backward_finalize_kernel, channels, geometry.splits)
    return _BackwardPlan(geometry, reduce, finalize, elementwise,
                         channels * (1 + 2 * geometry.splits))


def plan_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    relu_mask: torch.Tensor | None,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    eps: float,
    batch_stats: bool,
    residual_grad: bool,
    *,
    reduction_programs=_reduction_programs,
) -> BackwardCall:
    """Allocate a backward's gradients and describe its launches (without running them)."""
    # Gradients take the strides the fake kernel promises, whatever copies compute them.
    grad_input = torch.empty_like(x)
    grad_residual = torch.empty_like(grad_out, dtype=x.dtype) if residual_grad else None
    key = (_signature(x), _signature(grad_out), _signature(relu_mask), residual_grad,
           weight is not None, batch_stats, reduction_programs)
    plan = _BACKWARD_PLANS.get(key)
    if plan is None:
        plan = _BACKWARD_PLANS[key] = _backward_plan(key, x, grad_out, relu_mask, grad_input,
                                                     grad_residual, weight is not None,
                                                     batch_stats)
    packed = relu_mask is not None and relu_mask.dtype == torch.uint8  # _is_packed, inline
    out = None if packed else relu_mask
    grad_input_buffer, grad_residual_buffer = grad_input, grad_residual
    if plan.geometry.reshaped:
        x, grad_out, out = _dense_inputs(plan.geometry, x, grad_out, out)
        grad_input_buffer = _buffer(plan.geometry, 0, grad_input)
        if residual_grad:
            grad_residual_buffer = _buffer(plan.geometry, 1, grad_residual)
    if not residual_grad:
        grad_residual = grad_residual_buffer = torch.empty(0, dtype=x.dtype, device=x.device)
    channels = x.shape[1]
    sums = torch.empty(plan.sums, dtype=torch.float32, device=x.device)
    # Separate tensors: the op's outputs must not share storage.
    grad_weight = torch.empty(channels, dtype=torch.float32, device=x.device)
    grad_bias = torch.empty(channels, dtype=torch.float32, device=x.device)
    # The ReLU mask's pointer: the packed mask, the output, or where RELU is off (and it is
    # unread) any valid pointer.
    mask_or_grad = relu_mask if packed else out if relu_mask is not None else grad_out
    masked = grad_residual_buffer if residual_grad else grad_out
    launches = [
        plan.reduce.bind((grad_out, mask_or_grad, x, mean, sums, grad_residual_buffer)),
        plan.finalize.bind((sums, var, grad_weight, grad_bias), eps),
        plan.elementwise.bind((masked, mask_or_grad, x, mean, var,
                               weight if weight is not None else var, grad_bias, sums,
                               grad_input_buffer), eps),
    ]
    return BackwardCall(launches, grad_input, grad_input_buffer, grad_residual,
                        grad_residual_buffer, grad_weight, grad_bias)


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`Implementation.forward` in _contract.py: the update joins the finalize launch."""
    call = plan_forward(x, weight, bias, residual, running_mean, running_var, eps, relu,
                        pack_relu_mask, update)
    for launch in call.launches:
        launch()
    if call.out_buffer is not call.out:
        call.out.copy_(call.out_buffer)
    return call.out, call.saved_mean, call.saved_var, call.relu_mask


def backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    relu_mask: torch.Tensor | None,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    eps: float,
    batch_stats: bool,
    residual_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`Implementation.backward` in _contract.py."""
    call = plan_backward(grad_out, x, relu_mask, weight, mean, var, eps, batch_stats,
                         residual_grad)
    for launch in call.launches:
        launch()
    if call.grad_input_buffer is not call.grad_input:
        call.grad_input.copy_(call.grad_input_buffer)
    if call.grad_residual_buffer is not call.grad_residual:
        call.grad_residual.copy_(call.grad_residual_buffer)
    return call.grad_input, call.grad_residual, call.grad_weight, call.grad_bias


def update_running_stats(running_mean: torch.Tensor, running_var: torch.Tensor, mean: torch.Tensor,
                         var: torch.Tensor, momentum: float, unbias: float) -> None:
    """`Implementation.update_running_stats` in _contract.py: one launch for both vectors."""
    channels = running_mean.numel()
    KernelLaunch(_update_running_stats_kernel, (-(-channels // FINALIZE_BLOCK_C),),
                 (running_mean, running_var, mean, var, channels, float(momentum), float(unbias)),
                 dict(BLOCK_C=FINALIZE_BLOCK_C))()
