"""`fuse(model)`: give an existing torchvision- or timm-style ResNet the fused BN + add + ReLU
epilogues (`unfuse`, in convert.py, goes back).

A block is converted only when it is recognisably torchvision's or timm's `BasicBlock` /
`Bottleneck`: children exactly conv1/bn1/conv2/bn2[/conv3/bn3], then torchvision's shared `relu`
or timm's act1/act2[/act3], and an optional downsample; timm's drop_block, aa, se and drop_path
only where they are nn.Identity (in use, each changes the block in a way the fused epilogue cannot
reproduce: such blocks are refused with that reason); plain `nn.BatchNorm2d` and `nn.ReLU`, no
hooks, and (the check that catches a changed forward) the converted block gives the original's
output on a probe input. A model with no block at all is reported too. Converted blocks reuse the original convs, shortcut
module, BN parameters and buffers (same tensors), so weights, outputs and gradients are unchanged
and optimizers built before fusing keep working. Anything that looks like a block but fails a
check is left as it is and reported, with the reason, in a warning and in the `FuseReport`.

The model's own stem BN is left alone: its ReLU is called by the model's forward, not a block's.
This package's own unfused models (`fused=False`) are converted completely, stem included.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, TypeVar, overload

import torch
from torch import nn

from .blocks import BasicBlock, Bottleneck, fuse_block_, fused_twin_of
from .kernels import FusedBatchNorm2d
from .models import ResNet

M = TypeVar("M", bound=nn.Module)

_BASIC_PARTS = ("conv1", "bn1", "conv2", "bn2")
_BOTTLENECK_PARTS = (*_BASIC_PARTS, "conv3", "bn3")
_PROBE_SIZE = 8


class FuseWarning(UserWarning):
    """Some blocks of a model were left unfused; the message says which and why."""


@dataclass(frozen=True)
class SkippedBlock:
    name: str
    reason: str


@dataclass(frozen=True)
class FuseReport:
    """Module names of the blocks `fuse` converted, and of those it left alone with the reason."""

    fused: tuple[str, ...]
    skipped: tuple[SkippedBlock, ...]


def _looks_like_block(module: nn.Module) -> bool:
    class_name = type(module).__name__.lower()
    has_parts = all(isinstance(getattr(module, part, None), nn.Module) for part in ("conv1", "bn1", "conv2"))
    return has_parts or class_name.endswith("block") or "bottleneck" in class_name


# timm's blocks hold these optional parts, None or nn.Identity where unused; each, where used,
# changes the block in a way the fused epilogue cannot reproduce exactly.
_OPTIONAL_PARTS = {
    "drop_block": "it masks a BN output before its activation",
    "aa": "it blurs (anti-aliased downsampling) inside the block, where the converted block has no "
          "place for it",
    "se": "it rescales the last BN's output before the residual add, so that add cannot be fused",
    "drop_path": "it drops the residual branch per sample (stochastic depth) before the add",
}


def _layout(children: dict[str, nn.Module]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The conv/BN parts and the activation modules a block should have: torchvision's one shared
    `relu`, or timm's act1/act2(/act3), one per activation."""
    bottleneck = "conv3" in children or "bn3" in children
    parts = _BOTTLENECK_PARTS if bottleneck else _BASIC_PARTS
    if "relu" in children:
        return parts, ("relu",)
    return parts, ("act1", "act2", "act3") if bottleneck else ("act1", "act2")


def _unrecognised_because(block: nn.Module) -> str | None:
    """Why `block` is not a standard torchvision or timm block, or None when it is."""
    children = dict(block.named_children())
    parts, activations = _layout(children)
    missing = [p for p in (*parts, *activations) if p not in children]
    if missing:
        return f"missing submodules {missing}"
    extra = sorted(set(children) - {*parts, *activations, "downsample", *_OPTIONAL_PARTS})
    if extra:
        return f"unexpected submodules {extra}: its forward may use them"
    for part, why in _OPTIONAL_PARTS.items():
        if part in children and type(children[part]) is not nn.Identity:
            return f"{part} is {type(children[part]).__name__}: {why}"
    for part in parts:
        module = children[part]
        expected = nn.Conv2d if part.startswith("conv") else nn.BatchNorm2d
        if type(module) is not expected:  # subclasses (SyncBatchNorm, custom convs) may differ
            return f"{part} is {type(module).__name__}, expected {expected.__name__}"
    for part in activations:
        if type(children[part]) is not nn.ReLU:
            return f"{part} is {type(children[part]).__name__}, expected ReLU"
    if any(m._forward_hooks or m._forward_pre_hooks for m in block.modules()):
        return "it has forward hooks, which the converted block would not call"
    if any(p.is_meta for p in block.parameters()):
        return "its parameters are on the meta device, so its forward cannot be checked"
    return None


def _converted(block: nn.Module) -> BasicBlock | Bottleneck:
    children = dict(block.named_children())
    cls = Bottleneck if "conv3" in children else BasicBlock
    parts = _BOTTLENECK_PARTS if cls is Bottleneck else _BASIC_PARTS
    new = cls.from_modules({p: children[p] for p in parts}, children.get("downsample"))
    new.train(block.training)
    return new  # type: ignore[return-value]


def probe_input(like: torch.Tensor, channels: int, side: int, batch: int = 2) -> torch.Tensor:
    """A seeded random batch (batch, channels, side, side) on `like`'s device and dtype: the
    input a conversion is checked on."""
    generator = torch.Generator(device=like.device).manual_seed(0)
    return torch.randn(batch, channels, side, side, generator=generator, device=like.device,
                       dtype=like.dtype)


@contextlib.contextmanager
def evaluating(*modules: nn.Module) -> Iterator[None]:
    """Within: every module in eval mode and no gradients; each module's mode restored after,
    so a check changes no state."""
    modes = {m: m.training for module in modules for m in module.modules()}
    try:
        for module in modules:
            module.eval()
        with torch.no_grad():
            yield
    finally:
        for module, training in modes.items():
            module.training = training


def beyond_tolerance(expected: torch.Tensor, actual: torch.Tensor) -> float | None:
    """The largest difference of two outputs where it exceeds what their dtype's rounding
    explains (relative to the outputs' scale), else None."""
    tolerance = 1e-4 if expected.dtype in (torch.float32, torch.float64) else 2e-2
    error = (expected.float() - actual.float()).abs().max().item()
    return error if error > tolerance * (expected.abs().max().item() + 1.0) else None


def _forward_mismatch(original: nn.Module, converted: nn.Module) -> str | None:
    """Compare both blocks in eval mode (no state changes) on a random probe input."""
    conv1 = original.get_submodule("conv1")
    assert isinstance(conv1, nn.Conv2d)
    probe = probe_input(conv1.weight, conv1.in_channels, _PROBE_SIZE)
    with evaluating(original, converted):
        try:
            expected = original(probe.clone())
        except Exception as error:  # noqa: BLE001 - any failure means "not the standard block"
            return f"its forward failed on a probe input ({type(error).__name__}: {error})"
        actual = converted(probe.clone())
    if not isinstance(expected, torch.Tensor) or expected.shape != actual.shape:
        return "its forward returns something other than the standard block's output"
    error = beyond_tolerance(expected, actual)
    if error is not None:
        return f"its forward differs from the standard block's (max difference {error:.3g} on a probe input)"
    return None


def _fuse_own_resnet_stem(model: ResNet) -> None:
    if model.fused:
        return
    model.bn1 = fused_twin_of(model.bn1, relu=True)
    model.relu = None
    model.fused = True
    model.arch = model.arch.replace(fused=True)


def _parent_and_attr(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


@dataclass
class _Plan:
    report: FuseReport
    replacements: list[tuple[str, nn.Module]]
    own_blocks: list[BasicBlock | Bottleneck]
    own_models: list[ResNet]


def _plan(model: nn.Module) -> _Plan:
    """What fusing would change; changes nothing, so strict mode can refuse before any change."""
    fused: list[str] = []
    skipped: list[SkippedBlock] = []
    plan = _Plan(FuseReport((), ()), [], [], [])
    inside_block: list[str] = []

    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside_block):
            continue  # a block's own parts go with the block
        if isinstance(module, ResNet):
            if not module.fused:
                plan.own_models.append(module)
            continue
        if isinstance(module, (BasicBlock, Bottleneck)):
            inside_block.append(name)
            if not module.fused:
                plan.own_blocks.append(module)
                fused.append(name)
            continue
        if module is model or isinstance(module, FusedBatchNorm2d) or not _looks_like_block(module):
            continue
        inside_block.append(name)
        reason = _unrecognised_because(module)
        if reason is None:
            converted = _converted(module)
            reason = _forward_mismatch(module, converted)
        if reason is not None:
            skipped.append(SkippedBlock(name, reason))
            continue
        plan.replacements.append((name, converted))
        fused.append(name)
    plan.report = FuseReport(tuple(fused), tuple(skipped))
    return plan


def _apply(model: nn.Module, plan: _Plan) -> None:
    for own_model in plan.own_models:
        _fuse_own_resnet_stem(own_model)
    for block in plan.own_blocks:
        fuse_block_(block)
    for name, converted in plan.replacements:
        parent, attr = _parent_and_attr(model, name)
        setattr(parent, attr, converted)


@overload
def fuse(model: M, *, strict: bool = ..., return_report: Literal[False] = ...) -> M: ...
@overload
def fuse(model: M, *, strict: bool = ..., return_report: Literal[True]) -> tuple[M, FuseReport]: ...


def fuse(model: M, *, strict: bool = False, return_report: bool = False) -> M | tuple[M, FuseReport]:
    """Convert the residual blocks of `model` in place to fused epilogues; return the model.

    Blocks that are not recognised are left unchanged and listed in a `FuseWarning` (with
    `strict=True`, a ValueError raised before anything is changed). With `return_report=True`
    returns `(model, FuseReport)`.
    """
    plan = _plan(model)
    report = plan.report
    if strict and report.skipped:
        raise ValueError("fuse(strict=True): blocks not recognised, nothing changed: " + _describe(report.skipped))
    already = any(isinstance(m, (BasicBlock, Bottleneck)) for m in model.modules())
    if not report.fused and not report.skipped and not plan.own_models and not already:
        warnings.warn(f"fuse found no residual block in {type(model).__name__}: nothing changed "
                      "(it converts torchvision's and timm's BasicBlock / Bottleneck and this "
                      "package's models)", FuseWarning, stacklevel=2)
    _apply(model, plan)
    if report.skipped:
        warnings.warn(
            f"fuse left {len(report.skipped)} block(s) unfused: {_describe(report.skipped)}",
            FuseWarning,
            stacklevel=2,
        )
    return (model, report) if return_report else model


def _describe(skipped: list[SkippedBlock] | tuple[SkippedBlock, ...]) -> str:
    return "; ".join(f"{s.name or '<model>'}: {s.reason}" for s in skipped)
