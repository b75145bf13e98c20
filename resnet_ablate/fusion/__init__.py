"""`fuse(model)`: BatchNorm2d -> [add] -> ReLU computed by one fused op, in any network;
`unfuse(model)` goes back to plain PyTorch modules.

Two paths, both proved on a probe input before anything is kept:
- residual_blocks.py: torchvision's and timm's `BasicBlock` / `Bottleneck` (recognised by their
  parts) become this package's fused blocks; needs no tracing, keeps the stride placement.
- graph.py: every other site that a traced forward (torch.fx) holds, in any module: the forward
  of the module making the calls is rewritten to call the BatchNorm's fused twin.
Anything that cannot be fused exactly is left as it is and named, with the reason, in a
`FuseWarning` and the `FuseReport`. Parameters and buffers are the same tensors throughout, so
state_dict keys, outputs, gradients and optimizers built before fusing stay valid.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Literal, TypeVar, overload

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..blocks import BasicBlock, Bottleneck
from ..kernels import FusedBatchNorm2d
from .forward_facts import StaleForward
from .graph import fuse_graphs
from .norm_act import FusedNormAct, fuse_norm_acts
from .records import FusedSite, FuseReport, FuseWarning, SkippedBlock, describe, qualified
from .residual_blocks import plan_blocks
from .unfuse import check_is_module, check_no_lazy_modules, unfuse

__all__ = ["FuseReport", "FuseWarning", "FusedSite", "SkippedBlock", "StaleForward", "fuse",
           "unfuse"]

M = TypeVar("M", bound=nn.Module)


def _fuse(model: nn.Module, example_input: Any) -> FuseReport:
    plan = plan_blocks(model)
    plan.apply()
    norm_acts, norm_acts_left = fuse_norm_acts(model)
    graphs = fuse_graphs(model, example_input)
    joined = _joined_batch_norms(model)
    left = [s for s in plan.skipped if not _fused_by_its_forward(model, s.name, joined)]
    named = {s.name for s in norm_acts_left}  # (the graph path names them with a vaguer reason)
    skipped = dict.fromkeys((*left, *norm_acts_left,  # one BN met at two calls: once
                             *(s for s in graphs.skipped if s.name not in named)))
    return FuseReport(tuple(plan.fused), tuple(skipped),
                      (*plan.sites, *norm_acts, *graphs.sites), tuple(graphs.rewritten))


def _joined_batch_norms(model: nn.Module) -> set[str]:
    """The BatchNorms whose output a fused BatchNorm adds (a projection's), by this fuse or an
    earlier one: each rewritten forward names those it joined."""
    return {qualified(owner, name) for owner, module in model.named_modules()
            for name in getattr(module, "joined_batch_norms", ())}


def _fused_by_its_forward(model: nn.Module, block: str, joined: set[str]) -> bool:
    """Whether the graph path fused each BatchNorm of a block that the block path left (a
    forward with an optional argument), or fused its add and ReLU with the BatchNorm of the
    residual it adds (a projection's, among `joined`): then the block is not left unfused. A
    BatchNorm left for another reason (a squeeze-excitation between it and the add) keeps the
    block's."""
    norms = [(qualified(block, name), m) for name, m in model.get_submodule(block).named_children()
             if isinstance(m, _BatchNorm)]
    return bool(norms) and all(isinstance(m, (FusedBatchNorm2d, FusedNormAct)) or name in joined
                               for name, m in norms)


@overload
def fuse(model: M, *, strict: bool = ..., return_report: Literal[False] = ...,
         example_input: Any = ...) -> M: ...
@overload
def fuse(model: M, *, strict: bool = ..., return_report: Literal[True],
         example_input: Any = ...) -> tuple[M, FuseReport]: ...


def fuse(model: M, *, strict: bool = False, return_report: bool = False,
         example_input: Any = None) -> M | tuple[M, FuseReport]:
    """Fuse every BatchNorm2d -> [add] -> ReLU of `model` in place; return the model.

    Sites that cannot be fused exactly are left unchanged and listed in a `FuseWarning` (with
    `strict=True`, a ValueError raised before anything is changed). `example_input` is the batch
    rewritten forwards are checked on, or a tuple of the model's positional arguments (default: 2
    random 32x32 images with the first conv's channels). With `return_report=True` returns
    `(model, FuseReport)`.
    """
    check_is_module(model, "fuse")
    for name, flag in (("strict", strict), ("return_report", return_report)):
        if not isinstance(flag, bool):  # (strict="no" was taken as strict: an audit)
            raise TypeError(f"fuse(): argument {name!r} must be bool, not {type(flag).__name__}")
    check_no_lazy_modules(model)
    if strict:
        try:
            copied = copy.deepcopy(model)  # tried on a copy: refuse before any change
        except Exception as error:  # noqa: BLE001 - a lock, a client, a file: any copy failure
            raise TypeError(
                f"fuse(strict=True) tries the fusion on a copy of the model first, and this "
                f"{type(model).__name__} cannot be copied ({type(error).__name__}: {error}); "
                "nothing changed: call fuse(model, return_report=True) and check "
                "report.skipped instead") from error
        trial = _fuse(copied, example_input)
        if trial.skipped:
            raise ValueError("fuse(strict=True): sites not fused, nothing changed: " + describe(trial.skipped))
    report = _fuse(model, example_input)
    already = any(isinstance(m, (BasicBlock, Bottleneck)) or hasattr(m, "fused_batch_norms")
                  for m in model.modules())
    if not report.sites and not report.skipped and not already:
        warnings.warn(f"fuse found no BatchNorm2d -> [add] -> ReLU in {type(model).__name__}: "
                      "nothing changed", FuseWarning, stacklevel=2)
    if report.skipped:
        warnings.warn(f"fuse left {len(report.skipped)} site(s) unfused: {describe(report.skipped)}",
                      FuseWarning, stacklevel=2)
    return (model, report) if return_report else model
