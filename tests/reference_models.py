"""Hand-written copies of torchvision's and timm's ResNet modules, for the tests of fuse, the
conversions and checkpoint loading that vary the blocks by hand (an SE block, a changed forward)
or must run where the libraries' own code is absent (real_libraries.py loads that code for
test_real_models.py): the structure, submodule names, forward and stride placement of
torchvision/models/resnet.py and timm/models/resnet.py (with timm's SE module and DropPath),
trimmed of what the tests do not use; and the training-step comparison the fuse tests share.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# ---------------------------------------------------------------- torchvision's ResNet, copied


def conv3x3(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class TVBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class TVBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, base_width=64):
        super().__init__()
        width = int(planes * (base_width / 64.0))
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride)  # torchvision strides the 3x3 ("v1.5")
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class TVResNet(nn.Module):
    def __init__(self, block, layers, num_classes=1000, width_per_group=64):
        super().__init__()
        self.inplanes = 64
        self.base_width = width_per_group
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        extra = {"base_width": self.base_width} if block is TVBottleneck else {}
        layers = [block(self.inplanes, planes, stride, downsample, **extra)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, **extra))
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN state and a zero-mean head, so outputs depend on every layer."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = torch.rand(m.num_features, generator=g) + 0.5
            m.bias.data = torch.randn(m.num_features, generator=g) * 0.1
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def small_tv_resnet(block=TVBasicBlock, layers=(1, 1, 1, 1), num_classes=10):
    torch.manual_seed(0)
    return randomize(TVResNet(block, list(layers), num_classes=num_classes))


# ---------------------------------------------------------------- timm's ResNet, copied


class TimmSEModule(nn.Module):
    """timm's SEModule (squeeze-and-excitation), as seresnet50 uses it."""

    def __init__(self, channels, rd_ratio=1 / 16):
        super().__init__()
        rd_channels = max(8, int(channels * rd_ratio))
        self.fc1 = nn.Conv2d(channels, rd_channels, kernel_size=1, bias=True)
        self.bn = nn.Identity()
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(rd_channels, channels, kernel_size=1, bias=True)
        self.gate = nn.Sigmoid()

    def forward(self, x):
        x_se = x.mean((2, 3), keepdim=True)
        x_se = self.act(self.bn(self.fc1(x_se)))
        return x * self.gate(self.fc2(x_se))


class TimmDropPath(nn.Module):
    """timm's DropPath: stochastic depth, one Bernoulli draw per sample while training."""

    def __init__(self, drop_prob=0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class TimmBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, attn_layer=None, drop_path=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.drop_block = nn.Identity()
        self.act1 = nn.ReLU(inplace=True)
        self.aa = nn.Identity()
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.se = attn_layer(planes) if attn_layer is not None else None
        self.act2 = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.drop_path = drop_path

    def forward(self, x):
        shortcut = x
        x = self.aa(self.act1(self.drop_block(self.bn1(self.conv1(x)))))
        x = self.bn2(self.conv2(x))
        if self.se is not None:
            x = self.se(x)
        if self.drop_path is not None:
            x = self.drop_path(x)
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x += shortcut
        return self.act2(x)


class TimmBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, attn_layer=None, drop_path=None,
                 base_width=64):
        super().__init__()
        width = int(math.floor(planes * (base_width / 64)))
        outplanes = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, width, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.drop_block = nn.Identity()
        self.act2 = nn.ReLU(inplace=True)
        self.aa = nn.Identity()
        self.conv3 = nn.Conv2d(width, outplanes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(outplanes)
        self.se = attn_layer(outplanes) if attn_layer is not None else None
        self.act3 = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.drop_path = drop_path

    def forward(self, x):
        shortcut = x
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.aa(self.act2(self.drop_block(self.bn2(self.conv2(x)))))
        x = self.bn3(self.conv3(x))
        if self.se is not None:
            x = self.se(x)
        if self.drop_path is not None:
            x = self.drop_path(x)
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x += shortcut
        return self.act3(x)


class TimmResNet(nn.Module):
    """timm's ResNet: resnet50 (stem_type "", avg_down False), resnet50d ("deep" stem of three
    3x3 convs, average-pool downsampling), seresnet50 (attn_layer SE); drop_path_rate > 0 gives
    each block a DropPath."""

    def __init__(self, block, layers, num_classes=10, stem_type="", avg_down=False,
                 attn_layer=None, drop_path_rate=0.0):
        super().__init__()
        inplanes = 64
        if stem_type == "deep":
            stem = 32
            self.conv1 = nn.Sequential(
                nn.Conv2d(3, stem, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(stem),
                nn.ReLU(inplace=True),
                nn.Conv2d(stem, stem, 3, padding=1, bias=False), nn.BatchNorm2d(stem),
                nn.ReLU(inplace=True),
                nn.Conv2d(stem, inplanes, 3, padding=1, bias=False))
        else:
            self.conv1 = nn.Conv2d(3, inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        for index, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
            stride = 1 if index == 0 else 2
            downsample = None
            if stride != 1 or inplanes != planes * block.expansion:
                pool = nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False) \
                    if avg_down and stride != 1 else nn.Identity()
                conv = nn.Conv2d(inplanes, planes * block.expansion, 1,
                                 stride=1 if avg_down else stride, bias=False)
                downsample = nn.Sequential(pool, conv, nn.BatchNorm2d(planes * block.expansion)) \
                    if avg_down else nn.Sequential(conv, nn.BatchNorm2d(planes * block.expansion))
            stage = []
            for i in range(blocks):
                drop_path = TimmDropPath(drop_path_rate) if drop_path_rate > 0 else None
                stage.append(block(inplanes, planes, stride if i == 0 else 1,
                                   downsample if i == 0 else None, attn_layer, drop_path))
                inplanes = planes * block.expansion
            self.add_module(f"layer{index + 1}", nn.Sequential(*stage))
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x):
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.global_pool(x), 1))


def small_timm_resnet(block=TimmBottleneck, layers=(1, 1, 1, 1), **options):
    torch.manual_seed(0)
    return randomize(TimmResNet(block, list(layers), **options))


# ---------------------------------------------------------------- checks


def assert_same_training_step(reference: nn.Module, fused: nn.Module, x: torch.Tensor, *, tol: float = 1e-5) -> None:
    """Both models in training mode take one forward and backward on `x` (same random state, for
    dropout): outputs, input and parameter gradients, and buffers (running statistics) after it
    must match; then the eval-mode outputs."""
    reference.train(), fused.train()
    outputs = []
    for model in (reference, fused):
        torch.manual_seed(1)
        inputs = x.clone().requires_grad_()
        out = model(inputs)
        out.square().sum().backward()
        outputs.append((out, inputs.grad))
    torch.testing.assert_close(outputs[1], outputs[0], atol=tol, rtol=tol)
    fused_parameters = dict(fused.named_parameters())
    assert fused_parameters.keys() == dict(reference.named_parameters()).keys()
    for name, p in reference.named_parameters():
        torch.testing.assert_close(fused_parameters[name].grad, p.grad, atol=tol, rtol=tol, msg=name)
    fused_buffers = dict(fused.named_buffers())
    for name, b in reference.named_buffers():
        torch.testing.assert_close(fused_buffers[name], b, atol=tol, rtol=tol, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(fused.eval()(x), reference.eval()(x), atol=tol, rtol=tol)
