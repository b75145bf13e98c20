"""Launch geometry: how a call tiles its tensors, how many programs a reduction runs, and what
a call's shapes, strides, dtypes and device decide, worked out once per signature.

Reductions are deterministic, with no atomics on their results, and sized to one wave: the launch
runs as many programs as the GPU holds at once (from the compiled kernel's registers, see
_occupancy.py), each walking a fixed range of tiles and accumulating per lane, with one block
reduction at the end into its own slot of a [splits, C] buffer; the last program of each channel
block to finish merges the block's slots in a fixed order, many slots at once
(_triton_finalize.py); a small layer's statistics pass runs fewer (SMALL_LAYER_STEPS). So a
shape's results are the same bits run after run on one GPU model and Triton version; on another
GPU (another SM count or occupancy) the split, and so the last bits, may differ. That is
deliberate: a split of fixed size would leave part of a wave idle or add a tail wave on every GPU
but one, and a training run's bits were never portable across GPU models anyway (cuDNN picks
convolution algorithms per GPU).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import triton

from ._contract import RunningUpdate
from ._layout import Strides3d, spatial_numel, strides_3d
from ._signature_cache import SignatureCache
from ._occupancy import cuda_limits, programs_per_wave
from ._triton_tiles import MASK_ALONG_CHANNELS, MASK_ALONG_POSITIONS, MASK_ALONG_SPAN, MASK_NONE


UPDATE_BLOCK_C = 64  # channels per program of a running-stat update launched on its own
# The last program of a channel block merges its slots a [BLOCK_S, BLOCK_C] block at a time:
# 1024 values, a few registers a thread at any of the reductions' warp counts.
FINALIZE_VALUES = 1024
# Under the interpreter programs run one after another: few of them keep tests fast.
INTERPRETER_PROGRAMS = 4
# Tiles (span tiles: samples) a step of the statistics pass loads at once, a thread's 16-byte
# loads in flight. A pass that only reads keeps only its step's loads in flight; with 4, the one
# program of 16 warps an SM holds keeps 32 KB of reads in flight, what an H100's or H200's memory
# needs to stream (bandwidth times latency, ~4 TB/s x ~0.8 us, over 132 SMs: ~25 KB an SM). At 1,
# 8 KB, an H200 read at 30% of a copy's bandwidth. NCHW row tiles take 2 (see
# RowTiling.stats_tiles_per_step). A program's range of tiles need not divide by it: the last
# step's tiles past the range are masked.
STATISTICS_TILES_PER_STEP = 4
# A statistics pass whose programs would each read fewer than this many steps at one wave (a small
# layer: all of it in flight at once) runs fewer programs, down to the slots its merge loads at
# once (finalize_slots): a program reading one step more costs a round trip to memory, while every
# block of slots past the first costs the merge one in each of its three passes, and the merge
# runs alone. An H200 timed ResNet-56's 128x16x32x32 statistics pass at 17, 27 and 46 us with
# 128, 256 and 512 slots to merge (0.08 us a slot, the five-pass merge of 75e05b0); at one wave
# its 8x8 layer ran 128 programs of one tile each in 25 us, 8 blocks of slots a pass. With 2,
# ResNet-56's layers run 64, 32 and 16 programs (at 132 SMs), each two steps, one block of slots
# to merge. 1: one wave whatever the size (bench_kernel_passes.py times both).
SMALL_LAYER_STEPS = 2


@dataclass(frozen=True)
class RowTiling:
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

    @property
    def stats_tiles_per_step(self) -> int:
        """Tiles a step of the statistics pass loads (STATISTICS_TILES_PER_STEP): 2 where the
        tiles run along positions (NCHW), whose binaries fit two programs of 16 warps an SM, so
        that two tiles a step already keep 32 KB in flight; four would hold one more tile's
        registers than the two programs leave (ptxas then spills)."""
        channels_contiguous = self.strides[0].c == 1 and self.positions > 1
        return STATISTICS_TILES_PER_STEP if channels_contiguous else 2

    def split(self, programs: int, least_per_split: int = 1,
              merged_at_once: int = 1) -> tuple[int, int]:
        """(tiles per split, splits) for a reduction of at most `programs` programs in all (see
        split_sizes). The split depends on shapes and device only, so the reduction order is
        fixed run to run."""
        return split_sizes(self.tiles, programs // self.col_blocks, least_per_split,
                           merged_at_once)


def split_sizes(items: int, splits: int, least_per_split: int = 1,
                merged_at_once: int = 1) -> tuple[int, int]:
    """(items per split, splits) for `items` tiles (span tiles: samples) over at most `splits`
    programs a channel block, none of them empty: each reads at least `least_per_split` items
    where that leaves more programs than `merged_at_once` (the merge's block of slots)."""
    splits = max(1, min(items, splits))
    if least_per_split > 1:
        splits = min(splits, max(merged_at_once, triton.cdiv(items, least_per_split)))
    per_split = triton.cdiv(items, splits)
    return per_split, triton.cdiv(items, per_split)


def _tiling(x: torch.Tensor, strides: Sequence[Strides3d | None]) -> RowTiling:
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
    return RowTiling(
        samples=samples, positions=positions, strides=tuple(s or Strides3d(0, 0, 0) for s in strides),
        block_r=block_r, block_c=block_c, num_warps=8 if block_r * block_c >= 4096 else 4,
        col_blocks=triton.cdiv(channels, block_c), l_blocks=triton.cdiv(positions, block_r),
    )


@dataclass(frozen=True)
class SpanTiling:
    """Span tiles (see the Spans section): BLOCK_C channels of one sample, read as one flat run."""

    samples: int
    channels: int
    positions: int  # L, a compile-time constant of the span kernels
    block_c: int
    span: int  # lanes: block_c * positions rounded up to a power of two
    num_warps: int
    col_blocks: int

    def split(self, programs: int, least_per_split: int = 1,
              merged_at_once: int = 1) -> tuple[int, int]:
        """(samples per split, splits) for a reduction of at most `programs` programs in all."""
        return split_sizes(self.samples, programs // self.col_blocks, least_per_split,
                           merged_at_once)

    def constexprs(self) -> dict[str, int | bool]:
        return dict(L=self.positions, BLOCK_C=self.block_c, SPAN=self.span,
                    EVEN_C=self.col_blocks * self.block_c == self.channels)


SPAN_MAX_LANES = 2048


def _span_tiling(x: torch.Tensor, tensors: Sequence[torch.Tensor | None]) -> SpanTiling | None:
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
    return SpanTiling(samples=x.shape[0], channels=channels, positions=positions, block_c=block_c,
                      span=span, num_warps=8 if span >= 2048 else 4,
                      col_blocks=triton.cdiv(channels, block_c))


def programs_in_one_wave(kernel: Any, args: tuple[Any, ...], constexprs: dict[str, Any],
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


def finalize_slots(block_c: int) -> int:
    """BLOCK_S of a reduction whose programs cover `block_c` channels: slots merged at a time."""
    return max(1, FINALIZE_VALUES // block_c)


# ------------------------------------------------------------------------------------------------
# Geometry: what a call decides from its tensors' shapes, strides, dtypes and device alone (which
# inputs need a dense copy, which outputs a stand-in buffer, the tiling, the reduction's split),
# worked out on a signature's first call and then looked up. Deciding it took most of a layer's
# host time, every call, for the same answer; and a split fixed per signature also fixes the
# reduction order, whatever the alignment of later calls' pointers.


@dataclass(frozen=True)
class Geometry:
    copies: tuple[bool, ...]  # per input: copy it to a contiguous layout first
    stand_ins: tuple[bool, ...]  # per output: compute it into a contiguous buffer, then copy
    span: SpanTiling | None  # span tiles, or else
    tiling: RowTiling | None  # row tiles
    per_split: int  # tiles (span: samples) per reduction program, and programs along the split
    splits: int
    mask_packing: int  # how a forward writes the packed ReLU mask (MASK_NONE: it cannot)
    reshaped: bool  # any copy or stand-in at all (most calls have none, and skip both)


_GEOMETRIES: SignatureCache[tuple, Geometry] = SignatureCache()


def tensor_signature(t: torch.Tensor | None) -> tuple | None:
    return None if t is None else (t.shape, t.stride(), t.dtype, t.device)


def tilings(inputs: Sequence[torch.Tensor | None], outputs: Sequence[torch.Tensor | None]):
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


def relu_mask_packing(x: torch.Tensor, span: SpanTiling | None, tiling: RowTiling | None) -> int:
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


def is_packed_mask(relu_mask: torch.Tensor | None) -> bool:
    """Whether a backward's ReLU mask is the packed one (else the forward's output, or None)."""
    return relu_mask is not None and relu_mask.dtype == torch.uint8


def relu_mask_bytes(x: torch.Tensor, residual: torch.Tensor | None) -> int:
    """The Triton implementation's `relu_mask_bytes` (_contract.py): x.numel() / 8 where a
    forward's tiles can write x's packed ReLU mask, else 0 (the fake kernel's answer, from shapes
    and strides)."""
    if x.numel() == 0:
        return 0
    # x stands for the output, which has its strides where a mask can be written at all.
    _, _, span, tiling = tilings((x, residual), (x,))
    return x.numel() // 8 if relu_mask_packing(x, span, tiling) != MASK_NONE else 0


def call_geometry(key: tuple, inputs: Sequence[torch.Tensor | None],
                  outputs: Sequence[torch.Tensor | None], reduction: Any | None) -> Geometry:
    """The cached geometry of a call; `key` ends with the function that sizes reductions.
    `inputs[0]` is x, None stands for a tensor the call does not use; `reduction(tiling or span,
    dense inputs, output buffers)` gives the reduction's (kernel, provisional args, constexprs,
    num_warps), to size its split from (None: no reduction)."""
    found = _GEOMETRIES.get(key)
    if found is not None:
        return found
    dense, buffers, span, tiling = tilings(inputs, outputs)
    x = dense[0]
    per_split = splits = 0
    if reduction is not None:
        shape = span if span is not None else tiling
        kernel, provisional, constexprs, num_warps = reduction(shape, dense, buffers)
        programs = key[-1](kernel, provisional, constexprs, num_warps, x.device)
        # A pass loading its tiles in steps (the statistics pass) reads at least SMALL_LAYER_STEPS
        # of them a program where that leaves its merge more than one block of slots.
        steps = constexprs.get("TILES_PER_STEP")
        least = SMALL_LAYER_STEPS * steps if steps else 1
        per_split, splits = shape.split(programs, least, constexprs["BLOCK_S"])
    copies = tuple(d is not None and d is not t for d, t in zip(dense, inputs))
    stand_ins = tuple(b is not None and b is not t for b, t in zip(buffers, outputs))
    found = Geometry(
        copies=copies, stand_ins=stand_ins, span=span, tiling=tiling, per_split=per_split,
        splits=splits,
        mask_packing=MASK_NONE if x is not inputs[0] else relu_mask_packing(x, span, tiling),
        reshaped=any(copies) or any(stand_ins))
    _GEOMETRIES[key] = found
    return found


def dense_inputs(geometry: Geometry, *inputs: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [t.contiguous() if copy else t for t, copy in zip(inputs, geometry.copies)]


def per_channel_dense(weight: torch.Tensor | None, bias: torch.Tensor | None = None,
                      mean: torch.Tensor | None = None, var: torch.Tensor | None = None) -> bool:
    """Whether these per-channel vectors (None: absent) are as the kernels index them, channel c
    at `pointer + c`; else `per_channel_copies` (a slice, or weight and bias interleaved in one
    buffer, or an expanded vector). Four named arguments, no loop: every layer's call pays."""
    return ((weight is None or weight.is_contiguous()) and (bias is None or bias.is_contiguous())
            and (mean is None or mean.is_contiguous()) and (var is None or var.is_contiguous()))


def per_channel_copies(weight, bias, running_mean, running_var, update: RunningUpdate | None):
    """The per-channel vectors dense (copied where not), the update's running statistics too:
    `written_back` then copies those into the tensors the update stands for."""
    weight, bias, running_mean, running_var = (
        None if t is None else t.contiguous() for t in (weight, bias, running_mean, running_var))
    if update is not None:
        update = update._replace(running_mean=update.running_mean.contiguous(),
                                 running_var=update.running_var.contiguous())
    return weight, bias, running_mean, running_var, update


def written_back(strided: RunningUpdate, dense: RunningUpdate) -> None:
    """Running statistics updated in dense copies, copied into the strided tensors they stand for
    (an expanded one, whose channels share memory, is refused there, as in-place ops refuse it)."""
    for target, values in zip(strided[:2], dense[:2]):
        if values is not target:
            target.copy_(values)


def output_buffer(geometry: Geometry, index: int, t: torch.Tensor) -> torch.Tensor:
    if not geometry.stand_ins[index]:
        return t
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)
