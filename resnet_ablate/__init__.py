"""resnet-ablate: architecture ablations of residual networks on fused Triton kernels.

The names below load on first use, so that `import resnet_ablate.spec` (checking a study spec)
imports neither torch nor Triton: descriptions (arch, recipe, spec) are plain values, and the model
layer (blocks, models, fuse, profile) imports them, never the reverse.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.4.4"

# Public name -> the module that defines it.
_EXPORTS: dict[str, str] = {
    "ArchError": "arch", "ResNetArch": "arch",
    "TrainRecipe": "recipe",
    "BasicBlock": "blocks", "Bottleneck": "blocks",
    "FuseReport": "fusion", "FuseWarning": "fusion", "StaleForward": "fusion", "fuse": "fusion",
    "from_torchvision": "convert", "unfuse": "fusion",
    "ModelProfile": "profile", "profile": "profile",
    "seed_state_dict": "seed_stack", "stack_models": "seed_stack",
    "DownsamplingWarning": "models", "ResNet": "models", "build": "models", "cifar_resnet": "models", "imagenet_resnet": "models",
    **{f"resnet{depth}": "models" for depth in (8, 18, 20, 32, 34, 44, 50, 56, 101, 110, 152, 1202)},
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        if importlib.util.find_spec(f"{__name__}.{name}") is not None:  # a submodule, e.g. models
            return importlib.import_module(f".{name}", __name__)
        raise AttributeError(f"module 'resnet_ablate' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


# Functions that share their name with the submodule defining them.
_SHADOWED = ("fuse", "profile")


class _Package(types.ModuleType):
    """Keeps `resnet_ablate.fuse` and `resnet_ablate.profile` the functions: loading a submodule
    makes Python set it as an attribute of the package, under the function's name."""

    def __getattribute__(self, name: str) -> Any:
        value = super().__getattribute__(name)
        if name in _SHADOWED and isinstance(value, types.ModuleType):
            return getattr(value, name)
        return value

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled by reference, as a plain module is (Ray and cloudpickle ship closures over it).
        return importlib.import_module, (self.__name__,)


sys.modules[__name__].__class__ = _Package


if TYPE_CHECKING:  # what type checkers and IDEs see
    from .arch import ArchError, ResNetArch
    from .blocks import BasicBlock, Bottleneck
    from .convert import from_torchvision
    from .fusion import FuseReport, FuseWarning, StaleForward, fuse, unfuse
    from .models import (
        DownsamplingWarning, ResNet, build, cifar_resnet, imagenet_resnet, resnet8, resnet18, resnet20, resnet32,
        resnet34, resnet44, resnet50, resnet56, resnet101, resnet110, resnet152, resnet1202,
    )
    from .profile import ModelProfile, profile
    from .recipe import TrainRecipe
    from .seed_stack import seed_state_dict, stack_models
