"""`unfuse(model)`: every fused epilogue back to plain `BatchNorm2d` + `ReLU` (same tensors), for
exporters (ONNX, `torch.export` artifacts that load without this package) and other libraries."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from ..blocks import BasicBlock, Bottleneck, unfused_in_place
from ..kernels import FusedBatchNorm2d
from ..models import ResNet
from .forward_facts import KEPT_MODULES, LEFT_BELOW
from .fused_class import give_back_class
from .library_blocks import give_library_class, kept_child

M = TypeVar("M", bound=nn.Module)


def _unfuse_rewritten(module: nn.Module) -> None:
    """A module whose forward `fuse` rewrote: its class and plain BatchNorms back (where one was
    swapped for another module since, that one stays)."""
    for target in module.fused_batch_norms:  # type: ignore[attr-defined]
        parent, _, name = target.rpartition(".")
        bn = getattr(module.get_submodule(parent) if parent else module, name, None)
        if isinstance(bn, FusedBatchNorm2d):
            module.set_submodule(target, unfused_in_place(bn))
    give_back_class(module)
    vars(module).pop(KEPT_MODULES, None)
    vars(module).pop(LEFT_BELOW, None)


def check_is_module(model: object, what: str) -> None:
    """One clear error where `model` is no nn.Module (None, a state_dict, a function): `fuse`
    and `unfuse` change a model's modules in place."""
    if isinstance(model, nn.Module):
        return
    hint = ": a state_dict holds only tensors; load it into its model and pass that" \
        if isinstance(model, Mapping) else ""
    raise TypeError(f"{what} takes a model (an nn.Module), not {type(model).__name__}{hint}")


def check_no_lazy_modules(model: nn.Module) -> None:
    """One clear error where `model` holds lazy modules not yet run (LazyConv2d, LazyLinear):
    fuse's probe batch would make their shapes its own (a LazyConv2d of 0 input channels, and
    the model then failed on every real batch: an audit), and what it made cannot be undone."""
    lazy = [name or "<model>" for name, module in model.named_modules()
            if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params()]
    if lazy:
        raise ValueError(f"fuse: {', '.join(lazy[:3])}{' and others' if len(lazy) > 3 else ''} "
                         "are lazy modules whose shapes are not known yet: run one real batch "
                         "through the model first, then fuse it")


def unfuse(model: M) -> M:
    """Turn every fused epilogue of `model` back into plain `BatchNorm2d` + `ReLU` modules, in
    place (the same parameter and buffer tensors), and return the model. Outputs, gradients and
    state_dict keys are unchanged; what remains is plain PyTorch, which every exporter and
    library understands. The inverse of `fuse`: modules whose forward it rewrote get their own
    class and forward back, and blocks it converted the library's class they were
    (library_blocks.py)."""
    check_is_module(model, "unfuse")
    for module in list(model.modules()):
        if hasattr(type(module), "unfused_class"):
            _unfuse_rewritten(module)
        elif isinstance(module, (BasicBlock, Bottleneck)) and module.fused:
            for name in ("bn1", "bn2", "bn3"):
                bn = getattr(module, name, None)
                if isinstance(bn, FusedBatchNorm2d):
                    setattr(module, name, unfused_in_place(bn))
            module.fused = False
            for name in module.activations:  # (one set after fusing stays)
                if getattr(module, name) is None:
                    held, activation = kept_child(module, name)  # (the library block's own)
                    setattr(module, name, activation if held else nn.ReLU(inplace=True))
            give_library_class(module)
        elif isinstance(module, ResNet) and module.fused:
            assert isinstance(module.bn1, FusedBatchNorm2d)
            module.bn1 = unfused_in_place(module.bn1)
            if module.relu is None:  # (one set after fusing stays)
                module.relu = nn.ReLU(inplace=True)
            module.fused = False
            module.arch = module.arch.replace(fused=False)
    vars(model).pop(LEFT_BELOW, None)  # (what a fuse left beside its rewritten forwards)
    left = [name for name, m in model.named_modules() if isinstance(m, FusedBatchNorm2d)]
    if left:
        raise ValueError(f"unfuse: {len(left)} FusedBatchNorm2d module(s) were not made by fuse nor "
                         f"are inside this package's blocks or ResNet ({', '.join(left[:3])}); "
                         "replace them with resnet_ablate.blocks.plain_twin_of(module) and a ReLU "
                         "where their relu flag is set")
    return model
