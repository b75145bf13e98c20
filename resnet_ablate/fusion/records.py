"""What `fuse` reports: the blocks it converted, every BatchNorm it fused and with which pattern,
and what it left alone with the reason."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Pattern = Literal["BN->ReLU", "BN->add->ReLU"]


class FuseWarning(UserWarning):
    """Some sites of a model were left unfused; the message says which and why."""


@dataclass(frozen=True)
class SkippedBlock:
    """A block or BatchNorm `fuse` left as it was (`name`, its module name), and why."""

    name: str
    reason: str


@dataclass(frozen=True)
class FusedSite:
    """A BatchNorm (`batch_norm`, its module name) that now also applies the add and ReLU.
    `residual_batch_norm`: where a site found in a traced forward adds another BatchNorm's
    output (a projection shortcut's), that one, which stays as it was (its sum's ReLU is this
    one's); None elsewhere (a converted block's shortcut is part of the block)."""

    batch_norm: str
    pattern: Pattern
    residual_batch_norm: str | None = None


@dataclass(frozen=True)
class FuseReport:
    """`fused`: the residual blocks converted to this package's blocks; `sites`: every BatchNorm
    fused, in blocks or found in a module's traced forward; `rewritten`: the modules whose forward
    was rewritten to call the fused BatchNorms; `skipped`: what was left alone, with the reason."""

    fused: tuple[str, ...]
    skipped: tuple[SkippedBlock, ...]
    sites: tuple[FusedSite, ...] = ()
    rewritten: tuple[str, ...] = ()

    def count(self, pattern: Pattern | None = None) -> int:
        """How many BatchNorms were fused (with `pattern`, or with either)."""
        return sum(pattern is None or site.pattern == pattern for site in self.sites)


def describe(skipped: tuple[SkippedBlock, ...] | list[SkippedBlock]) -> str:
    return "; ".join(f"{s.name or '<model>'}: {s.reason}" for s in skipped)


def qualified(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name
