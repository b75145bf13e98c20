"""`fuse` on torchvision's and timm's own model code (read from their wheels; see
reference_models.real_libraries for how torchvision's model files load without its C extension),
small configurations of the real classes at 32x32, batch 2: every BatchNorm -> [add] -> ReLU site
fused, the count checked against the architecture's own rule, and one training step giving the
same outputs, gradients and running statistics as the untouched model; `unfuse` restores the
library's own classes."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from real_libraries import LibrariesAbsent, real_libraries
from reference_models import assert_same_training_step
from resnet_ablate import FuseWarning, from_torchvision, fuse, unfuse
from resnet_ablate.kernels import FusedBatchNorm2d


@pytest.fixture(scope="module")
def libs():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small convs: one thread is quicker than two on a shared machine
    try:
        with real_libraries() as libraries:
            yield libraries
    except LibrariesAbsent as absent:
        pytest.skip(f"torchvision's and timm's code is not here: {absent}")
    finally:
        torch.set_num_threads(threads)


def _batch_norms(model: nn.Module, *, not_under: tuple[str, ...] = ()) -> int:
    return sum(type(m) is nn.BatchNorm2d and not any(part in name.split(".") for part in not_under)
               for name, m in model.named_modules())


# Each: the real model, small, and the number of sites by the architecture's own rule.
def _vgg(libs):
    vgg = libs.torchvision["vgg"]
    model = vgg.VGG(vgg.make_layers([16, "M", 32, "M", 512], batch_norm=True), num_classes=10)
    # its 120M-parameter head holds no BN; a small one (dropout kept) keeps the test quick
    model.classifier = nn.Sequential(nn.Dropout(), nn.Linear(512 * 7 * 7, 10))
    # every conv is followed by BN -> ReLU
    return model, _batch_norms(model)


def _densenet(libs):
    model = libs.torchvision["densenet"].DenseNet(growth_rate=8, block_config=(2, 2, 2, 2),
                                                   num_init_features=16, bn_size=2, num_classes=10)
    # every BN feeds a ReLU: norm1/norm2 of each layer, each transition's, norm0, and norm5 whose
    # ReLU is a function call in DenseNet.forward
    return model, _batch_norms(model)


def _regnet(libs, se_ratio):
    regnet = libs.torchvision["regnet"]
    params = regnet.BlockParams.from_init_params(depth=4, w_0=16, w_a=8.0, w_m=2.0, group_width=8,
                                                 se_ratio=se_ratio)
    model = regnet.RegNet(params, num_classes=10)
    # stem, a, b: BN -> ReLU; c: BN -> add -> ReLU, the add taken by c so the shortcut's BN (proj) stays
    return model, _batch_norms(model, not_under=("proj",))


def _resnet(libs, block, **options):
    resnet = libs.torchvision["resnet"]
    model = resnet.ResNet(getattr(resnet, block), [1, 2, 1, 1], num_classes=10, **options)
    return model, _batch_norms(model, not_under=("downsample",))


def _timm(libs, name, **options):
    timm_resnet = libs.timm.models.resnet
    model = timm_resnet.ResNet(timm_resnet.Bottleneck if "bottleneck" in name else timm_resnet.BasicBlock,
                               [1, 1, 1, 1], num_classes=10, **options)
    if "se" in options.get("block_args", {}).get("attn_layer", ""):
        # the SE rescale sits between bn3 and the add: bn1, bn2 -> ReLU fuse; the add is fused with
        # the shortcut's BN where the block has one (4 of 4 first blocks here); bn3 stays
        return model, 1 + 2 * 4 + 4
    return model, _batch_norms(model, not_under=("downsample",))


MODELS = {
    "torchvision vgg-bn": _vgg,
    "torchvision densenet": _densenet,
    "torchvision regnet-x": lambda libs: _regnet(libs, None),
    "torchvision regnet-y (SE)": lambda libs: _regnet(libs, 0.25),
    "torchvision resnet": lambda libs: _resnet(libs, "BasicBlock"),
    "torchvision resnext": lambda libs: _resnet(libs, "Bottleneck", groups=8, width_per_group=4),
    "torchvision wide resnet": lambda libs: _resnet(libs, "Bottleneck", width_per_group=128),
    "timm resnet": lambda libs: _timm(libs, "basic"),
    "timm resnet-d": lambda libs: _timm(libs, "bottleneck", stem_type="deep", avg_down=True),
    "timm seresnet": lambda libs: _timm(libs, "bottleneck", block_args={"attn_layer": "se"}),
}


@pytest.mark.parametrize("name", MODELS)
def test_fuse_on_the_libraries_own_models_keeps_one_training_step_exact(libs, name):
    torch.manual_seed(0)
    model, expected_sites = MODELS[name](libs)
    reference = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FuseWarning)  # seresnet's refusals are checked below
        fused, report = fuse(model, return_report=True)
    assert fused is model and report.count() == expected_sites
    assert sum(isinstance(m, FusedBatchNorm2d) for m in model.modules()) == expected_sites
    assert model.state_dict().keys() == reference.state_dict().keys()
    assert_same_training_step(reference, model, torch.randn(2, 3, 32, 32))

    unfuse(model)
    assert not any(isinstance(m, FusedBatchNorm2d) for m in model.modules())
    # The library's own classes, names and attributes back (its blocks came back as this
    # package's plain blocks: code that looks for torchvision's BasicBlock missed them).
    assert [(n, type(m)) for n, m in model.named_modules()] == \
        [(n, type(m)) for n, m in reference.named_modules()]
    def attributes(module):
        return {k: v for k, v in vars(module).items()
                if k != "training" and not isinstance(v, (dict, set))}

    assert all(attributes(mine) == attributes(theirs)
               for mine, theirs in zip(model.modules(), reference.modules()))
    assert model.state_dict().keys() == reference.state_dict().keys()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.eval()(x), reference.eval()(x))


class _AuxiliaryLossesSummed(nn.Module):
    """GoogLeNet as a training loop uses it: in training mode its auxiliary heads' logits are
    weighted into the main ones (the paper's 0.3), in eval mode the logits alone."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        out = self.net(x)
        return out.logits + 0.3 * (out.aux_logits1 + out.aux_logits2) if self.training else out


def test_googlenets_auxiliary_heads_that_run_in_training_only_are_fused(libs):
    """The probe runs the model in eval mode, where GoogLeNet never calls its auxiliary heads:
    their BN -> ReLU sites were left as "never reached" (an audit). Each head is probed on a
    copy in training mode and checked as any site: every BN fuses, a training step exact."""
    torch.manual_seed(0)
    net = libs.torchvision["googlenet"].GoogLeNet(num_classes=10, aux_logits=True,
                                                  init_weights=True)
    model = _AuxiliaryLossesSummed(net)
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FuseWarning)
        _, report = fuse(model, return_report=True, example_input=x)
    heads = {s.batch_norm for s in report.sites if s.batch_norm.startswith(("net.aux1.", "net.aux2."))}
    assert heads == {"net.aux1.conv.bn", "net.aux2.conv.bn"}
    assert len(report.sites) == _batch_norms(reference) and report.skipped == ()
    assert_same_training_step(reference, model, x)


def test_seresnet_refuses_its_se_add_by_name_and_fuses_the_rest(libs):
    model, _ = _timm(libs, "bottleneck", block_args={"attn_layer": "se"})
    with pytest.warns(FuseWarning, match=r"layer1\.0: se is SEModule: it rescales the last BN's output"):
        _, report = fuse(model, return_report=True)
    assert [s.name for s in report.skipped] == ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]
    assert type(model.layer1[0].bn3) is nn.BatchNorm2d
    assert {s.batch_norm for s in report.sites} >= {"bn1", "layer1.0.bn1", "layer1.0.bn2", "layer1.0.downsample.1"}


def test_timm_drop_path_blocks_fuse_exactly_around_the_dropped_branch(libs):
    torch.manual_seed(0)
    timm_resnet = libs.timm.models.resnet
    model = timm_resnet.ResNet(timm_resnet.Bottleneck, [1, 1, 1, 1], num_classes=10, drop_path_rate=0.2)
    reference = copy.deepcopy(model)
    with pytest.warns(FuseWarning, match="drop_path is DropPath: it drops the residual branch"):
        _, report = fuse(model, return_report=True)
    # drop_path grows from 0 in the first block (an Identity there: the whole block converts) to
    # 0.2; in the others bn3 -> drop_path -> add stays, and the add is fused with the shortcut's
    # BN instead, the dropped branch as its residual
    assert report.fused == ("layer1.0",)
    assert [s.name for s in report.skipped] == ["layer2.0", "layer3.0", "layer4.0"]
    assert report.count("BN->ReLU") == 1 + 2 * 4 and report.count("BN->add->ReLU") == 4
    assert {s.batch_norm for s in report.sites} >= {"layer2.0.downsample.1", "layer4.0.downsample.1"}
    assert type(model.layer2[0].bn3) is nn.BatchNorm2d
    assert_same_training_step(reference, model, torch.randn(2, 3, 32, 32))


def test_timm_dla_trees_fuse_every_site_their_blocks_are_called_with(libs):
    """timm's DlaBasic takes `shortcut=None` beside x, and its trees call it with the shortcut
    and without: traced with it given, dla34 left 20 sites (an audit). Each block is now traced
    as its caller calls it. Where a block's add takes a projection's BN output, that BN takes the
    add and ReLU, and the block's bn2 stays as it was (the report names it, not as left)."""
    torch.manual_seed(0)
    dla = libs.timm.models.dla
    model = dla.DLA(levels=(1, 1, 1, 2, 2, 1), channels=(8, 8, 16, 16, 32, 32), block=dla.DlaBasic,
                    num_classes=10)
    reference = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FuseWarning)
        _, report = fuse(model, return_report=True)
    assert report.skipped == ()
    joined = {s.residual_batch_norm for s in report.sites} - {None}
    plain = {name for name, m in model.named_modules() if type(m) is nn.BatchNorm2d}
    assert plain == joined and all(name.endswith(".bn2") for name in joined)
    assert report.count() == _batch_norms(reference) - len(plain)
    assert_same_training_step(reference, model, torch.randn(2, 3, 32, 32))
    with warnings.catch_warnings():  # fused again: nothing left, nothing to say (an audit: the
        warnings.simplefilter("error", FuseWarning)  # four trees' blocks were reported left)
        _, again = fuse(model, return_report=True)
    assert again.skipped == () and again.sites == ()


def _timm_norm_act_models(libs):
    timm = libs.timm.models
    norm_act = libs.timm.layers.BatchNormAct2d
    return {
        # BN-ReLU-conv layers, every one a BatchNormAct2d with a ReLU
        "timm densenet": timm.densenet.DenseNet(growth_rate=8, block_config=(2, 2), bn_size=2,
                                               num_classes=10),
        # pre-activation bottlenecks with BatchNorm (the BiT models take GroupNorm)
        "timm resnetv2": timm.resnetv2.ResNetV2(layers=[1, 1], channels=(16, 32), stem_chs=8,
                                               norm_layer=norm_act,
                                               num_classes=10),
        # the residual branch's last BN (act an Identity) takes the add and the block's ReLU
        "timm regnet": timm.regnet.RegNet(timm.regnet.RegNetCfg(depth=6, w0=8, wa=8.0, wm=1.5,
                                                                group_size=8, stem_width=8),
                                          num_classes=10, zero_init_last=False),
    }


@pytest.mark.parametrize("name", ["timm densenet", "timm resnetv2", "timm regnet"])
def test_timm_norm_activation_layers_fuse_in_place_and_keep_a_training_step_exact(libs, name):
    """timm's BatchNormAct2d (a BatchNorm2d whose forward applies its own `act`) was refused as
    a subclass: its DenseNet, RegNet, ResNetV2, VoVNet and DPN fused none of them. Each with a
    ReLU is now fused in place, and one without (an Identity act) followed by an add and a ReLU
    takes them as an nn.BatchNorm2d would (RegNet's: the shortcut's BN stays, its add taken by
    the branch's): still a BatchNormAct2d, its state_dict as it was."""
    torch.manual_seed(0)
    model = _timm_norm_act_models(libs)[name]
    norm_act = libs.timm.layers.BatchNormAct2d
    norm_acts = {n for n, m in model.named_modules() if type(m) is norm_act}
    with_relu = {n for n in norm_acts if type(model.get_submodule(n).act) is nn.ReLU}
    reference = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FuseWarning)
        _, report = fuse(model, return_report=True)
    fused = {s.batch_norm for s in report.sites}
    assert with_relu and with_relu <= fused and report.skipped == ()
    shortcuts = {n for n in norm_acts if ".downsample." in n}  # (RegNet's)
    assert norm_acts - fused == shortcuts
    blocks = [n for n in norm_acts if n.endswith(".conv3.bn")]  # (RegNet's, each with its add)
    assert report.count("BN->add->ReLU") == len(blocks) == (6 if name == "timm regnet" else 0)
    assert all(isinstance(model.get_submodule(n), norm_act) for n in norm_acts)
    assert model.state_dict().keys() == reference.state_dict().keys()
    assert_same_training_step(reference, model, torch.randn(2, 3, 32, 32))
    unfuse(model)
    assert all(type(model.get_submodule(n)) is norm_act for n in norm_acts)


def test_a_fused_norm_activation_runs_its_own_forward_where_its_activation_changed(libs):
    """An activation swapped or hooked after `fuse`, and a torch.fx trace: the module's own
    forward runs (exact); a DropBlock between the BN and its ReLU is left, with the reason."""
    torch.manual_seed(0)
    layers = libs.timm.layers
    net = nn.Sequential(nn.Conv2d(3, 8, 3), layers.BatchNormAct2d(8), nn.Conv2d(8, 8, 3),
                        layers.BatchNormAct2d(8, drop_layer=lambda: layers.DropBlock2d(0.5, 3)))
    reference = copy.deepcopy(net).eval()
    with pytest.warns(FuseWarning, match="3: its drop is DropBlock2d, between the BN and its ReLU"):
        fuse(net)
    assert type(net[1]).__name__ == "FusedBatchNormAct2d" and type(net[3]) is layers.BatchNormAct2d
    net.eval()
    x = torch.randn(2, 3, 12, 12)
    torch.testing.assert_close(net(x), reference(x))
    traced = torch.fx.symbolic_trace(net)  # records the module's own ops
    assert "batch_norm" in traced.code
    torch.testing.assert_close(traced(x), reference(x))
    seen = []
    net[1].act.register_forward_hook(lambda *_: seen.append(1))
    torch.testing.assert_close(net(x), reference(x))
    assert seen == [1]
    net[1].act = nn.GELU()
    reference[1].act = nn.GELU()
    torch.testing.assert_close(net(x), reference(x))


class _AddsToANormAct(nn.Module):
    def __init__(self, norm_act: type[nn.Module]):
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(8, 8, 3, padding=1), norm_act(8, apply_act=False), nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)) + x)


class _StemUsedTwice(nn.Module):
    """TResNet's stem: a norm-activation's output taken by a block's add and ReLU, and by its
    shortcut."""

    def __init__(self, norm_act: nn.Module):
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(8, 8, 3, padding=1), norm_act, nn.ReLU()
        self.branch = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return self.relu(self.branch(y) + y) + y


@pytest.mark.parametrize("shape", ["added", "used twice"])
@pytest.mark.parametrize("act", [nn.LeakyReLU, nn.SiLU, nn.ReLU6])
def test_a_norm_activation_with_its_own_activation_before_an_add_is_no_site(libs, act, shape):
    """Its output is activated before the add and the ReLU see it: no BN -> add -> ReLU site.
    It was named as a site left unfused ("it is BatchNormAct2d, not nn.BatchNorm2d", or in
    TResNet's stem "its output is used 2 times"), where one without an activation fuses (an
    audit)."""
    torch.manual_seed(0)
    norm_act = libs.timm.layers.BatchNormAct2d(8, act_layer=act)
    if shape == "added":
        net = _AddsToANormAct(libs.timm.layers.BatchNormAct2d)
        net.bn = norm_act
    else:
        net = _StemUsedTwice(norm_act)
    reference = copy.deepcopy(net)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FuseWarning)
        _, report = fuse(net, return_report=True)
    assert report.sites == () and report.skipped == ()
    assert [str(w.message) for w in caught] == [
        f"fuse found no BatchNorm2d -> [add] -> ReLU in {type(net).__name__}: nothing changed"]
    assert_same_training_step(reference, net, torch.randn(2, 8, 6, 6))


def test_a_norm_activation_fused_with_its_add_follows_what_is_set_on_it_later(libs):
    """A norm-activation without an activation, fused with the add and ReLU after it: given an
    activation after `fuse`, it applies it before the add, as its own forward does."""
    torch.manual_seed(0)
    net = _AddsToANormAct(libs.timm.layers.BatchNormAct2d)
    reference = copy.deepcopy(net).eval()
    _, report = fuse(net, return_report=True)
    assert [(s.batch_norm, s.pattern) for s in report.sites] == [("bn", "BN->add->ReLU")]
    net.eval()
    x = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(net(x), reference(x))
    for module in (net, reference):
        module.bn.act = nn.Hardtanh(-0.5, 0.5)
    torch.testing.assert_close(net(x), reference(x))
    unfuse(net)
    assert type(net.bn) is libs.timm.layers.BatchNormAct2d and type(net) is _AddsToANormAct


def test_a_fused_regnet_traced_by_torch_fx_keeps_its_norm_activations_mode_as_unfused(libs):
    """A user's torch.fx trace bakes a norm-activation's mode in, as it traces into it; the
    fused one whose add was fused ran inside one opaque call, in the mode the graph ran in:
    traced in eval, run in training, it updated running statistics the unfused trace keeps
    (an audit). It is traced into as the unfused module is."""
    torch.manual_seed(0)
    model = _timm_norm_act_models(libs)["timm regnet"]
    for module in model.modules():  # (timm zeroes the last BN's weight: differences would hide)
        if isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.weight, 0.5, 1.5)
    reference = copy.deepcopy(model)
    fuse(model)
    x = torch.randn(2, 3, 32, 32)
    for traced_in, run_in in ((False, True), (True, False)):
        graphs = [torch.fx.symbolic_trace(copy.deepcopy(m).train(traced_in)).train(run_in)
                  for m in (reference, model)]
        outputs = [graph(x) for graph in graphs]
        torch.testing.assert_close(outputs[1], outputs[0])
        for output in outputs:
            output.square().mean().backward()
        for (name, a), b in zip(graphs[0].named_parameters(), graphs[1].parameters()):
            torch.testing.assert_close(b.grad, a.grad, msg=name)
        for (name, a), b in zip(graphs[0].named_buffers(), graphs[1].buffers()):
            torch.testing.assert_close(b, a, msg=name)


def test_unfuse_keeps_a_parametrization_registered_on_a_fused_norm_activation(libs):
    """Parametrized after `fuse`, a norm-activation's class is torch's subclass of the fused
    one; `unfuse` set the bare BatchNormAct2d and its `weight` was gone (an audit)."""
    torch.manual_seed(0)
    layers = libs.timm.layers
    net = nn.Sequential(nn.Conv2d(3, 8, 3), layers.BatchNormAct2d(8))
    reference = copy.deepcopy(net).eval()
    fuse(net)

    class Doubled(nn.Module):
        def forward(self, weight):
            return 2 * weight

    for module in (net, reference):
        torch.nn.utils.parametrize.register_parametrization(module[1], "weight", Doubled())
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(net.eval()(x), reference(x))
    unfuse(net)
    assert type(net[1]).__name__ == "ParametrizedBatchNormAct2d"
    assert isinstance(net[1], layers.BatchNormAct2d)
    torch.testing.assert_close(net(x), reference(x))


# ---------------------------------------------------------------- from_torchvision on the real code


def test_from_torchvision_converts_the_libraries_plain_resnets_exactly(libs):
    resnet, timm_resnet = libs.torchvision["resnet"], libs.timm.models.resnet
    for model in (resnet.ResNet(resnet.Bottleneck, [1, 1, 1, 1], num_classes=10, width_per_group=128),
                  timm_resnet.ResNet(timm_resnet.BasicBlock, [1, 1, 1, 1], num_classes=10)):
        model.eval()
        ours = from_torchvision(model)
        x = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(ours(x), model(x), atol=1e-5, rtol=1e-5)


def _refused(libs, kind):
    resnet, timm_resnet = libs.torchvision["resnet"], libs.timm.models.resnet
    timm_bottleneck = lambda **options: timm_resnet.ResNet(timm_resnet.Bottleneck, [1, 1, 1, 1],  # noqa: E731
                                                           num_classes=10, **options)
    return {
        "resnext": lambda: resnet.ResNet(resnet.Bottleneck, [1, 1, 1, 1], groups=8, width_per_group=4),
        "dilated": lambda: resnet.ResNet(resnet.Bottleneck, [1, 1, 1, 1],
                                         replace_stride_with_dilation=[False, False, True]),
        "resnet-d": lambda: timm_bottleneck(stem_type="deep", avg_down=True),
        "seresnet": lambda: timm_bottleneck(block_args={"attn_layer": "se"}),
        "drop_path": lambda: timm_bottleneck(drop_path_rate=0.2),
        "drop_block": lambda: timm_bottleneck(drop_block_rate=0.2),
    }[kind]()


@pytest.mark.parametrize("kind, reason", [
    ("resnext", r"layer1\.0\.conv2 has groups=8 \(a ResNeXt\)"),
    ("dilated", r"layer4\.0's convs have strides \[1\], where this package's ResNet has 2 \(a dilated net"),
    ("resnet-d", r"its stem conv1 is Sequential, not one 7x7 stride-2 conv"),
    ("seresnet", r"layer1\.0: se is SEModule"),
    ("drop_path", r"layer2\.0: drop_path is DropPath"),
    ("drop_block", r"drop_block is DropBlock2d"),
])
def test_from_torchvision_refuses_what_it_cannot_convert_exactly_and_names_what_it_can(libs, kind, reason):
    with pytest.raises(ValueError, match=reason) as refused:
        from_torchvision(_refused(libs, kind))
    assert "It converts torchvision's resnet18/34/50/101/152" in str(refused.value)
