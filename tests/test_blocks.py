"""Residual blocks: fused and unfused builds are the same block; shortcut options, widths, strides, init."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from resnet_ablate.blocks import BasicBlock, Bottleneck, ZeroPadShortcut, fuse_block_
from resnet_ablate.kernels import FusedBatchNorm2d, use_backend


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _randomize_bn(module: nn.Module, seed: int = 0) -> None:
    """Non-trivial BN parameters and running stats, so that a swapped or skipped BN shows."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = torch.rand(m.num_features, generator=g) + 0.5
            m.bias.data = torch.randn(m.num_features, generator=g) * 0.1
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def _pair(make, **kwargs):
    """An unfused block and a fused one loaded from its state_dict."""
    torch.manual_seed(0)
    plain = make(fused=False, **kwargs)
    _randomize_bn(plain)
    fused = make(fused=True, **kwargs)
    fused.load_state_dict(plain.state_dict(), strict=True)
    return plain, fused


BLOCK_CASES = [
    pytest.param(lambda **kw: BasicBlock(8, 8, 1, **kw), (3, 8, 6, 6), id="basic-identity"),
    pytest.param(lambda **kw: BasicBlock(8, 16, 2, shortcut="B", **kw), (3, 8, 7, 7), id="basic-B-stride2-odd"),
    pytest.param(lambda **kw: BasicBlock(8, 16, 2, shortcut="A", **kw), (3, 8, 6, 6), id="basic-A"),
    pytest.param(lambda **kw: BasicBlock(8, 8, 1, shortcut="none", **kw), (3, 8, 5, 5), id="basic-plain"),
    pytest.param(lambda **kw: Bottleneck(16, 4, 1, shortcut="C", **kw), (2, 16, 5, 5), id="bottleneck-C"),
    pytest.param(
        lambda **kw: Bottleneck(8, 8, 2, shortcut="B", downsampling="v1.5", **kw), (2, 8, 6, 6),
        id="bottleneck-B-v1.5",
    ),
    pytest.param(
        lambda **kw: Bottleneck(8, 8, 2, shortcut="A", base_width=32, **kw), (2, 8, 6, 6), id="bottleneck-A-narrow"
    ),
]


@pytest.mark.parametrize("make, shape", BLOCK_CASES)
def test_fused_and_unfused_blocks_have_identical_state_dict_keys_and_shapes(make, shape):
    plain, fused = _pair(make)
    assert {k: v.shape for k, v in plain.state_dict().items()} == {k: v.shape for k, v in fused.state_dict().items()}
    assert isinstance(fused.bn1, FusedBatchNorm2d) and type(plain.bn1) is nn.BatchNorm2d


@pytest.mark.parametrize("make, shape", BLOCK_CASES)
def test_fused_block_matches_unfused_outputs_gradients_and_running_stats(make, shape):
    plain, fused = _pair(make)
    x = torch.randn(shape)
    x_plain, x_fused = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad_out = torch.randn_like(plain(x))
    plain.load_state_dict(fused.state_dict())  # undo the probe's running-stat update above
    out_plain, out_fused = plain(x_plain), fused(x_fused)
    torch.testing.assert_close(out_fused, out_plain)
    out_plain.backward(grad_out)
    out_fused.backward(grad_out)
    torch.testing.assert_close(x_fused.grad, x_plain.grad)
    fused_params = dict(fused.named_parameters())
    for name, p in plain.named_parameters():
        torch.testing.assert_close(fused_params[name].grad, p.grad, msg=name)
    fused_buffers = dict(fused.named_buffers())
    for name, b in plain.named_buffers():
        torch.testing.assert_close(fused_buffers[name], b, msg=name)
    plain.eval()
    fused.eval()
    torch.testing.assert_close(fused(x), plain(x))


def test_basic_block_matches_a_hand_written_forward():
    block = BasicBlock(4, 8, 2, shortcut="B", fused=True).eval()
    _randomize_bn(block)
    x = torch.randn(2, 4, 6, 6)

    def bn(m, t):
        return F.batch_norm(t, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)

    h = F.relu(bn(block.bn1, F.conv2d(x, block.conv1.weight, stride=2, padding=1)))
    h = bn(block.bn2, F.conv2d(h, block.conv2.weight, padding=1))
    shortcut = bn(block.downsample[1], F.conv2d(x, block.downsample[0].weight, stride=2))
    torch.testing.assert_close(block(x), F.relu(h + shortcut))


def test_plain_block_is_the_residual_block_without_the_add():
    residual = BasicBlock(6, 6, shortcut="A", fused=True).eval()
    plain = BasicBlock(6, 6, shortcut="none", fused=True).eval()
    _randomize_bn(residual)
    plain.load_state_dict(residual.state_dict(), strict=True)
    x = torch.randn(2, 6, 5, 5)
    # With the same weights, the residual block is relu(f(x) + x) and the plain one relu(f(x)).
    relu_f_x = residual.bn2(residual.conv2(residual.bn1(residual.conv1(x))))  # no residual given
    torch.testing.assert_close(plain(x), relu_f_x)
    residual.bn2.relu = False
    f_x_linear = residual.bn2(residual.conv2(residual.bn1(residual.conv1(x))))
    residual.bn2.relu = True
    torch.testing.assert_close(residual(x), F.relu(f_x_linear + x))


def test_zero_pad_shortcut_subsamples_and_appends_zero_channels():
    x = torch.arange(2 * 2 * 4 * 4, dtype=torch.float32).reshape(2, 2, 4, 4)
    out = ZeroPadShortcut(2, 5, stride=2)(x)
    assert out.shape == (2, 5, 2, 2)
    assert torch.equal(out[:, :2], x[:, :, ::2, ::2])
    assert torch.count_nonzero(out[:, 2:]) == 0
    with pytest.raises(ValueError, match="can only add channels"):
        ZeroPadShortcut(4, 2, stride=1)


def test_shortcut_options_give_the_papers_parameter_counts():
    # Hand counts: two 3x3 convs 16->32->32 and two BNs of 32; a projection is 16*32 + 2*32.
    body = 16 * 32 * 9 + 32 * 32 * 9 + 4 * 32
    projection = 16 * 32 + 2 * 32
    assert _params(BasicBlock(16, 32, 2, shortcut="A")) == body
    assert _params(BasicBlock(16, 32, 2, shortcut="none")) == body
    assert _params(BasicBlock(16, 32, 2, shortcut="B")) == body + projection
    assert _params(BasicBlock(16, 32, 2, shortcut="C")) == body + projection
    # Where the shape does not change, B is the identity and C still projects.
    same = 32 * 32 * 9 * 2 + 4 * 32
    assert _params(BasicBlock(32, 32, 1, shortcut="B")) == same
    assert BasicBlock(32, 32, 1, shortcut="B").downsample is None
    assert _params(BasicBlock(32, 32, 1, shortcut="C")) == same + 32 * 32 + 2 * 32


@pytest.mark.parametrize("shortcut", ["A", "B", "C", "none"])
@pytest.mark.parametrize("block_cls, in_ch, planes", [(BasicBlock, 16, 32), (Bottleneck, 64, 32)])
def test_every_shortcut_option_gives_the_expected_output_shape(shortcut, block_cls, in_ch, planes):
    block = block_cls(in_ch, planes, 2, shortcut=shortcut)
    assert block(torch.randn(2, in_ch, 8, 8)).shape == (2, planes * block_cls.expansion, 4, 4)


def test_option_a_shortcut_has_no_parameters():
    block = Bottleneck(64, 32, 2, shortcut="A")
    assert isinstance(block.downsample, ZeroPadShortcut)
    assert _params(block.downsample) == 0
    assert not any(k.startswith("downsample") for k in block.state_dict())


def test_unknown_shortcut_and_downsampling_are_rejected_with_the_valid_values():
    with pytest.raises(ValueError, match="valid: A, B, C, none"):
        BasicBlock(4, 4, shortcut="D")
    with pytest.raises(ValueError, match="'v1' .* or 'v1.5'"):
        Bottleneck(4, 4, downsampling="v2")


def test_bottleneck_inner_width_follows_base_width_or_an_explicit_width():
    assert Bottleneck(256, 64).conv2.weight.shape == (64, 64, 3, 3)
    wide = Bottleneck(256, 64, base_width=128)  # Wide ResNet-50-2
    assert wide.conv2.weight.shape == (128, 128, 3, 3)
    assert wide.conv3.weight.shape == (256, 128, 1, 1)
    assert Bottleneck(256, 64, width=24).conv1.weight.shape == (24, 256, 1, 1)


def test_bottleneck_downsampling_places_the_stride_on_the_1x1_or_the_3x3():
    v1 = Bottleneck(64, 32, 2, downsampling="v1")
    v15 = Bottleneck(64, 32, 2, downsampling="v1.5")
    assert (v1.conv1.stride, v1.conv2.stride) == ((2, 2), (1, 1))
    assert (v15.conv1.stride, v15.conv2.stride) == ((1, 1), (2, 2))
    x = torch.randn(1, 64, 8, 8)
    assert v1(x).shape == v15(x).shape == (1, 128, 4, 4)


def test_zero_init_residual_makes_each_block_start_as_its_shortcut():
    block = BasicBlock(8, 8, zero_init_residual=True).eval()
    assert torch.count_nonzero(block.bn2.weight) == 0
    x = torch.randn(2, 8, 4, 4)
    torch.testing.assert_close(block(x), F.relu(x))
    assert torch.count_nonzero(Bottleneck(16, 4, zero_init_residual=True).bn3.weight) == 0
    with pytest.raises(ValueError, match="plain network"):
        BasicBlock(8, 8, shortcut="none", zero_init_residual=True)


def test_convs_get_he_initialisation():
    torch.manual_seed(0)
    conv = BasicBlock(256, 256).conv1
    fan_out = 256 * 3 * 3
    assert math.isclose(conv.weight.std().item(), math.sqrt(2 / fan_out), rel_tol=0.02)
    assert torch.all(BasicBlock(8, 8).bn1.weight == 1)


def test_fuse_block_converts_an_unfused_block_in_place_sharing_its_tensors():
    plain, _ = _pair(lambda **kw: Bottleneck(8, 4, 2, shortcut="B", **kw))
    reference = copy.deepcopy(plain).eval()
    weight = plain.bn3.weight
    fuse_block_(plain)
    assert isinstance(plain.bn3, FusedBatchNorm2d) and plain.bn3.weight is weight
    x = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(plain.eval()(x), reference(x))


@pytest.mark.parametrize("make, shape", [BLOCK_CASES[1], BLOCK_CASES[5]])
def test_triton_kernels_match_the_unfused_block(make, shape):
    plain, fused = _pair(make)
    x = torch.randn(shape)
    x_plain, x_fused = x.clone().requires_grad_(), x.clone().requires_grad_()
    with use_backend("triton"):
        out_fused = fused(x_fused)
        out_fused.sum().backward()
    out_plain = plain(x_plain)
    out_plain.sum().backward()
    torch.testing.assert_close(out_fused, out_plain, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(x_fused.grad, x_plain.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fused.bn1.weight.grad, plain.bn1.weight.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fused.bn2.running_var, plain.bn2.running_var)
