"""Triton implementation of BatchNorm + residual add + ReLU, forward and backward: the launch
plans and the functions of the contract in _contract.py. Bottom up:
- _triton_tiles: device helpers (tile addressing, the packed ReLU mask, Welford summaries);
- _triton_finalize: the reductions' last step, run by the last program to finish;
- _triton_rows and _triton_spans: the kernels, on row tiles and on span tiles;
- _triton_launch: launches as data, launch templates, launches that skip Triton's binding;
- _triton_geometry: tilings, reduction sizes, per-signature geometry;
- _triton_sizing: the reductions as a training step launches them, which size their splits;
- _triton_tuning: the elementwise passes' warps, timed on a GPU (opt-in);
- this module: per-signature launch plans; forward, backward and the running-stat update.

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
times over. The forward writes it where its tiles own whole bytes of it (relu_mask_packing: every
ResNet-50 and ResNet-56 shape in bf16 and fp16, NCHW and channels_last; in fp32 all but NCHW
14x14, whose rows of 196 are 16-byte aligned, so row tiles, but not whole bytes of the mask);
elsewhere the backward reads the output.

A training forward makes two launches, statistics (with the merge and the running-stat update,
_triton_finalize.py) and normalize, a backward two, reduce (with the merge) and elementwise; the
custom op (traced and compiled code) launches the running-stat update on its own.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch

from . import _triton_tuning
from ._contract import RunningUpdate
from ._triton_geometry import (
    STATISTICS_TILES_PER_STEP, UPDATE_BLOCK_C, Geometry, call_geometry, dense_inputs,
    finalize_slots, is_packed_mask, output_buffer, per_channel_copies, per_channel_dense,
    programs_in_one_wave, tensor_signature, written_back,
)
from ._triton_geometry import relu_mask_bytes  # noqa: F401  (Implementation.relu_mask_bytes)
from ._triton_finalize import reduction_counters
from ._triton_launch import (
    KernelLaunch, LaunchTemplate, aligned, launch_stream, through_jit_only,
)
from ._triton_rows import (
    _backward_elementwise_kernel, _backward_reduce_kernel, _batch_stats_kernel, _forward_kernel,
    _update_running_stats_kernel,
)
from ._triton_sizing import backward_reduction, statistics_reduction
from ._triton_spans import (
    _span_backward_elementwise_kernel, _span_backward_reduce_kernel, _span_batch_stats_kernel,
    _span_forward_kernel,
)
from ._triton_tiles import MASK_NONE


# ------------------------------------------------------------------------------------------------
# Plans: a call's launches as its signature (the geometry's, plus its optional tensors and flags)
# fixes them, worked out on the signature's first call. Later calls allocate their outputs and one
# buffer per reduction, and launch the templates with them and their scalars. Each call passes a
# `launch(template, stream, tensors, *scalars)`: LaunchTemplate.__call__ runs it, `plan_forward`
# and `plan_backward` record it instead.

Launch = Callable[..., None]


class ForwardCall(NamedTuple):
    """The launches of one forward (described, not run) and the tensors they would fill."""

    launches: list[KernelLaunch]
    out: torch.Tensor
    stats: torch.Tensor | None
    relu_mask: torch.Tensor | None


class _ForwardPlan(NamedTuple):
    geometry: Geometry
    statistics: LaunchTemplate | None  # the statistics pass (training only)
    normalize: LaunchTemplate
    counters: dict[int, torch.Tensor]  # the statistics pass's, per stream
    stats_size: int  # fp32 values: mean and var (2C), then four planes of [splits, C] slots
    mask_bytes: int  # of the packed ReLU mask (0: none is written)
    floats: torch.Tensor  # empty, fp32 on the call's device: `new_empty` allocates like it
    bytes: torch.Tensor  # likewise uint8


_FORWARD_PLANS: dict[tuple, _ForwardPlan] = {}


def _forward_plan(x, weight, bias, residual, out, batch_stats: bool, mask: bool, relu: bool,
                  eps: float, update: bool, reduction_programs, all_aligned: bool) -> _ForwardPlan:
    """`mask`: whether a packed ReLU mask is wanted. Where not all tensors are aligned, the plan's
    launches go through JITFunction.run only (set before any other thread can find the plan)."""
    constexprs = dict(HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
                      HAS_RESIDUAL=residual is not None, RELU=relu, EPS_ZERO=eps == 0,
                      MASK_PACKING=mask)
    key = (tensor_signature(x), tensor_signature(residual), batch_stats, reduction_programs)
    geometry = call_geometry(key, (x, residual), (out,),
                             statistics_reduction if batch_stats else None)
    channels = x.shape[1]
    span, tiling = geometry.span, geometry.tiling
    statistics = None
    if batch_stats and span is not None:
        statistics = LaunchTemplate(
            _span_batch_stats_kernel, (span.col_blocks, geometry.splits),
            (channels, span.samples, geometry.per_split), (),
            dict(span.constexprs(), UPDATE_RUNNING=update, BLOCK_S=finalize_slots(span.block_c),
                 TILES_PER_STEP=STATISTICS_TILES_PER_STEP), span.num_warps)
    elif batch_stats:
        statistics = LaunchTemplate(
            _batch_stats_kernel, (tiling.col_blocks, geometry.splits),
            (channels, tiling.positions, tiling.l_blocks, tiling.tiles, geometry.per_split,
             *tiling.strides[0]), (),
            dict(UPDATE_RUNNING=update, BLOCK_R=tiling.block_r, BLOCK_C=tiling.block_c,
                 BLOCK_S=finalize_slots(tiling.block_c),
                 TILES_PER_STEP=tiling.stats_tiles_per_step), tiling.stats_warps)
    packing = geometry.mask_packing if constexprs["MASK_PACKING"] else MASK_NONE
    constexprs = dict(constexprs, MASK_PACKING=packing, BATCH_STATS=batch_stats)
    if span is not None:
        normalize = LaunchTemplate(_span_forward_kernel, (span.col_blocks, span.samples),
                                   (channels,), (), dict(constexprs, **span.constexprs()),
                                   span.num_warps, tunable=True)
    else:
        normalize = LaunchTemplate(
            _forward_kernel, (tiling.tiles, tiling.col_blocks),
            (channels, tiling.positions, tiling.l_blocks),
            tuple(s for strides in tiling.strides for s in strides),
            dict(constexprs, BLOCK_R=tiling.block_r, BLOCK_C=tiling.block_c), tiling.num_warps,
            tunable=True)
    plan = _ForwardPlan(geometry, statistics, normalize, {}, (2 + 4 * geometry.splits) * channels,
                        x.numel() // 8 if packing else 0, _prototype(x, torch.float32),
                        _prototype(x, torch.uint8))
    if not all_aligned:
        through_jit_only(plan)
    return plan


def _prototype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An empty tensor of `dtype` on x's device, whose `new_empty` allocates a call's buffers: it
    parses fewer arguments than `torch.empty(size, dtype=..., device=...)`, every call."""
    return torch.empty(0, dtype=dtype, device=x.device)


def _issue_forward(x, weight, bias, residual, running_mean, running_var, eps: float, relu: bool,
                   pack_relu_mask: bool, update: RunningUpdate | None, reduction_programs,
                   launch: Launch) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """A forward's outputs, allocated, and its launches, issued through `launch`."""
    eps = float(eps)  # an int would be specialized on; a template's launches share one binary
    batch_stats = running_mean is None
    strided_update = update  # the running statistics read (eval) or updated (training)
    if not per_channel_dense(weight, bias, *((running_mean, running_var) if update is None
                                             else update[:2])):
        weight, bias, running_mean, running_var, update = per_channel_copies(
            weight, bias, running_mean, running_var, update)
    running = () if update is None else update[:2]
    all_aligned = aligned(x, residual, weight, bias, running_mean, running_var, *running)
    # Every tensor's dtype and whether all are aligned: a template's launches share one binary
    # (_triton_launch.py). All are on x's device (_checks.py), and a residual has x's shape. One
    # flat tuple: a layer looks its plan up every call, and nested tuples hash and compare slower.
    key = (x.shape, x.stride(), x.dtype, x.device,
           None if residual is None else residual.stride(),
           None if residual is None else residual.dtype,
           None if weight is None else weight.dtype, None if bias is None else bias.dtype,
           None if batch_stats else running_mean.dtype, None if batch_stats else running_var.dtype,
           None if update is None else running[0].dtype,
           None if update is None else running[1].dtype,
           relu, pack_relu_mask, eps == 0, all_aligned, reduction_programs)
    out = torch.empty_like(x)  # the input's strides, as the fake kernel promises
    plan = _FORWARD_PLANS.get(key)
    if plan is None:
        plan = _FORWARD_PLANS[key] = _forward_plan(
            x, weight, bias, residual, out, batch_stats, relu and pack_relu_mask, relu, eps,
            update is not None, reduction_programs, all_aligned)
    out_buffer = out
    if plan.geometry.reshaped:
        out_buffer = output_buffer(plan.geometry, 0, out)
        x, residual = dense_inputs(plan.geometry, x, residual)
    stats = relu_mask = None
    stream = launch_stream(plan.normalize)
    mean, var = running_mean, running_var  # eval: the running statistics normalize
    if batch_stats:  # the normalize pass finds the variances after the means (BATCH_STATS)
        stats = mean = var = plan.floats.new_empty(plan.stats_size)
        counters = reduction_counters(plan.counters, plan.floats.device,
                                      plan.statistics.grid[0], stream)
        if update is None:  # the running statistics' pointers are then unread
            launch(plan.statistics, stream, (x, stats, counters, stats, stats), 0.0, 0.0)
        else:
            launch(plan.statistics, stream, (x, stats, counters, *running),
                   float(update.momentum), float(update.unbias))
    if plan.mask_bytes:
        relu_mask = plan.bytes.new_empty(plan.mask_bytes)
    # Where a tensor is absent, any valid pointer stands in: the kernel does not read it.
    launch(plan.normalize, stream,
           (x, residual if residual is not None else x, out_buffer, mean, var,
            weight if weight is not None else mean, bias if bias is not None else mean,
            relu_mask if relu_mask is not None else mean), eps)
    if out_buffer is not out:
        out.copy_(out_buffer)
    if update is not strided_update:  # the running statistics' own elements, updated
        written_back(strided_update, update)
    return out, stats, relu_mask


def plan_forward(x, weight, bias, residual, running_mean, running_var, eps: float, relu: bool,
                 pack_relu_mask: bool = False, update: RunningUpdate | None = None, *,
                 reduction_programs=programs_in_one_wave) -> ForwardCall:
    """Everything `forward` does but the launches, which it returns as data."""
    launches: list[KernelLaunch] = []
    outputs = _issue_forward(x, weight, bias, residual, running_mean, running_var, eps, relu,
                             pack_relu_mask, update, reduction_programs, _recorder(launches))
    return ForwardCall(launches, *outputs)


class BackwardCall(NamedTuple):
    """The launches of one backward (described, not run) and the tensors they would fill."""

    launches: list[KernelLaunch]
    grad_input: torch.Tensor
    grad_residual: torch.Tensor | None
    grad_weight: torch.Tensor
    grad_bias: torch.Tensor


class _BackwardPlan(NamedTuple):
    geometry: Geometry
    reduce: LaunchTemplate
    elementwise: LaunchTemplate
    counters: dict[int, torch.Tensor]  # the reduce pass's, per stream
    sums: int  # fp32 values of the reduce pass's buffer: C, then two planes of [splits, C]
    floats: torch.Tensor  # as _ForwardPlan's


_BACKWARD_PLANS: dict[tuple, _BackwardPlan] = {}


def _backward_plan(geometry_key: tuple, x, grad_out, relu_mask, grad_input, grad_residual,
                   has_weight: bool, batch_stats: bool) -> _BackwardPlan:
    relu, packed = relu_mask is not None, is_packed_mask(relu_mask)
    residual_grad = grad_residual is not None
    out = None if packed else relu_mask  # the output, a tensor of x's shape, where it is the mask
    geometry = call_geometry(geometry_key, (x, grad_out, out), (grad_input, grad_residual),
                             functools.partial(backward_reduction, relu_mask=relu_mask))
    channels = x.shape[1]
    # Where this call's tiles hold whole bytes of the packed mask, they read a byte per 8 values.
    packing = geometry.mask_packing if packed else MASK_NONE
    span, tiling = geometry.span, geometry.tiling
    reduce_constexprs = dict(RELU=relu, PACKED=packed, MASK_PACKING=packing,
                             STORE_GRAD_RESIDUAL=residual_grad,
                             BLOCK_S=finalize_slots((span or tiling).block_c))
    elementwise_constexprs = dict(HAS_WEIGHT=has_weight, BATCH_STATS=batch_stats,
                                  RELU=relu and not residual_grad, PACKED=packed,
                                  MASK_PACKING=packing)
    count = x.numel() // channels
    if span is not None:
        reduce = LaunchTemplate(
            _span_backward_reduce_kernel, (span.col_blocks, geometry.splits),
            (channels, span.samples, geometry.per_split), (),
            dict(reduce_constexprs, **span.constexprs()), span.num_warps)
        elementwise = LaunchTemplate(
            _span_backward_elementwise_kernel, (span.col_blocks, span.samples), (channels, count),
            (), dict(elementwise_constexprs, **span.constexprs()), span.num_warps, tunable=True)
    else:
        sx, sg, so, sdi, sdr = tiling.strides
        blocks = dict(BLOCK_R=tiling.block_r, BLOCK_C=tiling.block_c)
        walk = (tiling.positions, tiling.l_blocks)
        reduce = LaunchTemplate(
            _backward_reduce_kernel, (tiling.col_blocks, geometry.splits),
            (channels, *walk, tiling.tiles, geometry.per_split, *sg, *so, *sx, *sdr), (),
            dict(reduce_constexprs, **blocks), tiling.num_warps)
        # With a residual, the elementwise pass reads the masked gradient the reduce pass wrote.
        elementwise = LaunchTemplate(
            _backward_elementwise_kernel, (tiling.tiles, tiling.col_blocks),
            (channels, *walk, count), (*(sdr if residual_grad else sg), *so, *sx, *sdi),
            dict(elementwise_constexprs, **blocks), tiling.num_warps, tunable=True)
    return _BackwardPlan(geometry, reduce, elementwise, {}, channels * (1 + 2 * geometry.splits),
                         _prototype(x, torch.float32))


def _issue_backward(grad_out, x, relu_mask, weight, stats, eps: float, batch_stats: bool,
                    residual_grad: bool, reduction_programs, launch: Launch
                    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """A backward's gradients, allocated, and its launches, issued through `launch`."""
    eps = float(eps)
    if not per_channel_dense(weight):
        weight = weight.contiguous()
    # Gradients take the strides the fake kernel promises, whatever copies compute them.
    grad_input = torch.empty_like(x)
    grad_residual = torch.empty_like(grad_out, dtype=x.dtype) if residual_grad else None
    all_aligned = aligned(x, grad_out, relu_mask, weight, stats)
    # As the forward's key; the mask is packed (its shape follows from x's) or the output.
    key = (x.shape, x.stride(), x.dtype, x.device, grad_out.shape, grad_out.stride(),
           grad_out.dtype, None if relu_mask is None else relu_mask.dtype,
           None if relu_mask is None else relu_mask.stride(), residual_grad,
           None if weight is None else weight.dtype, stats.dtype, batch_stats, all_aligned,
           reduction_programs)
    plan = _BACKWARD_PLANS.get(key)
    if plan is None:
        geometry_key = (tensor_signature(x), tensor_signature(grad_out),
                        tensor_signature(relu_mask), residual_grad, reduction_programs)
        plan = _backward_plan(geometry_key, x, grad_out, relu_mask, grad_input, grad_residual,
                              weight is not None, batch_stats)
        if not all_aligned:  # before any other thread can find the plan
            through_jit_only(plan)
        _BACKWARD_PLANS[key] = plan
    packed = is_packed_mask(relu_mask)
    out = None if packed else relu_mask
    grad_input_buffer, grad_residual_buffer = grad_input, grad_residual
    if plan.geometry.reshaped:
        x, grad_out, out = dense_inputs(plan.geometry, x, grad_out, out)
        grad_input_buffer = output_buffer(plan.geometry, 0, grad_input)
        if residual_grad:
            grad_residual_buffer = output_buffer(plan.geometry, 1, grad_residual)
    channels = x.shape[1]
    floats = plan.floats
    sums = floats.new_empty(plan.sums)
    # Separate tensors: autograd takes them as two gradients.
    grad_weight, grad_bias = floats.new_empty(channels), floats.new_empty(channels)
    # The ReLU mask's pointer: the packed mask, the output, or where RELU is off (and it is
    # unread) any valid pointer; likewise the residual's gradient where none is stored.
    mask_or_grad = relu_mask if packed else out if relu_mask is not None else grad_out
    masked = grad_residual_buffer if residual_grad else grad_out
    stream = launch_stream(plan.elementwise)
    counters = reduction_counters(plan.counters, floats.device, plan.reduce.grid[0], stream)
    launch(plan.reduce, stream, (grad_out, mask_or_grad, x, stats, sums, masked, counters,
                                 grad_weight, grad_bias), eps)
    launch(plan.elementwise, stream, (masked, mask_or_grad, x, stats,
                                      weight if weight is not None else stats, grad_bias, sums,
                                      grad_input_buffer), eps)
    if grad_input_buffer is not grad_input:
        grad_input.copy_(grad_input_buffer)
    if grad_residual_buffer is not grad_residual:
        grad_residual.copy_(grad_residual_buffer)
    return grad_input, grad_residual, grad_weight, grad_bias


def plan_backward(grad_out, x, relu_mask, weight, stats, eps: float, batch_stats: bool,
                  residual_grad: bool, *, reduction_programs=programs_in_one_wave
                  ) -> BackwardCall:
    """Everything `backward` does but the launches, which it returns as data."""
    launches: list[KernelLaunch] = []
    gradients = _issue_backward(grad_out, x, relu_mask, weight, stats, eps, batch_stats,
                                residual_grad, reduction_programs, _recorder(launches))
    return BackwardCall(launches, *gradients)


def _recorder(launches: list[KernelLaunch]) -> Launch:
    """A `launch` that appends each launch, as data, to `launches` instead of running it."""
    return lambda template, *args: launches.append(template.bind(*args))


def forward(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
            residual: torch.Tensor | None, running_mean: torch.Tensor | None,
            running_var: torch.Tensor | None, eps: float, relu: bool,
            pack_relu_mask: bool = False, update: RunningUpdate | None = None,
            ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """`Implementation.forward` in _contract.py: the update joins the statistics launch."""
    return _issue_forward(x, weight, bias, residual, running_mean, running_var, eps, relu,
                          pack_relu_mask, update, programs_in_one_wave, _launch())


def backward(grad_out: torch.Tensor, x: torch.Tensor, relu_mask: torch.Tensor | None,
             weight: torch.Tensor | None, stats: torch.Tensor, eps: float, batch_stats: bool,
             residual_grad: bool,
             ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """`Implementation.backward` in _contract.py."""
    return _issue_backward(grad_out, x, relu_mask, weight, stats, eps, batch_stats, residual_grad,
                           programs_in_one_wave, _launch())


def _launch() -> Launch:
    """How `forward` and `backward` launch: with autotuning on, through the tuner."""
    return _triton_tuning.launch if _triton_tuning.ENABLED else LaunchTemplate.__call__


def update_running_stats(running_mean: torch.Tensor, running_var: torch.Tensor,
                         stats: torch.Tensor, momentum: float, unbias: float) -> None:
    """`Implementation.update_running_stats` in _contract.py: one launch for both vectors."""
    channels = running_mean.numel()
    strided = RunningUpdate(running_mean, running_var, momentum, unbias)
    dense = per_channel_copies(None, None, None, None, strided)[-1]
    LaunchTemplate(_update_running_stats_kernel, (-(-channels // UPDATE_BLOCK_C),),
                   (channels,), (), dict(BLOCK_C=UPDATE_BLOCK_C), 4
                   )(None, (dense.running_mean, dense.running_var, stats), float(momentum),
                     float(unbias))
    written_back(strided, dense)
