"""The refusals of `F.batch_norm`, in its words, made before any work, plus the residual's rules.

`check_arguments` runs ahead of both the custom op (batch_norm.py, every call) and the eager path
(_eager.py, a signature's first call: its key holds all the checks read but eps, momentum's
type and the grad mode, which every call that needs them checks), so every backend refuses the
same inputs with the same error (type and message), and no kernel ever sees an argument it would
have to reject half-way through.
"""

from __future__ import annotations

import math
import numbers
from typing import NoReturn

import torch


def _eval_takes_zero_eps() -> bool:
    """Whether this PyTorch's F.batch_norm takes eps=0 in eval, as it does from 2.12 on (before,
    it refuses eps <= 0 in every mode, worded otherwise). Asked of F.batch_norm itself, once."""
    try:
        torch.nn.functional.batch_norm(torch.zeros(1, 1), torch.zeros(1), torch.ones(1), eps=0.0)
    except ValueError:
        return False
    return True


_EVAL_TAKES_ZERO_EPS = _eval_takes_zero_eps()


def check_arguments(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
) -> float:
    """Raise what `F.batch_norm` raises for these arguments (its wording where it has one);
    returns `momentum` as a float (F.batch_norm takes any real number, a 0-dim tensor too).
    Stricter in one respect: per-channel tensors must be 1-D (`_refuse_sizes`).

    Written for the call that passes, which pays for every line of it on every layer: each
    condition is one cheap test, and building a message waits until a test fails."""
    if input.dim() < 2:
        raise ValueError(f"expected an input of shape (N, C, ...), got size {list(input.shape)}")
    # Parameters and running statistics in the input's dtype, or float32 beside a 16-bit input
    # (as F.batch_norm takes them); anything else would be read as another type, or rounded.
    # One dict lookup a call: a dtype it lacks is rare (an integer input, or a float8 one, which
    # F.batch_norm refuses too).
    kept = _PARAMETER_DTYPES.get(input.dtype)
    if kept is None:
        raise NotImplementedError(
            f'"batch_norm" not implemented for {_scalar_name(input.dtype)!r}')
    # And all of them in one dtype, as F.batch_norm takes them (not float32 weights beside
    # bfloat16 running statistics): the first one given sets it.
    shared = (weight if weight is not None else bias if bias is not None
              else running_mean if running_mean is not None else running_var)
    if shared is not None and (
            shared.dtype not in kept
            or (bias is not None and bias.dtype != shared.dtype)
            or (running_mean is not None and running_mean.dtype != shared.dtype)
            or (running_var is not None and running_var.dtype != shared.dtype)):
        _refuse_dtypes(input, kept, weight, bias, running_mean, running_var)
    _check_per_channel_tensors(input, weight, bias, running_mean, running_var)
    if training and (running_mean is None) != (running_var is None):
        raise ValueError(
            "running_mean and running_var must either both be None or neither be None"
        )
    if type(momentum) is not float:
        momentum = _momentum_as_float(momentum)
    if eps <= 0:
        _check_eps(eps, training)
    channels = input.shape[1]
    # Values per channel as F.batch_norm counts them, N times the spatial sizes (even for C = 0)
    per_channel = input.numel() // channels if channels else (
        input.shape[0] * math.prod(input.shape[2:]))
    if training and per_channel == 1:
        raise ValueError("Expected more than 1 value per channel when training, "
                         f"got input size {input.size()}")
    if not training and (running_mean is None or running_var is None):
        missing = "running_mean" if running_mean is None else "running_var"
        raise RuntimeError(f"{missing} must be defined in evaluation mode")
    if any(t is not None and (t.numel() != channels or t.dim() != 1)
           for t in (running_mean, running_var, weight, bias)):
        _refuse_sizes(channels, running_mean, running_var, weight, bias)
    return momentum


# The parameters' and running statistics' dtypes an input's takes: its own, and float32 too
# beside a 16-bit input (mixed precision).
_PARAMETER_DTYPES = {torch.float32: (torch.float32,), torch.float64: (torch.float64,),
                     torch.float16: (torch.float16, torch.float32),
                     torch.bfloat16: (torch.bfloat16, torch.float32)}


def _scalar_name(dtype: torch.dtype) -> str:
    """PyTorch's name of a scalar type, as its errors give it ('Long' for torch.int64)."""
    return torch.empty(0, dtype=dtype).type().rsplit(".", 1)[-1].removesuffix("Tensor")


def _refuse_dtypes(input: torch.Tensor, kept: tuple[torch.dtype, ...],
                   *tensors: torch.Tensor | None) -> None:
    given = [(n, t.dtype) for n, t in zip(("weight", "bias", "running_mean", "running_var"),
                                          tensors) if t is not None]
    valid = " or ".join(str(d) for d in kept)
    outside = [(n, dtype) for n, dtype in given if dtype not in kept]
    if outside:
        name, found = outside[0]
        raise RuntimeError(f"mixed dtype: {name} is {found} and the input {input.dtype}; "
                           f"expected {valid}")
    (first, shared), (name, found) = given[0], next(g for g in given if g[1] != given[0][1])
    raise RuntimeError(f"mixed dtype: {first} is {shared} and {name} {found}; the parameters and "
                       f"running statistics take one dtype, {valid}, as F.batch_norm takes them")


def _check_per_channel_tensors(input: torch.Tensor, weight: torch.Tensor | None,
                               bias: torch.Tensor | None, running_mean: torch.Tensor | None,
                               running_var: torch.Tensor | None) -> None:
    """F.batch_norm's refusals of per-channel tensors on another device than the input's, and of
    running statistics that require grad while grad mode is on (it cannot differentiate them)."""
    device = input.device
    for t in (weight, bias, running_mean, running_var):
        if t is not None and t.device != device:
            raise RuntimeError(f"Tensor on device {t.device} is not on the expected device "
                               f"{device}!")
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is not None and t.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(f"The function 'native_batch_norm' is not differentiable with "
                               f"respect to argument '{name}'. This input cannot have "
                               "requires_grad True.")


def _momentum_as_float(momentum: object) -> float:
    """A momentum that is not a Python float, as F.batch_norm reads it: any real number (an int,
    a NumPy scalar) or a one-value tensor; bool and everything else refused."""
    one_value = (isinstance(momentum, torch.Tensor) and momentum.numel() == 1
                 and momentum.dtype != torch.bool and not momentum.is_complex())
    if one_value or (isinstance(momentum, numbers.Real) and not isinstance(momentum, bool)):
        return float(momentum)  # type: ignore[arg-type]
    _refuse_momentum(momentum)


def _refuse_momentum(momentum: object) -> NoReturn:
    # F.batch_norm refuses None too; the module spells the cumulative average out itself.
    raise TypeError(
        f"momentum must be a float, got {type(momentum).__name__}; for a cumulative moving "
        "average pass 1 / (number of batches seen), as nn.BatchNorm2d(momentum=None) does")


def check_one_dimensional(channels: int, running_mean: torch.Tensor | None,
                          running_var: torch.Tensor | None, weight: torch.Tensor | None,
                          bias: torch.Tensor | None) -> None:
    """The rule that check_arguments holds every backend to, for the inline path (where
    F.batch_norm makes the other checks): per-channel tensors are 1-D, so that a (C, 1) weight
    that runs on the CPU does not fail once the same code runs on a GPU."""
    if ((weight is not None and weight.dim() != 1) or (bias is not None and bias.dim() != 1)
            or (running_mean is not None and running_mean.dim() != 1)
            or (running_var is not None and running_var.dim() != 1)):
        _refuse_sizes(channels, running_mean, running_var, weight, bias)


def _refuse_sizes(channels: int, *tensors: torch.Tensor | None) -> None:
    for name, t in zip(("running_mean", "running_var", "weight", "bias"), tensors):
        if t is not None and t.numel() != channels:
            raise RuntimeError(f"{name} should contain {channels} elements not {t.numel()}")
        # F.batch_norm takes other shapes of C elements in its forward and fails on them
        # elsewhere (running statistics in CPU training: "TensorAccessor expected 1 dims"; a
        # weight's gradient: autograd's shape check): one rule here, from the first call. A view,
        # not a reshape, in the hint: a copy of the running statistics would lose their updates.
        if t is not None and t.dim() != 1:
            raise RuntimeError(f"{name} should be 1-D, with {channels} element"
                               f"{'s' if channels != 1 else ''}, not of shape {tuple(t.shape)} "
                               f"(pass a 1-D view: {name}.view(-1))")


def _check_eps(eps: float, training: bool) -> None:
    """F.batch_norm's refusals of an eps <= 0."""
    if not _EVAL_TAKES_ZERO_EPS:
        raise ValueError(f"batch_norm eps must be positive, but got {eps}")
    if training:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")


_TENSOR_ARGUMENTS = (("input", 1), ("running_mean", 2), ("running_var", 3), ("weight", 4),
                     ("bias", 5))


def check_types(input, running_mean, running_var, weight, bias, training, residual,
                relu=True) -> None:
    """TypeError naming an argument of a type F.batch_norm refuses, in its words (a list as a
    weight, "yes" as `training`), and a residual that is no tensor or a `relu` that is no bool
    ("no" applied the ReLU: an audit): the first call of a signature, or one whose signature
    could not be read, asks."""
    for (name, position), value in zip(_TENSOR_ARGUMENTS,
                                       (input, running_mean, running_var, weight, bias)):
        if not isinstance(value, torch.Tensor) and (value is not None or name == "input"):
            raise TypeError(f"batch_norm(): argument '{name}' (position {position}) must be "
                            f"Tensor, not {type(value).__name__}")
    if not isinstance(training, bool):
        raise TypeError("batch_norm(): argument 'training' (position 6) must be bool, not "
                        f"{type(training).__name__}")
    if residual is not None and not isinstance(residual, torch.Tensor):
        raise TypeError(f"fused_batch_norm(): argument 'residual' must be Tensor or None, not "
                        f"{type(residual).__name__}")
    if not isinstance(relu, bool):
        raise TypeError(f"fused_batch_norm(): argument 'relu' must be bool, not "
                        f"{type(relu).__name__}")


def checked_residual(input: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor | None:
    """The residual as `out += residual` adds it: any floating dtype on the input's device, of the
    input's shape or one that broadcasts to it (returned expanded: a view whose zero strides the
    kernels read as they are, and whose gradient autograd sums back to the residual's shape)."""
    if residual is None:
        return None
    if not residual.is_floating_point():
        raise TypeError(f"residual must be a floating-point tensor, got {residual.dtype}")
    if residual.device != input.device:
        raise ValueError(
            f"residual is on {residual.device} but the input is on {input.device}; move it there"
        )
    if residual.shape == input.shape:
        return residual
    try:
        broadcast = torch.broadcast_shapes(residual.shape, input.shape)
    except RuntimeError:
        broadcast = None
    if broadcast != input.shape:
        raise ValueError(
            f"residual must have the input's shape {list(input.shape)} or broadcast to it "
            f"(as in out += residual), got {list(residual.shape)}"
        )
    return residual.expand_as(input)
