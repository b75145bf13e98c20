"""The row kernels: BatchNorm statistics, normalize + residual add + ReLU, and the backward,
on tiles of rows.

Every tensor is addressed as a strided (N, C, L) view (see _layout.py); a kernel argument
`s<tensor>_<axis>` is the element stride of that view for tensor x, r (residual), o (out), g
(grad_out), di (grad_input) or dr (grad_residual) along axis n, c or l. A program works on a tile
of one sample's BLOCK_R consecutive spatial positions by BLOCK_C channels, so a tile's addresses
are `n * stride_n + l * stride_l + c * stride_c` with `n` a scalar: no per-element division, and
the compiler sees which axis is contiguous and vectorizes along it. When every tensor of a launch
stores its samples back to back (channels_last, or N = 1), the launch views them as a single
sample of N*L positions, which makes tiles long for small maps (7x7) too. Tiles are wide in C when
C is the contiguous axis (channels_last) and long in L otherwise (NCHW).

Instructions per element: an H100 issues ~33e12 thread instructions a second (132 SMs x 4 warp
schedulers x 32 lanes x 1.98 GHz) while its memory moves 3.35e12 bytes, so a kernel holds the byte
model only while it spends at most ~20 SASS instructions per bf16 value it moves per element.
tests/compile_kernels_for_hopper.py counts them in the sm_90 binary of every ResNet-50 and
ResNet-56 launch: all fit (the backward reduce takes 12-17.4 for its 2-3 values, the elementwise
passes 19-35 for 3, the forward 20-34 for 2-3, the statistics pass 7.1-10.9 for its one: sums
around a per-lane shift, no division, four tiles (NCHW two) loaded a step before any is summed,
16 warps where its tiles are full). The same check holds every reduction to 24 KB of loads an
iteration on each SM, the bytes in flight the memory needs to stream.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._triton_finalize import _finalize_statistics, _finalize_sums, _last_to_finish
from ._triton_tiles import (
    _channel_scale, _first_shift, _lane_summary, _merge, _normalize_terms, _offsets,
    _passed_by_mask, _relu_passes, _row_mask_bits, _shifted_update, _store_row_mask,
    _store_summary, _store_sums, _tile, _update_running,
)


# Tile counts vary with the batch; left unspecialized, they do not change the compiled binary, so
# the registers read from one compilation size every launch of that kernel.
@triton.jit(do_not_specialize=["tiles_total", "tiles_per_split"])
def _batch_stats_kernel(
    x_ptr, stats_ptr, counters_ptr, running_mean_ptr, running_var_ptr,
    C, L, l_blocks, tiles_total, tiles_per_split,
    sx_n, sx_c, sx_l, momentum, unbias,
    UPDATE_RUNNING: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr, TILES_PER_STEP: tl.constexpr,
):
    """The batch statistics: each program summarizes its range of tiles into its slot, and the
    last of a channel block to finish merges the block's slots (_triton_finalize.py).

    A step loads TILES_PER_STEP (1, 2 or 4) tiles at once, each a tensor of its own in the tile's
    layout, so that a thread holds its lanes' values of all of them and sums them with no
    exchange (a [tiles, rows, channels] tensor was laid out across a warp's threads by one
    Triton version or another, and summing along its tile axis took shuffles). A pass that only
    reads keeps only a step's loads in flight: at one tile a step, one 16-byte load a thread, one
    program of 16 warps an SM read at 30% of a copy's bandwidth on an H200, where the backward
    reduce, reading two or three tensors a tile, reached 75%."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    split = tl.program_id(1)
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, tiles_total)

    # Per-lane sums around a per-lane shift, no division in the loop, and one block reduction
    # after it. A step's loads are all issued before any of its values is used, so that a
    # warp waits on all of them at once; the other warps of the SM add meanwhile. Tiles past
    # the range load nothing. The first tile is read once for the lanes' shifts and again by
    # the first step, from the cache.
    x, mask = _load_tile(x_ptr, first, last, L, l_blocks, cols, col_mask, sx_n, sx_c, sx_l,
                         True, BLOCK_R)
    shift = _first_shift(x.to(tl.float32), mask, 0)
    sums = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    squares = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for tile in range(first, last, TILES_PER_STEP):
        x0, m0 = _load_tile(x_ptr, tile, last, L, l_blocks, cols, col_mask, sx_n, sx_c, sx_l,
                            True, BLOCK_R)
        x1, m1 = _load_tile(x_ptr, tile + 1, last, L, l_blocks, cols, col_mask, sx_n, sx_c,
                            sx_l, TILES_PER_STEP >= 2, BLOCK_R)
        x2, m2 = _load_tile(x_ptr, tile + 2, last, L, l_blocks, cols, col_mask, sx_n, sx_c,
                            sx_l, TILES_PER_STEP >= 4, BLOCK_R)
        x3, m3 = _load_tile(x_ptr, tile + 3, last, L, l_blocks, cols, col_mask, sx_n, sx_c,
                            sx_l, TILES_PER_STEP >= 4, BLOCK_R)
        sums, squares = _shifted_update(shift, sums, squares, x0.to(tl.float32), m0)
        if TILES_PER_STEP >= 2:
            sums, squares = _shifted_update(shift, sums, squares, x1.to(tl.float32), m1)
        if TILES_PER_STEP >= 4:
            sums, squares = _shifted_update(shift, sums, squares, x2.to(tl.float32), m2)
            sums, squares = _shifted_update(shift, sums, squares, x3.to(tl.float32), m3)
    # A lane's count, worked out rather than counted: every tile of the range, less the tail
    # tiles (the last of each sample) where the lane lies past L.
    tail_length = L - (l_blocks - 1) * BLOCK_R
    tails = last // l_blocks - first // l_blocks
    lane_tiles = (last - first) - tl.where(tl.arange(0, BLOCK_R) >= tail_length, tails, 0)
    count = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32) + lane_tiles.to(tl.float32)[:, None]
    count, mean, m2, odd = _lane_summary(count, shift, sums, squares)
    count, mean, m2, odd = _merge(count, mean, m2, odd, 0)
    _store_summary(stats_ptr + 2 * C, split * C + cols, C, col_mask, count, mean, m2, odd)
    if _last_to_finish(counters_ptr):
        _finalize_statistics(stats_ptr, running_mean_ptr, running_var_ptr, cols, col_mask, C,
                             momentum, unbias, UPDATE_RUNNING, BLOCK_S, BLOCK_C)


@triton.jit
def _load_tile(x_ptr, tile, last, L, l_blocks, cols, col_mask, sx_n, sx_c, sx_l,
               USED: tl.constexpr, BLOCK_R: tl.constexpr):
    """Tile `tile` of channels `cols` and its mask, empty past `last` (and where not USED: a
    step of fewer tiles compiles no load for it)."""
    n, positions, position_mask = _tile(tile, L, l_blocks, BLOCK_R)
    mask = (position_mask & (positions * 0 + tile < last))[:, None] & col_mask[None, :]
    if not USED:
        mask = mask & False
        return tl.zeros(mask.shape, dtype=x_ptr.dtype.element_ty), mask
    return tl.load(x_ptr + _offsets(n, positions, cols, sx_n, sx_c, sx_l), mask=mask), mask


@triton.jit
def _forward_kernel(
    x_ptr, residual_ptr, out_ptr, mean_ptr, var_ptr, weight_ptr, bias_ptr, relu_mask_ptr,
    C, L, l_blocks, eps,
    sx_n, sx_c, sx_l, sr_n, sr_c, sr_l, so_n, so_c, so_l,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    RELU: tl.constexpr, EPS_ZERO: tl.constexpr, MASK_PACKING: tl.constexpr,
    BATCH_STATS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    n, positions, position_mask = _tile(tl.program_id(0), L, l_blocks, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    mask = position_mask[:, None] & col_mask[None, :]
    mean, scale, shift = _normalize_terms(mean_ptr, var_ptr, weight_ptr, bias_ptr, cols, col_mask,
                                          C, eps, HAS_WEIGHT, HAS_BIAS, EPS_ZERO, BATCH_STATS)

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
    grad_ptr, out_ptr, x_ptr, stats_ptr, sums_ptr, grad_residual_ptr, counters_ptr,
    grad_weight_ptr, grad_bias_ptr,
    C, L, l_blocks, tiles_total, tiles_per_split,
    sg_n, sg_c, sg_l, so_n, so_c, so_l, sx_n, sx_c, sx_l, sdr_n, sdr_c, sdr_l, eps,
    RELU: tl.constexpr, PACKED: tl.constexpr, MASK_PACKING: tl.constexpr,
    STORE_GRAD_RESIDUAL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Per-channel sums of the masked gradient g and of g * (x - mean), into this split's slots
    of `sums_ptr` (see `_store_sums`), which the last program of a channel block to finish sums
    into the weight's and bias's gradients (_triton_finalize.py); with a residual, also writes g
    as the residual's gradient, so that the elementwise pass reads it instead of grad_out and the
    ReLU mask (`out_ptr`: the output, or with PACKED the packed mask). `stats_ptr` holds the C
    means, then the C variances."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    split = tl.program_id(1)
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, tiles_total)
    mean = tl.load(stats_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)

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
    if _last_to_finish(counters_ptr):
        _finalize_sums(sums_ptr, stats_ptr, grad_weight_ptr, grad_bias_ptr, cols, col_mask, C,
                       eps, BLOCK_S, BLOCK_C)


@triton.jit
def _backward_elementwise_kernel(
    grad_ptr, out_ptr, x_ptr, stats_ptr, weight_ptr, sum_g_ptr, sum_gx_ptr, grad_input_ptr,
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
    mean, invstd, scale = _channel_scale(stats_ptr, stats_ptr + C, weight_ptr, cols, col_mask,
                                         eps, HAS_WEIGHT)

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
    running_mean_ptr, running_var_ptr, stats_ptr, C, momentum, unbias,
    BLOCK_C: tl.constexpr,
):
    """The running-stat update alone, where it cannot join the statistics pass (the custom op's
    path): from the batch's statistics, the C means then the C variances of `stats_ptr`."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = cols < C
    _update_running(running_mean_ptr, running_var_ptr, tl.load(stats_ptr + cols, mask=mask),
                    tl.load(stats_ptr + C + cols, mask=mask), cols, mask, momentum, unbias)
