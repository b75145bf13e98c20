"""How the kernels see a tensor: a strided (N, C, L) view, whatever its memory format.

BatchNorm reduces over every dimension but the channel one, so both backends treat an input of
shape (N, C, *spatial) as N x C x L with L the product of the spatial sizes. NCHW and channels_last
differ only in the strides of that view, which is what lets one kernel serve both layouts (and
expanded or sliced gradients) without copies.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Strides3d(NamedTuple):
    """Element strides of the (N, C, L) view of a tensor."""

    n: int
    c: int
    l: int  # noqa: E741 - the spatial axis is called L throughout


def strides_3d(t: torch.Tensor) -> Strides3d | None:
    """Strides of `t` viewed as (N, C, L), or None when its spatial dims cannot merge into one."""
    if t.dim() == 2:
        return Strides3d(t.stride(0), t.stride(1), t.stride(0))  # L = 1: a row per sample
    spatial = [(size, stride) for size, stride in zip(t.shape[2:], t.stride()[2:]) if size != 1]
    for (_, outer_stride), (inner_size, inner_stride) in zip(spatial, spatial[1:]):
        if outer_stride != inner_stride * inner_size:
            return None
    # With L = 1 the position stride is never stepped; the sample stride makes samples contiguous.
    inner = spatial[-1][1] if spatial else t.stride(0)
    return Strides3d(t.stride(0), t.stride(1), inner)


def spatial_numel(t: torch.Tensor) -> int:
    """L: the number of values per (sample, channel) pair."""
    numel = 1
    for size in t.shape[2:]:
        numel *= size
    return numel


def reduce_dims(t: torch.Tensor) -> list[int]:
    """The dimensions BatchNorm reduces over: all but the channel dimension."""
    return [0, *range(2, t.dim())]


def channel_view_shape(t: torch.Tensor) -> list[int]:
    """Shape that broadcasts a per-channel vector against `t`."""
    return [1, t.shape[1], *([1] * (t.dim() - 2))]


def aligned(*tensors: torch.Tensor | None) -> bool:
    """Whether every tensor given (None: none) starts on a 16-byte boundary, which Triton
    specializes pointers on (so a launch's binary depends on it)."""
    for t in tensors:
        if t is not None and t.data_ptr() % 16:
            return False
    return True
