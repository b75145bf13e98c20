"""The architecture description and the model families it builds."""

import copy
import hashlib
import shutil

import pytest
import torch
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from resnet_ablate import ArchError, ResNetArch, resnet8, resnet18, resnet20, resnet50, resnet56
from resnet_ablate.blocks import BasicBlock, Bottleneck, ZeroPadShortcut
from resnet_ablate.kernels import FusedBatchNorm2d, use_backend
from resnet_ablate.models import build, cifar_resnet, imagenet_resnet

# ---------------------------------------------------------------- the description


def test_depth_and_stages_are_two_spellings_of_one_description():
    by_depth = ResNetArch(family="cifar", depth=56)
    by_stages = ResNetArch(family="cifar", stages=[9, 9, 9])
    assert by_depth == by_stages and hash(by_depth) == hash(by_stages)
    assert by_depth.digest == by_stages.digest
    assert by_depth.stages == (9, 9, 9) and by_depth.widths == (16, 32, 64)
    assert by_depth.block == "basic" and by_depth.shortcut == "A"


def test_family_defaults_follow_the_paper():
    imagenet50 = ResNetArch(family="imagenet", depth=50)
    assert (imagenet50.block, imagenet50.stages, imagenet50.shortcut) == ("bottleneck", (3, 4, 6, 3), "B")
    assert imagenet50.widths == (64, 128, 256, 512) and imagenet50.downsampling == "v1"
    assert ResNetArch(family="cifar", depth=164, block="bottleneck").stages == (18, 18, 18)  # 9n+2


def test_digest_is_a_stable_sha1_of_the_canonical_description():
    # A fixed value: a change here silently orphans every stored study result keyed by it. The
    # description written out by hand: every field, keys sorted, no spaces.
    described = ('{"base_width":64,"block":"basic","depth":20,"downsampling":"v1","family":"cifar",'
                 '"fused":true,"shortcut":"A","stages":[3,3,3],"widths":[16,32,64]}')
    expected = hashlib.sha1(described.encode()).hexdigest()
    assert expected == "9324286ca49911117df861d29905ad208df4d88b"
    assert ResNetArch(family="cifar", depth=20).digest == expected
    assert ResNetArch(depth=20).digest != ResNetArch(depth=20, fused=False).digest


def test_to_dict_from_dict_round_trip_uses_plain_values():
    arch = ResNetArch(family="imagenet", depth=101, shortcut="C", base_width=128, downsampling="v1.5")
    data = arch.to_dict()
    assert data == {
        "family": "imagenet", "depth": 101, "stages": [3, 4, 23, 3], "block": "bottleneck",
        "shortcut": "C", "widths": [64, 128, 256, 512], "base_width": 128, "downsampling": "v1.5",
        "fused": True,
    }
    assert ResNetArch.from_dict(data) == arch
    yaml = pytest.importorskip("yaml")
    assert ResNetArch.from_dict(yaml.safe_load(yaml.safe_dump(data))) == arch
    assert ResNetArch.from_dict(yaml.safe_load("depth: 32\nwidths: [16, 32, 64]\nshortcut: b")).shortcut == "B"


def test_names_are_readable_and_leave_out_what_the_family_implies():
    assert ResNetArch(depth=56).name == "resnet56-cifar-A"
    assert ResNetArch(depth=56, shortcut="none").name == "plain56-cifar"
    assert ResNetArch(family="imagenet", depth=50, downsampling="v1.5").name == "resnet50-imagenet-B-v1.5"
    custom = ResNetArch(family="imagenet", stages=[2, 2, 2, 2], block="bottleneck", fused=False)
    assert custom.name == "resnet26-imagenet-bottleneck-stages2.2.2.2-B-v1-unfused"
    assert ResNetArch(depth=20, widths=[32, 64, 128]).name == "resnet20-cifar-A-w32.64.128"


def test_basic_blocks_store_one_downsampling_so_identical_networks_hash_alike():
    assert ResNetArch(depth=20, downsampling="v1.5") == ResNetArch(depth=20)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"depth": 21}, r"6n\+2 with basic blocks in 3 stages: 20, 32, 44, 56, 110"),
        ({"depth": 21, "block": "bottleneck"}, r"9n\+2 with bottleneck blocks in 3 stages: 29, 47"),
        ({"family": "imagenet", "depth": 42}, r"valid: 18 \(basic\), 34 \(basic\), 50 \(bottleneck\)"),
        ({"family": "imagenet", "depth": 18, "block": "bottleneck"}, "uses basic blocks"),
        ({"family": "resnext", "depth": 20}, "valid: cifar, imagenet"),
        ({"depth": 20, "shortcut": "D"}, "valid: A, B, C, none"),
        ({"depth": 50, "family": "imagenet", "downsampling": "v2"}, "valid: v1, v1.5"),
        ({"stages": [3, 3, 3], "widths": [16, 32]}, "one width per stage"),
        ({"depth": 20, "stages": [3, 3, 4]}, "contradicts stages"),
        ({"depth": 20, "widths": [64, 32, 16]}, "cannot shrink"),
        ({"depth": 20, "base_width": 128}, "bottleneck blocks only"),
        ({"depth": True}, "positive int"),
        ({"stages": [3, 0, 3]}, r"stages\[1\]=0"),
        ({}, "needs a depth or stages"),
    ],
)
def test_impossible_descriptions_say_what_is_valid(fields, message):
    with pytest.raises(ArchError, match=message):
        ResNetArch(**fields)


def test_from_dict_rejects_unknown_fields_and_names_the_source():
    unknown = r"unknown ResNetArch field\(s\) \['dept'\] in study.yaml; valid fields: family"
    with pytest.raises(ArchError, match=unknown):
        ResNetArch.from_dict({"dept": 20}, source="study.yaml")
    with pytest.raises(ArchError, match=r"depth=21 .*\(in study.yaml\)"):
        ResNetArch.from_dict({"depth": 21}, source="study.yaml")


def test_description_is_immutable():
    arch = ResNetArch(depth=20)
    with pytest.raises(AttributeError):
        arch.depth = 32  # type: ignore[misc]
    assert arch.replace(depth=32).stages == (5, 5, 5)


# ---------------------------------------------------------------- the models


def test_cifar_family_structure_follows_section_4_2():
    model = resnet20()
    assert model.conv1.weight.shape == (16, 3, 3, 3) and isinstance(model.maxpool, nn.Identity)
    assert [len(getattr(model, f"layer{i}")) for i in (1, 2, 3)] == [3, 3, 3]
    assert isinstance(model.layer2[0].downsample, ZeroPadShortcut)
    assert model.fc.weight.shape == (10, 64)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) + 1 == 20  # depth counts the weighted layers: convs and the fc


def test_cifar_family_takes_small_single_channel_images():
    model = resnet20(in_channels=1, num_classes=7)
    assert model(torch.randn(4, 1, 8, 8)).shape == (4, 7)


def test_imagenet_family_stem_and_stage_shapes():
    model = resnet50(num_classes=5).eval()
    assert model.conv1.weight.shape == (64, 3, 7, 7) and isinstance(model.maxpool, nn.MaxPool2d)
    assert [len(model.layer3), model.layer4[0].conv3.out_channels] == [6, 2048]
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5)


def test_custom_stages_on_the_imagenet_family():
    arch = ResNetArch(family="imagenet", stages=[1, 1, 1, 1], widths=[8, 16, 32, 64])
    model = build(arch, num_classes=3)
    assert isinstance(model.layer4[0], BasicBlock) and arch.depth == 10
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_builders_pass_description_options_through():
    model = resnet50(shortcut="C", downsampling="v1.5", fused=False)
    assert model.arch == ResNetArch(family="imagenet", depth=50, shortcut="C", downsampling="v1.5", fused=False)
    assert isinstance(model.layer1[1].downsample, nn.Sequential)  # C projects every shortcut
    assert model.layer1[0].conv2.stride == (1, 1) and model.layer2[0].conv2.stride == (2, 2)
    assert cifar_resnet(29, block="bottleneck").arch.stages == (3, 3, 3)
    assert imagenet_resnet(18).arch.name == "resnet18-imagenet-B"


def test_plain_twin_differs_only_by_the_shortcut():
    residual = resnet20()
    plain = build(residual.arch.replace(shortcut="none"))  # the paper's plain twin
    assert plain.arch.name == "plain20-cifar"
    assert {k: v.shape for k, v in plain.state_dict().items()} == {
        k: v.shape for k, v in residual.state_dict().items()
    }
    residual_modules = {name: type(m) for name, m in residual.named_modules()}
    plain_modules = {name: type(m) for name, m in plain.named_modules()}
    only_in_residual = {name: t.__name__ for name, t in residual_modules.items() if name not in plain_modules}
    assert only_in_residual == {"layer2.0.downsample": "ZeroPadShortcut", "layer3.0.downsample": "ZeroPadShortcut"}
    assert all(residual_modules[name] is t for name, t in plain_modules.items())
    assert all(not block.has_shortcut for block in plain.modules() if isinstance(block, BasicBlock))


def _model_pair(make, **kwargs):
    torch.manual_seed(0)
    unfused = make(fused=False, **kwargs)
    fused = make(fused=True, **kwargs)
    fused.load_state_dict(unfused.state_dict(), strict=True)
    return unfused, fused


def _train_step_matches(unfused, fused, x, atol=1e-5, rtol=1.3e-6):
    x_unfused, x_fused = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_unfused, out_fused = unfused(x_unfused), fused(x_fused)
    torch.testing.assert_close(out_fused, out_unfused, atol=atol, rtol=rtol)
    out_unfused.square().sum().backward()
    out_fused.square().sum().backward()
    torch.testing.assert_close(x_fused.grad, x_unfused.grad, atol=atol, rtol=rtol)
    fused = getattr(fused, "_orig_mod", fused)  # torch.compile's wrapper prefixes the names
    fused_params = dict(fused.named_parameters())
    for name, p in unfused.named_parameters():
        torch.testing.assert_close(fused_params[name].grad, p.grad, atol=atol, rtol=rtol, msg=name)
    fused_buffers = dict(fused.named_buffers())
    for name, b in unfused.named_buffers():
        torch.testing.assert_close(fused_buffers[name], b, atol=atol, rtol=rtol, msg=name)


@pytest.mark.parametrize(
    "make, options, shape",
    [
        (resnet8, {"in_channels": 1}, (4, 1, 8, 8)),
        (cifar_resnet, {"depth": 11, "block": "bottleneck", "shortcut": "B"}, (3, 3, 9, 9)),
        (resnet8, {"shortcut": "none"}, (2, 3, 8, 8)),
    ],
)
def test_fused_and_unfused_models_train_and_evaluate_identically(make, options, shape):
    unfused, fused = _model_pair(make, **options)
    x = torch.randn(shape)
    _train_step_matches(unfused, fused, x)
    torch.testing.assert_close(fused.eval()(x), unfused.eval()(x))


def test_triton_kernels_through_the_interpreter_match_the_unfused_model():
    unfused, fused = _model_pair(resnet8, in_channels=1)
    x = torch.randn(4, 1, 8, 8)
    with use_backend("triton"):
        _train_step_matches(unfused, fused, x, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(fused.eval()(x), unfused.eval()(x), atol=1e-4, rtol=1e-4)


def test_channels_last_models_match_contiguous_ones():
    unfused, fused = _model_pair(resnet8)
    fused = fused.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 8, 8)
    _train_step_matches(unfused, fused, x.to(memory_format=torch.channels_last), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_model_under_autocast_matches_unfused(dtype):
    unfused, fused = _model_pair(resnet8)
    x = torch.randn(4, 3, 8, 8)
    with torch.autocast("cpu", dtype=dtype):
        out_unfused, out_fused = unfused(x), fused(x)
    assert out_fused.dtype == out_unfused.dtype == dtype
    torch.testing.assert_close(out_fused.float(), out_unfused.float(), atol=5e-2, rtol=5e-2)
    out_fused.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in fused.parameters())


def test_fused_model_compiles_without_graph_breaks():
    unfused, fused = _model_pair(resnet8)
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    _train_step_matches(unfused, compiled, torch.randn(2, 3, 8, 8))


def test_ddp_style_checkpoints_round_trip_between_fused_and_unfused():
    class DataParallelLike(nn.Module):  # DDP and DataParallel keep the model as `.module`
        def __init__(self, module):
            super().__init__()
            self.module = module

    unfused, _ = _model_pair(resnet20)
    unfused.train()(torch.randn(2, 3, 8, 8))  # move running stats off their initial values
    state = DataParallelLike(unfused).state_dict()
    assert next(iter(state)).startswith("module.")
    consume_prefix_in_state_dict_if_present(state, "module.")
    fused = resnet20(fused=True)
    fused.load_state_dict(state, strict=True)
    restored = resnet20(fused=False)
    restored.load_state_dict(copy.deepcopy(fused.state_dict()), strict=True)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(fused.eval()(x), unfused.eval()(x))
    torch.testing.assert_close(restored.eval()(x), unfused(x))


def test_zero_init_residual_reaches_every_block():
    model = resnet56(zero_init_residual=True)
    last_bns = [b.bn2 for b in model.modules() if isinstance(b, BasicBlock)]
    assert len(last_bns) == 27 and all(torch.count_nonzero(bn.weight) == 0 for bn in last_bns)
    assert all(isinstance(bn, FusedBatchNorm2d) for bn in last_bns)
    with pytest.raises(ValueError, match="plain network"):
        resnet20(shortcut="none", zero_init_residual=True)


def test_resnet18_uses_basic_blocks_and_resnet50_bottlenecks():
    assert isinstance(resnet18().layer1[0], BasicBlock) and isinstance(resnet50().layer1[0], Bottleneck)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="inductor needs a C++ compiler")
def test_fused_model_trains_under_inductor():
    unfused, fused = _model_pair(resnet8)
    _train_step_matches(unfused, torch.compile(fused), torch.randn(2, 3, 8, 8), atol=1e-4, rtol=1e-4)
