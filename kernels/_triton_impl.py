"""Triton implementation of BatchNorm + residual add + ReLU, forward and backward: the functions
of the contract in _contract.py. Bottom up:
- _triton_tiles: device helpers (tile addressing, the packed ReLU mask, Welford summaries);
- _triton_finalize: the reductions' last step, run by the last program to finish;
- _triton_rows and _triton_spans: the kernels, on row tiles and on span tiles;
- _triton_launch: launches as data, launch templates, launches that skip Triton's binding;
- _triton_geometry: tilings, reduction sizes, per-signature geometry;
- _triton_sizing: the reductions as a training step launches them, which size their splits;
- _triton_tuning: the elementwise passes' warps, timed on a GPU (opt-in);
- _triton_plans: per-signature launch plans, made on a signature's first call;
- this module: forward, backward (each call: allocations and the plan's launches; the eager path
  keeps a signature's plan and runs it as `run_prepared_*`) and the running-stat update.

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

from collections.abc import Callable
from typing import NamedTuple

import torch

from . import _triton_tuning
from ._contract import RunningUpdate
from ._triton_finalize import reduction_counters
from ._triton_geometry import (
    UPDATE_BLOCK_C, dense_inputs, output_buffer, per_channel_copies, per_channel_dense,
    programs_in_one_wave, written_back,
)
from ._triton_geometry import relu_mask_bytes  # noqa: F401  (Implementation.relu_mask_bytes)
from ._triton_launch import KernelLaunch, LaunchTemplate, launch_stream
from ._triton_plans import BackwardPlan, ForwardPlan, backward_plan, forward_plan
from ._triton_rows import _update_running_stats_kernel


# A call's launches come from its signature's plan (_triton_plans.py). Each call passes a
# `launch(template, stream, tensors, *scalars)`: LaunchTemplate.__call__ runs it, `plan_forward`
# and `plan_backward` record it instead.

Launch = Callable[..., None]


class ForwardCall(NamedTuple):
    """The launches of one forward (described, not run) and the tensors they would fill."""

    launches: list[KernelLaunch]
    out: torch.Tensor
    stats: torch.Tensor | None
    relu_mask: torch.Tensor | None


def _issue_forward(x, weight, bias, residual, running_mean, running_var, eps: float, relu: bool,
                   pack_relu_mask: bool, update: RunningUpdate | None, reduction_programs,
                   launch: Launch) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """A forward's outputs, allocated, and its launches, issued through `launch`."""
    eps = float(eps)  # an int would be specialized on; a template's launches share one binary
    strided_update = update  # the running statistics read (eval) or updated (training)
    if not per_channel_dense(weight, bias, *((running_mean, running_var) if update is None
                                             else update[:2])):
        weight, bias, running_mean, running_var, update = per_channel_copies(
            weight, bias, running_mean, running_var, update)
    plan = forward_plan(x, weight, bias, residual, running_mean, running_var, eps, relu,
                        pack_relu_mask, update, reduction_programs)
    if update is not None:  # training: the statistics pass updates these
        running_mean, running_var = update.running_mean, update.running_var
    outputs = run_prepared_forward(
        plan, x, weight, bias, residual, running_mean, running_var, eps,
        0.0 if update is None else float(update.momentum),
        0.0 if update is None else float(update.unbias), launch)
    if update is not strided_update:  # the running statistics' own elements, updated
        written_back(strided_update, update)
    return outputs


def run_prepared_forward(plan: ForwardPlan, x: torch.Tensor, weight: torch.Tensor | None,
                         bias: torch.Tensor | None, residual: torch.Tensor | None,
                         running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                         eps: float, momentum: float, unbias: float, launch: Launch | None = None,
                         ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """`Implementation.run_prepared_forward` in _contract.py, and every forward's last step: its
    outputs, allocated, and the plan's launches, through `launch` (None: `_launch()`). The
    running statistics normalize (eval), or in training the statistics pass updates them (None:
    no update)."""
    if launch is None:
        launch = _launch()
    out = torch.empty_like(x)  # the input's strides, as the fake kernel promises
    out_buffer = out
    if plan.geometry.reshaped:
        out_buffer = output_buffer(plan.geometry, 0, out)
        x, residual = dense_inputs(plan.geometry, x, residual)
    stats = relu_mask = None
    stream = launch_stream(plan.normalize)
    mean, var = running_mean, running_var
    if plan.statistics is not None:  # the normalize pass finds the variances after the means
        stats = mean = var = plan.floats.new_empty(plan.stats_size)
        counters = reduction_counters(plan.counters, plan.floats,
                                      plan.statistics.grid[0], stream)
        if running_mean is None:  # the running statistics' pointers are then unread
            launch(plan.statistics, stream, (x, stats, counters, stats, stats), 0.0, 0.0)
        else:
            launch(plan.statistics, stream, (x, stats, counters, running_mean, running_var),
                   momentum, unbias)
    if plan.mask_bytes:
        relu_mask = plan.bytes.new_empty(plan.mask_bytes)
    # Where a tensor is absent, any valid pointer stands in: the kernel does not read it.
    launch(plan.normalize, stream,
           (x, residual if residual is not None else x, out_buffer, mean, var,
            weight if weight is not None else mean, bias if bias is not None else mean,
            relu_mask if relu_mask is not None else mean), eps)
    if out_buffer is not out:
        out.copy_(out_buffer)
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


def _issue_backward(grad_out, x, relu_mask, weight, stats, eps: float, batch_stats: bool,
                    residual_grad: bool, reduction_programs, launch: Launch
                    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """A backward's gradients, allocated, and its launches, issued through `launch`."""
    if not per_channel_dense(weight):
        weight = weight.contiguous()
    plan = backward_plan(grad_out, x, relu_mask, weight, stats, batch_stats, residual_grad,
                         reduction_programs)
    return run_prepared_backward(plan, grad_out, x, relu_mask, weight, stats, float(eps),
                                 residual_grad, launch)


def run_prepared_backward(plan: BackwardPlan, grad_out: torch.Tensor, x: torch.Tensor,
                          relu_mask: torch.Tensor | None, weight: torch.Tensor | None,
                          stats: torch.Tensor, eps: float, residual_grad: bool,
                          launch: Launch | None = None,
                          ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """`Implementation.run_prepared_backward` in _contract.py, and every backward's last step:
    its gradients, allocated, and the plan's launches, through `launch` (None: `_launch()`)."""
    if launch is None:
        launch = _launch()
    grad_input = torch.empty_like(x)
    grad_residual = torch.empty_like(grad_out, dtype=x.dtype) if residual_grad else None
    packed = plan.packed
    out = None if packed else relu_mask
    grad_input_buffer, grad_residual_buffer = grad_input, grad_residual
    if plan.geometry.reshaped:
        x, grad_out, out = dense_inputs(plan.geometry, x, grad_out, out)
        grad_input_buffer = output_buffer(plan.geometry, 0, grad_input)
        if residual_grad:
            grad_residual_buffer = output_buffer(plan.geometry, 1, grad_residual)
    floats = plan.floats
    sums = floats.new_empty(plan.sums)
    # Separate tensors: autograd takes them as two gradients.
    grad_weight, grad_bias = floats.new_empty(plan.channels), floats.new_empty(plan.channels)
    # The ReLU mask's pointer: the packed mask, the output, or where RELU is off (and it is
    # unread) any valid pointer; likewise the residual's gradient where none is stored.
    mask_or_grad = relu_mask if packed else out if relu_mask is not None else grad_out
    masked = grad_residual_buffer if residual_grad else grad_out
    stream = launch_stream(plan.elementwise)
    counters = reduction_counters(plan.counters, floats, plan.reduce.grid[0], stream)
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


def prepare_forward(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                    residual: torch.Tensor | None, running_mean: torch.Tensor | None,
                    running_var: torch.Tensor | None, eps: float, relu: bool,
                    pack_relu_mask: bool = False, update: RunningUpdate | None = None,
                    ) -> ForwardPlan | None:
    """`Implementation.prepare_forward` in _contract.py: the call's plan, where its per-channel
    tensors are dense (else they are copied every call, which `forward` does)."""
    if not per_channel_dense(weight, bias, *((running_mean, running_var) if update is None
                                             else update[:2])):
        return None
    return forward_plan(x, weight, bias, residual, running_mean, running_var, float(eps), relu,
                        pack_relu_mask, update, programs_in_one_wave)


def prepare_backward(grad_out: torch.Tensor, x: torch.Tensor, relu_mask: torch.Tensor | None,
                     weight: torch.Tensor | None, stats: torch.Tensor, batch_stats: bool,
                     residual_grad: bool) -> BackwardPlan | None:
    """`Implementation.prepare_backward` in _contract.py."""
    if not per_channel_dense(weight):
        return None
    return backward_plan(grad_out, x, relu_mask, weight, stats, batch_stats, residual_grad,
                         programs_in_one_wave)


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
