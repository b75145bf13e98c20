"""The architecture description: one small, immutable, hashable value that names a ResNet.

It is a plain value with no torch in it: `resnet_ablate.models.build(arch)` builds the network.

Studies sweep `ResNetArch` values, so it is built from plain values (a YAML mapping works as is),
round-trips through `to_dict()` / `from_dict()`, and has a `digest` (sha1 of a canonical JSON) that
stays the same across processes and Python versions, unlike `hash()`.

Construction resolves every family default (block, stages, widths, shortcut) so that two spellings
of the same network (`depth=20` or `stages=(3, 3, 3)`) compare, hash and name the same.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

Family = Literal["cifar", "imagenet"]
BlockKind = Literal["basic", "bottleneck"]
Shortcut = Literal["A", "B", "C", "none"]
Downsampling = Literal["v1", "v1.5"]

FAMILIES: tuple[str, ...] = ("cifar", "imagenet")
BLOCKS: tuple[str, ...] = ("basic", "bottleneck")
# The shortcut options of the paper (blocks.py says what each builds) and "none", the plain twin.
SHORTCUTS: tuple[str, ...] = ("A", "B", "C", "none")
# Where a bottleneck strides: "v1" the first 1x1 (the paper), "v1.5" the 3x3 (torchvision).
DOWNSAMPLINGS: tuple[str, ...] = ("v1", "v1.5")
# Output channels of a block over its stage width.
EXPANSION: dict[str, int] = {"basic": 1, "bottleneck": 4}

# Conv layers per block: what turns blocks-per-stage into a depth (plus the stem conv and the fc).
LAYERS_PER_BLOCK: dict[str, int] = {"basic": 2, "bottleneck": 3}
# The deepest network described: above the paper's deepest (1202 layers) with room to spare. A
# far deeper one is a typo, and would take minutes to build and profile before anything says so.
MAX_DEPTH = 2000
# The most weights a described network may hold: 200x the paper's largest ImageNet net (60
# million), far below what a typo such as widths [640000] asks for (trillions, terabytes to build).
MAX_PARAMETERS = 10_000_000_000

# The paper's Table 1.
IMAGENET_DEPTHS: dict[int, tuple[str, tuple[int, ...]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}

_DEFAULT_WIDTHS: dict[str, tuple[int, ...]] = {"cifar": (16, 32, 64), "imagenet": (64, 128, 256, 512)}
# Section 4.2: option A on CIFAR so that deep and plain nets have the same parameters; B on ImageNet.
_DEFAULT_SHORTCUT: dict[str, str] = {"cifar": "A", "imagenet": "B"}


class ArchError(ValueError):
    """An architecture description that names no buildable network."""


def _check_choice(field_name: str, value: object, valid: tuple[str, ...]) -> str:
    if value not in valid:
        raise ArchError(f"ResNetArch.{field_name}={value!r} is not valid; valid: {', '.join(valid)}")
    return value  # type: ignore[return-value]


def _check_positive_int(field_name: str, value: object) -> int:
    # bool is an int subclass; `fused: yes` landing in `depth` should not pass as 1
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ArchError(f"ResNetArch.{field_name}={value!r} is not valid; it must be a positive int")
    return value


def _int_tuple(field_name: str, value: object) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) == 0:
        raise ArchError(
            f"ResNetArch.{field_name}={value!r} is not valid; it must be a non-empty list of positive ints"
        )
    return tuple(_check_positive_int(f"{field_name}[{i}]", v) for i, v in enumerate(value))


def _depth_series(block: str, num_stages: int) -> str:
    per_block = LAYERS_PER_BLOCK[block] * num_stages
    examples = ", ".join(str(per_block * n + 2) for n in (3, 5, 7, 9, 18))
    return f"{per_block}n+2 with {block} blocks in {num_stages} stages: {examples}, ..."


@dataclass(frozen=True)
class ResNetArch:
    """A residual network of the paper's families, described by plain values.

    - `family`: "cifar" (3x3 stem, no max-pool, 16/32/64 filters, depth 6n+2 with basic blocks or
      9n+2 with bottlenecks) or "imagenet" (7x7 stem + max-pool, Table 1 depths 18/34/50/101/152).
    - `depth` or `stages` (blocks per stage), or both when they agree.
    - `block`: "basic" (two 3x3) or "bottleneck" (1x1, 3x3, 1x1, expansion 4). Defaults to the
      family's: basic on CIFAR, Table 1's on ImageNet.
    - `shortcut`: "A" zero-padding identity, "B" projection where the shape changes, "C" projection
      everywhere, "none" the plain twin. Defaults to A on CIFAR and B on ImageNet, as in the paper.
    - `widths`: filters per stage (bottleneck: inner width at base_width 64; outputs are 4x).
    - `base_width`: bottleneck inner-width multiplier, torchvision's `width_per_group` (128 gives
      Wide ResNet-50-2). Basic blocks have no inner width, so it must stay 64 for them.
    - `downsampling`: where a bottleneck strides, "v1" on the first 1x1 (the paper) or "v1.5" on
      the 3x3 (torchvision). Basic blocks have one place only, so it is stored as "v1" for them.
    - `fused`: BN + add + ReLU in one fused op, or plain `nn.BatchNorm2d` and ops (same state_dict).

    `None` fields mean "the family's default" and are resolved at construction.
    """

    family: Family = "cifar"
    depth: int | None = None
    stages: tuple[int, ...] | None = None
    block: BlockKind | None = None
    shortcut: Shortcut | None = None
    widths: tuple[int, ...] | None = None
    base_width: int = 64
    downsampling: Downsampling = "v1"
    fused: bool = True

    def __post_init__(self) -> None:
        # Each field checked on its own first, then the layout they make together, in this order
        # (the first error raised is the one a user sees).
        family = _check_choice("family", self.family, FAMILIES)
        block = None if self.block is None else _check_choice("block", self.block, BLOCKS)
        shortcut = _check_shortcut(self.shortcut, family)
        downsampling = _check_choice("downsampling", self.downsampling, DOWNSAMPLINGS)
        base_width = _check_positive_int("base_width", self.base_width)
        if not isinstance(self.fused, bool):
            raise ArchError(f"ResNetArch.fused={self.fused!r} is not valid; it must be true or false")
        depth = None if self.depth is None else _check_positive_int("depth", self.depth)
        stages = None if self.stages is None else _int_tuple("stages", self.stages)
        widths = None if self.widths is None else _int_tuple("widths", self.widths)

        block, stages, depth = _resolve_layout(family, block, stages, depth, widths)
        widths = _check_widths(family, depth, stages, widths)
        _check_base_width(block, base_width, widths)
        if block == "basic":
            downsampling = "v1"  # one place to stride: both spellings are the same network
        _check_padded_widths(shortcut, block, widths)

        for name, value in (
            ("block", block), ("shortcut", shortcut), ("downsampling", downsampling),
            ("depth", depth), ("stages", stages), ("widths", widths), ("base_width", base_width),
        ):
            object.__setattr__(self, name, value)
        _check_size(self)

    @property
    def conv_weights(self) -> int:
        """The convolution weights of the network (3 input channels; its parameters less
        BatchNorm's and the classifier's), counted from the description alone: what bounds a
        network before anything allocates it."""
        widths, stages = self.widths or (), self.stages or ()
        stem = widths[0]
        total = 3 * stem * (49 if self.family == "imagenet" else 9)
        channels = stem
        for width, blocks in zip(widths, stages):
            out = width * self.expansion
            inner = width * self.base_width // 64
            for i in range(blocks):
                if self.block == "bottleneck":
                    total += channels * inner + inner * inner * 9 + inner * out
                else:
                    total += channels * out * 9 + out * out * 9
                if self.shortcut == "C" or (self.shortcut == "B" and (i == 0 and channels != out)):
                    total += channels * out
                channels = out
        return total

    @property
    def expansion(self) -> int:
        """Output channels of a block over its stage width: 1 for basic, 4 for bottleneck."""
        return EXPANSION[str(self.block)]

    @property
    def name(self) -> str:
        """A readable name that leaves out what the family implies, e.g. "resnet56-cifar-A".

        Results, plots and comparisons group trials by it, so two descriptions that build
        different networks must never share it: every resolved field that is not what the family
        and depth imply is spelled out (block, stages, shortcut, widths, and for bottlenecks the
        inner width and stride placement), and so is `unfused`, a different build of one network.
        """
        kind = "plain" if self.shortcut == "none" else "resnet"
        parts = [f"{kind}{self.depth}", self.family]
        default_block, default_stages = self._implied_block_and_stages()
        if self.block != default_block:
            parts.append(str(self.block))
        if self.stages != default_stages:
            parts.append("stages" + ".".join(map(str, self.stages or ())))
        if self.shortcut != "none":
            parts.append(str(self.shortcut))
        base = _DEFAULT_WIDTHS[self.family][0]
        if self.widths != tuple(base * 2**i for i in range(len(self.stages or ()))):
            parts.append("w" + ".".join(map(str, self.widths or ())))
        if self.block == "bottleneck":
            if self.base_width != 64:
                parts.append(f"bw{self.base_width}")
            parts.append(self.downsampling)
        if not self.fused:
            parts.append("unfused")
        return "-".join(parts)

    def _implied_block_and_stages(self) -> tuple[str | None, tuple[int, ...] | None]:
        """The block and stages the family builds for this depth alone: Table 1's on ImageNet; on
        CIFAR basic blocks, and three equal stages when the depth allows them (with this block)."""
        if self.family == "imagenet":
            return IMAGENET_DEPTHS.get(self.depth or 0, (None, None))
        block = str(self.block)
        num_stages = len(_DEFAULT_WIDTHS["cifar"])
        n, remainder = divmod((self.depth or 0) - 2, LAYERS_PER_BLOCK[block] * num_stages)
        return "basic", (n,) * num_stages if n >= 1 and not remainder else None

    def to_dict(self) -> dict[str, Any]:
        """Plain values only (lists, str, int, bool): what YAML, JSON and study storage hold."""
        data = asdict(self)
        data["stages"] = list(self.stages or ())
        data["widths"] = list(self.widths or ())
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "") -> ResNetArch:
        """The inverse of `to_dict`; also accepts a partial mapping (missing fields take defaults).

        `source` (e.g. a file name) is quoted in errors so a bad study spec is easy to find.
        """
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(valid))
        where = f" in {source}" if source else ""
        if unknown:
            raise ArchError(f"unknown ResNetArch field(s) {unknown}{where}; valid fields: {', '.join(valid)}")
        try:
            return cls(**data)
        except ArchError as error:
            if source:
                raise ArchError(f"{error} (in {source})") from None
            raise

    @property
    def digest(self) -> str:
        """sha1 of the canonical JSON of `to_dict()`: stable across runs, processes and machines."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha1(canonical.encode()).hexdigest()

    def replace(self, **changes: Any) -> ResNetArch:
        """A copy with some fields changed, re-validated (e.g. `arch.replace(shortcut="none")`).

        Changing `depth` drops the stored stages, and changing `stages` the stored depth, so the
        two do not contradict each other.
        """
        data = self.to_dict()
        if "depth" in changes and "stages" not in changes:
            data["stages"] = None
        if "stages" in changes and "depth" not in changes:
            data["depth"] = None
        data.update(changes)
        return type(self).from_dict(data)


def _resolve_imagenet(
    block: str | None, stages: tuple[int, ...] | None, depth: int | None
) -> tuple[str, tuple[int, ...], int]:
    table = ", ".join(f"{d} ({b})" for d, (b, _) in IMAGENET_DEPTHS.items())
    if stages is None:
        if depth is None:
            raise ArchError(f"ResNetArch needs a depth or stages; ImageNet depths: {table}")
        if depth not in IMAGENET_DEPTHS:
            raise ArchError(
                f"ResNetArch.depth={depth} is not an ImageNet depth of the paper; valid: {table}; "
                "or give stages=[...] (blocks per stage) for a custom network"
            )
        table_block, stages = IMAGENET_DEPTHS[depth]
        if block is not None and block != table_block:
            raise ArchError(
                f"ResNetArch.block={block!r} does not match ImageNet depth {depth}, which uses "
                f"{table_block} blocks; give stages=[...] for a custom network"
            )
        return table_block, stages, depth
    block = block or "basic"
    implied = LAYERS_PER_BLOCK[block] * sum(stages) + 2
    if depth is not None and depth != implied:
        raise ArchError(
            f"ResNetArch.depth={depth} contradicts stages={list(stages)} with {block} blocks, "
            f"which give depth {implied}; give one of them or make them agree"
        )
    return block, stages, implied


def _resolve_cifar(
    block: str | None, stages: tuple[int, ...] | None, depth: int | None, num_stages: int
) -> tuple[str, tuple[int, ...], int]:
    block = block or "basic"
    per_block = LAYERS_PER_BLOCK[block]
    if stages is None:
        if depth is None:
            raise ArchError(f"ResNetArch needs a depth or stages; CIFAR depths: {_depth_series(block, num_stages)}")
        n, remainder = divmod(depth - 2, per_block * num_stages)
        if remainder or n < 1:
            raise ArchError(
                f"ResNetArch.depth={depth} is not a CIFAR depth; valid: {_depth_series(block, num_stages)}"
            )
        return block, (n,) * num_stages, depth
    if len(stages) != num_stages:
        raise ArchError(
            f"ResNetArch.stages={list(stages)} has {len(stages)} stages but there are "
            f"{num_stages} widths; give one width per stage"
        )
    implied = per_block * sum(stages) + 2
    if depth is not None and depth != implied:
        raise ArchError(
            f"ResNetArch.depth={depth} contradicts stages={list(stages)} with {block} blocks, "
            f"which give depth {implied}; give one of them or make them agree"
        )
    return block, stages, implied


def _check_shortcut(shortcut: object, family: str) -> str:
    """The shortcut option, the family's default when none is given; lower-case letters and
    "None" are accepted as spellings of the options."""
    shortcut = shortcut if shortcut is not None else _DEFAULT_SHORTCUT[family]
    if isinstance(shortcut, str) and shortcut in ("a", "b", "c", "None", "NONE"):
        shortcut = shortcut.upper() if len(shortcut) == 1 else "none"
    return _check_choice("shortcut", shortcut, SHORTCUTS)


def _resolve_layout(family: str, block: str | None, stages: tuple[int, ...] | None,
                    depth: int | None, widths: tuple[int, ...] | None,
                    ) -> tuple[str, tuple[int, ...], int]:
    """(block, stages, depth) completed from whichever of them were given."""
    if family == "imagenet":
        return _resolve_imagenet(block, stages, depth)
    if widths is not None:
        num_stages = len(widths)
    else:
        num_stages = len(stages) if stages is not None else len(_DEFAULT_WIDTHS["cifar"])
    return _resolve_cifar(block, stages, depth, num_stages)


def _check_widths(family: str, depth: int, stages: tuple[int, ...],
                  widths: tuple[int, ...] | None) -> tuple[int, ...]:
    """The depth within the toolkit's limit, and one width per stage (doubling from the family's
    first width when none are given)."""
    if depth > MAX_DEPTH:
        raise ArchError(f"ResNetArch.depth={depth} is above the deepest network the toolkit "
                        f"builds, {MAX_DEPTH} layers (the paper's deepest has 1202)")
    if widths is None:
        base = _DEFAULT_WIDTHS[family][0]
        widths = tuple(base * 2**i for i in range(len(stages)))
    if len(widths) != len(stages):
        raise ArchError(
            f"ResNetArch.widths={list(widths)} has {len(widths)} entries but there are "
            f"{len(stages)} stages {list(stages)}; give one width per stage"
        )
    return widths


def _check_base_width(block: str, base_width: int, widths: tuple[int, ...]) -> None:
    """Basic blocks take no base_width; a bottleneck's inner width, width * base_width // 64,
    must be a channel at least in every stage (it built, then failed in the model)."""
    if block == "basic" and base_width != 64:
        raise ArchError(f"ResNetArch.base_width={base_width} applies to bottleneck blocks only; "
                        "basic blocks need 64 (change widths instead)")
    if block == "bottleneck" and min(widths) * base_width // 64 < 1:
        raise ArchError(f"ResNetArch.base_width={base_width} leaves the stage of {min(widths)} "
                        f"filters no inner channel ({min(widths)} x {base_width} // 64 = 0): "
                        f"base_width >= {-(-64 // min(widths))} with these widths")


def _check_padded_widths(shortcut: str, block: str, widths: tuple[int, ...]) -> None:
    """Shortcuts that pad with zeros (A, and none's projection-free stages) need channels that
    never shrink from one stage to the next."""
    if shortcut not in ("A", "none"):
        return
    expansion = EXPANSION[block]
    channels = [widths[0], *(w * expansion for w in widths)]
    for stage, (c_in, c_out) in enumerate(zip(channels, channels[1:]), start=1):
        if c_out < c_in:
            raise ArchError(
                f"ResNetArch.shortcut={shortcut!r} pads channels with zeros, so stage widths "
                f"cannot shrink, but stage {stage} goes from {c_in} to {c_out} channels; "
                "use non-decreasing widths or shortcut 'B' or 'C'"
            )


def _check_size(arch: ResNetArch) -> None:
    """The network's convolution weights within what the toolkit builds."""
    weights = arch.conv_weights
    if weights > MAX_PARAMETERS:
        raise ArchError(
            f"ResNetArch with widths={list(arch.widths)}, stages={list(arch.stages)} and "
            f"{arch.block} blocks holds about {weights:.3g} convolution weights, above the "
            f"{MAX_PARAMETERS:.0e} the toolkit builds (the paper's largest net has 6e+07): "
            "check the widths"
        )
