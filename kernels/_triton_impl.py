"""Triton kernels for BatchNorm + residual add + ReLU, forward and backward.

Every tensor is addressed as a strided (N, C, L) view (see _layout.py). A program works on a tile
of one sample's BLOCK_R consecutive spatial positions by BLOCK_C channels, so a tile's addresses are
`n * stride_n + l * stride_l + c * stride_c` with `n` a scalar: no per-element division, and the
compiler sees which axis is contiguous and vectorizes along it. When every tensor of a launch stores
its samples back to back (channels_last, or N = 1), the launch views them as a single sample of
N*L positions, which makes tiles long for small maps (7x7) too. Tiles are wide in C when C is the
contiguous axis (channels_last) and long in L otherwise (NCHW).

Bytes moved (the benchmark's byte model counts exactly these):
- training forward: x read twice (statistics, then normalize), residual read once, out written once;
- eval forward: x and residual read once, out written once;
- backward: grad_out, out (for the ReLU mask) and x read twice (reduction, then elementwise),
  grad_input and grad_residual written once. The ReLU mask is recomputed from the saved output,
  which the next layer keeps alive anyway, instead of storing a mask of its own.

Per-channel reductions are deterministic split reductions with no atomics: each program reduces a
fixed range of tiles into its own slot of a [splits, C] buffer, and a second small kernel folds the
slots in a fixed order. The forward keeps (count, mean, M2) per slot and merges them with Chan's
formula, which stays accurate where sum / sum-of-squares would cancel (large means, fp16 inputs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._layout import Strides3d, spatial_numel, strides_3d


@triton.jit
def _offsets(n, positions, cols, stride_n, stride_c, stride_l):
    return (n.to(tl.int64) * stride_n + positions.to(tl.int64)[:, None] * stride_l
            + cols.to(tl.int64)[None, :] * stride_c)


@triton.jit
def _tile(tile, L, l_blocks, BLOCK_R: tl.constexpr):
    """Sample index, positions and their mask, and valid count of tile number `tile`."""
    n = tile // l_blocks
    start = (tile - n * l_blocks) * BLOCK_R
    positions = start + tl.arange(0, BLOCK_R)
    return n, positions, positions < L, tl.minimum(L - start, BLOCK_R)


@triton.jit
def _chan_merge(count, mean, m2, other_count, other_mean, other_m2):
    """Chan et al.'s merge of two (count, mean, M2) summaries, with PyTorch's non-finite results.

    Where a mean is inf or NaN the merged mean is their sum (inf stays inf, inf - inf is NaN, as a
    sum over the channel gives) and M2 is NaN. The M2 term multiplies the weight in first, so that
    merging into the empty start (weight 0) stays exact however large the mean.
    """
    new_count = count + other_count
    delta = other_mean - mean
    finite = (tl.abs(mean) < float("inf")) & (tl.abs(other_mean) < float("inf"))
    mean = tl.where(finite, mean + delta * (other_count / new_count), mean + other_mean)
    m2 = tl.where(finite, m2 + other_m2 + (delta * (count * other_count / new_count)) * delta,
                  float("nan"))
    return new_count, mean, m2


@triton.jit
def _batch_stats_partial_kernel(
    x_ptr, part_mean_ptr, part_m2_ptr, part_count_ptr,
    C, L, l_blocks, tiles_total, tiles_per_split,
    sx_n, sx_c, sx_l,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    split = tl.program_id(1)
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, tiles_total)

    # Sums are taken around the split's first value (when finite): a constant channel's mean
    # then comes out exact, where sum / count rounds and 1 / sqrt(eps) would amplify the error.
    first_n = first // l_blocks
    first_position = (first - first_n * l_blocks) * BLOCK_R
    first_offsets = first_n.to(tl.int64) * sx_n + first_position.to(tl.int64) * sx_l \
        + cols.to(tl.int64) * sx_c
    first_value = tl.load(x_ptr + first_offsets, mask=col_mask, other=0.0).to(tl.float32)
    shift = tl.where(tl.abs(first_value) < float("inf"), first_value, 0.0)

    count = tl.zeros([], dtype=tl.float32)  # a typed scalar: loop-carried in compiled code
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for tile in range(first, last):
        n, positions, position_mask, valid = _tile(tile, L, l_blocks, BLOCK_R)
        mask = position_mask[:, None] & col_mask[None, :]
        x = tl.load(x_ptr + _offsets(n, positions, cols, sx_n, sx_c, sx_l), mask=mask, other=0.0)
        x = x.to(tl.float32)
        tile_count = valid.to(tl.float32)
        shifted = tl.where(mask, x - shift[None, :], 0.0)
        tile_mean = shift + tl.sum(shifted, axis=0) / tile_count
        centered = tl.where(mask, x - tile_mean[None, :], 0.0)
        count, mean, m2 = _chan_merge(count, mean, m2, tile_count, tile_mean,
                                      tl.sum(centered * centered, axis=0))

    slot = split * C + cols
    tl.store(part_mean_ptr + slot, mean, mask=col_mask)
    tl.store(part_m2_ptr + slot, m2, mask=col_mask)
    # Every channel block of a split writes the same count; one slot per split keeps it simple.
    tl.store(part_count_ptr + split, count)


@triton.jit
def _batch_stats_finalize_kernel(
    part_mean_ptr, part_m2_ptr, part_count_ptr, mean_ptr, var_ptr,
    C, num_splits,
    BLOCK_C: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    count = tl.zeros([], dtype=tl.float32)  # a typed scalar: loop-carried in compiled code
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for split in range(0, num_splits):
        count, mean, m2 = _chan_merge(
            count, mean, m2, tl.load(part_count_ptr + split),
            tl.load(part_mean_ptr + split * C + cols, mask=col_mask, other=0.0),
            tl.load(part_m2_ptr + split * C + cols, mask=col_mask, other=0.0),
        )
    tl.store(mean_ptr + cols, mean, mask=col_mask)
    tl.store(var_ptr + cols, m2 / count, mask=col_mask)


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
def _forward_kernel(
    x_ptr, residual_ptr, out_ptr, mean_ptr, var_ptr, weight_ptr, bias_ptr,
    C, L, l_blocks, eps,
    sx_n, sx_c, sx_l, sr_n, sr_c, sr_l, so_n, so_c, so_l,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    RELU: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    n, positions, position_mask, _ = _tile(tl.program_id(0), L, l_blocks, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    mask = position_mask[:, None] & col_mask[None, :]
    mean, _, scale = _channel_scale(mean_ptr, var_ptr, weight_ptr, cols, col_mask, eps, HAS_WEIGHT)

    x = tl.load(x_ptr + _offsets(n, positions, cols, sx_n, sx_c, sx_l), mask=mask).to(tl.float32)
    # (x - mean) * scale rather than x * scale + shift: no cancellation when |mean| >> std.
    y = (x - mean[None, :]) * scale[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_RESIDUAL:
        r_offsets = _offsets(n, positions, cols, sr_n, sr_c, sr_l)
        y += tl.load(residual_ptr + r_offsets, mask=mask).to(tl.float32)
    if RELU:
        y = tl.where(y < 0, 0.0, y)  # NaN passes, as in torch.relu (tl.maximum would drop it)
    o_offsets = _offsets(n, positions, cols, so_n, so_c, so_l)
    tl.store(out_ptr + o_offsets, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _masked_grad(grad_ptr, out_ptr, n, positions, cols, mask,
                 sg_n, sg_c, sg_l, so_n, so_c, so_l, RELU: tl.constexpr):
    """grad_out except where the ReLU cut the value (output <= 0): PyTorch's threshold_backward,
    which lets the gradient of a NaN output through."""
    g = tl.load(grad_ptr + _offsets(n, positions, cols, sg_n, sg_c, sg_l), mask=mask, other=0.0)
    g = g.to(tl.float32)
    if RELU:
        out = tl.load(out_ptr + _offsets(n, positions, cols, so_n, so_c, so_l), mask=mask, other=0.0)
        g = tl.where(out <= 0, 0.0, g)
    return g


@triton.jit
def _backward_reduce_kernel(
    grad_ptr, out_ptr, x_ptr, mean_ptr, part_sum_g_ptr, part_sum_gx_ptr,
    C, L, l_blocks, tiles_total, tiles_per_split,
    sg_n, sg_c, sg_l, so_n, so_c, so_l, sx_n, sx_c, sx_l,
    RELU: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    split = tl.program_id(1)
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, tiles_total)
    mean = tl.load(mean_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)

    sum_g = tl.zeros([BLOCK_C], dtype=tl.float32)
    sum_gx = tl.zeros([BLOCK_C], dtype=tl.float32)
    for tile in range(first, last):
        n, positions, position_mask, _ = _tile(tile, L, l_blocks, BLOCK_R)
        mask = position_mask[:, None] & col_mask[None, :]
        g = _masked_grad(grad_ptr, out_ptr, n, positions, cols, mask,
                         sg_n, sg_c, sg_l, so_n, so_c, so_l, RELU)
        x = tl.load(x_ptr + _offsets(n, positions, cols, sx_n, sx_c, sx_l), mask=mask, other=0.0)
        x_centered = tl.where(mask, x.to(tl.float32) - mean[None, :], 0.0)
        sum_g += tl.sum(g, axis=0)
        sum_gx += tl.sum(g * x_centered, axis=0)

    slot = split * C + cols
    tl.store(part_sum_g_ptr + slot, sum_g, mask=col_mask)
    tl.store(part_sum_gx_ptr + slot, sum_gx, mask=col_mask)


@triton.jit
def _backward_finalize_kernel(
    part_sum_g_ptr, part_sum_gx_ptr, var_ptr, grad_weight_ptr, grad_bias_ptr, sum_gx_ptr,
    C, num_splits, eps,
    BLOCK_C: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    sum_g = tl.zeros([BLOCK_C], dtype=tl.float32)
    sum_gx = tl.zeros([BLOCK_C], dtype=tl.float32)
    for split in range(0, num_splits):
        sum_g += tl.load(part_sum_g_ptr + split * C + cols, mask=col_mask, other=0.0)
        sum_gx += tl.load(part_sum_gx_ptr + split * C + cols, mask=col_mask, other=0.0)
    var = tl.load(var_ptr + cols, mask=col_mask, other=1.0).to(tl.float32)
    invstd = 1.0 / tl.sqrt(var + eps)
    tl.store(grad_weight_ptr + cols, sum_gx * invstd, mask=col_mask)
    tl.store(grad_bias_ptr + cols, sum_g, mask=col_mask)
    tl.store(sum_gx_ptr + cols, sum_gx, mask=col_mask)


@triton.jit
def _backward_elementwise_kernel(
    grad_ptr, out_ptr, x_ptr, mean_ptr, var_ptr, weight_ptr, sum_g_ptr, sum_gx_ptr,
    grad_input_ptr, grad_residual_ptr,
    C, L, l_blocks, count, eps,
    sg_n, sg_c, sg_l, so_n, so_c, so_l, sx_n, sx_c, sx_l,
    sdi_n, sdi_c, sdi_l, sdr_n, sdr_c, sdr_l,
    HAS_WEIGHT: tl.constexpr, BATCH_STATS: tl.constexpr, RELU: tl.constexpr,
    STORE_GRAD_RESIDUAL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    n, positions, position_mask, _ = _tile(tl.program_id(0), L, l_blocks, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    mask = position_mask[:, None] & col_mask[None, :]
    mean, invstd, scale = _channel_scale(mean_ptr, var_ptr, weight_ptr, cols, col_mask, eps, HAS_WEIGHT)

    g = _masked_grad(grad_ptr, out_ptr, n, positions, cols, mask,
                     sg_n, sg_c, sg_l, so_n, so_c, so_l, RELU)
    if BATCH_STATS:
        # d/dx of the batch statistics: subtract the mean gradient and its projection on x_hat.
        x = tl.load(x_ptr + _offsets(n, positions, cols, sx_n, sx_c, sx_l), mask=mask).to(tl.float32)
        mean_g = tl.load(sum_g_ptr + cols, mask=col_mask, other=0.0) / count
        mean_gx = tl.load(sum_gx_ptr + cols, mask=col_mask, other=0.0) / count
        projection = (x - mean[None, :]) * (invstd * invstd * mean_gx)[None, :]
        grad_input = (g - mean_g[None, :] - projection) * scale[None, :]
    else:
        grad_input = g * scale[None, :]
    di_offsets = _offsets(n, positions, cols, sdi_n, sdi_c, sdi_l)
    tl.store(grad_input_ptr + di_offsets, grad_input.to(grad_input_ptr.dtype.element_ty), mask=mask)
    if STORE_GRAD_RESIDUAL:
        dr_offsets = _offsets(n, positions, cols, sdr_n, sdr_c, sdr_l)
        tl.store(grad_residual_ptr + dr_offsets, g.to(grad_residual_ptr.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class _Launch:
    """How one call walks its tensors: the (samples, positions) view, tile shape, reduction split."""

    samples: int  # N, or 1 when every tensor stores its samples back to back
    positions: int  # L, or N*L in that case
    strides: tuple[Strides3d, ...]  # per tensor, in the view above
    block_r: int
    block_c: int
    num_warps: int
    col_blocks: int
    l_blocks: int
    tiles_per_split: int
    num_splits: int

    @property
    def tiles(self) -> int:
        return self.samples * self.l_blocks


def _target_programs(device: torch.device) -> int:
    """Programs per reduction launch: enough to fill a GPU, few under the interpreter (serial)."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _plan(x: torch.Tensor, strides: list[Strides3d | None]) -> _Launch:
    """The launch for tensors shaped like `x` with these (N, C, L) strides (None: unused tensor)."""
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
    col_blocks = triton.cdiv(channels, block_c)
    l_blocks = triton.cdiv(positions, block_r)
    tiles = samples * l_blocks
    # The split depends on shapes and device only, so the reduction order is fixed run to run.
    splits = max(1, min(tiles, triton.cdiv(_target_programs(x.device), col_blocks)))
    tiles_per_split = triton.cdiv(tiles, splits)
    return _Launch(
        samples=samples, positions=positions, strides=tuple(s or Strides3d(0, 0, 0) for s in strides),
        block_r=block_r, block_c=block_c, num_warps=8 if block_r * block_c >= 4096 else 4,
        col_blocks=col_blocks, l_blocks=l_blocks, tiles_per_split=tiles_per_split,
        num_splits=triton.cdiv(tiles, tiles_per_split),
    )


def _dense_like(t: torch.Tensor) -> torch.Tensor:
    """`t` itself when its spatial dims merge into one stride, else a contiguous copy."""
    return t if strides_3d(t) is not None else t.contiguous()


def _writable(t: torch.Tensor) -> torch.Tensor:
    """A buffer the kernel can write for output `t`: t itself, or a contiguous stand-in."""
    return t if strides_3d(t) is not None else torch.empty(t.shape, dtype=t.dtype, device=t.device)


def forward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    eps: float,
    relu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """See `batch_norm_act` in batch_norm.py for the contract."""
    channels = x.shape[1]
    out = torch.empty_like(x)  # the input's strides, as the fake kernel promises
    out_buffer = _writable(out)
    x = _dense_like(x)
    residual = _dense_like(residual) if residual is not None else None
    plan = _plan(x, [strides_3d(x), strides_3d(residual) if residual is not None else None,
                     strides_3d(out_buffer)])
    sx, sr, so = plan.strides
    f32 = dict(dtype=torch.float32, device=x.device)
    if running_mean is None:
        mean = torch.empty(channels, **f32)
        var = torch.empty(channels, **f32)
        part_mean = torch.empty(plan.num_splits, channels, **f32)
        part_m2 = torch.empty(plan.num_splits, channels, **f32)
        part_count = torch.empty(plan.num_splits, **f32)
        _batch_stats_partial_kernel[(plan.col_blocks, plan.num_splits)](
            x, part_mean, part_m2, part_count, channels, plan.positions, plan.l_blocks,
            plan.tiles, plan.tiles_per_split, *sx,
            BLOCK_R=plan.block_r, BLOCK_C=plan.block_c, num_warps=plan.num_warps,
        )
        _batch_stats_finalize_kernel[(triton.cdiv(channels, 128),)](
            part_mean, part_m2, part_count, mean, var, channels, plan.num_splits, BLOCK_C=128,
        )
        saved_mean, saved_var = mean, var
    else:
        mean, var = running_mean, running_var
        saved_mean, saved_var = torch.empty(0, **f32), torch.empty(0, **f32)

    _forward_kernel[(plan.tiles, plan.col_blocks)](
        x, residual if residual is not None else x, out_buffer, mean, var,
        weight if weight is not None else mean, bias if bias is not None else mean,
        channels, plan.positions, plan.l_blocks, eps, *sx, *sr, *so,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None, RELU=relu,
        BLOCK_R=plan.block_r, BLOCK_C=plan.block_c, num_warps=plan.num_warps,
    )
    if out_buffer is not out:
        out.copy_(out_buffer)
    return out, saved_mean, saved_var


def backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    out: torch.Tensor | None,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    eps: float,
    batch_stats: bool,
    residual_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """See `batch_norm_act_backward` in batch_norm.py for the contract."""
    channels = x.shape[1]
    # Gradients take the strides the fake kernel promises, whatever copies compute them.
    grad_input = torch.empty_like(x)
    grad_input_buffer = _writable(grad_input)
    if residual_grad:
        grad_residual = torch.empty_like(grad_out, dtype=x.dtype)
        grad_residual_buffer = _writable(grad_residual)
    else:
        grad_residual = grad_residual_buffer = torch.empty(0, dtype=x.dtype, device=x.device)
    grad_out = _dense_like(grad_out)
    x = _dense_like(x)
    relu = out is not None
    out = _dense_like(out) if relu else None
    plan = _plan(x, [
        strides_3d(x), strides_3d(grad_out), strides_3d(out) if relu else None,
        strides_3d(grad_input_buffer), strides_3d(grad_residual_buffer) if residual_grad else None,
    ])
    sx, sg, so, sdi, sdr = plan.strides
    out_or_grad = out if relu else grad_out  # a valid pointer where RELU is off and it is unread

    f32 = dict(dtype=torch.float32, device=x.device)
    part_sum_g = torch.empty(plan.num_splits, channels, **f32)
    part_sum_gx = torch.empty(plan.num_splits, channels, **f32)
    _backward_reduce_kernel[(plan.col_blocks, plan.num_splits)](
        grad_out, out_or_grad, x, mean, part_sum_g, part_sum_gx,
        channels, plan.positions, plan.l_blocks, plan.tiles, plan.tiles_per_split, *sg, *so, *sx,
        RELU=relu, BLOCK_R=plan.block_r, BLOCK_C=plan.block_c, num_warps=plan.num_warps,
    )
    grad_weight = torch.empty(channels, **f32)
    grad_bias = torch.empty(channels, **f32)
    sum_gx = torch.empty(channels, **f32)
    _backward_finalize_kernel[(triton.cdiv(channels, 128),)](
        part_sum_g, part_sum_gx, var, grad_weight, grad_bias, sum_gx,
        channels, plan.num_splits, eps, BLOCK_C=128,
    )
    _backward_elementwise_kernel[(plan.tiles, plan.col_blocks)](
        grad_out, out_or_grad, x, mean, var, weight if weight is not None else var, grad_bias, sum_gx,
        grad_input_buffer, grad_residual_buffer,
        channels, plan.positions, plan.l_blocks, x.numel() // channels, eps,
        *sg, *so, *sx, *sdi, *sdr,
        HAS_WEIGHT=weight is not None, BATCH_STATS=batch_stats, RELU=relu,
        STORE_GRAD_RESIDUAL=residual_grad, BLOCK_R=plan.block_r, BLOCK_C=plan.block_c,
        num_warps=plan.num_warps,
    )
    if grad_input_buffer is not grad_input:
        grad_input.copy_(grad_input_buffer)
    if grad_residual_buffer is not grad_residual:
        grad_residual.copy_(grad_residual_buffer)
    return grad_input, grad_residual, grad_weight, grad_bias
