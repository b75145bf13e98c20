"""Triton kernels for BatchNorm + residual add + ReLU, forward and backward.

Every tensor is addressed as a strided (N, C, L) view (see _layout.py); a program works on a tile of
BLOCK_R rows of the flattened (N, L) axis by BLOCK_C channels. The tile shape follows the layout:
tall and narrow for NCHW (L is contiguous), wide for channels_last (C is contiguous), so loads are
coalesced in both.

Bytes moved (the benchmark's byte model counts exactly these):
- training forward: x read twice (statistics, then normalize), residual read once, out written once;
- eval forward: x and residual read once, out written once;
- backward: grad_out, out (for the ReLU mask) and x read twice (reduction, then elementwise),
  grad_input and grad_residual written once. The ReLU mask is recomputed from the saved output,
  which the next layer keeps alive anyway, instead of storing a mask of its own.

Per-channel reductions are deterministic split reductions with no atomics: each program reduces a
fixed slice of rows into its own slot of a [splits, C] buffer, and a second small kernel folds the
slots in a fixed order. The forward keeps (mean, M2) per slot and merges them with Chan's formula,
which stays accurate where sum / sum-of-squares would cancel (large means, fp16 inputs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._layout import Strides3d, spatial_numel, strides_3d


@triton.jit
def _tile_offsets(rows, cols, L, stride_n, stride_c, stride_l):
    n = rows // L
    l_idx = rows - n * L
    row_offsets = n.to(tl.int64) * stride_n + l_idx.to(tl.int64) * stride_l
    return row_offsets[:, None] + cols.to(tl.int64)[None, :] * stride_c


@triton.jit
def _batch_stats_partial_kernel(
    x_ptr, part_mean_ptr, part_m2_ptr,
    C, L, rows_total, rows_per_split,
    sx_n, sx_c, sx_l,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_c = tl.program_id(0)
    split = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    row_start = split * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, rows_total)

    count = 0.0
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for r0 in range(row_start, row_end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        mask = (rows < row_end)[:, None] & col_mask[None, :]
        offsets = _tile_offsets(rows, cols, L, sx_n, sx_c, sx_l)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        # Statistics of this tile, then Chan's merge into the running (count, mean, M2).
        tile_count = tl.minimum(row_end - r0, BLOCK_R).to(tl.float32)
        tile_mean = tl.sum(x, axis=0) / tile_count
        centered = tl.where(mask, x - tile_mean[None, :], 0.0)
        tile_m2 = tl.sum(centered * centered, axis=0)
        new_count = count + tile_count
        delta = tile_mean - mean
        mean += delta * (tile_count / new_count)
        m2 += tile_m2 + delta * delta * (count * tile_count / new_count)
        count = new_count

    slot = split * C + cols
    tl.store(part_mean_ptr + slot, mean, mask=col_mask)
    tl.store(part_m2_ptr + slot, m2, mask=col_mask)


@triton.jit
def _batch_stats_finalize_kernel(
    part_mean_ptr, part_m2_ptr, mean_ptr, var_ptr,
    C, num_splits, rows_total, rows_per_split,
    BLOCK_C: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    count = 0.0
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for split in range(0, num_splits):
        split_count = tl.minimum(rows_per_split, rows_total - split * rows_per_split).to(tl.float32)
        split_mean = tl.load(part_mean_ptr + split * C + cols, mask=col_mask, other=0.0)
        split_m2 = tl.load(part_m2_ptr + split * C + cols, mask=col_mask, other=0.0)
        new_count = count + split_count
        delta = split_mean - mean
        mean += delta * (split_count / new_count)
        m2 += split_m2 + delta * delta * (count * split_count / new_count)
        count = new_count
    tl.store(mean_ptr + cols, mean, mask=col_mask)
    tl.store(var_ptr + cols, m2 / count, mask=col_mask)


@triton.jit
def _channel_scale(mean_ptr, var_ptr, weight_ptr, cols, col_mask, eps, HAS_WEIGHT: tl.constexpr):
    """Per-channel mean and weight * invstd, in fp32."""
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
    C, L, rows_total, eps,
    sx_n, sx_c, sx_l, sr_n, sr_c, sr_l, so_n, so_c, so_l,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    RELU: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    mask = (rows < rows_total)[:, None] & col_mask[None, :]
    mean, invstd, scale = _channel_scale(mean_ptr, var_ptr, weight_ptr, cols, col_mask, eps, HAS_WEIGHT)

    x = tl.load(x_ptr + _tile_offsets(rows, cols, L, sx_n, sx_c, sx_l), mask=mask).to(tl.float32)
    # (x - mean) * scale rather than x * scale + shift: no cancellation when |mean| >> std.
    y = (x - mean[None, :]) * scale[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_RESIDUAL:
        r_offsets = _tile_offsets(rows, cols, L, sr_n, sr_c, sr_l)
        y += tl.load(residual_ptr + r_offsets, mask=mask).to(tl.float32)
    if RELU:
        y = tl.maximum(y, 0.0)
    o_offsets = _tile_offsets(rows, cols, L, so_n, so_c, so_l)
    tl.store(out_ptr + o_offsets, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _masked_grad(grad_ptr, out_ptr, rows, cols, mask, L,
                 sg_n, sg_c, sg_l, so_n, so_c, so_l, RELU: tl.constexpr):
    """grad_out where the ReLU let the value through (the output is positive), zero elsewhere."""
    g = tl.load(grad_ptr + _tile_offsets(rows, cols, L, sg_n, sg_c, sg_l), mask=mask, other=0.0)
    g = g.to(tl.float32)
    if RELU:
        out = tl.load(out_ptr + _tile_offsets(rows, cols, L, so_n, so_c, so_l), mask=mask, other=0.0)
        g = tl.where(out > 0, g, 0.0)
    return g


@triton.jit
def _backward_reduce_kernel(
    grad_ptr, out_ptr, x_ptr, mean_ptr, part_sum_g_ptr, part_sum_gx_ptr,
    C, L, rows_total, rows_per_split,
    sg_n, sg_c, sg_l, so_n, so_c, so_l, sx_n, sx_c, sx_l,
    RELU: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_c = tl.program_id(0)
    split = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    mean = tl.load(mean_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    row_start = split * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, rows_total)

    sum_g = tl.zeros([BLOCK_C], dtype=tl.float32)
    sum_gx = tl.zeros([BLOCK_C], dtype=tl.float32)
    for r0 in range(row_start, row_end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        mask = (rows < row_end)[:, None] & col_mask[None, :]
        g = _masked_grad(grad_ptr, out_ptr, rows, cols, mask, L,
                         sg_n, sg_c, sg_l, so_n, so_c, so_l, RELU)
        x = tl.load(x_ptr + _tile_offsets(rows, cols, L, sx_n, sx_c, sx_l), mask=mask, other=0.0)
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
    C, L, rows_total, eps,
    sg_n, sg_c, sg_l, so_n, so_c, so_l, sx_n, sx_c, sx_l,
    sdi_n, sdi_c, sdi_l, sdr_n, sdr_c, sdr_l,
    HAS_WEIGHT: tl.constexpr, BATCH_STATS: tl.constexpr, RELU: tl.constexpr,
    STORE_GRAD_RESIDUAL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    mask = (rows < rows_total)[:, None] & col_mask[None, :]
    mean, invstd, scale = _channel_scale(mean_ptr, var_ptr, weight_ptr, cols, col_mask, eps, HAS_WEIGHT)

    g = _masked_grad(grad_ptr, out_ptr, rows, cols, mask, L,
                     sg_n, sg_c, sg_l, so_n, so_c, so_l, RELU)
    if BATCH_STATS:
        # d/dx of the batch statistics: subtract the mean gradient and its projection on x_hat.
        x = tl.load(x_ptr + _tile_offsets(rows, cols, L, sx_n, sx_c, sx_l), mask=mask).to(tl.float32)
        mean_g = tl.load(sum_g_ptr + cols, mask=col_mask, other=0.0) / rows_total
        mean_gx = tl.load(sum_gx_ptr + cols, mask=col_mask, other=0.0) / rows_total
        projection = (x - mean[None, :]) * (invstd * invstd * mean_gx)[None, :]
        grad_input = (g - mean_g[None, :] - projection) * scale[None, :]
    else:
        grad_input = g * scale[None, :]
    di_offsets = _tile_offsets(rows, cols, L, sdi_n, sdi_c, sdi_l)
    tl.store(grad_input_ptr + di_offsets, grad_input.to(grad_input_ptr.dtype.element_ty), mask=mask)
    if STORE_GRAD_RESIDUAL:
        dr_offsets = _tile_offsets(rows, cols, L, sdr_n, sdr_c, sdr_l)
        tl.store(grad_residual_ptr + dr_offsets, g.to(grad_residual_ptr.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class _LaunchConfig:
    """Tile shape and the split of rows among reduction programs for one tensor shape."""

    block_r: int
    block_c: int
    num_warps: int
    col_blocks: int
    row_blocks: int
    rows_per_split: int
    num_splits: int


def _target_programs(device: torch.device) -> int:
    """Programs per reduction launch: enough to fill a GPU, few under the interpreter (serial)."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _launch_config(
    rows_total: int, channels: int, channels_last: bool, device: torch.device
) -> _LaunchConfig:
    if channels_last:
        block_c = min(64, triton.next_power_of_2(channels))
        block_r = max(16, 4096 // block_c)
    else:
        block_c = min(4, triton.next_power_of_2(channels))
        block_r = 1024
    block_r = min(block_r, max(16, triton.next_power_of_2(rows_total)))
    col_blocks = triton.cdiv(channels, block_c)
    row_blocks = triton.cdiv(rows_total, block_r)
    # The split depends on shapes and device only, so the reduction order is fixed run to run.
    splits = max(1, min(row_blocks, triton.cdiv(_target_programs(device), col_blocks)))
    rows_per_split = triton.cdiv(row_blocks, splits) * block_r
    return _LaunchConfig(
        block_r=block_r,
        block_c=block_c,
        num_warps=8 if block_r * block_c >= 4096 else 4,
        col_blocks=col_blocks,
        row_blocks=row_blocks,
        rows_per_split=rows_per_split,
        num_splits=triton.cdiv(rows_total, rows_per_split),
    )


def _dense_like(t: torch.Tensor) -> tuple[torch.Tensor, Strides3d]:
    """`t` with mergeable spatial strides: itself when possible, else a contiguous copy."""
    strides = strides_3d(t)
    if strides is None:
        t = t.contiguous()
        strides = strides_3d(t)
    return t, strides


def _writable_3d(t: torch.Tensor) -> tuple[torch.Tensor, Strides3d]:
    """A buffer the kernel can write for output `t` (t itself, or a contiguous stand-in)."""
    strides = strides_3d(t)
    if strides is not None:
        return t, strides
    stand_in = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    return stand_in, strides_3d(stand_in)


def _is_channels_last(strides: Strides3d) -> bool:
    return strides.c == 1 and strides.l != 1


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
    L = spatial_numel(x)
    rows_total = x.shape[0] * L
    x, sx = _dense_like(x)
    cfg = _launch_config(rows_total, channels, _is_channels_last(sx), x.device)
    f32 = dict(dtype=torch.float32, device=x.device)
    if running_mean is None:
        mean = torch.empty(channels, **f32)
        var = torch.empty(channels, **f32)
        part_mean = torch.empty(cfg.num_splits, channels, **f32)
        part_m2 = torch.empty(cfg.num_splits, channels, **f32)
        _batch_stats_partial_kernel[(cfg.col_blocks, cfg.num_splits)](
            x, part_mean, part_m2, channels, L, rows_total, cfg.rows_per_split, *sx,
            BLOCK_R=cfg.block_r, BLOCK_C=cfg.block_c, num_warps=cfg.num_warps,
        )
        _batch_stats_finalize_kernel[(triton.cdiv(channels, 128),)](
            part_mean, part_m2, mean, var, channels, cfg.num_splits, rows_total, cfg.rows_per_split,
            BLOCK_C=128,
        )
        saved_mean, saved_var = mean, var
    else:
        mean, var = running_mean, running_var
        saved_mean, saved_var = torch.empty(0, **f32), torch.empty(0, **f32)

    if residual is not None:
        residual, sr = _dense_like(residual)
    else:
        sr = Strides3d(0, 0, 0)
    out = torch.empty_like(x)
    out_buffer, so = _writable_3d(out)
    _forward_kernel[(cfg.row_blocks, cfg.col_blocks)](
        x, residual if residual is not None else x, out_buffer, mean, var,
        weight if weight is not None else mean, bias if bias is not None else mean,
        channels, L, rows_total, eps, *sx, *sr, *so,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None, RELU=relu,
        BLOCK_R=cfg.block_r, BLOCK_C=cfg.block_c, num_warps=cfg.num_warps,
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
    L = spatial_numel(x)
    rows_total = x.shape[0] * L
    grad_out, sg = _dense_like(grad_out)
    x, sx = _dense_like(x)
    relu = out is not None
    if relu:
        out, so = _dense_like(out)
    else:
        out, so = grad_out, Strides3d(0, 0, 0)
    cfg = _launch_config(rows_total, channels, _is_channels_last(sx), x.device)
    f32 = dict(dtype=torch.float32, device=x.device)
    part_sum_g = torch.empty(cfg.num_splits, channels, **f32)
    part_sum_gx = torch.empty(cfg.num_splits, channels, **f32)
    _backward_reduce_kernel[(cfg.col_blocks, cfg.num_splits)](
        grad_out, out, x, mean, part_sum_g, part_sum_gx,
        channels, L, rows_total, cfg.rows_per_split, *sg, *so, *sx,
        RELU=relu, BLOCK_R=cfg.block_r, BLOCK_C=cfg.block_c, num_warps=cfg.num_warps,
    )
    grad_weight = torch.empty(channels, **f32)
    grad_bias = torch.empty(channels, **f32)
    sum_gx = torch.empty(channels, **f32)
    _backward_finalize_kernel[(triton.cdiv(channels, 128),)](
        part_sum_g, part_sum_gx, var, grad_weight, grad_bias, sum_gx,
        channels, cfg.num_splits, eps, BLOCK_C=128,
    )

    grad_input = torch.empty_like(x)
    grad_input_buffer, sdi = _writable_3d(grad_input)
    if residual_grad:
        grad_residual = torch.empty_like(grad_out, dtype=x.dtype)
        grad_residual_buffer, sdr = _writable_3d(grad_residual)
    else:
        grad_residual = grad_residual_buffer = torch.empty(0, dtype=x.dtype, device=x.device)
        sdr = Strides3d(0, 0, 0)
    _backward_elementwise_kernel[(cfg.row_blocks, cfg.col_blocks)](
        grad_out, out, x, mean, var, weight if weight is not None else var, grad_bias, sum_gx,
        grad_input_buffer, grad_residual_buffer,
        channels, L, rows_total, eps, *sg, *so, *sx, *sdi, *sdr,
        HAS_WEIGHT=weight is not None, BATCH_STATS=batch_stats, RELU=relu,
        STORE_GRAD_RESIDUAL=residual_grad, BLOCK_R=cfg.block_r, BLOCK_C=cfg.block_c, num_warps=cfg.num_warps,
    )
    if grad_input_buffer is not grad_input:
        grad_input.copy_(grad_input_buffer)
    if grad_residual_buffer is not grad_residual:
        grad_residual.copy_(grad_residual_buffer)
    return grad_input, grad_residual, grad_weight, grad_bias
