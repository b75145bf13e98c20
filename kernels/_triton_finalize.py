"""The reductions' last step, run by the last program of each channel block to finish.

A reduction launch (the forward's statistics pass, the backward's reduce pass) runs a grid of
(channel blocks, splits) programs; each leaves its partial result in its own slot of a
[splits, C] buffer. The program of a channel block that finishes last then merges that block's
slots, in a fixed order, into the channels' results: no launch of its own for the merge (a
launch costs the host a few microseconds and the GPU a drain and a ramp-up, on layers whose passes
take only a few microseconds each), and no atomics on the results, so they are the same bits run
after run.

Which program is last is counted per channel block, in `counters_ptr` (int32, one per block,
zero between launches): a program's slot stores, a barrier (every thread of the program has
issued its stores), then one acquire-release atomic add at GPU scope. On sm_90 that compiles to
BAR.SYNC, MEMBAR.GPU, ATOMG, CCTL.IVALL (L1 invalidated), BAR.SYNC: the slots other programs
released are visible to the last one, which reads them past L1 besides (`.cg`). The last program
sets its counter back to zero for the next launch, which on one stream starts only after this one
ends; a counter is therefore one stream's (`reduction_counters`). A launch that does not finish
would leave its counters off for the next, and no later merge would be elected; but on CUDA a
kernel that faults or is killed leaves the process's context unusable, so no later launch runs
to read them. (Under the interpreter, only an exception out of a program, an interrupt for
one, abandons a launch half-way; the plans' counters are then off for the rest of the process.)

Merging in the reduction's last programs rather than in the consumer pass: folded into the
elementwise pass, each of its programs would merge the [splits, C] slots of its channels itself,
66 splits x 64 channels x 2 sums x 4 bytes = 34 KB at ResNet-50's 256x56x56 in channels_last,
more than the 24 KB of activations the program moves.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from ._triton_tiles import _finite_or, _update_running

if TYPE_CHECKING:  # a type only: the launches sit above this module
    from ._triton_launch import LaunchStream


def reduction_counters(counters: dict[int, torch.Tensor], device: torch.device,
                       col_blocks: int, stream: LaunchStream | None) -> torch.Tensor:
    """The counters a plan's reduction launches count their finished programs in (one per
    channel block, see above), for the stream they launch on (`stream`, or where they go through
    JITFunction.run, the current device's current stream, as Triton reads it): each launch leaves
    them at zero for the next on its stream, while launches on two streams may run at once. Kept
    with the plan for as long as it lives.

    Except while a CUDA graph is being captured: its stream is shared by every capture, and
    counters allocated then would be zeroed only when that graph replays. A captured launch gets
    counters of its own, zeroed in the graph before it on every replay, and kept by the graph's
    memory pool, as any tensor of the step is."""
    if device.type != "cuda":
        handle = 0
    elif torch.cuda.is_current_stream_capturing():
        return torch.zeros(col_blocks, dtype=torch.int32, device=device)
    elif stream is not None:
        handle = stream.handle
    else:
        handle = torch._C._cuda_getCurrentRawStream(torch.cuda.current_device())
    found = counters.get(handle)
    if found is None:
        found = counters.setdefault(
            handle, torch.zeros(col_blocks, dtype=torch.int32, device=device))
    return found


@triton.jit
def _last_to_finish(counters_ptr):
    """Whether this program is the last of its channel block (program_id(0)) to finish; the
    last one also resets the block's counter."""
    tl.debug_barrier()  # the program's slot stores are issued before its release
    ticket = tl.atomic_add(counters_ptr + tl.program_id(0), 1, sem="acq_rel", scope="gpu")
    last = ticket == tl.num_programs(1) - 1
    if last:
        tl.store(counters_ptr + tl.program_id(0), 0)
    return last


@triton.jit
def _finalize_statistics(stats_ptr, running_mean_ptr, running_var_ptr, cols, col_mask, C,
                         momentum, unbias, UPDATE_RUNNING: tl.constexpr, BLOCK_S: tl.constexpr,
                         BLOCK_C: tl.constexpr):
    """Merges the [splits, C] summaries of channels `cols` (the four planes after the head of
    `stats_ptr`: count, mean, M2, odd) in a fixed order into the head: the C means, then the C
    biased variances. With UPDATE_RUNNING also updates the running statistics, which saves that
    update a launch.

    _merge's arithmetic (a weighted mean, the weighted mean of the offsets from it, then
    M2 = sum(M2 + c * (m - mean)^2)), with the slots summed the way _sum_slots sums them: each
    lane of a [BLOCK_S, BLOCK_C] block accumulates its own slots across the loop, and one block
    reduction per sum follows it. Merging block by block instead (_merge's reductions and a
    Welford combine per BLOCK_S slots) cost ~9.5 us per 16 slots of 64 channels on an H200,
    the barriers of 7 reductions each time: more than the statistics pass spent reading its
    activation on ResNet-56's shapes. The slots are read in five passes (from L2: splits x C x 16
    bytes), each sum but the first two needing the one before it."""
    num_splits = tl.num_programs(1)
    counts_ptr = stats_ptr + 2 * C
    plane = num_splits * C
    total = _sum_slots(counts_ptr, cols, col_mask, C, BLOCK_S, BLOCK_C)
    odd = _sum_slots(counts_ptr + 3 * plane, cols, col_mask, C, BLOCK_S, BLOCK_C)
    mean = _weighted_mean(counts_ptr, counts_ptr + plane, total, cols, col_mask, C, num_splits,
                          BLOCK_S, BLOCK_C)
    m2 = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    for start in range(0, num_splits, BLOCK_S):
        offsets, mask = _slots(start, num_splits, cols, col_mask, C, BLOCK_S)
        count = _load_slots(counts_ptr, offsets, mask)
        deviation = _load_slots(counts_ptr + plane, offsets, mask) - mean[None, :]
        # count first: an empty summary (count 0) adds 0 however far its mean is.
        m2 += _load_slots(counts_ptr + 2 * plane, offsets, mask) + (count * deviation) * deviation
    m2 = tl.sum(m2, 0)
    plain = odd == 0  # no inf or NaN in the channel
    mean = tl.where(plain, mean, odd)
    var = tl.where(plain, m2 / total, float("nan"))
    tl.store(stats_ptr + cols, mean, mask=col_mask)
    tl.store(stats_ptr + C + cols, var, mask=col_mask)
    if UPDATE_RUNNING:
        _update_running(running_mean_ptr, running_var_ptr, mean, var, cols, col_mask, momentum,
                        unbias)


@triton.jit
def _weighted_mean(counts_ptr, means_ptr, total, cols, col_mask, C, num_splits,
                   BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """The count-weighted mean of the slots' means, in two passes: a rough one, then the weighted
    mean of the offsets from it added (centred terms sum without losing digits, and equal means
    merge exactly: a constant channel stays exact)."""
    safe_total = tl.where(total > 0, total, 1.0)
    zero = tl.zeros([BLOCK_C], dtype=tl.float32)
    # Counts times means, summed, then divided: exact for tiny means (shares times tiny means
    # would underflow). Where that overflows (means near the float range, 3e38), shares times
    # means instead, in a second pass taken only then: a convex combination never overflows.
    rough = _offset_sum(counts_ptr, means_ptr, zero, 1.0 + zero, cols, col_mask, C, num_splits,
                        BLOCK_S, BLOCK_C) / safe_total
    if tl.max(tl.where(tl.abs(rough) < float("inf"), 0, 1), 0) > 0:
        rough = _finite_or(rough, _offset_sum(counts_ptr, means_ptr, zero, 1.0 / safe_total,
                                              cols, col_mask, C, num_splits, BLOCK_S, BLOCK_C))
    correction = _offset_sum(counts_ptr, means_ptr, rough, 1.0 + zero, cols, col_mask, C,
                             num_splits, BLOCK_S, BLOCK_C) / safe_total
    if tl.max(tl.where(tl.abs(correction) < float("inf"), 0, 1), 0) > 0:
        correction = _finite_or(correction, _offset_sum(
            counts_ptr, means_ptr, rough, 1.0 / safe_total, cols, col_mask, C, num_splits,
            BLOCK_S, BLOCK_C))
    return rough + correction


@triton.jit
def _slots(start, num_splits, cols, col_mask, C, BLOCK_S: tl.constexpr):
    """Offsets into a [splits, C] plane of slots start..start + BLOCK_S of channels `cols`, and
    which of them exist."""
    slots = start + tl.arange(0, BLOCK_S)
    mask = (slots < num_splits)[:, None] & col_mask[None, :]
    return slots[:, None] * C + cols[None, :], mask


@triton.jit
def _load_slots(ptr, offsets, mask):
    return tl.load(ptr + offsets, mask=mask, other=0.0, cache_modifier=".cg")


@triton.jit
def _offset_sum(counts_ptr, means_ptr, centre, scale, cols, col_mask, C, num_splits,
                BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per channel, the sum over slots of (mean - centre) * (count * scale), in a fixed order:
    with centre 0 and scale 1 the count-weighted sum of the means. Missing slots add 0."""
    total = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    for start in range(0, num_splits, BLOCK_S):
        offsets, mask = _slots(start, num_splits, cols, col_mask, C, BLOCK_S)
        count = _load_slots(counts_ptr, offsets, mask)
        offset = tl.where(mask, _load_slots(means_ptr, offsets, mask) - centre[None, :], 0.0)
        total += offset * (count * scale[None, :])
    return tl.sum(total, 0)


@triton.jit
def _sum_slots(part_ptr, cols, col_mask, C, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Sum of the [splits, C] slots of channels `cols`, BLOCK_S slots at a time, in a fixed order
    (deterministic)."""
    num_splits = tl.num_programs(1)
    total = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    for start in range(0, num_splits, BLOCK_S):
        offsets, mask = _slots(start, num_splits, cols, col_mask, C, BLOCK_S)
        total += _load_slots(part_ptr, offsets, mask)
    return tl.sum(total, axis=0)


@triton.jit
def _finalize_sums(sums_ptr, stats_ptr, grad_weight_ptr, grad_bias_ptr, cols, col_mask, C, eps,
                   BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Sums the backward reduce pass's slots of channels `cols` (`_store_sums`): grad_bias is
    the sum of g, grad_weight that of g * (x - mean) times invstd, which sum also goes to the
    head of `sums_ptr` for the elementwise pass."""
    splits = tl.num_programs(1)
    sum_g = _sum_slots(sums_ptr + C, cols, col_mask, C, BLOCK_S, BLOCK_C)
    sum_gx = _sum_slots(sums_ptr + C + splits * C, cols, col_mask, C, BLOCK_S, BLOCK_C)
    var = tl.load(stats_ptr + C + cols, mask=col_mask, other=1.0).to(tl.float32)
    invstd = 1.0 / tl.sqrt(var + eps)
    tl.store(grad_weight_ptr + cols, sum_gx * invstd, mask=col_mask)
    tl.store(grad_bias_ptr + cols, sum_g, mask=col_mask)
    tl.store(sums_ptr + cols, sum_gx, mask=col_mask)
