"""resnet-ablate: architecture ablations of residual networks on fused Triton kernels."""

__version__ = "0.1.0"

from .arch import ArchError, ResNetArch
from .blocks import BasicBlock, Bottleneck
from .fuse import FuseReport, FuseWarning, fuse
from .models import (
    ResNet,
    cifar_resnet,
    imagenet_resnet,
    resnet8,
    resnet18,
    resnet20,
    resnet32,
    resnet34,
    resnet44,
    resnet50,
    resnet56,
    resnet101,
    resnet110,
    resnet152,
    resnet1202,
)
from .profile import ModelProfile, profile

__all__ = [
    "__version__",
    "ArchError",
    "BasicBlock",
    "Bottleneck",
    "FuseReport",
    "FuseWarning",
    "ModelProfile",
    "ResNet",
    "ResNetArch",
    "cifar_resnet",
    "fuse",
    "imagenet_resnet",
    "profile",
    "resnet8",
    "resnet18",
    "resnet20",
    "resnet32",
    "resnet34",
    "resnet44",
    "resnet50",
    "resnet56",
    "resnet101",
    "resnet110",
    "resnet152",
    "resnet1202",
]
