"""`fuse()`: residual blocks (on the copies of torchvision's and timm's blocks in
reference_models.py, which the tests vary by hand; test_real_models.py runs the libraries' own
code), BatchNorm -> [add] -> ReLU anywhere in a user's own network, what it refuses and says, and
torchvision checkpoints loading into this package's models."""

import copy
import enum
import pickle
import re
import warnings

import pytest
import torch
from torch import nn

import torch.nn.functional as F

from resnet_ablate import DownsamplingWarning, FuseWarning, fuse, resnet8, resnet18, resnet50, unfuse
from resnet_ablate.fusion import FuseReport, StaleForward
from resnet_ablate.blocks import BasicBlock as OurBasicBlock
from resnet_ablate.blocks import Bottleneck as OurBottleneck
from resnet_ablate.kernels import FusedBatchNorm2d, use_backend
from reference_models import (TimmBasicBlock, assert_same_training_step, TimmBottleneck, TimmSEModule, TVBasicBlock,
                              TVBottleneck, TVResNet, randomize, small_timm_resnet, small_tv_resnet)

# ---------------------------------------------------------------- fuse()


def _fused_in_silence(model: nn.Module) -> tuple[nn.Module, FuseReport]:
    """An untouched copy of `model` and the report of fusing it, which must warn of nothing."""
    reference = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FuseWarning)
        _, report = fuse(model, return_report=True)
    return reference, report


@pytest.mark.parametrize("block, layers", [(TVBasicBlock, (2, 1, 1, 1)), (TVBottleneck, (1, 2, 1, 1))])
def test_fuse_keeps_weights_outputs_gradients_and_running_stats(block, layers):
    model = small_tv_resnet(block, layers)
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
    model = fuse(small_tv_resnet(TVBottleneck))
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


def test_unrecognised_blocks_keep_their_residual_add_and_say_why():
    model = small_tv_resnet()
    model.layer2[0] = randomize(SqueezeExciteBlock(64, 128, 2, copy.deepcopy(model.layer2[0].downsample)))
    model.layer3[0] = randomize(PreActivationBlock(128, 256, 2, copy.deepcopy(model.layer3[0].downsample)))
    model.layer4[0].bn1 = nn.SyncBatchNorm(512)
    reference = copy.deepcopy(model).eval()
    left_alone = {name: model.get_submodule(name) for name in ("layer2.0", "layer3.0", "layer4.0")}
    with pytest.warns(FuseWarning, match="4 site") as caught:
        _, report = fuse(model, return_report=True)
    assert report.fused == ("layer1.0",)
    reasons = {s.name: s.reason for s in report.skipped}
    assert "se is Sequential: it rescales the last BN's output" in reasons["layer2.0"]
    assert "forward differs" in reasons["layer3.0"]
    assert "bn1 is SyncBatchNorm" in reasons["layer4.0"]
    assert "it is SyncBatchNorm, not nn.BatchNorm2d" in reasons["layer4.0.bn1"]
    assert "layer3.0" in str(caught[0].message)
    for name, module in left_alone.items():  # the same objects
        assert model.get_submodule(name) is module
    assert type(model.layer2[0].bn2) is nn.BatchNorm2d and type(model.layer4[0].bn1) is nn.SyncBatchNorm
    # the graph path fuses what is exact inside them: BN -> ReLU pairs, and layer4.0's add
    assert {(s.batch_norm, s.pattern) for s in report.sites} >= {
        ("layer2.0.bn1", "BN->ReLU"), ("layer3.0.bn1", "BN->ReLU"), ("layer4.0.bn2", "BN->add->ReLU")}
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.eval()(x), reference(x))


def test_fuse_strict_refuses_before_changing_anything():
    model = small_tv_resnet()
    model.layer3[0] = PreActivationBlock(128, 256, 2, model.layer3[0].downsample)
    before = {name: m for name, m in model.named_modules()}
    with pytest.raises(ValueError, match="layer3.0: its forward differs"):
        fuse(model, strict=True)
    assert {name: m for name, m in model.named_modules()} == before


def test_fuse_strict_on_a_model_that_cannot_be_copied_says_so_and_changes_nothing():
    """strict mode tries the fusion on a copy first: a model holding a lock (a client, a file)
    failed with deepcopy's TypeError, which named nothing of fuse's (an audit)."""
    import threading

    model = small_tv_resnet()
    model.lock = threading.Lock()
    before = {name: (m, type(m)) for name, m in model.named_modules()}
    with pytest.raises(TypeError, match=r"strict=True\) tries the fusion on a copy .* cannot be "
                                        r"copied \(TypeError: .*lock.*return_report=True"):
        fuse(model, strict=True)
    assert {name: (m, type(m)) for name, m in model.named_modules()} == before


class _DescribedBlock(TVBasicBlock):
    """torchvision's block with members of its own, which the model and its users call."""

    def describe(self) -> str:
        return f"stride {self.stride}"

    @property
    def out_channels(self) -> int:
        return self.conv2.out_channels


class _DescribedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.block = nn.Conv2d(3, 8, 3, padding=1), _DescribedBlock(8, 8)

    def forward(self, x):
        return self.block(self.stem(x)) / self.block.out_channels


def test_a_library_block_subclass_with_members_of_its_own_keeps_its_class_fused_in_its_forward():
    """Converted by its parts, such a block became this package's and lost its methods and
    properties: the model's forward failed after fusing (an audit). It is not converted; its
    own forward is rewritten in place, and it keeps its class and its members."""
    model = randomize(_DescribedNet())
    reference = copy.deepcopy(model)
    block = model.block
    _, report = fuse(model, return_report=True)
    assert report.fused == () and report.rewritten == ("block",)
    assert {s.batch_norm for s in report.sites} == {"block.bn1", "block.bn2"}
    assert model.block is block and isinstance(block, _DescribedBlock)
    assert block.describe() == "stride 1" and block.out_channels == 8
    assert_same_training_step(reference, model, torch.randn(2, 3, 8, 8))


def test_fuse_converts_this_packages_unfused_models_completely():
    torch.manual_seed(0)
    model = randomize(resnet8(fused=False))
    reference = copy.deepcopy(model).eval()
    fuse(model)
    assert model.arch.fused and model.fused
    assert all(type(m) is not nn.BatchNorm2d or "downsample" in name for name, m in model.named_modules())
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(model.eval()(x), reference(x))


def test_fused_torchvision_model_matches_through_the_triton_kernels():
    model = small_tv_resnet().eval()
    reference = copy.deepcopy(model)
    fuse(model)
    x = torch.randn(2, 3, 16, 16)
    with use_backend("triton"):
        out = model(x)
    torch.testing.assert_close(out, reference(x), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- timm's ResNets, and no ResNet


@pytest.mark.parametrize("block", [TimmBasicBlock, TimmBottleneck])
@pytest.mark.parametrize("variant", [{}, {"stem_type": "deep", "avg_down": True}],
                         ids=["resnet", "resnet-d"])
def test_fuse_converts_timm_blocks_with_the_same_outputs_and_gradients(block, variant):
    model = small_timm_resnet(block, **variant)
    reference = copy.deepcopy(model)
    _, report = fuse(model, return_report=True)
    assert report.fused == ("layer1.0", "layer2.0", "layer3.0", "layer4.0") and not report.skipped
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.eval()(x), reference.eval()(x), atol=1e-5, rtol=1e-5)
    model.train(), reference.train()
    model(x).square().sum().backward()
    reference(x).square().sum().backward()
    for (name, ours), theirs in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-4, rtol=1e-4, msg=name)


def _blocks_activations(model: nn.Module, block_types: tuple[type, ...]) -> list[tuple[nn.Module, str]]:
    """(block, attribute) of each activation a residual block holds: torchvision's one shared
    `relu`, timm's act1, act2 (act3)."""
    found = []
    for block in model.modules():
        if isinstance(block, block_types):
            found += [(block, name) for name in ("relu", "act1", "act2", "act3")
                      if isinstance(getattr(block, name, None), nn.Module)]
    return found


@pytest.mark.parametrize("make", [lambda: small_tv_resnet(TVBasicBlock, (2, 1, 1, 1)),
                                  lambda: small_tv_resnet(TVBottleneck),
                                  lambda: small_timm_resnet(TimmBasicBlock),
                                  lambda: small_timm_resnet(TimmBottleneck)],
                         ids=["torchvision basic", "torchvision bottleneck", "timm basic",
                              "timm bottleneck"])
def test_an_activation_swapped_or_a_batch_norm_hooked_after_fuse_acts_as_in_the_original(make):
    """An ablation on a fused model: each block's activations set to GELU on the original and
    on the fused copy alike. A converted block never called them, so the fused model kept its
    ReLUs, 0.27 apart, unsaid (an audit); a hook on a converted block's BN saw relu(BN + the
    shortcut). Both now compute as the original: the fused BN (and add) then the activation
    set; a hooked BN alone, its hook seeing its own output."""
    torch.manual_seed(0)
    reference = randomize(make())
    model = fuse(copy.deepcopy(reference))
    block_types = (TVBasicBlock, TVBottleneck, TimmBasicBlock, TimmBottleneck)
    swapped = _blocks_activations(reference, block_types)
    assert swapped and all(type(getattr(block, name)) is nn.ReLU for block, name in swapped)
    for block, name in swapped:
        setattr(block, name, nn.GELU())
    # The converted blocks hold no activation module until one is set, as here.
    fused_blocks = [m for m in model.modules() if isinstance(m, (OurBasicBlock, OurBottleneck))]
    names = {name for _, name in swapped}
    for block in fused_blocks:
        for name in names:
            setattr(block, name, nn.GELU())
    assert_same_training_step(reference, model, torch.randn(2, 3, 32, 32))
    seen = {}
    last = "bn3" if isinstance(fused_blocks[0], OurBottleneck) else "bn2"
    for tag, net in (("original", reference), ("fused", model)):
        getattr(net.layer1[0], last).register_forward_hook(
            lambda module, args, out, tag=tag: seen.__setitem__(tag, out.detach().clone()))
        net.eval()(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)))
    assert seen["original"].min() < 0  # a BN's own output, before the add and the activation
    torch.testing.assert_close(seen["fused"], seen["original"], atol=1e-5, rtol=1e-5)
    # Unfused again, the blocks keep the activations set (it put ReLUs back in their place).
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(unfuse(model).eval()(x), reference(x), atol=1e-5, rtol=1e-5)


def test_this_packages_fused_model_follows_an_activation_or_batch_norm_set_after_fusing():
    """The same ablations on this package's own fused ResNet, against its unfused twin: every
    ReLU (the stem's and the blocks') set to GELU, and one block's BN set to nn.Identity."""
    torch.manual_seed(0)
    reference = randomize(resnet8(num_classes=10, fused=False))
    model = resnet8(num_classes=10, fused=True)
    model.load_state_dict(reference.state_dict())
    for net in (reference, model):
        for module in [net, *(m for m in net.modules() if isinstance(m, (OurBasicBlock, OurBottleneck)))]:
            module.relu = nn.GELU()
        net.layer2[0].bn1 = nn.Identity()
    assert_same_training_step(reference, model, torch.randn(2, 3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(unfuse(model).eval()(x), reference(x), atol=1e-5, rtol=1e-5)
    assert type(model.relu) is nn.GELU and type(model.layer1[0].relu) is nn.GELU


def test_a_converted_block_answers_the_library_blocks_attributes_and_unfuse_gives_its_class_back():
    """A converted block lacked torchvision's `stride`, and `unfuse` gave this package's plain
    block back, not the library's class (code that looks for it missed every block)."""
    torch.manual_seed(0)
    model = small_tv_resnet()
    reference = copy.deepcopy(model).eval()
    fuse(model)
    assert isinstance(model.layer2[0], OurBasicBlock) and model.layer2[0].stride == 2
    model.layer1[0].note = "set while fused"
    for net in (model, reference):
        net.layer1[0].relu = nn.GELU()
    unfuse(model)
    assert [type(m) for m in model.modules()] == [type(m) for m in reference.modules()]
    assert type(model.layer2[0]) is TVBasicBlock and model.layer2[0].stride == 2
    assert model.layer1[0].note == "set while fused" and not hasattr(model.layer1[0], "fused")
    assert list(model.layer1[0]._modules) == list(reference.layer1[0]._modules)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.eval()(x), reference(x))


@pytest.mark.parametrize("options, reason", [
    ({"attn_layer": TimmSEModule}, "se is TimmSEModule: it rescales the last BN's output before "
                                   "the residual add"),
    ({"drop_path_rate": 0.1}, "drop_path is TimmDropPath: it drops the residual branch"),
], ids=["seresnet", "drop_path"])
def test_fuse_refuses_timm_blocks_it_cannot_fuse_exactly_and_says_why(options, reason):
    model = small_timm_resnet(TimmBottleneck, **options)
    with pytest.warns(FuseWarning, match="4 site"):
        _, report = fuse(model, return_report=True)
    assert not report.fused and all(reason in s.reason for s in report.skipped)
    assert all(type(block.bn3) is nn.BatchNorm2d for block in (model.layer1[0], model.layer4[0]))
    with pytest.raises(ValueError, match=reason):
        fuse(model, strict=True)


class ScaledBlock(TVBasicBlock):
    """A user's block with torchvision's parts and a value of its own, which its forward reads
    (1.0 while fuse probes it)."""

    def __init__(self, planes):
        super().__init__(planes, planes)
        self.res_scale = 1.0

    def forward(self, x):
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) * self.res_scale
                         + x)


class ClassScaledBlock(ScaledBlock):
    """The value held by its class."""

    res_scale = 1.0

    def __init__(self, planes):
        super().__init__(planes)
        del self.res_scale


@pytest.mark.parametrize("block", [ScaledBlock, ClassScaledBlock])
def test_a_block_with_torchvisions_parts_and_values_of_its_own_is_not_replaced(block):
    """Replaced by this package's block, it would lose the value and what the forward does with
    it: it is left to the graph path, which computes as the block does, or refuses once the value
    changed."""
    original = nn.Sequential(block(8)).eval()
    with pytest.warns(FuseWarning, match="it holds res_scale beside its parts"):
        fused = fuse(copy.deepcopy(original))
    assert isinstance(fused[0], block) and not isinstance(fused[0], OurBasicBlock)
    x = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(fused(x), original(x))
    # The value changed after fusing: the rewritten forward refuses rather than use the old one.
    original[0].res_scale = fused[0].res_scale = 0.1
    with pytest.raises(StaleForward, match="res_scale is 0.1, but resnet_ablate.fuse rewrote "
                                           "this forward when it was 1.0"):
        fused(x)


def test_fuse_says_so_when_a_model_has_nothing_to_fuse():
    no_batch_norm = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten())
    with pytest.warns(FuseWarning, match=r"fuse found no BatchNorm2d -> \[add\] -> ReLU in Sequential"):
        fuse(no_batch_norm)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fuse(resnet8())  # already fused: nothing to do, and nothing to warn about


# ---------------------------------------------------------------- any network: the graph path


class OwnNetwork(nn.Module):
    """A user's network with every way of writing the patterns: a Sequential stack, a functional
    ReLU, a method ReLU, `+=` into the BN output, `torch.add` with the BN second, a nested block."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.inner = nn.ModuleDict({"conv": nn.Conv2d(8, 8, 1), "bn": nn.BatchNorm2d(8)})
        self.bn_last = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.stem(x)
        y = self.bn(self.conv(x))
        y += x
        y = F.relu(y)
        z = torch.add(y, self.inner["bn"](self.inner["conv"](y))).relu()
        z = self.bn_last(z).relu_()
        return self.head(z.mean((2, 3)))


def test_fuse_finds_the_patterns_in_a_users_own_network_and_keeps_a_training_step_exact():
    torch.manual_seed(0)
    model = randomize(OwnNetwork())
    reference = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FuseWarning)
        fused, report = fuse(model, return_report=True)
    assert fused is model and isinstance(model, OwnNetwork)  # in place, the same object
    assert {(s.batch_norm, s.pattern) for s in report.sites} == {
        ("stem.1", "BN->ReLU"), ("bn", "BN->add->ReLU"), ("inner.bn", "BN->add->ReLU"), ("bn_last", "BN->ReLU")}
    assert set(report.rewritten) == {"", "stem"}
    assert all(isinstance(model.get_submodule(s.batch_norm), FusedBatchNorm2d) for s in report.sites)
    assert model.bn.weight is reference.bn.weight or model.bn.weight.data_ptr() != 0
    assert model.state_dict().keys() == reference.state_dict().keys()
    assert_same_training_step(reference, model, torch.randn(2, 3, 8, 8))

    assert unfuse(model) is model and type(model) is OwnNetwork and type(model.stem) is nn.Sequential
    assert not any(isinstance(m, FusedBatchNorm2d) for m in model.modules())
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(model.eval()(x), reference.eval()(x))


def test_fuse_keeps_the_same_tensors_so_an_existing_optimizer_still_trains_the_model():
    torch.manual_seed(0)
    model = randomize(OwnNetwork())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    bn_weight = model.bn.weight
    fuse(model)
    assert model.bn.weight is bn_weight
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    before = bn_weight.detach().clone()
    optimizer.step()
    assert not torch.equal(model.bn.weight, before)


class BranchesOnTraining(nn.Module):
    """Its BN is followed by a ReLU in training mode only: no one rewrite is exact in both (a
    forward whose branches keep the same sites is rewritten per mode: test_fuse_exactness)."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(x)
        return F.relu(y) if self.training else y * 2


class UsesTheBatchNormOutputTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return F.relu(y) + y


class BroadcastsTheBatchNormOutput(nn.Module):
    """bn(pooled) + x is larger than the BN output: the fused op adds a residual onto the BN's
    output as `out += residual` does, so this one cannot be fused."""

    def __init__(self):
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x).mean((2, 3), keepdim=True)) + x)


class CannotBeTraced(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.inner = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x):
        if x.sum() > 0:  # data-dependent: torch.fx cannot trace this forward
            x = -x
        return F.relu(self.bn(self.inner(x)))


@pytest.mark.parametrize("network, name, reason", [
    (BranchesOnTraining, "bn", "traces to different graphs in training and eval mode"),
    (UsesTheBatchNormOutputTwice, "bn", "its output is used 2 times, not only by a ReLU or an add"),
    (BroadcastsTheBatchNormOutput, "bn", "the rewritten forward failed on the probe input"),
    (CannotBeTraced, "bn", "that calls it cannot be traced exactly"),
], ids=["training-branch", "output-reused", "broadcast-bn-output", "untraceable"])
def test_fuse_refuses_by_name_what_it_cannot_fuse_exactly_and_changes_nothing_there(network, name, reason):
    torch.manual_seed(0)
    model = randomize(network())
    reference = copy.deepcopy(model)
    with pytest.warns(FuseWarning, match="unfused"):
        _, report = fuse(model, return_report=True, example_input=torch.randn(2, 4, 6, 6))
    assert any(s.name == name and reason in s.reason for s in report.skipped), report.skipped
    assert type(model.bn) is nn.BatchNorm2d and type(model) is network
    with pytest.raises(ValueError, match=reason):
        fuse(copy.deepcopy(reference), strict=True, example_input=torch.randn(2, 4, 6, 6))
    if network is CannotBeTraced:  # its children are searched on their own
        assert [s.batch_norm for s in report.sites] == ["inner.1"]
    x = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(model.eval()(x), reference.eval()(x))


class _AddsIntoItsInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()

    def forward(self, x):
        x += self.bn(self.conv(x))  # changes the caller's tensor
        return self.relu(x)


class ReadsWhatItsBlockChanged(nn.Module):
    """Calls `block` on its stem's output, then reads that tensor as the block left it."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.stem, self.block = nn.Conv2d(4, 4, 1), block

    def forward(self, x):
        a = self.stem(x)
        return self.block(a) + a  # a, as the block left it


def test_a_forward_that_adds_into_its_input_in_place_is_left_as_it_is():
    """`x += bn(...)` adds into the block's input, which its caller reads after: a fused add
    would leave the caller's tensor unchanged (1.1 off in the output). Left as it is, saying
    why."""
    torch.manual_seed(0)
    model = randomize(ReadsWhatItsBlockChanged(_AddsIntoItsInput())).eval()
    reference = copy.deepcopy(model)
    with pytest.warns(FuseWarning, match="unfused"):
        _, report = fuse(model, return_report=True, example_input=torch.randn(2, 4, 6, 6))
    assert report.sites == ()
    assert any(s.name == "block.bn" and "added into its residual's tensor in place" in s.reason
               for s in report.skipped), report.skipped
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))


class _StandardPartsAddingIntoItsInput(TVBasicBlock):
    """torchvision's BasicBlock (its parts and output), but the add goes into its input in place."""

    def __init__(self):
        super().__init__(4, 4)

    def forward(self, x):
        x += self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(x)


def test_a_standard_block_that_adds_into_its_input_is_not_converted():
    """Converted to this package's block (which leaves its input alone), its caller read another
    tensor; the probe's input after the call tells, on the block path as on the traced one."""
    torch.manual_seed(0)
    model = randomize(ReadsWhatItsBlockChanged(_StandardPartsAddingIntoItsInput())).eval()
    reference = copy.deepcopy(model)
    with pytest.warns(FuseWarning, match="block: its forward changes its input in place"):
        _, report = fuse(model, return_report=True, example_input=torch.randn(2, 4, 6, 6))
    assert report.fused == () and {s.batch_norm for s in report.sites} <= {"block.bn1"}
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))


class _MasksItsOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x, mask, empty):
        return F.relu(self.bn(self.conv(x))) * mask + empty.sum()


class PassesABoolMaskAndAnEmptyTensor(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = _MasksItsOutput()

    def forward(self, x, mask):
        return self.inner(x, mask, x.new_empty(0))


def test_arguments_that_are_not_floats_or_hold_nothing_do_not_stop_a_rewrite():
    """The in-place check compares a bool mask and an empty tensor exactly (its float
    comparison raised on them, refusing the rewrite as if it had failed)."""
    torch.manual_seed(0)
    model = randomize(PassesABoolMaskAndAnEmptyTensor())
    reference = copy.deepcopy(model)
    inputs = (torch.randn(2, 3, 6, 6), torch.rand(2, 4, 6, 6) > 0.5)
    _, report = fuse(model, return_report=True, example_input=inputs)
    assert [s.batch_norm for s in report.sites] == ["inner.bn"] and report.skipped == ()
    torch.testing.assert_close(model.eval()(*inputs), reference.eval()(*inputs))


class _TakesAShortcut(TVBasicBlock):
    """torchvision's BasicBlock, but its forward takes the shortcut too (as timm's DlaBasic)."""

    def __init__(self):
        super().__init__(4, 4)

    def forward(self, x, shortcut=None):
        shortcut = x if shortcut is None else shortcut
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + shortcut)


class PassesItsBlockAShortcut(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.block = nn.Conv2d(3, 4, 1), _TakesAShortcut()

    def forward(self, x):
        y = self.stem(x)
        return self.block(y, y * 2)


def test_a_block_whose_forward_takes_more_than_x_is_not_converted_to_the_standard_block():
    """Recognised by its parts, it was converted to a block that takes x alone, and every
    forward of the fused model failed; the graph path fuses its sites where they are exact, and
    then the block is not reported left (it was, with its two BatchNorms fused)."""
    torch.manual_seed(0)
    model = randomize(PassesItsBlockAShortcut())
    reference, report = _fused_in_silence(model)
    assert not isinstance(model.block, OurBasicBlock) and report.fused == ()
    assert {s.batch_norm for s in report.sites} == {"block.bn1", "block.bn2"}
    assert report.skipped == ()
    x, y = torch.randn(2, 3, 8, 8), torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(model.eval()(x), reference.eval()(x))
    # traced with the shortcut given: a call without it runs the block's own forward
    torch.testing.assert_close(model.block(y), reference.block(y))


class _ConvBatchNormReLU(nn.Module):
    def __init__(self, channels_in=3):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(channels_in, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class HoldsAScriptedModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = torch.jit.script(randomize(_ConvBatchNormReLU()))
        self.conv, self.bn = nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(self.inner(x))))


def test_a_scripted_or_traced_module_is_called_as_it_is_and_its_batch_norms_named():
    """TorchScript modules made every fuse fail (AttributeError from the scripted forward); their
    forwards are compiled, so they stay calls, and the BatchNorms inside are named."""
    torch.manual_seed(0)
    model = randomize(HoldsAScriptedModule())
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 10, 10)
    with pytest.warns(FuseWarning, match="inner.bn: inside inner, a TorchScript module"):
        _, report = fuse(model, return_report=True, example_input=x)
    assert [s.batch_norm for s in report.sites] == ["bn"]
    torch.testing.assert_close(model.eval()(x), reference.eval()(x))
    scripted = torch.jit.trace(randomize(_ConvBatchNormReLU()).eval(), x)
    with pytest.warns(FuseWarning, match="bn: inside <model>, a TorchScript module"):
        fuse(scripted)


def test_a_rewritten_model_deep_copies_but_refuses_whole_module_pickling_with_the_way_out():
    model = fuse(randomize(OwnNetwork()))
    duplicate = copy.deepcopy(model)
    assert type(duplicate) is type(model) and duplicate.bn is not model.bn
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(duplicate.eval()(x), model.eval()(x))
    with pytest.raises(TypeError, match=r"save its state_dict\(\), or call resnet_ablate.unfuse"):
        pickle.dumps(model)
    pickle.dumps(unfuse(model))


def _randomized_statistics(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1), module.running_var.uniform_(0.5, 2)
    return model


@pytest.mark.parametrize("build", ["the package's resnet8", "fused torchvision resnet",
                                   "a rewritten forward"])
def test_a_batch_norm_rebuilt_by_convert_sync_batchnorm_keeps_its_add_and_relu(build):
    """PyTorch's convert_sync_batchnorm rebuilds every BatchNorm from its class, the fused one
    too, keeping the normalisation alone (an audit): the package's blocks and stem, and a
    forward `fuse` rewrote, apply the add and ReLU themselves once their BN is replaced."""
    torch.manual_seed(0)
    model = {"the package's resnet8": lambda: resnet8(),
             "fused torchvision resnet": lambda: fuse(small_tv_resnet()),
             "a rewritten forward": lambda: fuse(randomize(OwnNetwork()))}[build]()
    model = _randomized_statistics(model).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
        assert any(isinstance(m, FusedBatchNorm2d) for m in model.modules())
        converted = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model)).eval()
        assert not any(isinstance(m, FusedBatchNorm2d) for m in converted.modules())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FuseWarning)  # a rewritten forward says it runs unfused
            torch.testing.assert_close(converted(x), expected)


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
    tv = randomize(tv_model()).eval()
    model = ours(shortcut="B", fused=fused)
    tv_state = tv.state_dict()
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in tv_state.items()}
    model.load_state_dict(tv_state, strict=True)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(model.eval()(x), tv(x), atol=1e-4, rtol=1e-4)


def test_paper_v1_bottleneck_warns_when_it_loads_torchvision_weights_which_compute_another_net():
    tv = randomize(TVResNet(TVBottleneck, [3, 4, 6, 3])).eval()
    v1 = resnet50(downsampling="v1")
    with pytest.warns(DownsamplingWarning, match="Build it with downsampling='v1.5'"):
        v1.load_state_dict(tv.state_dict(), strict=True)  # same shapes: only the strides move
    x = torch.randn(1, 3, 64, 64)
    assert not torch.allclose(v1.eval()(x), tv(x), atol=1e-3)


def test_the_toolkits_checkpoints_warn_when_loaded_into_the_other_stride_placement():
    v1, v15 = resnet50(downsampling="v1"), resnet50(downsampling="v1.5")
    with pytest.warns(DownsamplingWarning, match="weights of a v1.5 net .* Build it with downsampling='v1.5'"):
        resnet50(downsampling="v1").load_state_dict(v15.state_dict())
    with pytest.warns(DownsamplingWarning, match="this toolkit's v1 net .* Build it with downsampling='v1'"):
        resnet50(downsampling="v1.5").load_state_dict(v1.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resnet50(downsampling="v1.5").load_state_dict(v15.state_dict())
        resnet18().load_state_dict(resnet18().state_dict())


def test_the_toolkits_own_v1_checkpoints_load_without_a_warning(tmp_path):
    source = resnet50(downsampling="v1")
    torch.save(source.state_dict(), tmp_path / "v1.pt")  # the metadata travels with the file
    state = torch.load(tmp_path / "v1.pt", weights_only=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resnet50(downsampling="v1").load_state_dict(state)
        resnet50(downsampling="v1.5").load_state_dict(randomize(TVResNet(TVBottleneck, [3, 4, 6, 3])).state_dict())


def _strip_module_prefix(state):
    return {key.removeprefix("module."): value for key, value in state.items()}


@pytest.mark.parametrize("manipulation", [
    dict,
    lambda state: _strip_module_prefix({f"module.{k}": v for k, v in state.items()}),  # DataParallel's
    lambda state: {k: v.detach().clone().contiguous() for k, v in state.items()},  # what safetensors keeps
], ids=["dict()", "module. prefix stripped", "tensors only (safetensors)"])
def test_the_stride_placement_survives_the_usual_manipulations_of_a_state_dict(manipulation):
    v1_state = manipulation(resnet50(downsampling="v1").state_dict())
    assert not hasattr(v1_state, "_metadata")  # the metadata is gone; the placement is not
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resnet50(downsampling="v1").load_state_dict(v1_state, strict=True)  # no false warning
    with pytest.warns(DownsamplingWarning, match="this toolkit's v1 net .* Build it with downsampling='v1'"):
        resnet50(downsampling="v1.5").load_state_dict(v1_state)  # never silently another network
    v15_state = manipulation(resnet50(downsampling="v1.5").state_dict())
    with pytest.warns(DownsamplingWarning, match="a v1.5 net"):
        resnet50(downsampling="v1").load_state_dict(v15_state)
    assert set(v15_state) == set(TVResNet(TVBottleneck, [3, 4, 6, 3]).state_dict())  # torchvision's keys


@pytest.mark.parametrize("given, hint", [
    (None, ""), (lambda x: x, ""),
    (resnet8(num_classes=10, fused=False).state_dict(),
     ": a state_dict holds only tensors; load it into its model and pass that"),
], ids=["None", "a function", "a state_dict"])
def test_fuse_and_unfuse_of_what_is_no_model_is_one_clear_error(given, hint):
    """fuse(None), fuse(model.state_dict()) raised AttributeError from deep inside the package
    ('... has no attribute named_modules'; an audit)."""
    for function in (fuse, unfuse):
        with pytest.raises(TypeError) as raised:
            function(given)
        assert str(raised.value) == (f"{function.__name__} takes a model (an nn.Module), not "
                                     f"{type(given).__name__}{hint}")


class _OptionalSkip(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU()

    def forward(self, x, skip=None):
        out = self.bn(self.conv(x))
        if skip is not None:
            out = out + skip
        return self.relu(out)


class _CallsItsBlockPlainly(nn.Module):
    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block(x)


def test_a_forward_whose_optional_argument_was_left_at_its_default_is_fused_as_called(monkeypatch):
    """A trace took `skip` as given, so `skip is not None` held in it and the site was left (an
    audit: timm's dla34 left 20 so). The forward is now traced with skip=None, as the probe
    called it; a call that passes a skip runs the module's own forward."""
    torch.manual_seed(0)
    model = randomize(_CallsItsBlockPlainly(_OptionalSkip()))
    reference, report = _fused_in_silence(model)
    assert [(s.batch_norm, s.pattern) for s in report.sites] == [("block.bn", "BN->ReLU")]
    assert report.skipped == ()
    own_forward_calls = []  # of the fused block (the reference's are its own too)
    original = _OptionalSkip.forward
    monkeypatch.setattr(_OptionalSkip, "forward", lambda self, *a, **k: (
        self is model.block and own_forward_calls.append(k), original(self, *a, **k))[1])
    x, skip = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    for training in (True, False):
        model.train(training), reference.train(training)
        torch.testing.assert_close(model(x), reference(x))
        torch.testing.assert_close(model.block(x, skip=None), reference.block(x, skip=None))
        assert own_forward_calls == []  # the rewritten forward ran, by position and by keyword
        torch.testing.assert_close(model.block(x, skip), reference.block(x, skip))
        torch.testing.assert_close(model.block(x, skip=skip), reference.block(x, skip=skip))
        assert len(own_forward_calls) == 2 and model.block.bn.running_mean.equal(
            reference.block.bn.running_mean)
        own_forward_calls.clear()


class _ReturnsItsPreActivation(_OptionalSkip):
    def forward(self, x, return_pre: bool = False, scale=1.0):
        pre = self.bn(self.conv(x)) * scale if scale != 1.0 else self.bn(self.conv(x))
        if return_pre:
            return self.relu(pre), pre
        return self.relu(pre)


class _Mode(enum.Enum):
    PLAIN = 1
    RESIDUAL = 2


class _TakesAModeOrAList(_OptionalSkip):
    def forward(self, x, mode=_Mode.PLAIN, skip=None, size=(8, 8)):
        if isinstance(skip, (list, tuple)):
            skip = skip[0] * 0.5
        out = self.bn(self.conv(x))
        if mode is _Mode.RESIDUAL:
            out = out + x
        return F.adaptive_avg_pool2d(self.relu(out if skip is None else out + skip), size)


class _CallsItWithASkip(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = _TakesAModeOrAList()

    def forward(self, x):
        return self.block(x, skip=x)


def test_an_enum_or_a_container_where_the_probe_saw_another_runs_the_modules_own_forward():
    """An Enum argument was traced as a tensor stand-in, its `is` test decided while tracing:
    the other member gave the probe's branch, 3.45 off, silently; a list where the probe passed
    a tensor failed inside the rewritten forward (an audit). Every argument the probe passed as
    anything but a tensor or a container is now fixed and checked, and a tensor's or a
    container's type too (a tuple of another size runs the rewritten forward)."""
    torch.manual_seed(0)
    model = randomize(_CallsItWithASkip())
    reference, report = _fused_in_silence(model)
    assert [s.batch_norm for s in report.sites] == ["block.bn"]
    x = torch.randn(2, 4, 8, 8)
    for training in (True, False):
        model.train(training), reference.train(training)
        for args, kwargs in [((x,), {}), ((x, _Mode.RESIDUAL), {"skip": x}),
                             ((x,), {"mode": _Mode.RESIDUAL}), ((x,), {"skip": [x]}),
                             ((x, _Mode.PLAIN, (x, x)), {}), ((x,), {"size": (4, 4)})]:
            torch.testing.assert_close(model.block(*args, **kwargs),
                                       reference.block(*args, **kwargs))


def test_a_forward_that_branches_on_a_flag_is_fused_as_its_caller_sets_it():
    """A branch on a flag fails to trace with the flag as a tensor stand-in (the site was left,
    `cannot be traced exactly`): such a forward is searched with its plain defaults fixed and
    rewritten as the probe called it; a call with another value of either runs its own forward."""
    torch.manual_seed(0)
    model = randomize(_CallsItsBlockPlainly(_ReturnsItsPreActivation()))
    reference, report = _fused_in_silence(model)
    assert [s.batch_norm for s in report.sites] == ["block.bn"] and report.skipped == ()
    x = torch.randn(2, 4, 8, 8)
    for training in (True, False):
        model.train(training), reference.train(training)
        torch.testing.assert_close(model(x), reference(x))
        for options in ({"return_pre": True}, {"scale": 2.0}, {"scale": 1}, {"return_pre": 0}):
            torch.testing.assert_close(model.block(x, **options), reference.block(x, **options))
        torch.testing.assert_close(model.block(x, False, 1.0), reference.block(x, False, 1.0))
        torch.testing.assert_close(model.block(x, True), reference.block(x, True))


def test_lazy_modules_not_yet_run_and_flags_that_are_no_bools_are_refused_before_any_change():
    """fuse()'s probe batch made a LazyConv2d of 0 input channels (1 site reported fused, and
    the model then failed on every real batch), and strict="no" was taken as strict (an
    audit): each is one error, the model unchanged; run once, a lazy model fuses."""
    model = nn.Sequential(nn.LazyConv2d(4, 3), nn.BatchNorm2d(4), nn.ReLU())
    with pytest.raises(ValueError, match=r"fuse: 0 are lazy modules whose shapes are not known "
                                         r"yet: run one real batch through the model first"):
        fuse(model)
    assert type(model[0]) is nn.LazyConv2d and type(model[1]) is nn.BatchNorm2d
    for flag in ("strict", "return_report"):
        with pytest.raises(TypeError, match=rf"fuse\(\): argument '{flag}' must be bool, not str"):
            fuse(model, **{flag: "no"})
    x = torch.randn(2, 1, 8, 8)
    model(x)  # its shapes known
    reference = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FuseWarning)
        fuse(model, example_input=x)
    torch.testing.assert_close(model.eval()(x), reference.eval()(x))



def test_a_probe_that_fails_says_to_pass_an_example_input_or_to_check_the_one_given():
    """The message ended "pass example_input" where one was given, and wrong (an audit)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 2))  # 8x8 inputs only: the default probe fails
    for example, fix in ((None, "; pass example_input"),
                         (torch.randn(2, 5, 8, 8), "; check example_input (the batch, or a tuple")):
        with pytest.warns(FuseWarning, match=r"failed on a probe input .*" + re.escape(fix)):
            fuse(copy.deepcopy(model), example_input=example)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FuseWarning)
        fuse(model, example_input=torch.randn(2, 3, 8, 8))
