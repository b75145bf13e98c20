"""BatchNorms that hold their own activation (timm's `BatchNormAct2d`), fused in place.

timm builds many networks (its DenseNet, RegNet, ResNetV2, VoVNet, DPN) from `BatchNormAct2d`: an
`nn.BatchNorm2d` whose forward is BatchNorm2d's followed by its `drop` (an Identity unless
configured) and its `act`. Fused, the module keeps its object, parameters, buffers, state_dict
keys and `isinstance` checks: its class becomes a subclass made for it (`Fused<Name>`, which
`unfuse` sets back) whose forward is the fused op:
- where `act` is a ReLU (`fuse_norm_acts`), BN + ReLU;
- where `act` is an Identity (a BN whose output a residual add and a ReLU follow, as in timm's
  RegNet), the fused op as a `FusedBatchNorm2d` would be called: the graph path treats it as an
  `nn.BatchNorm2d` (`acts_as_batch_norm`) and calls it with the residual and `relu=True`.
Each call checks that `drop` and `act` are still what the fused op computes, without hooks; where
one is not, and under a torch.fx trace (which then records the original ops), the module's own
forward runs, then the residual and ReLU asked for. A norm-activation fused on its own is proved
on a probe batch, in eval and in training mode (outputs and running statistics), before it is
kept; one the graph path fuses is proved with its owner's rewritten forward.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..blocks import calls_hooks
from ..kernels import FusedBatchNorm2d
from .fused_class import FusedForward, give_back_class
from .probe import beyond_tolerance, evaluating, probe_input
from .records import FusedSite, SkippedBlock

_PROBE_SIDE = 4


class FusedNormAct(FusedForward):
    """Mixed into the class made for each fused norm-activation module (module docstring)."""

    fused_batch_norms: tuple[str, ...] = ()

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None, *,
                relu: bool | None = None) -> torch.Tensor:
        """The module's own forward (BN, drop, act), then `+ residual` where given, then ReLU
        where `relu`: by the fused op wherever drop and act allow it."""
        act = None if isinstance(input, torch.fx.Proxy) else _plain_act(self)
        if act is nn.Identity:
            return FusedBatchNorm2d.forward(self, input, residual, relu=bool(relu))
        if act is nn.ReLU and residual is None and relu is None:
            return FusedBatchNorm2d.forward(self, input, relu=True)
        output = self.unfused_class.forward(self, input)  # nn.BatchNorm2d's steps, drop, act
        if residual is not None:
            output = output + residual
        return torch.relu(output) if relu else output


def _plain_act(module: nn.Module) -> type | None:
    """The class of `module`'s act where its drop is a plain Identity and neither has hooks
    (what the fused op can compute), else None."""
    drop, act = module._modules.get("drop"), module._modules.get("act")
    if type(drop) is not nn.Identity or calls_hooks(drop) or calls_hooks(act):
        return None
    return type(act)


def is_norm_act(module: nn.Module) -> bool:
    """timm's BatchNormAct2d, or a subclass that keeps its forward (recognised by where its
    forward is defined: this package does not import timm), not yet fused."""
    if not isinstance(module, nn.BatchNorm2d) or isinstance(module, FusedBatchNorm2d):
        return False  # (before its forward is read: a TorchScript module's is not a function)
    forward = type(module).forward
    return (getattr(forward, "__qualname__", "") == "BatchNormAct2d.forward"
            and getattr(forward, "__module__", "").startswith("timm."))


def activates_first(module: nn.Module) -> bool:
    """Whether `module` is a norm-activation with an activation of its own (LeakyReLU, SiLU,
    ReLU6; a ReLU is fused or named by `fuse_norm_acts`): what follows it (an add, a ReLU) sees
    its output activated, so it begins no BN -> [add] -> ReLU site."""
    return is_norm_act(module) and type(module._modules.get("act")) is not nn.Identity


def acts_as_batch_norm(module: nn.Module) -> bool:
    """Whether `module` is a norm-activation that computes nn.BatchNorm2d's output alone: its
    drop and act plain Identities, without hooks (the graph path fuses it as one)."""
    return is_norm_act(module) and _plain_act(module) is nn.Identity


def fuse_norm_acts(model: nn.Module) -> tuple[list[FusedSite], list[SkippedBlock]]:
    """Fuse every norm-activation of `model` whose activation is a plain ReLU, in place: the
    sites fused, and those with a ReLU left (with the reason)."""
    sites, skipped = [], []
    for name, module in _norm_acts(model):
        if type(module._modules.get("act")) is not nn.ReLU:
            continue  # SiLU, LeakyReLU, none: no BN -> ReLU inside it
        reason = _why_not(module)
        if reason is None:
            give_fused_class(module)
            reason = _probe_mismatch(module)
            if reason is not None:
                take_fused_class(module)
        if reason is None:
            sites.append(FusedSite(name, "BN->ReLU"))
        else:
            skipped.append(SkippedBlock(name, reason))
    return sites, skipped


def _norm_acts(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if is_norm_act(module):
            yield name, module


def _why_not(module: nn.Module) -> str | None:
    drop = module._modules.get("drop")
    if type(drop) is not nn.Identity:
        return (f"its drop is {type(drop).__name__}, between the BN and its ReLU, which the fused "
                "op has no place for")
    if calls_hooks(drop) or calls_hooks(module._modules["act"]):
        return "its drop or act has hooks, which its fused forward would not call"
    return None


_CLASSES: dict[type, type] = {}  # the class made for each class fused (its instances share it)


def give_fused_class(module: nn.Module) -> None:
    """`module` (a norm-activation) with its fused class, in place."""
    original = type(module)
    if original not in _CLASSES:
        _CLASSES[original] = type(f"Fused{original.__name__}", (FusedNormAct, original),
                                  {"unfused_class": original, "__module__": __name__})
    module.__class__ = _CLASSES[original]


def take_fused_class(module: nn.Module) -> None:
    """`module` with its own class back, where it has a fused one."""
    if isinstance(module, FusedNormAct):
        give_back_class(module)


def _probe_mismatch(module: nn.Module) -> str | None:
    """Why the fused forward does not compute what the module's own does on a probe batch, in
    eval mode and in training mode (on copies: outputs and running statistics), or None."""
    like = next((t for t in (module.weight, module.running_mean) if t is not None),
                torch.empty(0))
    probe = probe_input(like, module.num_features, _PROBE_SIDE)
    own = module.unfused_class.forward
    with evaluating(module):
        difference = _difference(own(module, probe.clone()), module(probe.clone()))
    if difference is not None:
        return f"its fused forward differs on a probe input in eval mode ({difference})"
    with torch.no_grad():
        fused, unfused = copy.deepcopy(module).train(), copy.deepcopy(module).train()
        outputs = own(unfused, probe.clone()), fused(probe.clone())
    for expected, got in [outputs, *zip(unfused.buffers(), fused.buffers())]:
        difference = _difference(expected, got)
        if difference is not None:
            return f"its fused forward differs on a probe input in training mode ({difference})"
    return None


def _difference(expected: Any, actual: Any) -> str | None:
    if not (isinstance(expected, torch.Tensor) and isinstance(actual, torch.Tensor)) \
            or expected.shape != actual.shape:
        return "another output"
    if not expected.is_floating_point():
        return None if torch.equal(expected, actual) else "another count of batches"
    error = beyond_tolerance(expected, actual)
    return None if error is None else f"max difference {error:.3g}"
