"""The class `fuse` gives a module whose forward it replaces in place (a rewritten forward, a
norm-activation's fused one): the way back, and a refusal to be pickled whole."""

from __future__ import annotations

import copy
from typing import Any

from torch import nn
from torch.nn.utils import parametrize


class FusedForward:
    """Mixed into the class made for each rewritten module: how to go back, and a refusal to be
    pickled as a whole (its forward is generated code; its state_dict saves as before)."""

    unfused_class: type[nn.Module]
    fused_batch_norms: tuple[str, ...]

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        fused_class = type(self)
        self.__class__ = self.unfused_class  # type: ignore[assignment]
        try:
            duplicate = copy.deepcopy(self, memo)
        finally:
            self.__class__ = fused_class
        duplicate.__class__ = fused_class
        return duplicate

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(f"{type(self).__name__} has a forward rewritten by resnet_ablate.fuse and "
                        "cannot be pickled as a whole module: save its state_dict(), or call "
                        "resnet_ablate.unfuse(model) first")


def give_back_class(module: nn.Module) -> None:
    """`module`'s own class back (its `unfused_class`), keeping a parametrization registered
    on it since it was fused: torch gave it a subclass of the fused class (`Parametrized<Name>`)
    whose properties compute the parametrized tensors, and the bare class would lose them (an
    audit: `weight` gone after `unfuse`). Such a module gets that subclass over its own class."""
    original = module.unfused_class  # type: ignore[attr-defined]
    names = list(module.parametrizations) if parametrize.is_parametrized(module) else []
    module.__class__ = original
    if any(not isinstance(getattr(original, name, None), property) for name in names):
        parametrize._inject_new_class(module)  # as register_parametrization does
        for name in names:
            parametrize._inject_property(module, name)
