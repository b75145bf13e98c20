"""Explicit conversions between this package's models and other libraries' modules.

- `from_torchvision(model)`: a torchvision ResNet (or one that follows its layout) as this
  package's `ResNet`, with torchvision's "v1.5" downsampling and its weights, checked to compute
  the same outputs.
- `unfuse(model)`: the fused epilogues back to plain `BatchNorm2d` + `ReLU` (same tensors), for
  exporters (ONNX, `torch.export` artifacts that load without this package) and other libraries.
  The inverse of `fuse`.
"""

from __future__ import annotations

from typing import TypeVar

from torch import nn

from .arch import ResNetArch
from .blocks import BasicBlock, Bottleneck, plain_twin_of
from .fuse import beyond_tolerance, evaluating, probe_input
from .kernels import FusedBatchNorm2d
from .models import ResNet, build

M = TypeVar("M", bound=nn.Module)

_PROBE = (2, 64)  # batch and side of the probe images that check a conversion


def unfuse(model: M) -> M:
    """Turn every fused epilogue of `model` back into plain `BatchNorm2d` + `ReLU` modules, in
    place (the same parameter and buffer tensors), and return the model. Outputs, gradients and
    state_dict keys are unchanged; what remains is plain PyTorch, which every exporter and
    library understands."""
    for module in model.modules():
        if isinstance(module, (BasicBlock, Bottleneck)) and module.fused:
            for name in ("bn1", "bn2", "bn3"):
                bn = getattr(module, name, None)
                if isinstance(bn, FusedBatchNorm2d):
                    setattr(module, name, plain_twin_of(bn))
            module.fused = False
            module.relu = nn.ReLU(inplace=True)
        elif isinstance(module, ResNet) and module.fused:
            assert isinstance(module.bn1, FusedBatchNorm2d)
            module.bn1 = plain_twin_of(module.bn1)
            module.relu = nn.ReLU(inplace=True)
            module.fused = False
            module.arch = module.arch.replace(fused=False)
    left = [name for name, m in model.named_modules() if isinstance(m, FusedBatchNorm2d)]
    if left:
        raise ValueError(f"unfuse: {len(left)} FusedBatchNorm2d module(s) are not inside this "
                         f"package's blocks or ResNet ({', '.join(left[:3])}); replace them with "
                         "resnet_ablate.blocks.plain_twin_of(module) and a ReLU where their relu "
                         "flag is set")
    return model


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
