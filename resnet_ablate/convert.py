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
from .models import ResNet, build

_PROBE = (2, 64)  # batch and side of the probe images that check a conversion


def from_torchvision(model: nn.Module, *, fused: bool = True) -> ResNet:
    """This package's ResNet equal to a torchvision ResNet: the same stages, widths and classes,
    torchvision's downsampling ("v1.5" bottlenecks), its weights, its train/eval mode. Raises
    ValueError where the model does not follow torchvision's layout or the converted net does not
    compute the same outputs on a probe input."""
    try:
        stages = [getattr(model, f"layer{i}") for i in range(1, 5)]
        first = stages[0][0]
        conv1, fc = model.conv1, model.fc
    except (AttributeError, IndexError, TypeError) as error:
        raise ValueError(f"from_torchvision: {type(model).__name__} does not have torchvision's "
                         f"ResNet layout (conv1, layer1..layer4 of blocks, fc): {error}") from None
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
    parameter = next(model.parameters())
    converted.to(device=parameter.device, dtype=parameter.dtype)
    _check_same_outputs(model, converted, conv1.in_channels)
    return converted.train(model.training)


def _check_same_outputs(original: nn.Module, converted: ResNet, in_channels: int) -> None:
    batch, side = _PROBE
    probe = probe_input(next(original.parameters()), in_channels, side, batch)
    with evaluating(original, converted):
        expected, actual = original(probe), converted(probe)
    error = beyond_tolerance(expected, actual)
    if error is not None:
        raise ValueError(f"from_torchvision: the converted {converted.arch.name} differs from "
                         f"{type(original).__name__} (max difference {error:.3g} on a probe "
                         "input); its blocks are not torchvision's")
