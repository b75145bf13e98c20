"""The eager path of `fused_batch_norm`: calls that no tracer, compiler, dispatch mode or functorch
transform looks on, through one autograd.Function, with what each call's signature decides worked
out on its first call.

A layer's host time is measured against eager PyTorch's BatchNorm + add + ReLU, a few
microseconds of C++ dispatch each (benchmarks/bench_host.py). Two things kept the fused layer
above it (1.23x at the median, launches aside), and this path removes both:
- The custom op's dispatch (schema binding, redispatch below autograd, the generated Function):
  nothing in eager mode needs the op to be one graph node, so `_EagerBatchNormAct` calls the
  implementation directly, with the same saved context and gradients (_autograd.py). Tracing and
  compilation keep the custom op (batch_norm.py).
- Work that depends only on the call's signature, redone on every call: F.batch_norm's checks,
  the choice of implementation, the launch plans' lookups, the per-channel tensors' layout.
  `EagerCall` holds it for one signature, made on its first call (which checks everything, as
  every call did) and found by later ones with a single key (`signature`): everything those
  decisions read, and nothing else (not the tensors' values or addresses but whether all are
  16-byte aligned, which Triton specializes on). A call that the key cannot vouch for (eps <= 0,
  a momentum that is not a float, a residual that broadcasts, a running statistic that requires
  grad) takes the first-call path every time. The key costs about what the checks did; the
  checks, the plans' two keys, their alignment and density tests and the per-call Python around
  them are gone: about eager's host time (1.03x at the median, README's "Host cost per layer").
"""

from __future__ import annotations

import torch

from ._autograd import (
    SavedMeta, backward_body, dtype_of, forward_body, gradient_will_be_taken, gradients,
    save_for_backward,
)
from ._checks import check_arguments, check_types, checked_residual
from ._contract import Implementation, RunningUpdate
from ._layout import aligned
from ._signature_cache import SignatureCache
from .backends import get_backend
from .backends import implementation as _implementation


class EagerCall:
    """One signature's eager calls: checked, their implementation chosen and their launches
    planned once. Immutable but for `prepared_backward`, replaced whole (threads may share a
    call)."""

    __slots__ = ("implementation", "meta", "updates", "pack_relu_mask", "unbias", "nonempty",
                 "prepared", "backward_prepares", "prepared_backward")

    def __init__(self, implementation: Implementation, input: torch.Tensor,
                 running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                 weight: torch.Tensor | None, bias: torch.Tensor | None, training: bool,
                 eps: float, residual: torch.Tensor | None, relu: bool, gradient: bool) -> None:
        """From the signature's first call, whose arguments passed the checks."""
        self.implementation = implementation
        self.meta = SavedMeta(relu, training, dtype_of(residual), dtype_of(weight), dtype_of(bias),
                              self.backward)
        count = input.numel() // max(input.shape[1], 1)  # no channels: an empty output
        self.updates = training and running_mean is not None and count > 0
        self.unbias = count / (count - 1) if self.updates else 1.0
        # The packed ReLU mask is worth writing only where a backward will read it.
        self.pack_relu_mask = relu and gradient
        self.nonempty = input.numel() > 0
        self.prepared = None
        if self.nonempty and eps > 0:
            update = RunningUpdate(running_mean, running_var, 0.0, self.unbias) \
                if self.updates else None
            self.prepared = implementation.prepare_forward(
                input, weight, bias, residual, None if training else running_mean,
                None if training else running_var, eps, relu, self.pack_relu_mask, update)
        # Where every tensor is aligned, a backward's own signature is the forward's but for
        # grad_out (x and the weight were the forward's arguments, the mask and the statistics
        # fresh tensors of its making): (grad_out's strides, dtype and alignment, residual_grad)
        # and the backward prepared for them, by the call's first backward. Not where the key
        # says only that some tensor is misaligned: which one, x or a residual, decides whether
        # the backward's launches may go direct.
        self.backward_prepares = self.nonempty and aligned(input, residual, weight, bias,
                                                           running_mean, running_var)
        self.prepared_backward: tuple = (None, None)

    def forward(self, x, weight, bias, residual, running_mean, running_var, momentum: float,
                eps: float) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        if self.prepared is not None:
            return self.implementation.run_prepared_forward(
                self.prepared, x, weight, bias, residual, running_mean, running_var, eps,
                momentum, self.unbias)
        update = None
        if self.meta.batch_stats:  # training: the running statistics are updated, or unused
            if self.updates:
                update = RunningUpdate(running_mean, running_var, momentum, self.unbias)
            running_mean = running_var = None
        return forward_body(self.implementation, x, weight, bias, residual, running_mean,
                            running_var, eps, self.meta.relu, self.pack_relu_mask, update)

    def backward(self, grad_out, x, relu_mask, weight, stats, eps: float, batch_stats: bool,
                 residual_grad: bool) -> tuple:
        """`SavedMeta.backward` of this signature's calls: the implementation's backward, through
        the plan prepared for grad_out's layout where the call's tensors are all aligned."""
        if not self.backward_prepares:  # an empty batch, or misaligned tensors: as they come
            return backward_body(self.implementation, grad_out, x, relu_mask, weight, stats, eps,
                                 batch_stats, residual_grad)
        guard = (grad_out.stride(), grad_out.dtype, grad_out.data_ptr() % 16 == 0, residual_grad)
        prepared = self.prepared_backward
        if prepared[0] != guard:
            prepared = self.prepared_backward = guard, self.implementation.prepare_backward(
                grad_out, x, relu_mask, weight, stats, batch_stats, residual_grad)
        if prepared[1] is None:
            return backward_body(self.implementation, grad_out, x, relu_mask, weight, stats, eps,
                                 batch_stats, residual_grad)
        return self.implementation.run_prepared_backward(prepared[1], grad_out, x, relu_mask,
                                                         weight, stats, eps, residual_grad)


_CALLS: SignatureCache[tuple, EagerCall] = SignatureCache()


def signature(input: torch.Tensor, running_mean: torch.Tensor | None,
              running_var: torch.Tensor | None, weight: torch.Tensor | None,
              bias: torch.Tensor | None, training: bool, residual: torch.Tensor | None,
              relu: bool, gradient: bool) -> tuple:
    """Everything that a call's checks, implementation and plans read: the backend; each tensor's
    shape, strides (per-channel ones: whether contiguous), dtype and device, or None; whether
    all are 16-byte aligned; the flags. One flat tuple, built and hashed once a call: nested
    tuples hash and compare slower."""
    return (
        # training as given where it is a bool, else None: 1 hashes as True does, and must not
        # find True's call (the first call of its own refuses it, as F.batch_norm does)
        get_backend(), input.shape, input.stride(), input.dtype, input.device,
        training if type(training) is bool else None, relu, gradient,
        None if residual is None else residual.shape,
        None if residual is None else residual.stride(),
        None if residual is None else residual.dtype,
        None if residual is None else residual.device,
        None if weight is None else weight.dtype, None if weight is None else weight.shape,
        None if weight is None else weight.is_contiguous(),
        None if weight is None else weight.device,
        None if bias is None else bias.dtype, None if bias is None else bias.shape,
        None if bias is None else bias.is_contiguous(), None if bias is None else bias.device,
        None if running_mean is None else running_mean.dtype,
        None if running_mean is None else running_mean.shape,
        None if running_mean is None else running_mean.is_contiguous(),
        None if running_mean is None else running_mean.device,
        None if running_mean is None else running_mean.requires_grad,
        None if running_var is None else running_var.dtype,
        None if running_var is None else running_var.shape,
        None if running_var is None else running_var.is_contiguous(),
        None if running_var is None else running_var.device,
        None if running_var is None else running_var.requires_grad,
        aligned(input, residual, weight, bias, running_mean, running_var),
    )


def fused_batch_norm_eager(input: torch.Tensor, running_mean: torch.Tensor | None,
                           running_var: torch.Tensor | None, weight: torch.Tensor | None,
                           bias: torch.Tensor | None, training: bool, momentum: float,
                           eps: float, residual: torch.Tensor | None, relu: bool
                           ) -> torch.Tensor:
    """`fused_batch_norm` on the eager path (its arguments, as it received them)."""
    try:
        gradient = gradient_will_be_taken(input, weight, bias, residual)
        key = signature(input, running_mean, running_var, weight, bias, training, residual,
                        relu, gradient)
    except AttributeError:  # an argument that is no tensor: named, in F.batch_norm's words
        check_types(input, running_mean, running_var, weight, bias, training, residual,
                    relu)
        raise
    call = _CALLS.get(key)
    if call is None or type(momentum) is not float or not eps > 0:
        check_types(input, running_mean, running_var, weight, bias, training, residual,
                    relu)
        momentum = check_arguments(input, running_mean, running_var, weight, bias, training,
                                   momentum, eps)
        expanded = checked_residual(input, residual)
        call = EagerCall(_implementation(input), input, running_mean, running_var, weight, bias,
                         training, eps, expanded, relu, gradient)
        # Else the key cannot stand for the checks (a running statistic that requires grad is
        # refused or not by the grad mode, which the key leaves out).
        if eps > 0 and expanded is residual and not (
                (running_mean is not None and running_mean.requires_grad)
                or (running_var is not None and running_var.requires_grad)):
            _CALLS[key] = call
        residual = expanded
    return _apply(input, weight, bias, residual,
                  (call, running_mean, running_var, momentum, float(eps), gradient))


class _EagerBatchNormAct(torch.autograd.Function):
    """`batch_norm_act` with its autograd, minus the custom-op dispatch around it. Autograd sees
    only what it differentiates: the output alone (the statistics and the mask only go to the
    backward), and as inputs the four tensors with gradients, the rest in one tuple (the call,
    the running statistics, momentum, eps, and whether autograd records the call)."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, rest):
        # forward(ctx, ...) rather than a separate setup_context: apply() then binds no signature.
        call, running_mean, running_var, momentum, eps, gradient = rest
        out, stats, relu_mask = call.forward(x, weight, bias, residual, running_mean, running_var,
                                             momentum, eps)
        if gradient:  # else nothing will read what is saved
            save_for_backward(ctx, call.meta, eps, x, weight, bias, residual, running_mean,
                              running_var, out, stats, relu_mask)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        return (*gradients(ctx, grad_out), None)


def without_python_wrapper(function: type[torch.autograd.Function]):
    """`function.apply` minus `Function.apply`'s Python wrapper, which binds default arguments
    (the eager Function has none) and unwraps dead functorch wrappers (there are none outside
    functorch transforms, which the eager path rules out) before calling the C++ apply that
    builds the graph node: that apply itself, bound to `function` (`function.apply` where a
    PyTorch has no such method). That saves a few microseconds a layer, where eager PyTorch's
    own ops set the budget."""
    c_apply = vars(torch._C._FunctionBase).get("apply")
    return function.apply if c_apply is None else c_apply.__get__(None, function)


_apply = without_python_wrapper(_EagerBatchNormAct)
