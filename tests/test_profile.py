"""Parameter and FLOP counts, checked against the paper, torchvision and hand counts."""

import functools
import math

import pytest
import torch
from torch import nn

from resnet_ablate import ResNetArch, profile, resnet8, resnet20
from resnet_ablate.kernels import FusedBatchNorm2d
from resnet_ablate.models import build, cifar_resnet, imagenet_resnet
from resnet_ablate.profile import count_parameters


def _paper_rounding(value: float, paper: str) -> float:
    return round(value, len(paper.partition(".")[2]))


@pytest.mark.parametrize(
    "depth, paper_millions",
    [(20, "0.27"), (32, "0.46"), (44, "0.66"), (56, "0.85"), (110, "1.7"), (1202, "19.4")],
)
def test_cifar_option_a_parameters_match_the_paper(depth, paper_millions):
    # Table 6 of the paper; counted without tracing, so ResNet-1202 stays fast.
    params = count_parameters(cifar_resnet(depth, shortcut="A"))
    assert _paper_rounding(params / 1e6, paper_millions) == float(paper_millions)


@pytest.mark.parametrize(
    "depth, torchvision_params",
    [(18, 11_689_512), (34, 21_797_672), (50, 25_557_032), (101, 44_549_160), (152, 60_192_808)],
)
def test_imagenet_option_b_parameters_match_torchvision_exactly(depth, torchvision_params):
    assert count_parameters(imagenet_resnet(depth, shortcut="B")) == torchvision_params


@pytest.fixture(scope="module")
def paper_profile():
    """The profile of an ImageNet ResNet of a depth with the paper's (v1) placement at 224x224;
    each depth built and traced once per module (ResNet-50 serves two tests)."""
    return functools.cache(
        lambda depth: profile(imagenet_resnet(depth, downsampling="v1"), (3, 224, 224)))


@pytest.mark.slow
@pytest.mark.parametrize(
    "depth, paper_gflops", [(18, "1.8"), (34, "3.6"), (50, "3.8"), (101, "7.6"), (152, "11.3")]
)
def test_imagenet_flops_match_table_1_with_the_papers_v1_placement(depth, paper_gflops,
                                                                   paper_profile):
    result = paper_profile(depth)
    assert result.unsupported == ()
    # Table 1 truncates to one decimal (ResNet-34 counts 3.66e9, listed as 3.6).
    assert math.floor(result.gflops * 10) / 10 == float(paper_gflops)


@pytest.mark.slow
def test_torchvision_v1_5_placement_costs_more_flops_than_the_paper(paper_profile):
    v1 = paper_profile(50)
    v15 = profile(imagenet_resnet(50, downsampling="v1.5"), (3, 224, 224))
    assert math.floor(v15.gflops * 10) / 10 == 4.1  # torchvision's documented 4.09 GFLOPs, + BN
    assert v15.flops > v1.flops


@pytest.mark.parametrize("make", [resnet8, lambda **kw: cifar_resnet(11, block="bottleneck", shortcut="C", **kw)])
def test_fused_and_unfused_models_count_the_same(make):
    fused = profile(make(fused=True), (3, 32, 32))
    unfused = profile(make(fused=False), (3, 32, 32))
    assert fused.flops == unfused.flops and fused.params == unfused.params
    assert fused.unsupported == () == unfused.unsupported
    by_op_fused, by_op_unfused = dict(fused.flops_by_operator), dict(unfused.flops_by_operator)
    assert by_op_fused["conv"] == by_op_unfused["conv"]
    # fvcore's scope hooks on every module make each fused block run its BNs alone (as a
    # hooked BN does, so that hooks see its output), then the add: counted apart, as unfused.
    assert by_op_fused["batch_norm_act"] + by_op_fused.get("batch_norm", 0) == (
        by_op_unfused["batch_norm"])
    assert by_op_fused["add"] == by_op_unfused["add_"]


class ConvBnAdd(nn.Module):
    def __init__(self, fused: bool):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.bn = FusedBatchNorm2d(4) if fused else nn.BatchNorm2d(4)
        self.fused = fused

    def forward(self, x):
        y = self.conv(x)
        if self.fused:
            return self.bn(y, y)
        return torch.relu(self.bn(y) + y)


@pytest.mark.parametrize("fused", [True, False])
def test_hand_counted_flops_of_conv_bn_add_relu(fused):
    result = profile(ConvBnAdd(fused), (2, 5, 6))
    conv = 4 * 2 * 3 * 3 * 5 * 6  # multiply-adds: out channels x in channels x kernel x positions
    bn = 2 * 4 * 5 * 6  # fvcore's eval BatchNorm: a scale and a shift per element
    add = 4 * 5 * 6
    assert result.flops == conv + bn + add
    assert result.params == 4 * 2 * 9 + 2 * 4 and result.input_shape == (2, 5, 6)


def test_cifar_flops_and_per_sample_counting():
    result = profile(resnet20(), (3, 32, 32))
    # ResNet-20 is commonly quoted at 41M multiply-adds on 32x32 images.
    assert 40e6 < result.flops < 42e6 and result.unsupported == ()
    assert "multiply-add = 1 FLOP" in result.convention
    assert "0.27M params" in str(result)


def test_uncounted_operators_are_listed_not_dropped():
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.Sigmoid())
    result = profile(model, (1, 4, 4))
    assert dict(result.unsupported) == {"aten::sigmoid": 1}
    assert "uncounted ops" in str(result)


def test_profile_restores_the_training_mode_and_checks_the_shape():
    model = resnet8().train()
    profile(model, (3, 8, 8))
    assert model.training and all(m.training for m in model.modules())
    with pytest.raises(ValueError, match=r"one sample, e.g. \(3, 32, 32\)"):
        profile(model, (3, 0, 8))


def test_option_a_has_fewer_parameters_than_b_and_c_and_the_plain_twin_equals_a():
    counts = {s: count_parameters(build(ResNetArch(depth=20, shortcut=s))) for s in "ABC"}
    counts["none"] = count_parameters(build(ResNetArch(depth=20, shortcut="none")))
    assert counts["A"] == counts["none"] < counts["B"] < counts["C"]
    # B adds two projections (16->32, 32->64) with their BNs.
    assert counts["B"] - counts["A"] == (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)
