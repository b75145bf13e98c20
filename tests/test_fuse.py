"""`fuse()` on torchvision-style ResNets, and torchvision checkpoints loading into our models.

torchvision is not a dependency, so its ResNet is copied here (structure, names, forward and the
v1.5 stride placement of torchvision/models/resnet.py), trimmed of what these tests do not use.
"""

import copy
import warnings

import pytest
import torch
from torch import nn

from resnet_ablate import FuseWarning, fuse, resnet8, resnet18, resnet50
from resnet_ablate.blocks import BasicBlock as OurBasicBlock
from resnet_ablate.blocks import Bottleneck as OurBottleneck
from resnet_ablate.kernels import FusedBatchNorm2d, use_backend

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


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN state and a zero-mean head, so outputs depend on every layer."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = torch.rand(m.num_features, generator=g) + 0.5
            m.bias.data = torch.randn(m.num_features, generator=g) * 0.1
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def _small_tv_resnet(block=TVBasicBlock, layers=(1, 1, 1, 1), num_classes=10):
    torch.manual_seed(0)
    return _randomize(TVResNet(block, list(layers), num_classes=num_classes))


# ---------------------------------------------------------------- fuse()


@pytest.mark.parametrize("block, layers", [(TVBasicBlock, (2, 1, 1, 1)), (TVBottleneck, (1, 2, 1, 1))])
def test_fuse_keeps_weights_outputs_gradients_and_running_stats(block, layers):
    model = _small_tv_resnet(block, layers)
    reference = copy.deepcopy(model)
    conv_weight, bn_weight = model.layer1[0].conv1.weight, model.layer1[0].bn1.weight
    with warnings.catch_warnings():
        warnings.simplefilter("error", FuseWarning)  # every block is recognised: no warning
        fused, report = fuse(model, return_report=True)
    assert fused is model
    assert report.skipped == () and report.fused[:2] == ("layer1.0", "layer1.1" if layers[0] == 2 else "layer2.0")
    assert len(report.fused) == sum(layers)
    first = fused.layer1[0]
    assert isinstance(first, (OurBasicBlock, OurBottleneck)) and isinstance(first.bn1, FusedBatchNorm2d)
    assert first.conv1.weight is conv_weight and first.bn1.weight is bn_weight  # same tensors
    assert fused.state_dict().keys() == reference.state_dict().keys()

    x = torch.randn(2, 3, 40, 40)
    x_ref, x_fused = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ref, out_fused = reference(x_ref), fused(x_fused)
    torch.testing.assert_close(out_fused, out_ref)
    out_ref.square().sum().backward()
    out_fused.square().sum().backward()
    torch.testing.assert_close(x_fused.grad, x_ref.grad)
    fused_params = dict(fused.named_parameters())
    for name, p in reference.named_parameters():
        torch.testing.assert_close(fused_params[name].grad, p.grad, msg=name)
    for (name, b_ref), (_, b_fused) in zip(reference.named_buffers(), fused.named_buffers()):
        torch.testing.assert_close(b_fused, b_ref, msg=name)
    torch.testing.assert_close(fused.eval()(x), reference.eval()(x))


def test_fuse_of_a_bottleneck_reads_the_stride_placement_from_the_model():
    model = fuse(_small_tv_resnet(TVBottleneck))
    assert model.layer2[0].downsampling == "v1.5" and model.layer1[0].downsampling == "v1"


class SqueezeExciteBlock(TVBasicBlock):
    """A block with an extra submodule: fusing it would drop the SE branch."""

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__(inplanes, planes, stride, downsample)
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(planes, planes, 1), nn.Sigmoid())

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out * self.se(out) + identity)


class PreActivationBlock(TVBasicBlock):
    """Same submodules as torchvision's block, different forward (no ReLU after the add)."""

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        return self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + identity


def test_unrecognised_blocks_are_left_alone_and_reported():
    model = _small_tv_resnet()
    model.layer2[0] = _randomize(SqueezeExciteBlock(64, 128, 2, copy.deepcopy(model.layer2[0].downsample)))
    model.layer3[0] = _randomize(PreActivationBlock(128, 256, 2, copy.deepcopy(model.layer3[0].downsample)))
    model.layer4[0].bn1 = nn.SyncBatchNorm(512)
    left_alone = {name: model.get_submodule(name) for name in ("layer2.0", "layer3.0", "layer4.0")}
    with pytest.warns(FuseWarning, match="3 block") as caught:
        _, report = fuse(model, return_report=True)
    assert report.fused == ("layer1.0",)
    reasons = {s.name: s.reason for s in report.skipped}
    assert "unexpected submodules ['se']" in reasons["layer2.0"]
    assert "forward differs" in reasons["layer3.0"]
    assert "bn1 is SyncBatchNorm" in reasons["layer4.0"]
    assert "layer3.0" in str(caught[0].message)
    for name, module in left_alone.items():
        assert model.get_submodule(name) is module
        assert not any(isinstance(m, FusedBatchNorm2d) for m in module.modules())


def test_fuse_strict_refuses_before_changing_anything():
    model = _small_tv_resnet()
    model.layer3[0] = PreActivationBlock(128, 256, 2, model.layer3[0].downsample)
    before = {name: m for name, m in model.named_modules()}
    with pytest.raises(ValueError, match="layer3.0: its forward differs"):
        fuse(model, strict=True)
    assert {name: m for name, m in model.named_modules()} == before


def test_fuse_converts_this_packages_unfused_models_completely():
    torch.manual_seed(0)
    model = _randomize(resnet8(fused=False))
    reference = copy.deepcopy(model).eval()
    fuse(model)
    assert model.arch.fused and model.fused
    assert all(type(m) is not nn.BatchNorm2d or "downsample" in name for name, m in model.named_modules())
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(model.eval()(x), reference(x))


def test_fused_torchvision_model_matches_through_the_triton_kernels():
    model = _small_tv_resnet().eval()
    reference = copy.deepcopy(model)
    fuse(model)
    x = torch.randn(2, 3, 16, 16)
    with use_backend("triton"):
        out = model(x)
    torch.testing.assert_close(out, reference(x), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- torchvision checkpoints


@pytest.mark.parametrize(
    "tv_model, ours",
    [
        (lambda: TVResNet(TVBasicBlock, [2, 2, 2, 2]), lambda **kw: resnet18(**kw)),
        (lambda: TVResNet(TVBottleneck, [3, 4, 6, 3]), lambda **kw: resnet50(downsampling="v1.5", **kw)),
    ],
    ids=["resnet18", "resnet50"],
)
@pytest.mark.parametrize("fused", [True, False])
def test_torchvision_checkpoints_load_strictly_and_give_the_same_outputs(tv_model, ours, fused):
    torch.manual_seed(0)
    tv = _randomize(tv_model()).eval()
    model = ours(shortcut="B", fused=fused)
    tv_state = tv.state_dict()
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in tv_state.items()}
    model.load_state_dict(tv_state, strict=True)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(model.eval()(x), tv(x), atol=1e-4, rtol=1e-4)


def test_paper_v1_bottleneck_loads_torchvision_weights_but_computes_a_different_network():
    tv = _randomize(TVResNet(TVBottleneck, [3, 4, 6, 3])).eval()
    v1 = resnet50(downsampling="v1")
    v1.load_state_dict(tv.state_dict(), strict=True)  # same shapes: only the strides move
    x = torch.randn(1, 3, 64, 64)
    assert not torch.allclose(v1.eval()(x), tv(x), atol=1e-3)
