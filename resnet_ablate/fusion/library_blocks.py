"""What a block converted by `fuse` remembers of the library's block it was (torchvision's or
timm's BasicBlock / Bottleneck): `fuse` makes the library's block this package's in place (the
same object, so that a reference held from before fusing, a hook's target, is the block the
model calls); while fused it answers the library block's own plain attributes (torchvision's
`block.stride`), and `unfuse` gives it the library's class back, in place, with its children in
their order (its ReLU, timm's unused parts) and its attributes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

LIBRARY_BLOCK = "_fused_from_library_block"
_MODULE_STATE = frozenset(vars(nn.Module()))  # what every nn.Module holds: hooks, mode, children
# Of that, what a converted block holds as its own: its children and tensors (the same tensors);
# the rest (hooks of every kind, the mode) stays the library block's.
_CONVERTED_STATE = frozenset({"_modules", "_parameters", "_buffers", "_non_persistent_buffers_set"})


@dataclass(frozen=True)
class LibraryBlock:
    """A converted block's library class, its own plain attributes, its children's names in
    order, and those of its children that the converted block does not hold (its activation
    modules, timm's parts left as Identity or None)."""

    cls: type
    attributes: dict[str, Any]
    order: tuple[str, ...]
    kept: dict[str, nn.Module | None]
    converted_attributes: frozenset[str]  # the converted block's own (fused, activations, ...)


def remember(converted: nn.Module, block: nn.Module) -> None:
    """Record on `converted` what `block` (the library's) was, and give it the library block's
    plain attributes it does not have."""
    attributes = {k: v for k, v in vars(block).items() if k not in _MODULE_STATE}
    kept = {name: child for name, child in block._modules.items()
            if name not in converted._modules}
    own = frozenset(k for k in vars(converted) if k not in _MODULE_STATE)
    vars(converted)[LIBRARY_BLOCK] = LibraryBlock(type(block), attributes, tuple(block._modules),
                                                  kept, own)
    for name, value in attributes.items():
        if not hasattr(converted, name):
            vars(converted)[name] = value


def become(block: nn.Module, converted: nn.Module) -> None:
    """`block` (the library's, checked against `converted`, which `remember`ed it) made
    `converted` in place: its class, children and attributes, its hooks and mode kept. `block`'s
    references held from before fusing (a list of layers to hook, a Grad-CAM target) stay the
    model's; `give_library_class` undoes it."""
    kept = {k: v for k, v in vars(block).items() if k in _MODULE_STATE - _CONVERTED_STATE}
    block.__class__ = type(converted)
    vars(block).clear()
    vars(block).update({**vars(converted), **kept})


def kept_child(module: nn.Module, name: str) -> tuple[bool, nn.Module | None]:
    """Whether the library block `module` was converted from held a child `name` that the
    converted block does not, and that child."""
    info = vars(module).get(LIBRARY_BLOCK)
    if info is None or name not in info.kept:
        return False, None
    return True, info.kept[name]


def give_library_class(module: nn.Module) -> None:
    """`module` (a converted block, unfused) as the library's block it was, in place: its class,
    its children in the library's order (the converted block's where it holds one: its plain
    BatchNorms, an activation set since; the library block's others) and its attributes, an
    attribute set since kept. No change where it was not converted from a library's block."""
    info: LibraryBlock | None = vars(module).get(LIBRARY_BLOCK)
    if info is None:
        return
    children = {name: module._modules[name] if name in module._modules else info.kept.get(name)
                for name in info.order}
    children.update((n, c) for n, c in module._modules.items() if n not in children)
    # Its own attributes as they are now (one set on the fused block stays), the converted
    # block's gone.
    state = {k: v for k, v in vars(module).items()
             if k not in info.converted_attributes and k != LIBRARY_BLOCK}
    state["_modules"] = children
    module.__class__ = info.cls
    vars(module).clear()
    vars(module).update({**info.attributes, **state})
