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


def reduction_counters(counters: dict[int, torch.Tensor], prototype: torch.Tensor,
                       col_blocks: int, stream: LaunchStream | None) -> torch.Tensor:
    """The counters a plan's reduction launches count their finished programs in (one per
    channel block, see above), for the stream they launch on (`stream`, or where they go through
    JITFunction.run, the current device's current stream, as Triton reads it): each launch leaves
    them at zero for the next on its stream, while launches on two streams may run at once. Kept
    with the plan for as long as it lives.

    Except while a CUDA graph is being captured: its stream is shared by every capture, and
    counters allocated then would be zeroed only when that graph replays. A captured launch gets
    counters of its own, zeroed in the graph before it on every replay, and kept by the graph's
    memory pool, as any tensor of the step is. `prototype`: a tensor on the launches' device
    (`is_cuda` is read every call, a fraction of what `device.type` costs)."""
    if not prototype.is_cuda:
        handle = 0
    elif torch.cuda.is_current_stream_capturing():
        return torch.zeros(col_blocks, dtype=torch.int32, device=prototype.device)
    elif stream is not None:
        handle = stream.handle
    else:
        handle = torch._C._cuda_getCurrentRawStream(torch.cuda.current_device())
    found = counters.get(handle)
    if found is None:
        found = counters.setdefault(
            handle, torch.zeros(col_blocks, dtype=torch.int32, device=prototype.device))
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


# Powers of two scale without rounding: the merge sums count-weighted means (and offsets) scaled
# down by TINY beside the unscaled sums, and takes the scaled sum, scaled back up, in a channel
# whose unscaled sum overflowed (means near the float range, 3e38). Summed in the same loop and
# reduction, where a fallback pass over the slots would follow a check of every channel.
TINY = tl.constexpr(2.0 ** -100)
HUGE = tl.constexpr(2.0 ** 100)


@triton.jit
def _finalize_statistics(stats_ptr, running_mean_ptr, running_var_ptr, cols, col_mask, C,
                         momentum, unbias, UPDATE_RUNNING: tl.constexpr, BLOCK_S: tl.constexpr,
                         BLOCK_C: tl.constexpr):
    """Merges the [splits, C] summaries of channels `cols` (the four planes after the head of
    `stats_ptr`: count, mean, M2, odd) in a fixed order into the head: the C means, then the C
    biased variances. With UPDATE_RUNNING also updates the running statistics, which saves that
    update a launch.

    _merge's arithmetic (a weighted mean, the weighted mean of the offsets from it, then
    M2 = sum(M2 + c * (m - mean)^2)) in three passes over the slots, each needing the one before
    it. In each, every lane of a [BLOCK_S, BLOCK_C] block accumulates its own slots across the
    loop, and one block reduction of all the pass's sums follows it. The merge runs in one
    program while the others have finished, so its time is latency: the slots' loads from L2
    (splits x C x 16 bytes), a round trip per pass where a loop's iterations fit the compiler's
    unrolling, and each reduction's barriers. Merged block by block (7 reductions per 16 slots),
    it cost ~9.5 us per 16 slots of 64 channels on an H200; in five passes, a reduction per sum
    and two checks for overflow, ~12 us of the 17 us statistics pass of ResNet-56's 128x16x32x32.
    """
    num_splits = tl.num_programs(1)
    counts_ptr = stats_ptr + 2 * C
    plane = num_splits * C
    total, odd, mean = _merged_mean(counts_ptr, plane, cols, col_mask, C, num_splits, BLOCK_S,
                                    BLOCK_C)
    # Pass 3: M2, count first: an empty summary (count 0) adds 0 however far its mean is.
    m2 = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    for start in range(0, num_splits, BLOCK_S):
        offsets, mask = _slots(start, num_splits, cols, col_mask, C, BLOCK_S)
        count = _load_slots(counts_ptr, offsets, mask)
        deviation = _load_slots(counts_ptr + plane, offsets, mask) - mean[None, :]
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
def _merged_mean(counts_ptr, plane, cols, col_mask, C, num_splits, BLOCK_S: tl.constexpr,
                 BLOCK_C: tl.constexpr):
    """The merge's first two passes: per channel the total count, the sum of the odd values and
    the count-weighted mean of the slots' means (a rough one, then the weighted mean of the
    offsets from it added)."""
    # Pass 1: counts and odd values summed, and means weighted by counts (exact for tiny means,
    # where shares times means would underflow), also scaled down.
    total = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    odd, weighted, weighted_tiny = total, total, total
    for start in range(0, num_splits, BLOCK_S):
        offsets, mask = _slots(start, num_splits, cols, col_mask, C, BLOCK_S)
        count = _load_slots(counts_ptr, offsets, mask)
        mean = _load_slots(counts_ptr + plane, offsets, mask)
        total += count
        odd += _load_slots(counts_ptr + 3 * plane, offsets, mask)
        weighted += count * mean
        weighted_tiny += count * (mean * TINY)
    total, odd, weighted, weighted_tiny = tl.reduce((total, odd, weighted, weighted_tiny), 0,
                                                    _add4)
    safe_total = tl.where(total > 0, total, 1.0)
    rough = _finite_or(weighted / safe_total, weighted_tiny / safe_total * HUGE)
    # Pass 2: the weighted mean of the offsets from it added (centred terms sum without losing
    # digits, and equal means merge exactly: a constant channel stays exact).
    offset_sum = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    offset_sum_tiny = offset_sum
    rough_tiny = rough * TINY
    for start in range(0, num_splits, BLOCK_S):
        offsets, mask = _slots(start, num_splits, cols, col_mask, C, BLOCK_S)
        count = _load_slots(counts_ptr, offsets, mask)
        mean = _load_slots(counts_ptr + plane, offsets, mask)
        offset_sum += tl.where(mask, mean - rough[None, :], 0.0) * count
        offset_sum_tiny += tl.where(mask, mean * TINY - rough_tiny[None, :], 0.0) * count
    offset_sum, offset_sum_tiny = tl.reduce((offset_sum, offset_sum_tiny), 0, _add2)
    mean = rough + _finite_or(offset_sum / safe_total, offset_sum_tiny / safe_total * HUGE)
    return total, odd, mean


@triton.jit
def _add2(a0, a1, b0, b1):
    return a0 + b0, a1 + b1


@triton.jit
def _add4(a0, a1, a2, a3, b0, b1, b2, b3):
    return a0 + b0, a1 + b1, a2 + b2, a3 + b3


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
def _finalize_sums(sums_ptr, stats_ptr, grad_weight_ptr, grad_bias_ptr, cols, col_mask, C, eps,
                   BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Sums the backward reduce pass's slots of channels `cols` (`_store_sums`): grad_bias is
    the sum of g, grad_weight that of g * (x - mean) times invstd, which sum also goes to the
    head of `sums_ptr` for the elementwise pass."""
    splits = tl.num_programs(1)
    sum_g = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    sum_gx = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    for start in range(0, splits, BLOCK_S):  # in a fixed order: deterministic
        offsets, mask = _slots(start, splits, cols, col_mask, C, BLOCK_S)
        sum_g += _load_slots(sums_ptr + C, offsets, mask)
        sum_gx += _load_slots(sums_ptr + C + splits * C, offsets, mask)
    sum_g, sum_gx = tl.reduce((sum_g, sum_gx), 0, _add2)
    var = tl.load(stats_ptr + C + cols, mask=col_mask, other=1.0).to(tl.float32)
    invstd = 1.0 / tl.sqrt(var + eps)
    tl.store(grad_weight_ptr + cols, sum_gx * invstd, mask=col_mask)
    tl.store(grad_bias_ptr + cols, sum_g, mask=col_mask)
    tl.store(sums_ptr + cols, sum_gx, mask=col_mask)
