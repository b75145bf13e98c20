"""The module-level path of `fuse`: recognise torchvision's and timm's residual blocks by their
parts and convert each to this package's fused block (same tensors).

A block is converted only when it is recognisably torchvision's or timm's `BasicBlock` /
`Bottleneck`: children exactly conv1/bn1/conv2/bn2[/conv3/bn3], then torchvision's shared `relu`
or timm's act1/act2[/act3], and an optional downsample (a block with other children, or missing
some, is not one of theirs: the graph path takes it as it is); timm's drop_block, aa, se and
drop_path only where they are nn.Identity (in use, each changes the block in a way the fused
epilogue cannot reproduce: such blocks are refused with that reason); plain `nn.BatchNorm2d` and
`nn.ReLU`, no parameters or buffers of the block's own, no hooks, and (the checks that catch a
changed forward) the converted block gives the original's output on a probe input, in eval and
in training mode, where the original draws no random numbers. This path needs no tracing, so it
works where a forward cannot be traced; it also keeps the stride placement that this package's
blocks record. The block becomes this package's block in place (the same object: its class and
children; `unfuse` gives the library's back).
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field

import torch
from torch import nn

from ..blocks import BasicBlock, Bottleneck, fuse_block_, fused_in_place, has_hooks
from ..kernels import FusedBatchNorm2d
from ..models import ResNet
from .forward_facts import KEPT_MODULES, random_draws, random_streams_kept
from .library_blocks import become, remember
from .probe import beyond_tolerance, changed_in_place, evaluating, probe_input
from .reads import MODULE_OWN
from .records import FusedSite, SkippedBlock, qualified

_BASIC_PARTS = ("conv1", "bn1", "conv2", "bn2")
_BOTTLENECK_PARTS = (*_BASIC_PARTS, "conv3", "bn3")
_PROBE_SIZE = 8

# timm's blocks hold these optional parts, None or nn.Identity where unused; each, where used,
# changes the block in a way the fused epilogue cannot reproduce exactly.
_OPTIONAL_PARTS = {
    "drop_block": "it masks a BN output before its activation",
    "aa": "it blurs (anti-aliased downsampling) inside the block, where the converted block has no "
          "place for it",
    "se": "it rescales the last BN's output before the residual add, so that add cannot be fused",
    "drop_path": "it drops the residual branch per sample (stochastic depth) before the add",
}


def _looks_like_block(module: nn.Module) -> bool:
    """Holds exactly torchvision's or timm's block parts, named as they name them; other blocks
    (DenseNet's, RegNet's, a user's block with a `shortcut`) are left to the graph path, which
    keeps them as they are."""
    children = dict(module.named_children())
    if not all(isinstance(children.get(part), nn.Module) for part in ("conv1", "bn1", "conv2")):
        return False
    parts, activations = _layout(children)
    return all(p in children for p in (*parts, *activations)) and not (
        set(children) - {*parts, *activations, "downsample", *_OPTIONAL_PARTS})


def _layout(children: dict[str, nn.Module]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The conv/BN parts and the activation modules a block should have: torchvision's one shared
    `relu`, or timm's act1/act2(/act3), one per activation."""
    bottleneck = "conv3" in children or "bn3" in children
    parts = _BOTTLENECK_PARTS if bottleneck else _BASIC_PARTS
    if "relu" in children:
        return parts, ("relu",)
    return parts, ("act1", "act2", "act3") if bottleneck else ("act1", "act2")


def unrecognised_because(block: nn.Module) -> str | None:
    """Why `block` is not a standard torchvision or timm block, or None when it is."""
    children = dict(block.named_children())
    parts, activations = _layout(children)
    extra = _extra_forward_inputs(block)
    if extra:
        return (f"its forward takes {extra} beside x, where the standard block's takes x alone: "
                "its callers may pass what the converted block would not take")
    own = [*block._parameters, *block._buffers]
    if own:
        return (f"it has parameters or buffers of its own ({', '.join(own)}), which the "
                "converted block would drop")
    for part, why in _OPTIONAL_PARTS.items():
        if part in children and type(children[part]) is not nn.Identity:
            return f"{part} is {type(children[part]).__name__}: {why}"
    for part in parts:
        module = children[part]
        expected = nn.Conv2d if part.startswith("conv") else nn.BatchNorm2d
        if type(module) is not expected:  # subclasses (SyncBatchNorm, custom convs) may differ
            return f"{part} is {type(module).__name__}, expected {expected.__name__}"
    for part in activations:
        if type(children[part]) is not nn.ReLU:
            return f"{part} is {type(children[part]).__name__}, expected ReLU"
    if any(has_hooks(m) for m in block.modules()):
        return "it or a part of it has hooks, which the converted block would not call"
    members = _members_converted_lacks(block)
    if members:
        return (f"its class defines {', '.join(members)}, which the converted block (this "
                "package's) would not have: its callers may use them")
    state = _state_beside_parts(block)
    if state:
        return (f"it holds {', '.join(state)} beside its parts, which its forward may read and "
                "the converted block would not (the graph path guards what a forward reads)")
    if any(p.is_meta for p in block.parameters()):
        return "its parameters are on the meta device, so its forward cannot be checked"
    return None


# The values torchvision's and timm's blocks hold beside their parts, which their forwards do
# not read (the convolutions hold the strides they use; `expansion` is a class attribute of
# both), and the parts they hold as None where unused.
_BLOCK_VALUES = frozenset({"stride", "dilation", "expansion", "downsample", *_OPTIONAL_PARTS,
                           # what the graph path records on a block whose forward it rewrote
                           KEPT_MODULES, "fused_batch_norms"})


def _members_converted_lacks(block: nn.Module) -> list[str]:
    """The methods and properties `block`'s class (below nn.Module) defines that this package's
    block does not: a subclass's `describe()` or `out_channels`, which the model or its user
    calls (converted, the block lost them, and the model failed after fusing: an audit)."""
    converted = Bottleneck if "conv3" in block._modules else BasicBlock
    names = [name for cls in type(block).__mro__ if issubclass(cls, nn.Module)
             and cls is not nn.Module for name, value in vars(cls).items()
             if not (name.startswith("__") and name.endswith("__"))
             and (callable(value) or isinstance(value, (property, classmethod, staticmethod)))]
    return sorted({name for name in names if not hasattr(converted, name)})


def _state_beside_parts(block: nn.Module) -> list[str]:
    """The values `block` (or its class, below nn.Module) holds beside its parts that the
    standard blocks do not: a user's `res_scale`, a flag, a config, which the converted block
    would lose while the probe, run with today's values, sees nothing amiss."""
    names = [n for n in vars(block) if n not in MODULE_OWN and n not in _BLOCK_VALUES]
    for cls in type(block).__mro__:
        if cls is nn.Module or not issubclass(cls, nn.Module):
            continue
        names += [n for n, v in vars(cls).items()
                  if not n.startswith("__") and n not in _BLOCK_VALUES and n not in names
                  and not callable(v) and not isinstance(v, (property, classmethod,
                                                              staticmethod))]
    return names


def _extra_forward_inputs(block: nn.Module) -> str | None:
    """What `block`'s forward takes beyond one input (timm's DlaBasic takes a shortcut and
    children too), or None where it takes x alone."""
    try:
        parameters = list(inspect.signature(block.forward).parameters.values())
    except (TypeError, ValueError):
        return "arguments that cannot be read from its signature"
    single = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if len(parameters) == 1 and parameters[0].kind in single:
        return None
    return ", ".join(str(p) for p in parameters[1:] or parameters) or "no input"


def _converted(block: nn.Module) -> BasicBlock | Bottleneck:
    children = dict(block.named_children())
    cls = Bottleneck if "conv3" in children else BasicBlock
    parts = _BOTTLENECK_PARTS if cls is Bottleneck else _BASIC_PARTS
    _, activations = _layout(children)
    new = cls.from_modules({p: children[p] for p in parts}, children.get("downsample"),
                           activations=activations * 3 if activations == ("relu",)
                           else activations)
    # The block's own mode; its parts keep theirs (a frozen BatchNorm stays in eval mode), and
    # each fused twin has its BatchNorm's.
    new.training = block.training
    remember(new, block)  # unfuse gives the library's class back
    return new  # type: ignore[return-value]


def _forward_mismatch(original: nn.Module, converted: nn.Module) -> str | None:
    """Compare both blocks on a random probe input: in eval mode (no state changes), then in
    training mode on copies, where a forward that draws random numbers (stochastic depth,
    dropout) is refused: the converted block draws none."""
    conv1 = original.get_submodule("conv1")
    assert isinstance(conv1, nn.Conv2d)
    probe = probe_input(conv1.weight, conv1.in_channels, _PROBE_SIZE)
    given, given_converted = probe.clone(), probe.clone()
    with evaluating(original, converted):
        try:
            expected = original(given)
        except Exception as error:  # noqa: BLE001 - any failure means "not the standard block"
            return f"its forward failed on a probe input ({type(error).__name__}: {error})"
        actual = converted(given_converted)
    if not isinstance(expected, torch.Tensor) or expected.shape != actual.shape:
        return "its forward returns something other than the standard block's output"
    if changed_in_place(probe, given, given_converted):
        return ("its forward changes its input in place (as `x += y` does), which the converted "
                "block would not: its caller may read that tensor afterwards")
    error = beyond_tolerance(expected, actual)
    if error is not None:
        return f"its forward differs from the standard block's (max difference {error:.3g} on a probe input)"
    devices = [probe.device] if probe.is_cuda else []
    with torch.random.fork_rng(devices=devices), random_streams_kept(), torch.no_grad():
        training = copy.deepcopy(original).train()  # its generators are the copy's own
        draws = _random_state(probe, training)
        try:
            expected = training(probe.clone())
        except Exception as error:  # noqa: BLE001 - as above, in training mode
            return f"its forward failed on a probe input in training mode ({type(error).__name__}: {error})"
        if _random_state(probe, training) != draws:
            return ("its forward draws random numbers in training mode (stochastic depth, "
                    "dropout), which the converted block would not")
        actual = copy.deepcopy(converted).train()(probe.clone())
    error = beyond_tolerance(expected, actual) if isinstance(expected, torch.Tensor) else None
    if error is not None:
        return (f"its forward differs from the standard block's in training mode (max difference "
                f"{error:.3g} on a probe input)")
    return None


def _random_state(like: torch.Tensor, module: nn.Module) -> tuple[object, ...]:
    """The state of the random generators `module`'s forward on `like`'s device draws from:
    torch's on the CPU and that device, Python's and numpy's, and those the module holds."""
    cpu = random_draws(module)
    return (*cpu, torch.cuda.get_rng_state(like.device).numpy().tobytes()) if like.is_cuda else cpu


def _block_sites(name: str, block: BasicBlock | Bottleneck) -> list[FusedSite]:
    """The BatchNorms a fused block fuses: each with its ReLU, the last also with the add."""
    bns = [bn for bn in ("bn1", "bn2", "bn3") if isinstance(getattr(block, bn, None), nn.BatchNorm2d)]
    return [FusedSite(qualified(name, bn), "BN->add->ReLU" if bn == bns[-1] and block.has_shortcut
                      else "BN->ReLU") for bn in bns]


def _fuse_own_resnet_stem(model: ResNet) -> None:
    model.bn1 = fused_in_place(model.bn1, relu=True)
    model.relu = None
    model.fused = True
    model.arch = model.arch.replace(fused=True)


@dataclass
class BlockPlan:
    """What the module-level path would change; planning changes nothing, so strict mode can
    refuse before any change."""

    fused: list[str] = field(default_factory=list)
    sites: list[FusedSite] = field(default_factory=list)
    skipped: list[SkippedBlock] = field(default_factory=list)
    conversions: list[tuple[nn.Module, nn.Module]] = field(default_factory=list)  # (new, library's)
    own_blocks: list[BasicBlock | Bottleneck] = field(default_factory=list)
    own_models: list[ResNet] = field(default_factory=list)

    def apply(self) -> None:
        for own_model in self.own_models:
            _fuse_own_resnet_stem(own_model)
        for block in self.own_blocks:
            fuse_block_(block)
        for converted, original in self.conversions:
            # The library block's own BatchNorms in place of the twins it was checked with, and
            # the block itself made the converted one, each in place: references to them taken
            # before fusing stay the model's.
            for bn in ("bn1", "bn2", "bn3"):
                if hasattr(converted, bn):
                    setattr(converted, bn, fused_in_place(getattr(original, bn), relu=True))
            become(original, converted)


def plan_blocks(model: nn.Module) -> BlockPlan:
    """The residual blocks of `model` (torchvision's, timm's, this package's unfused ones) and
    this package's unfused ResNet stems, each checked; nothing is changed."""
    plan = BlockPlan()
    inside_block: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside_block):
            continue  # a block's own parts go with the block
        if isinstance(module, ResNet):
            if not module.fused:
                plan.own_models.append(module)
                plan.sites.append(FusedSite(qualified(name, "bn1"), "BN->ReLU"))
            continue
        if isinstance(module, (BasicBlock, Bottleneck)):
            inside_block.append(name)
            if not module.fused:
                plan.own_blocks.append(module)
                plan.fused.append(name)
                plan.sites.extend(_block_sites(name, module))
            continue
        if isinstance(module, torch.jit.ScriptModule):
            inside_block.append(name)  # compiled: the graph path names its BatchNorms
            continue
        if module is model or isinstance(module, FusedBatchNorm2d) or not _looks_like_block(module):
            continue
        inside_block.append(name)
        reason = unrecognised_because(module)
        if reason is None:
            converted = _converted(module)
            reason = _forward_mismatch(module, converted)
        if reason is not None:
            plan.skipped.append(SkippedBlock(name, reason))
            continue
        plan.conversions.append((converted, module))
        plan.fused.append(name)
        plan.sites.extend(_block_sites(name, converted))
    return plan
