"""`fuse()` and `from_torchvision` leave a model's state as they found it (modes, buffers, what a
state_dict does not carry), and a fused model stays what the unfused one computes for every caller:
a BatchNorm called outside the rewritten forward, a Sequential sliced, a module swapped, a hook
added (refused with StaleForward where the rewrite cannot follow), torch.fx tracing it."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from reference_models import TVBasicBlock, TVResNet, randomize, small_tv_resnet
from resnet_ablate import FuseWarning, from_torchvision, fuse, unfuse
from resnet_ablate.kernels import FusedBatchNorm2d


def _frozen_batch_norms(model: nn.Module) -> nn.Module:
    """The fine-tuning recipe: the model trains, its BatchNorms stay in eval mode."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eval()
    return model


def _modes(model: nn.Module) -> dict[str, bool]:
    return {name: module.training for name, module in model.named_modules()}


def _step(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward and backward in the model's own modes: the output and the buffers after."""
    out = model(x)
    out.square().sum().backward()
    return out.detach(), {name: b.clone() for name, b in model.named_buffers()}


def test_fuse_keeps_frozen_batch_norms_in_eval_mode_and_their_statistics_unchanged():
    """A training model with frozen BatchNorms (a shortcut's among them) fuses with each module's
    mode kept: a training step then gives the unfused model's output and leaves the running
    statistics alone. (Converted blocks put every part in the block's mode.)"""
    model = _frozen_batch_norms(randomize(small_tv_resnet(TVBasicBlock, (1, 1, 1, 1))))
    reference = copy.deepcopy(model)
    fuse(model)
    batch_norms = {name: m.training for name, m in model.named_modules()
                   if isinstance(m, nn.BatchNorm2d)}
    assert batch_norms.keys() == {name for name, m in reference.named_modules()
                                  if isinstance(m, nn.BatchNorm2d)}
    assert not any(batch_norms.values()) and model.training
    x = torch.randn(2, 3, 32, 32)
    (out, buffers), (expected, expected_buffers) = _step(model, x), _step(reference, x)
    torch.testing.assert_close(out, expected)
    assert buffers.keys() == expected_buffers.keys()
    for name, value in expected_buffers.items():
        torch.testing.assert_close(buffers[name], value, msg=name)


class _OwnBlocks(nn.Module):
    """BN -> ReLU and BN -> add -> ReLU in a forward of the user's own (the graph path)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + y)


@pytest.mark.parametrize("kind", ["own forward", "torchvision blocks"])
def test_batch_norms_held_from_before_fuse_are_the_ones_the_model_calls(kind):
    """fuse() put a new module in each BatchNorm's place, sharing its tensors: a BatchNorm held
    from before (a list to freeze, a momentum to set) changed a module the model no longer
    called, without a word (an audit: bn.eval() after fuse, and the fused BN kept training; the
    loss 0.11 off after two steps). Now each is fused in place, and unfuse gives it back."""
    torch.manual_seed(0)
    model = _OwnBlocks() if kind == "own forward" else small_tv_resnet(TVBasicBlock, (1, 1, 1, 1))
    reference = copy.deepcopy(model)
    held = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FuseWarning)
        fuse(model)
    called = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(held) == len(called) and all(a is b for a, b in zip(held, called))
    fused = [m for m in held if isinstance(m, FusedBatchNorm2d)]  # (a downsample's BN is not)
    assert len(fused) >= 2 and fused[:2] == held[:2]
    # Frozen through the references held from before, as the unfused reference is
    for bns in (held, [m for m in reference.modules() if isinstance(m, nn.BatchNorm2d)]):
        for bn in bns[:2]:
            bn.eval()
            bn.momentum = 0.5
    x = torch.randn(4, 3, 16, 16)
    out, buffers = _step(model, x)
    expected, expected_buffers = _step(reference, x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for name, value in expected_buffers.items():
        torch.testing.assert_close(buffers[name], value, rtol=1e-5, atol=1e-6)
    unfuse(model)
    assert all(type(m) is nn.BatchNorm2d and not hasattr(m, "relu") for m in held)
    assert all(a is b for a, b in zip(held, [m for m in model.modules()
                                             if isinstance(m, nn.BatchNorm2d)]))


def test_a_library_block_held_from_before_fuse_is_the_block_the_model_calls():
    """fuse() put this package's block in a torchvision block's place: a block held from before
    (a Grad-CAM target, a list of layers to hook) was one the model no longer called, and a hook
    registered on it after fusing never fired. Now the block itself is converted in place (the
    same object), and unfuse gives it back as torchvision's, still the same object."""
    from resnet_ablate.blocks import BasicBlock

    model = small_tv_resnet(TVBasicBlock, (1, 1, 1, 1)).eval()
    reference = copy.deepcopy(model)
    held = [m for m in model.modules() if isinstance(m, TVBasicBlock)]
    x = torch.randn(2, 3, 16, 16)
    fuse(model)
    assert [m for m in model.modules() if isinstance(m, BasicBlock)] == held  # (the same objects)
    assert all(type(m) is BasicBlock and m.fused for m in held)
    seen = []
    handle = held[-1].register_forward_hook(lambda _, args, out: seen.append(out.detach()))
    out = model(x)
    handle.remove()
    # The hook saw the last block's output as the unfused model computes it
    features = reference.layer4(reference.layer3(reference.layer2(reference.layer1(
        reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))))))
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], features, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, reference(x), rtol=1e-5, atol=1e-5)
    unfuse(model)
    assert [m for m in model.modules() if isinstance(m, TVBasicBlock)] == held
    assert all(type(m) is TVBasicBlock for m in held)
    assert list(model.state_dict()) == list(reference.state_dict())
    torch.testing.assert_close(model(x), reference(x))


def test_from_torchvision_keeps_modes_momentum_eps_and_frozen_parameters():
    """What a state_dict does not carry comes over by module name: the frozen BatchNorms' eval
    mode, a BatchNorm's momentum (None: a cumulative average) and eps, and parameters that take
    no gradient. Three training steps then leave both nets with the same statistics and outputs."""
    torch.manual_seed(0)
    tv = _frozen_batch_norms(randomize(TVResNet(TVBasicBlock, [1, 1, 1, 1])))
    tv.layer2[0].bn1.train()
    tv.layer2[0].bn1.momentum, tv.layer3[0].bn2.momentum, tv.bn1.eps = None, 0.01, 1e-3
    for parameter in (*tv.conv1.parameters(), *tv.bn1.parameters()):
        parameter.requires_grad_(False)
    ours = from_torchvision(tv)
    assert _modes(ours).items() >= {k: v for k, v in _modes(tv).items() if "bn" in k}.items()
    assert ours.layer2[0].bn1.momentum is None and ours.layer3[0].bn2.momentum == 0.01
    assert ours.bn1.eps == 1e-3
    assert {name: p.requires_grad for name, p in ours.named_parameters()} == {
        name: p.requires_grad for name, p in tv.named_parameters()}
    x = torch.randn(2, 3, 64, 64)
    for _ in range(3):
        (out, buffers), (expected, expected_buffers) = _step(ours, x), _step(tv, x)
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
        for name, value in expected_buffers.items():
            torch.testing.assert_close(buffers[name], value, msg=name)


class BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d in small: a BatchNorm subclass whose forward applies its activation
    (and counts its batches, as nn.BatchNorm2d's does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(super().forward(x))


class Counting(nn.Module):
    """A forward that keeps state of its own: a call counter, read for a warm-up scale."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), BatchNormAct(4)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.steps.add_(1)
        warm_up = torch.clamp(self.steps.float() / 4, max=1.0)
        return self.bn2(self.conv2(F.relu(self.bn(self.conv(x))))) * warm_up


def test_fuse_changes_no_state_and_a_rewritten_forward_keeps_its_own_buffer_updates():
    """Tracing and probing change no buffer (a BatchNorm subclass's batch count, the forward's own
    counter: fuse ran them on the real tensors), the subclass is named, and the rewritten forward
    still counts its calls as the original does (it recorded nothing of the update)."""
    torch.manual_seed(0)
    model = Counting().train()
    reference = copy.deepcopy(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, report = fuse(model, return_report=True)
    assert [s.batch_norm for s in report.sites] == ["bn"]
    assert [(s.name, s.reason) for s in report.skipped] == [
        ("bn2", "it is BatchNormAct, not nn.BatchNorm2d (the fused op reproduces nn.BatchNorm2d's "
                "forward only)")]
    assert any("bn2" in str(w.message) for w in caught if w.category is FuseWarning)
    for name, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), f"fuse changed {name}"
    x = torch.randn(2, 3, 8, 8)
    for _ in range(3):
        torch.testing.assert_close(model(x), reference(x))
    assert int(model.steps) == int(reference.steps) == 3
    torch.testing.assert_close(model.bn2.running_mean, reference.bn2.running_mean)


class Branches(nn.Module):
    """A network whose BatchNorm is also called by a method of its own, without the ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def test_a_fused_batch_norm_is_still_a_batch_norm_to_every_other_caller():
    """The rewritten forward asks the fused BatchNorm for its ReLU; anyone else calling it (a
    method, a slice of a fused Sequential) gets the BatchNorm alone, negative values and all."""
    torch.manual_seed(0)
    net, features = Branches().eval(), nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    nets = {"net": (net, copy.deepcopy(net)), "features": (features, copy.deepcopy(features))}
    for model, _ in nets.values():
        fuse(model)
    assert isinstance(net.bn, FusedBatchNorm2d) and isinstance(features[1], FusedBatchNorm2d)
    x = torch.randn(2, 3, 8, 8)
    expected = nets["net"][1].pre_activation(x)
    assert expected.min() < 0
    torch.testing.assert_close(net.pre_activation(x), expected)
    torch.testing.assert_close(net(x), nets["net"][1](x))
    torch.testing.assert_close(features[:2](x), nets["features"][1][:2](x))
    assert type(features[:2]) is nn.Sequential
    torch.testing.assert_close(features(x), nets["features"][1](x))


def test_swapped_appended_hooked_or_parametrized_modules_run_the_modules_own_forward():
    """After fuse, an ablation swaps the activation or appends a layer, a profiler hooks every
    module, a pruning parametrizes a fused BatchNorm: the rewritten forward would ignore each, so
    the module's own forward runs instead, exactly as the unfused model (a FuseWarning names a
    swap or an appended layer once; hooks, which profilers add and remove, pass in silence).
    Deep copies and data-parallel replicas (a shallow copy of each module's attributes) keep the
    fused forward."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    net = fuse(Branches().eval())
    with warnings.catch_warnings():
        warnings.simplefilter("error", FuseWarning)
        torch.testing.assert_close(copy.deepcopy(net)(x), net(x))
        torch.testing.assert_close(net._replicate_for_data_parallel()(x), net(x))
    net.act = nn.GELU()
    with pytest.warns(FuseWarning, match=r"FusedBranches\.act is GELU, not the ReLU it was"):
        torch.testing.assert_close(net(x), F.gelu(net.pre_activation(x)))

    plain = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()).eval()
    features = fuse(copy.deepcopy(plain))
    for model in (plain, features):
        model.append(nn.Conv2d(8, 2, 1))
    features[3].load_state_dict(plain[3].state_dict())
    with pytest.warns(FuseWarning, match=r"has submodules \['0', '1', '2', '3'\], not"):
        torch.testing.assert_close(features(x), plain(x))

    features = fuse(copy.deepcopy(plain)[:3])
    calls = []
    features[2].register_forward_hook(lambda *args: calls.append(args))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FuseWarning)
        torch.testing.assert_close(features(x), plain[:3](x))
    assert len(calls) == 1
    torch.nn.utils.parametrize.register_parametrization(
        features[1], "weight", _Halved())
    with warnings.catch_warnings():
        warnings.simplefilter("error", FuseWarning)
        reference = copy.deepcopy(plain[:3])
        torch.nn.utils.parametrize.register_parametrization(reference[1], "weight", _Halved())
        torch.testing.assert_close(features(x), reference(x))


class _Halved(nn.Module):
    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight / 2


def test_a_fused_model_profiles_as_the_unfused_one():
    """fvcore hooks every module while it counts: the rewritten forwards run their modules' own,
    and the count is the unfused model's (it raised StaleForward on every rewritten forward)."""
    from resnet_ablate import profile

    torch.manual_seed(0)
    model = Branches().eval()
    expected = profile(model, (3, 8, 8))
    fuse(model)
    assert profile(model, (3, 8, 8)).flops == expected.flops


def test_an_add_with_no_relu_after_it_is_neither_fused_nor_reported():
    """An inverted-residual block: the last BatchNorm's output feeds the residual add and
    another op, with no ReLU after either: not a site, so nothing is reported, strict fuses."""

    class Inverted(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
            self.conv2, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
            return (x + y) * torch.sigmoid(y)

    _, report = fuse(Inverted(), strict=True, return_report=True)
    assert [s.batch_norm for s in report.sites] == ["bn1"] and report.skipped == ()


class Residual(nn.Module):
    """A residual add out of place, which the rewrite routes through `added_then_relu`."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)) + x)


def test_torch_fx_traces_a_fused_model_with_the_fused_batch_norm_as_a_leaf():
    """Symbolic tracing into the fused BatchNorm is refused with the way out; as a leaf module
    (what fx-based tools take) the traced fused model computes what the unfused one does, an
    out-of-place residual add included (its dtype test is one call in the graph)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          Residual()).eval()
    reference = copy.deepcopy(model)
    fuse(model)
    assert isinstance(model[3].bn, FusedBatchNorm2d)
    with pytest.raises(TypeError, match="leaf module .* or call resnet_ablate.unfuse"):
        fx.symbolic_trace(model)

    class LeafTracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, name: str) -> bool:
            return isinstance(m, FusedBatchNorm2d) or super().is_leaf_module(m, name)

    traced = fx.GraphModule(model, LeafTracer().trace(model))
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(traced(x), reference(x))


class ConvBnRelu(nn.Module):
    def __init__(self, channels: int = 4):
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(channels, channels, 3, padding=1), \
            nn.BatchNorm2d(channels), nn.ReLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


def test_fusing_a_fused_model_again_changes_nothing_it_fused_and_fuses_what_is_new():
    """fuse() of a fused model traced its rewritten forwards, whose guard then took the tracer's
    recording class for a swapped module and warned that the ReLU was no longer a ReLU. A
    rewritten forward is fused already: left as it is, in silence; a block added since fuses."""
    torch.manual_seed(0)
    model = nn.Sequential(ConvBnRelu(), ConvBnRelu())
    fuse(model[0])
    fuse(model[1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, report = fuse(model[0], return_report=True)
        assert report.sites == () and report.skipped == ()
        model.append(ConvBnRelu())
        reference = copy.deepcopy(model)
        _, report = fuse(model, return_report=True)
    assert [str(w.message) for w in caught if issubclass(w.category, FuseWarning)] == []
    assert [s.batch_norm for s in report.sites] == ["2.bn"] and report.skipped == ()
    x = torch.randn(2, 4, 6, 6)
    assert torch.equal(model(x), unfuse(reference)(x))
    assert all(isinstance(model[i].bn, FusedBatchNorm2d) for i in range(3))


class TimmStyleBatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d: its activation a child named `act` (Identity without one)."""

    def __init__(self, channels: int, act: nn.Module) -> None:
        super().__init__(channels)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(x))


class InitOnlyBatchNorm(nn.BatchNorm2d):
    """A subclass for its initialisation alone (zero gamma): nn.BatchNorm2d's forward."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        nn.init.zeros_(self.weight)


class SiluBatchNorm(nn.BatchNorm2d):
    """Its activation inline in its forward, no child."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(super().forward(x))


class HeldFunctionBatchNorm(nn.BatchNorm2d):
    """Its activation a function it holds, not a module: it may be a ReLU."""

    def __init__(self, channels: int, act_fn) -> None:
        super().__init__(channels)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act_fn(super().forward(x))


SUBCLASSES = {"relu": (lambda: TimmStyleBatchNormAct(4, nn.ReLU()), True),
              "silu": (lambda: TimmStyleBatchNormAct(4, nn.SiLU()), False),
              "none": (lambda: TimmStyleBatchNormAct(4, nn.Identity()), False),
              "init only": (lambda: InitOnlyBatchNorm(4), False),
              "inline silu": (lambda: SiluBatchNorm(4), False),
              "inline relu": (lambda: BatchNormAct(4), True),
              "held function": (lambda: HeldFunctionBatchNorm(4, F.silu), True)}


@pytest.mark.parametrize("subclass", list(SUBCLASSES))
def test_a_batch_norm_with_its_own_activation_is_named_only_where_that_may_be_a_relu(subclass):
    """timm's EfficientNet (SiLU) was reported as 49 sites left unfused, though it has no
    BN -> ReLU, and so was any BatchNorm subclass (one for its initialisation alone, one with a
    SiLU inline): only one whose forward may apply a ReLU (a ReLU child, a ReLU in its source, a
    function it holds) is a site left unfused."""
    build, named = SUBCLASSES[subclass]
    model = nn.Sequential(nn.Conv2d(3, 4, 3), build())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, report = fuse(model, return_report=True)
    assert [s.name for s in report.skipped] == (["1"] if named else [])
    said = [str(w.message) for w in caught if w.category is FuseWarning]
    assert said == ([f"fuse left 1 site(s) unfused: 1: {report.skipped[0].reason}"] if named
                    else ["fuse found no BatchNorm2d -> [add] -> ReLU in Sequential: nothing "
                          "changed"])


def test_a_subclass_for_its_initialisation_followed_by_a_relu_is_refused_saying_why():
    """Its forward is nn.BatchNorm2d's, so 'the fused op reproduces nn.BatchNorm2d's forward
    only' was no reason: its fused twin would not be an instance of its class."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), InitOnlyBatchNorm(4), nn.ReLU())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FuseWarning)
        _, report = fuse(model, return_report=True)
    assert [(s.name, s.reason) for s in report.skipped] == [
        ("1", "it is InitOnlyBatchNorm, a subclass of nn.BatchNorm2d, which its fused twin would "
              "not be (code that looks for its class would miss it)")]
    assert type(model[1]) is InitOnlyBatchNorm
