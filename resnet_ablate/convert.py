"""Explicit conversions between this package's models and other libraries' modules.

- `from_torchvision(model)`: a torchvision ResNet (or one that follows its layout) as this
  package's `ResNet`, with torchvision's "v1.5" downsampling and its weights, checked to compute
  the same outputs.
(`fuse` and `unfuse`, in fusion/, convert other libraries' models in place instead.)
"""

from __future__ import annotations

from torch import nn

from .arch import ResNetArch
from .fusion.probe import beyond_tolerance, evaluating, probe_input
from .fusion.residual_blocks import unrecognised_because
from .models import ResNet, build

_PROBE = (2, 64)  # batch and side of the probe images that check a conversion


SUPPORTED = ("torchvision's resnet18/34/50/101/152 and wide_resnet50_2/101_2, and timm's resnet18-152 "
             "of the same layout (7x7 stem, strided 1x1-conv shortcuts, plain blocks)")


def _block_unsupported_because(name: str, block: nn.Module) -> str | None:
    reason = unrecognised_because(block)
    if reason is not None:
        return f"{name}: {reason}"
    for part, conv in block.named_children():
        if not isinstance(conv, nn.Conv2d):
            continue
        if conv.groups != 1:
            return f"{name}.{part} has groups={conv.groups} (a ResNeXt), which this package's blocks do not have"
        if conv.dilation != (1, 1):
            return f"{name}.{part} has dilation {conv.dilation} (a dilated net), which this package's blocks do not have"
    downsample = getattr(block, "downsample", None)
    if downsample is not None and not (
            isinstance(downsample, nn.Sequential) and len(downsample) == 2
            and type(downsample[0]) is nn.Conv2d and downsample[0].kernel_size == (1, 1)
            and type(downsample[1]) is nn.BatchNorm2d):
        return (f"{name}.downsample is not a strided 1x1 conv + BatchNorm2d (an average-pool shortcut, "
                "as resnet-d's)")
    return None


def _unsupported_because(model: nn.Module, stages: list[nn.Module]) -> str | None:
    """Why `model` is not a network this package's ResNet computes exactly, or None."""
    conv1 = model.conv1
    if not (type(conv1) is nn.Conv2d and conv1.kernel_size == (7, 7) and conv1.stride == (2, 2)):
        return f"its stem conv1 is {type(conv1).__name__}, not one 7x7 stride-2 conv (a deep stem, as resnet-d's)"
    for name, bn in model.named_modules():
        if isinstance(bn, nn.BatchNorm2d) and not (bn.affine and bn.track_running_stats):
            return (f"{name} has affine={bn.affine}, track_running_stats={bn.track_running_stats}, "
                    "where this package's ResNet has both")
    for index, stage in enumerate(stages, start=1):
        strides = {max(c.stride) for c in stage[0].modules() if isinstance(c, nn.Conv2d)}
        if max(strides) != (1 if index == 1 else 2):
            return (f"layer{index}.0's convs have strides {sorted(strides)}, where this package's "
                    f"ResNet has {1 if index == 1 else 2} (a dilated net keeps the resolution)")
        for position, block in enumerate(stage):
            reason = _block_unsupported_because(f"layer{index}.{position}", block)
            if reason is not None:
                return reason
    return None


def from_torchvision(model: nn.Module, *, fused: bool = True) -> ResNet:
    """This package's ResNet equal to a torchvision ResNet: the same stages, widths and classes,
    torchvision's downsampling ("v1.5" bottlenecks), its weights, its train/eval mode. Raises
    ValueError, naming what is supported, where the model is not one this package's ResNet
    computes exactly (ResNeXt, resnet-d, SE, drop_path, DropBlock, dilation...) or the converted
    net does not compute the same outputs on a probe input."""
    try:
        stages = [getattr(model, f"layer{i}") for i in range(1, 5)]
        first = stages[0][0]
        conv1, fc = model.conv1, model.fc
    except (AttributeError, IndexError, TypeError) as error:
        raise ValueError(f"from_torchvision: {type(model).__name__} does not have torchvision's "
                         f"ResNet layout (conv1, layer1..layer4 of blocks, fc): {error}; it converts "
                         f"{SUPPORTED}") from None
    reason = _unsupported_because(model, stages)
    if reason is not None:
        raise ValueError(f"from_torchvision cannot convert this {type(model).__name__} exactly: {reason}. "
                         f"It converts {SUPPORTED}; `fuse(model)` fuses a model in place instead")
    bottleneck = hasattr(first, "conv3")
    planes = first.conv1.in_channels  # the stem's 64, the first stage's planes
    inner = first.conv1.out_channels  # a bottleneck's inner width: planes * base_width / 64
    arch = ResNetArch(
        family="imagenet", block="bottleneck" if bottleneck else "basic",
        stages=tuple(len(stage) for stage in stages), shortcut="B",
        base_width=inner * 64 // planes if bottleneck else 64,
        downsampling="v1.5" if bottleneck else "v1", fused=fused)
    converted = build(arch, num_classes=fc.out_features, in_channels=conv1.in_channels)
    converted.load_state_dict(model.state_dict())
    _take_settings(model, converted)
    parameter = next(model.parameters())
    converted.to(device=parameter.device, dtype=parameter.dtype)
    _check_same_outputs(model, converted, conv1.in_channels)
    return converted


def _take_settings(original: nn.Module, converted: ResNet) -> None:
    """What a state_dict does not carry, from the module of the same name: each module's mode (a
    frozen BatchNorm stays in eval mode), each BatchNorm's eps and momentum, and whether each
    parameter takes gradients (the names are torchvision's: its state_dict loaded as it is)."""
    modules = dict(original.named_modules())
    for name, module in converted.named_modules():
        source = modules.get(name, original)
        module.training = source.training
        if isinstance(module, nn.BatchNorm2d) and isinstance(source, nn.BatchNorm2d):
            module.eps, module.momentum = source.eps, source.momentum
    parameters = dict(original.named_parameters())
    for name, parameter in converted.named_parameters():
        parameter.requires_grad_(parameters[name].requires_grad)


def _check_same_outputs(original: nn.Module, converted: ResNet, in_channels: int) -> None:
    batch, side = _PROBE
    probe = probe_input(next(original.parameters()), in_channels, side, batch)
    with evaluating(original, converted):
        expected, actual = original(probe), converted(probe)
    error = beyond_tolerance(expected, actual)
    if error is not None:
        raise ValueError(f"from_torchvision: the converted {converted.arch.name} differs from "
                         f"{type(original).__name__} (max difference {error:.3g} on a probe "
                         f"input): its forward is not torchvision's. It converts {SUPPORTED}")
