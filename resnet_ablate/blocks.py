"""Residual blocks of the paper, ending in the fused BatchNorm + residual add + ReLU.

`BasicBlock` (two 3x3 convs) and `Bottleneck` (1x1, 3x3, 1x1, expansion 4) keep torchvision's
attribute and state_dict names (conv1, bn1, ..., downsample.0/.1), so checkpoints move between
them, torchvision, and the fused / unfused builds. `fused=False` builds the same block from
`nn.BatchNorm2d` + `nn.ReLU` + `+=`: same parameters and keys, the reference the fused one is
compared against.

Shortcut options (Section 3.3 and 4.1 of the paper):
- "A": identity, and where the shape changes, stride-2 subsampling with zero channels appended
  (no parameters).
- "B": identity, and a 1x1 projection + BN where the shape changes.
- "C": a 1x1 projection + BN on every shortcut.
- "none": no shortcut at all, the plain twin (same layers and parameters as option A).
"""

from __future__ import annotations

from typing import ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from .arch import DOWNSAMPLINGS, EXPANSION, SHORTCUTS, Downsampling, Shortcut
from .kernels import FusedBatchNorm2d

T = TypeVar("T", bound=nn.BatchNorm2d)


class ZeroPadShortcut(nn.Module):
    """Option A: subsample by `stride`, then append zero channels up to `out_channels`."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(
                f"option A shortcut can only add channels, got {in_channels} -> {out_channels}; "
                "use shortcut 'B' or 'C' where widths shrink"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.out_channels - self.in_channels))

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


def batch_norm(channels: int, *, fused: bool, relu: bool) -> nn.BatchNorm2d:
    """A BN that ends a conv: fused (BN [+ residual] + ReLU in one op) or plain `nn.BatchNorm2d`."""
    return FusedBatchNorm2d(channels, relu=relu) if fused else nn.BatchNorm2d(channels)


def make_shortcut(shortcut: Shortcut, in_channels: int, out_channels: int, stride: int) -> nn.Module | None:
    """The shortcut module of a block, or None for the identity (and for "none", no shortcut)."""
    if shortcut not in SHORTCUTS:
        raise ValueError(f"unknown shortcut option {shortcut!r}; valid: {', '.join(SHORTCUTS)}")
    reshapes = stride != 1 or in_channels != out_channels
    if shortcut == "none" or (shortcut in ("A", "B") and not reshapes):
        return None
    if shortcut == "A":
        return ZeroPadShortcut(in_channels, out_channels, stride)
    # Projection BN never carries the ReLU (it feeds the add), so it is plain in both builds.
    return nn.Sequential(conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels))


def he_init_(module: nn.Module) -> None:
    """He et al. 2015 init for convs (fan_out, as in the paper and torchvision); BN to gamma=1, beta=0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def calls_hooks(module: nn.Module) -> bool:
    """Whether calling `module` runs hooks of its own (forward or backward)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def has_hooks(module: nn.Module) -> bool:
    """Whether `module` has hooks of any kind, its state_dict's included: a module replaced by
    its fused twin would lose them."""
    return calls_hooks(module) or bool(
        module._state_dict_hooks or module._state_dict_pre_hooks
        or module._load_state_dict_pre_hooks or module._load_state_dict_post_hooks)


def fused_epilogue(bn: nn.Module, x: torch.Tensor, identity: torch.Tensor | None = None,
                   activation: nn.Module | None = None) -> torch.Tensor:
    """relu(bn(x) [+ identity]) through a fused BN, in one op, as the unfused block computes it;
    and where the model was changed after fusing, still as the unfused block would compute it:
    an `activation` set in the ReLU's place (an ablation) is applied after the fused BN + add; a
    BN with hooks, or another module set in its place, runs alone (its hooks see its own output),
    then the add and the activation."""
    fused, hooked = isinstance(bn, FusedBatchNorm2d), calls_hooks(bn)
    if fused and not hooked:
        if activation is None:  # (the common case: nothing set since fusing)
            return bn(x, identity)
        out = bn(x, identity, relu=False)
    else:
        out = bn(x, relu=False) if fused else bn(x)
        if identity is not None:
            out = out + identity
    return torch.relu(out) if activation is None else activation(out)


class _ResidualBlock(nn.Module):
    """What both blocks share: the shortcut and the two BN epilogues, fused or unfused."""

    expansion: ClassVar[int]
    last_bn: ClassVar[str]  # the BN that ends the residual branch (zero_init_residual zeroes it)
    downsample: nn.Module | None
    # Where each BN's activation is held (bn1, bn2, bn3), for a fused block a module set there
    # after fusing (None: the fused ReLU): this package's and torchvision's one shared `relu`; a
    # converted timm block's act1, act2, act3.
    activations: tuple[str, ...] = ("relu", "relu", "relu")

    def _init_epilogue(self, shortcut: Shortcut, in_channels: int, out_channels: int, stride: int,
                       fused: bool) -> None:
        self.fused = fused
        self.shortcut = shortcut
        self.has_shortcut = shortcut != "none"
        self.downsample = make_shortcut(shortcut, in_channels, out_channels, stride)
        # Fused blocks never call a ReLU module; keeping none there makes that visible in repr.
        self.relu = None if fused else nn.ReLU(inplace=True)

    def _identity(self, x: torch.Tensor) -> torch.Tensor | None:
        if not self.has_shortcut:
            return None
        return x if self.downsample is None else self.downsample(x)

    def _bn_relu(self, bn: nn.Module, x: torch.Tensor, position: int) -> torch.Tensor:
        """relu(bn(x)), `bn` the block's BN at `position` (0 for bn1): its activation is
        `activations[position]` (in a fused block None, the fused ReLU, unless one was set)."""
        activation = getattr(self, self.activations[position])
        return fused_epilogue(bn, x, None, activation) if self.fused else activation(bn(x))

    def _bn_add_relu(self, bn: nn.Module, x: torch.Tensor, identity: torch.Tensor | None,
                     position: int) -> torch.Tensor:
        """relu(bn(x) + identity), the block's last epilogue (see `_bn_relu`)."""
        activation = getattr(self, self.activations[position])
        if self.fused:
            return fused_epilogue(bn, x, identity, activation)
        out = bn(x)
        if identity is not None:
            out += identity
        return activation(out)

    @classmethod
    def from_modules(
        cls,
        modules: dict[str, nn.Module],
        downsample: nn.Module | None,
        *,
        shortcut: Shortcut = "B",
        activations: tuple[str, ...] = ("relu", "relu", "relu"),
    ) -> _ResidualBlock:
        """A fused block around existing modules (conv1, bn1, ...), sharing their tensors.

        This is how `resnet_ablate.fuse` converts a torchvision-style block: its convs and
        shortcut module are reused as they are, and each BN becomes a `FusedBatchNorm2d` twin
        (fuse, once the block is checked, swaps in each BN itself, fused in place, and makes the
        library's block this one in place).
        `shortcut` only labels the block ("B" for torchvision's projection-where-needed);
        `activations` names where each BN's activation was held (timm's act1, act2, act3), so
        that one set there after fusing runs.
        """
        block = cls.__new__(cls)
        nn.Module.__init__(block)
        for name, module in modules.items():
            is_bn = name.startswith("bn")
            setattr(block, name, fused_twin_of(module, relu=True) if is_bn else module)  # type: ignore[arg-type]
        block.fused = True
        block.shortcut = shortcut
        block.has_shortcut = shortcut != "none"
        block.downsample = downsample
        block.activations = activations
        for name in activations:
            setattr(block, name, None)
        if isinstance(block, Bottleneck):
            conv2 = modules["conv2"]
            assert isinstance(conv2, nn.Conv2d)
            block.width = conv2.out_channels
            block.downsampling = "v1.5" if tuple(conv2.stride) != (1, 1) else "v1"
        return block

    def _zero_init_residual(self) -> None:
        if not self.has_shortcut:
            raise ValueError(
                "zero_init_residual zeroes the last BN of each block so the block starts as its "
                "shortcut; the plain network (shortcut 'none') has no shortcut, so it would output zeros"
            )
        nn.init.zeros_(getattr(self, self.last_bn).weight)

    def zero_init_last(self) -> None:
        """The last BN's weight zeroed (timm's name for it: a timm block converted by `fuse`
        answers it as it did, and timm's own initialisation finds it)."""
        self._zero_init_residual()


class BasicBlock(_ResidualBlock):
    """Two 3x3 convs; the first strides. `forward(x)` = relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""

    expansion: ClassVar[int] = EXPANSION["basic"]
    last_bn: ClassVar[str] = "bn2"

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        *,
        shortcut: Shortcut = "B",
        fused: bool = True,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, planes, stride)
        self.bn1 = batch_norm(planes, fused=fused, relu=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = batch_norm(planes, fused=fused, relu=True)
        self._init_epilogue(shortcut, in_channels, planes, stride, fused)
        he_init_(self)
        if zero_init_residual:
            self._zero_init_residual()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self._identity(x)
        out = self._bn_relu(self.bn1, self.conv1(x), 0)
        return self._bn_add_relu(self.bn2, self.conv2(out), identity, 1)


class Bottleneck(_ResidualBlock):
    """1x1 reduce, 3x3, 1x1 expand (x4), then the shortcut add and ReLU.

    `width` is the inner (3x3) width; by default `planes * base_width // 64`, torchvision's
    `width_per_group` rule (base_width 64: width = planes, the paper; 128: Wide ResNet-50-2).
    `downsampling` says which conv strides: "v1" the first 1x1 (the paper), "v1.5" the 3x3
    (torchvision; more FLOPs, better accuracy).
    """

    expansion: ClassVar[int] = EXPANSION["bottleneck"]
    last_bn: ClassVar[str] = "bn3"

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        *,
        shortcut: Shortcut = "B",
        width: int | None = None,
        base_width: int = 64,
        downsampling: Downsampling = "v1",
        fused: bool = True,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if downsampling not in DOWNSAMPLINGS:
            raise ValueError(
                f"unknown bottleneck downsampling {downsampling!r}; valid: "
                "'v1' (stride on the first 1x1, the paper) or 'v1.5' (stride on the 3x3, torchvision)"
            )
        if width is None:
            width = planes * base_width // 64
        if width < 1:
            raise ValueError(f"bottleneck width must be >= 1, got {width} (planes={planes}, base_width={base_width})")
        out_channels = planes * self.expansion
        stride_1x1, stride_3x3 = (stride, 1) if downsampling == "v1" else (1, stride)
        self.width = width
        self.downsampling = downsampling
        self.conv1 = conv1x1(in_channels, width, stride_1x1)
        self.bn1 = batch_norm(width, fused=fused, relu=True)
        self.conv2 = conv3x3(width, width, stride_3x3)
        self.bn2 = batch_norm(width, fused=fused, relu=True)
        self.conv3 = conv1x1(width, out_channels)
        self.bn3 = batch_norm(out_channels, fused=fused, relu=True)
        self._init_epilogue(shortcut, in_channels, out_channels, stride, fused)
        he_init_(self)
        if zero_init_residual:
            self._zero_init_residual()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self._identity(x)
        out = self._bn_relu(self.bn1, self.conv1(x), 0)
        out = self._bn_relu(self.bn2, self.conv2(out), 1)
        return self._bn_add_relu(self.bn3, self.conv3(out), identity, 2)


def fused_twin_of(bn: nn.BatchNorm2d, *, relu: bool) -> FusedBatchNorm2d:
    """A `FusedBatchNorm2d` that shares `bn`'s parameters and buffers (same tensors, not copies).

    Sharing keeps optimizers and anything else holding those tensors valid after fusing.
    """
    twin = FusedBatchNorm2d(
        bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, relu=relu, device="meta"
    )
    return with_state_of(twin, bn)


def fused_in_place(bn: nn.BatchNorm2d, *, relu: bool) -> FusedBatchNorm2d:
    """`bn` itself made a `FusedBatchNorm2d`: its class changed, the same object, tensors and
    mode, so that a reference to it taken before fusing (a list of BatchNorms to freeze, its
    momentum to set) still reaches the module the model calls (with a twin it changed a module
    the model no longer called, without a word: an audit). A twin (`fused_twin_of`) where `bn`
    is not exactly an `nn.BatchNorm2d`. `unfused_in_place` undoes it."""
    if type(bn) is not nn.BatchNorm2d:
        return fused_twin_of(bn, relu=relu)
    bn.__class__ = FusedBatchNorm2d
    bn.relu = relu
    return bn  # type: ignore[return-value]


def unfused_in_place(bn: FusedBatchNorm2d) -> nn.BatchNorm2d:
    """`fused_in_place` the other way: `bn` itself back to an `nn.BatchNorm2d` (a twin,
    `plain_twin_of`, where it is a subclass of `FusedBatchNorm2d`)."""
    if type(bn) is not FusedBatchNorm2d:
        return plain_twin_of(bn)
    del bn.relu
    bn.__class__ = nn.BatchNorm2d
    return bn


def plain_twin_of(bn: FusedBatchNorm2d) -> nn.BatchNorm2d:
    """A `BatchNorm2d` sharing a fused BN's parameters and buffers (same tensors, not copies):
    `fused_twin_of` the other way (`resnet_ablate.unfuse` uses it)."""
    twin = nn.BatchNorm2d(bn.num_features, bn.eps, bn.momentum, bn.affine,
                          bn.track_running_stats, device="meta")
    return with_state_of(twin, bn)


def with_state_of(twin: T, bn: nn.BatchNorm2d) -> T:
    """`twin` (built on the meta device) given `bn`'s parameters, buffers and mode: the twins
    here, and replicas.py's synchronised BatchNorm, share one model's tensors this way."""
    twin.weight, twin.bias = bn.weight, bn.bias
    twin.running_mean, twin.running_var = bn.running_mean, bn.running_var
    twin.num_batches_tracked = bn.num_batches_tracked
    twin.train(bn.training)
    return twin


def fuse_block_(block: BasicBlock | Bottleneck) -> BasicBlock | Bottleneck:
    """Turn an unfused block into the fused one in place (same tensors), and return it."""
    if block.fused:
        return block
    for name in ("bn1", "bn2", "bn3"):
        bn = getattr(block, name, None)
        if bn is not None:
            setattr(block, name, fused_in_place(bn, relu=True))
    block.fused = True
    for name in block.activations:  # (the fused ReLU takes their place)
        setattr(block, name, None)
    return block
