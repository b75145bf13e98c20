"""The paper's ResNet families as one `ResNet` module built from a `ResNetArch`, and the usual builders.

- CIFAR family (Section 4.2): 3x3 stem conv, no max-pool, stages of 16/32/64 filters at strides
  1/2/2, global average pool, fc. Depth 6n+2 with basic blocks, 9n+2 with bottlenecks.
  Works for any input size and channel count (e.g. 8x8 single-channel digits).
- ImageNet family (Table 1): 7x7 stride-2 stem conv, 3x3 stride-2 max-pool, 4 stages at strides
  1/2/2/2, global average pool, fc. With shortcut "B" the state_dict keys and shapes are
  torchvision's (conv1, bn1, layer1.0.conv1, ..., layer2.0.downsample.0/.1, fc), so torchvision
  checkpoints load with `strict=True`. Their bottlenecks are "v1.5": build with
  downsampling="v1.5" (or use `from_torchvision`); loading them into the paper's "v1" warns
  (`DownsamplingWarning`), since the keys match but the network differs.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn
from typing import TypedDict, Unpack

from .arch import BlockKind, Downsampling, ResNetArch, Shortcut
from .blocks import BasicBlock, Bottleneck, batch_norm, conv3x3, fused_epilogue, he_init_

# The block class of each `ResNetArch.block`.
BLOCK_CLASSES: dict[str, type[BasicBlock] | type[Bottleneck]] = {
    "basic": BasicBlock, "bottleneck": Bottleneck,
}

_DEFAULT_CLASSES = {"cifar": 10, "imagenet": 1000}


class DownsamplingWarning(UserWarning):
    """Weights of one stride placement loaded into an ImageNet bottleneck net of the other: a
    "v1.5" checkpoint (torchvision's, timm's, or this toolkit's v1.5) into the paper's "v1", or
    the toolkit's v1 into v1.5. Every key and shape matches; the network computes another thing."""


class ResNet(nn.Module):
    """A residual (or plain) network described by `arch`; `arch` is kept on the module."""

    # A checkpoint's stride placement, which no other key or shape shows: a v1 ImageNet
    # bottleneck net's state_dict holds the tensor V1_KEY, which survives dict(), a stripped
    # `module.` prefix and safetensors (all of which drop metadata); v1.5 nets, like torchvision's
    # and timm's, hold none, so their state_dicts stay interchangeable. The metadata version (2,
    # or 3 for v1.5) is how checkpoints saved before V1_KEY tell theirs.
    _version = 2
    V1_KEY = "downsampling_v1"

    def __init__(
        self,
        arch: ResNetArch,
        *,
        num_classes: int | None = None,
        in_channels: int = 3,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if num_classes is None:
            num_classes = _DEFAULT_CLASSES[arch.family]
        if num_classes < 1 or in_channels < 1:
            raise ValueError(
                f"num_classes and in_channels must be >= 1, got num_classes={num_classes}, "
                f"in_channels={in_channels}"
            )
        assert arch.stages is not None and arch.widths is not None  # resolved by ResNetArch
        self.arch = arch
        if self._strides_matter() and arch.downsampling == "v1.5":
            self._version = 3
        self.fused = arch.fused
        stem_width = arch.widths[0]
        if arch.family == "imagenet":
            self.conv1: nn.Conv2d = nn.Conv2d(in_channels, stem_width, 7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.conv1 = conv3x3(in_channels, stem_width)
            self.maxpool = nn.Identity()
        self.bn1 = batch_norm(stem_width, fused=arch.fused, relu=True)
        self.relu = None if arch.fused else nn.ReLU(inplace=True)

        self.stage_names: tuple[str, ...] = tuple(f"layer{i + 1}" for i in range(len(arch.stages)))
        channels = stem_width
        for index, (name, blocks, width) in enumerate(zip(self.stage_names, arch.stages, arch.widths)):
            stride = 1 if index == 0 else 2
            layer, channels = self._make_layer(arch, channels, width, blocks, stride, zero_init_residual)
            self.add_module(name, layer)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(channels, num_classes)
        he_init_(self.conv1)

    @staticmethod
    def _make_layer(
        arch: ResNetArch, in_channels: int, planes: int, blocks: int, stride: int, zero_init_residual: bool
    ) -> tuple[nn.Sequential, int]:
        assert arch.shortcut is not None and arch.block is not None
        block_class = BLOCK_CLASSES[arch.block]
        options = dict(shortcut=arch.shortcut, fused=arch.fused, zero_init_residual=zero_init_residual)
        if block_class is Bottleneck:
            options.update(base_width=arch.base_width, downsampling=arch.downsampling)
        layers: list[nn.Module] = []
        for i in range(blocks):
            layers.append(block_class(in_channels, planes, stride if i == 0 else 1, **options))
            in_channels = planes * block_class.expansion
        return nn.Sequential(*layers), in_channels

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled features that feed `fc`, shape (N, channels)."""
        x = fused_epilogue(self.bn1, self.conv1(x), None, self.relu) if self.fused \
            else self.relu(self.bn1(self.conv1(x)))
        x = self.maxpool(x)
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))

    def _strides_matter(self) -> bool:
        """Whether a checkpoint could come from the other stride placement: ImageNet bottleneck
        nets, the ones torchvision's and timm's weights fit."""
        return self.arch.family == "imagenet" and self.arch.block == "bottleneck"

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._strides_matter() and self.arch.downsampling == "v1":
            destination[prefix + self.V1_KEY] = torch.ones((), dtype=torch.uint8)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        if self._strides_matter():
            # this toolkit's v1 net: V1_KEY, or (saved before it) metadata version 2; torchvision's
            # and timm's (version 1) and this toolkit's v1.5 (3) are v1.5
            saved_v1 = prefix + self.V1_KEY in state_dict or local_metadata.get("version", 1) == 2
            mine = self.arch.downsampling
            if saved_v1 != (mine == "v1"):
                source = ("this toolkit's v1 net" if saved_v1 else
                          "a v1.5 net (torchvision's and timm's weights are v1.5)")
                right = "v1" if saved_v1 else "v1.5"
                warnings.warn(
                    f"loading weights of {source} into {self.arch.name} with downsampling="
                    f"{mine!r}: every key and shape matches, but the stride sits in another conv, "
                    f"so the network computes something else. Build it with downsampling="
                    f"{right!r}" + (", or convert with resnet_ablate.from_torchvision(model)"
                                    if not saved_v1 else ""),
                    DownsamplingWarning, stacklevel=4)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if self._strides_matter() and prefix + self.V1_KEY in unexpected_keys:
            unexpected_keys.remove(prefix + self.V1_KEY)  # read above, not a parameter


class BuildOptions(TypedDict, total=False):
    """Keyword options every builder takes; the rest of the description comes from the builder."""

    num_classes: int
    in_channels: int
    zero_init_residual: bool
    shortcut: Shortcut
    widths: Sequence[int]
    fused: bool


class BottleneckOptions(BuildOptions, total=False):
    base_width: int
    downsampling: Downsampling


def build(arch: ResNetArch, **options: Unpack[BottleneckOptions]) -> ResNet:
    """The model described by `arch`, with description fields (shortcut, widths, ...) overridden;
    `num_classes`, `in_channels` and `zero_init_residual` go to `ResNet`."""
    model_options = {k: options.pop(k) for k in ("num_classes", "in_channels", "zero_init_residual")
                     if k in options}  # type: ignore[misc]
    if options:
        arch = arch.replace(**options)
    return ResNet(arch, **model_options)  # type: ignore[arg-type]


def cifar_resnet(depth: int, *, block: BlockKind = "basic", **options: Unpack[BottleneckOptions]) -> ResNet:
    """A CIFAR-family ResNet of any valid depth (6n+2 basic, 9n+2 bottleneck); option A by default."""
    return build(ResNetArch(family="cifar", depth=depth, block=block), **options)


def imagenet_resnet(depth: int, **options: Unpack[BottleneckOptions]) -> ResNet:
    """An ImageNet-family ResNet of Table 1 (18, 34, 50, 101, 152); option B by default."""
    return build(ResNetArch(family="imagenet", depth=depth), **options)


def resnet8(**options: Unpack[BuildOptions]) -> ResNet:
    """CIFAR ResNet-8 (n=1): the smallest of the family, for quick tests."""
    return cifar_resnet(8, **options)


def resnet20(**options: Unpack[BuildOptions]) -> ResNet:
    """CIFAR ResNet-20 (n=3), 0.27M parameters with option A."""
    return cifar_resnet(20, **options)


def resnet32(**options: Unpack[BuildOptions]) -> ResNet:
    """CIFAR ResNet-32 (n=5), 0.46M parameters with option A."""
    return cifar_resnet(32, **options)


def resnet44(**options: Unpack[BuildOptions]) -> ResNet:
    """CIFAR ResNet-44 (n=7), 0.66M parameters with option A."""
    return cifar_resnet(44, **options)


def resnet56(**options: Unpack[BuildOptions]) -> ResNet:
    """CIFAR ResNet-56 (n=9), 0.85M parameters with option A."""
    return cifar_resnet(56, **options)


def resnet110(**options: Unpack[BuildOptions]) -> ResNet:
    """CIFAR ResNet-110 (n=18), 1.7M parameters with option A."""
    return cifar_resnet(110, **options)


def resnet1202(**options: Unpack[BuildOptions]) -> ResNet:
    """CIFAR ResNet-1202 (n=200), 19.4M parameters with option A."""
    return cifar_resnet(1202, **options)


def resnet18(**options: Unpack[BuildOptions]) -> ResNet:
    """ImageNet ResNet-18 (Table 1), 1.8 GFLOPs."""
    return imagenet_resnet(18, **options)


def resnet34(**options: Unpack[BuildOptions]) -> ResNet:
    """ImageNet ResNet-34 (Table 1), 3.6 GFLOPs."""
    return imagenet_resnet(34, **options)


def resnet50(**options: Unpack[BottleneckOptions]) -> ResNet:
    """ImageNet ResNet-50 (Table 1), 3.8 GFLOPs with the paper's "v1" downsampling."""
    return imagenet_resnet(50, **options)


def resnet101(**options: Unpack[BottleneckOptions]) -> ResNet:
    """ImageNet ResNet-101 (Table 1), 7.6 GFLOPs with "v1" downsampling."""
    return imagenet_resnet(101, **options)


def resnet152(**options: Unpack[BottleneckOptions]) -> ResNet:
    """ImageNet ResNet-152 (Table 1), 11.3 GFLOPs with "v1" downsampling."""
    return imagenet_resnet(152, **options)
