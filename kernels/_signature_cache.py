"""A bounded dict for what the op works out once per call signature (eager calls, launch plans,
geometries).

A training loop makes a few hundred signatures at most (each layer's shape and layout, the last
partial batch, evaluation), but a loop whose shapes vary never stops making new ones: the paper's
multi-scale testing evaluates each image whole, one shape per image's size and scale, and a
plain dict would keep every signature's plans (and the device tensors they hold) for the life of
the process. Past `limit` entries the cache empties and refills: a steady loop pays its
signatures' first-call cost once more (tens of milliseconds for a whole network), never a lookup
that costs more than a dict's.
"""

from __future__ import annotations

from typing import TypeVar

Key = TypeVar("Key")
Value = TypeVar("Value")

# Signatures a cache keeps: an order of magnitude above a training loop's (ResNet-152 has 155
# BatchNorm layers, a few dozen distinct signatures, each at most twice: the last partial batch).
SIGNATURE_LIMIT = 4096


class SignatureCache(dict[Key, Value]):
    """A dict that empties itself before an insertion would take it past `limit` entries. Lookups
    are the dict's own (`get`, `in`, `[]`); an entry set while another thread empties the cache
    is at worst made again, as on a signature's first call."""

    __slots__ = ("limit",)

    def __init__(self, limit: int = SIGNATURE_LIMIT) -> None:
        super().__init__()
        if limit < 1:
            raise ValueError(f"a signature cache's limit must be an int >= 1, got {limit!r}")
        self.limit = limit

    def __setitem__(self, key: Key, value: Value) -> None:
        if len(self) >= self.limit and key not in self:
            self.clear()
        super().__setitem__(key, value)
