"""One replica's epoch of training batches in a data-parallel run on shards: the replica reads its
own shards (every `parts`-th of the epoch's order), over and over until the epoch's steps are
taken, since shards hold different numbers of samples and every replica takes the same number of
steps. What its first pass over them read is kept: summed over the replicas it is the training
split's size (less the loaders' partial batches), which checks a size the spec stated for shards
behind URLs (ShardData.check_read)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .errors import DataUnavailable

# A replica's shards read this many times over in one pass and still short of one batch hold
# (next to) no decodable sample: an error, not a replica that waits for ever.
MAX_COPIES = 1024

Batches = Callable[[list[str]], Iterable[tuple[Any, Any, int]]]


@dataclass
class FirstPass:
    """The samples (decoded or skipped) a replica's first pass over its shards has read, and
    whether that pass ended within the epoch (a replica whose shards hold more than its steps
    take does not finish it: its count is then a lower bound)."""

    read: int = 0
    ended: bool = False


@dataclass
class ReplicaBatches:
    """`steps` batches of `batch_size` from `loader` over `urls`, read again as they run out
    (`repeated`), with the epoch's FirstPass."""

    loader: Batches
    urls: list[str]
    batch_size: int
    steps: int
    first_pass: FirstPass = field(default_factory=FirstPass)

    def __iter__(self) -> Iterator[tuple[Any, Any, int]]:
        return itertools.islice(repeated(self.loader, self.urls, self.batch_size,
                                         self.first_pass), self.steps)


def repeated(loader: Batches, urls: list[str], batch_size: int,
             first_pass: FirstPass | None = None) -> Iterator[tuple[Any, Any, int]]:
    """A replica's batches (images, labels, samples skipped), over and over: its shards read
    again when they run out. Where they hold less than one batch (a small last shard alone on a
    replica), a pass yields none, so they are read twice in a pass, four times, ... until it
    yields one: a replica that took no step would leave the others waiting at their first
    all-reduce for ever. (Such a first pass counts as reading nothing: its samples are all in
    the partial batches a pass may leave unread.)"""
    first_pass = first_pass if first_pass is not None else FirstPass()
    copies = 1
    while True:
        yielded = False
        for batch, last in _with_last(loader(urls * copies), not first_pass.ended):
            yielded = True
            if not first_pass.ended:
                first_pass.read += len(batch[1]) + batch[2]
                first_pass.ended = last  # before the epoch's last step, which may be this one
            yield batch
        first_pass.ended = True
        if not yielded:
            if copies >= MAX_COPIES:
                raise DataUnavailable(f"shards {', '.join(urls)} (one replica's) hold no "
                                      f"{batch_size} decodable training images even read "
                                      f"{copies} times over")
            copies *= 2


def _with_last(batches: Iterable[Any], look_ahead: bool) -> Iterator[tuple[Any, bool]]:
    """Each batch, and whether it is the pass's last: known by reading the next one first where
    `look_ahead` (the first pass: an epoch whose last step is its last batch ends there without
    asking for more), else False until the pass has ended."""
    if not look_ahead:
        yield from ((batch, False) for batch in batches)
        return
    batches = iter(batches)
    batch = next(batches, _END)
    while batch is not _END:
        following = next(batches, _END)
        yield batch, following is _END
        batch = following


_END = object()
