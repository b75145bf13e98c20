"""Device helpers that the row and span kernels share: tile addressing, the packed ReLU
mask's bits, Welford summaries and each channel's scale.

Statistics are Welford summaries (count, mean, M2), made per lane from sums around the lane's first
value (see _lane_summary) and merged with Chan's formulas: exact for a constant channel, no
sum-of-squares cancellation over a channel, and inf and NaN give what a sum over the channel gives
(an inf mean, a NaN variance), kept apart from the finite values. Their limits, float32's (ATen's
CPU kernel sums in float64 instead, and the PyTorch path does too):
- the summaries' means are float32 at the values' offset, so the variance is good to about
  ulp(|mean|) / std relative (1e4 + randn: a few 1e-4; 1e3 + randn: a few 1e-5);
- a channel whose values lie so far apart that their offsets or a lane's sums of them pass the
  float range (3.4e38: values of both signs near it) gets an inf or NaN mean; means near the
  range themselves merge to finite ones (a constant 3e38 channel, or one of 3.0-3.3e38).
"""

from __future__ import annotations

import triton
import triton.language as tl


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
# (see relu_mask_packing): 1/16 of a bf16 activation's bytes, which the backward reads where it
# would read the whole output. The backward finds each element's bit by its offset in x, so any
# tiling reads it.
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
    whole bytes: relu_mask_packing of the reading call's tiling)."""
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
def _shifted_step(shift, sums, squares, x, mask):
    """_shifted_update for a step of several values per lane, along the last axis of `x` and
    `mask` ([lanes, step]), which a thread holds all of: summed with no exchange."""
    d = tl.where(mask, x - shift[:, None], 0.0)
    return sums + tl.sum(d, 1), squares + tl.sum(d * d, 1)


@triton.jit
def _lane_summary(count, shift, sums, squares):
    """Per-lane Welford summaries (count, mean, M2, odd) from sums around the lane's own first
    value `shift`: M2 = sum(d^2) - sum(d)^2 / count loses only digits in proportion to
    count * (mean - shift)^2 / M2, and a lane holds a few dozen values, so one outlier as its
    shift costs a few ulps of that lane's M2, not the channel's (summing a whole channel around
    one value would lose them all). Non-finite sums mean the lane saw an inf or NaN: "odd" carries
    their sum, the merge gives the channel a sum's statistics (inf mean, NaN variance)."""
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
    (count, mean, M2, odd: they follow the statistics in one buffer, so that a call allocates it
    once). The splits are the launch's second grid dimension."""
    plane = tl.num_programs(1) * C
    tl.store(part_ptr + slot, count, mask=mask)
    tl.store(part_ptr + plane + slot, mean, mask=mask)
    tl.store(part_ptr + 2 * plane + slot, m2, mask=mask)
    tl.store(part_ptr + 3 * plane + slot, odd, mask=mask)


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
def _normalize_terms(mean_ptr, var_ptr, weight_ptr, bias_ptr, cols, col_mask, C, eps,
                     HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, EPS_ZERO: tl.constexpr,
                     BATCH_STATS: tl.constexpr):
    """Per channel of `cols`, the forward's (mean, scale, shift): out = (x - mean) * scale +
    shift, once per channel rather than per element. With BATCH_STATS, `mean_ptr` is the batch's
    statistics buffer, the C variances after the C means (`var_ptr` unread); else the running
    statistics are two tensors."""
    if BATCH_STATS:
        var_ptr = mean_ptr + C
    mean, _, scale = _channel_scale(mean_ptr, var_ptr, weight_ptr, cols, col_mask, eps, HAS_WEIGHT)
    shift = tl.zeros_like(mean)
    if HAS_BIAS:
        shift = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    if EPS_ZERO:
        mean, shift = _infinite_scale_terms(mean, scale, shift)
    return mean, scale, shift


@triton.jit
def _store_sums(sums_ptr, slot, C, mask, sum_g, sum_gx):
    """A backward reduction program's sums into its slots. `sums_ptr` holds, one allocation a
    call: the channels' total of g * (x - mean) (C, which the merge writes and the elementwise
    pass reads), then the [splits, C] slots of g, then those of g * (x - mean); the splits are
    the launch's second grid dimension."""
    plane = tl.num_programs(1) * C
    tl.store(sums_ptr + C + slot, sum_g, mask=mask)
    tl.store(sums_ptr + C + plane + slot, sum_gx, mask=mask)
