"""The checks every conversion is proved with: a seeded probe input, a context that evaluates
modules without changing their state, and the tolerance two outputs must agree within."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def probe_input(like: torch.Tensor, channels: int, side: int, batch: int = 2) -> torch.Tensor:
    """A seeded random batch (batch, channels, side, side) on `like`'s device and dtype: the
    input a conversion is checked on."""
    generator = torch.Generator(device=like.device).manual_seed(0)
    return torch.randn(batch, channels, side, side, generator=generator, device=like.device,
                       dtype=like.dtype)


@contextlib.contextmanager
def evaluating(*modules: nn.Module) -> Iterator[None]:
    """Within: every module in eval mode and no gradients; after, each module's mode restored and
    each buffer that a forward changed in place (a call counter, which eval mode does not stop)
    given its values back, so a check changes no state."""
    modes = {m: m.training for module in modules for m in module.modules()}
    buffers = {id(b): (b, b._version, b.clone()) for module in modules for b in module.buffers()}
    try:
        for module in modules:
            module.eval()
        with torch.no_grad():
            yield
    finally:
        for module, training in modes.items():
            module.training = training
        with torch.no_grad():
            for buffer, version, values in buffers.values():
                if buffer._version != version:
                    buffer.copy_(values)


def changed_in_place(given: torch.Tensor, left: torch.Tensor, other: torch.Tensor) -> bool:
    """Whether a forward changed an argument in place (`given` before it, `left` after it) and
    another forward, given the same, left it otherwise (`other`): a caller reading it
    afterwards would see another tensor. Exact where the values are not floats, or none."""
    if torch.equal(given, left):
        return False  # unchanged (a NaN counts as changed, and is then compared below)
    if other.shape != left.shape or other.dtype != left.dtype:
        return True
    if not left.is_floating_point() or left.numel() == 0:
        return not torch.equal(left, other)
    return beyond_tolerance(left, other) is not None


def beyond_tolerance(expected: torch.Tensor, actual: torch.Tensor) -> float | None:
    """The largest difference of two outputs where it exceeds what their dtype's rounding
    explains (relative to the outputs' scale), else None."""
    tolerance = 1e-4 if expected.dtype in (torch.float32, torch.float64) else 2e-2
    error = (expected.float() - actual.float()).abs().max().item()
    return error if error > tolerance * (expected.abs().max().item() + 1.0) else None
