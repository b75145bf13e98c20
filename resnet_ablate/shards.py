"""Sharded data sets: tar shards in the webdataset layout, read by the `webdataset` library from
local paths or URLs (http, s3 through a `pipe:` URL, ...), so that no cluster node needs a shared
filesystem.

Each sample is a group of tar members sharing a key: the image (`.jpg`, `.jpeg`, `.png` or
`.webp`) and its class index as text (`.cls`), the layout ImageNet shards conventionally have.
Decoding and augmentation are the image folder's (imagefolder.py), with each image's draws seeded
by (seed, epoch, key). Shards are split among the loader's workers and read in an order drawn per
epoch, so the sample order depends on the number of workers; an image's crops never do. A sample
whose image cannot be decoded is skipped and counted; a shard that cannot be read fails the
trial, naming it.
"""

from __future__ import annotations

import io
import itertools
import random
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .imagefolder import Augmentation, collate, decode, one_thread
from .spec import DEFAULT_LOADER_WORKERS

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
SHUFFLE_BUFFER = 1000  # samples mixed across the shards a worker reads


def expand(pattern: str) -> list[str]:
    """Brace notation, as webdataset takes it: "train-{000..009}.tar" is ten shards."""
    import braceexpand

    return list(braceexpand.braceexpand(pattern))


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def count_samples(urls: list[str]) -> int:
    """Samples in local shards, from their member names (nothing is decoded)."""
    keys = set()
    for url in urls:
        with tarfile.open(url) as archive:
            for name in archive.getnames():
                stem, _, extension = name.rpartition(".")
                if extension.lower() in IMAGE_EXTENSIONS:
                    keys.add((url, stem))
    return len(keys)


def _sample(record: dict[str, Any], *, image_size: int, augmentation: Augmentation, seed: int,
            epoch: int | None) -> tuple[torch.Tensor | None, int]:
    key = record["__key__"]
    label = int(record["cls"].decode().strip()) if "cls" in record else -1
    image = next((record[e] for e in IMAGE_EXTENSIONS if e in record), None)
    if image is None:
        return None, label
    rng = None
    if epoch is not None:  # training: draws seeded by the sample, not by the worker reading it
        rng = np.random.default_rng([seed, epoch, zlib.crc32(key.encode())])
    return decode(io.BytesIO(image), image_size=image_size, augmentation=augmentation,
                  rng=rng), label


# eq=False: identity is what the data-set cache hands out.
@dataclass(frozen=True, eq=False)
class ShardData:
    """A sharded data set (see the module docstring); the training loop asks it for one loader
    per epoch and one for evaluation, as it does an image folder."""

    train_urls: tuple[str, ...]
    test_urls: tuple[str, ...]
    num_classes: int
    train_size: int
    test_size: int
    image_size: int
    augmentation: Augmentation
    loader_workers: int
    seed: int = 0
    name: str = "webdataset"
    in_channels: int = 3
    eval_split: str = "test"

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(str(i) for i in range(self.num_classes))

    def _loader(self, urls: list[str], batch_size: int, epoch: int | None, order_seed: int,
                pin_memory: bool, augment: bool = True) -> torch.utils.data.DataLoader:
        """Training batches where `epoch` is given (shuffled; augmented unless `augment` is
        false), else the evaluation's, in shard order."""
        import webdataset  # imported when a sharded data set is read: the others never need it

        workers = min(self.loader_workers, len(urls))  # a worker without a shard would idle
        dataset = webdataset.WebDataset(urls, shardshuffle=False, empty_check=False)
        if epoch is not None:
            dataset = dataset.shuffle(SHUFFLE_BUFFER, rng=random.Random(order_seed))
        dataset = dataset.map(partial(_sample, image_size=self.image_size,
                                      augmentation=self.augmentation, seed=self.seed,
                                      epoch=epoch if augment else None))
        return torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, collate_fn=collate, num_workers=workers,
            pin_memory=pin_memory, prefetch_factor=4 if workers else None,
            worker_init_fn=one_thread if workers else None,
            drop_last=epoch is not None)  # as the image folder's (a batch of one cannot train BN)

    def train_loader(self, batch_size: int, epoch: int, generator: torch.Generator, *,
                     augment: bool = True, pin_memory: bool = False, part: int = 0,
                     parts: int = 1) -> Iterable[tuple[torch.Tensor, torch.Tensor, int]]:
        """One epoch of training batches (augmented, or centre crops with `augment=False`):
        shards in an order drawn from `generator`.

        With `parts` replicas, the `part`-th one reads every `parts`-th shard of that order, and
        every replica takes the same number of steps, one epoch's worth of global batches of
        `batch_size` x `parts`: shards hold different numbers of samples, so a replica whose
        shards run out reads them again rather than leave the others waiting for it."""
        if parts > 1 and len(self.train_urls) < parts:
            raise ValueError(f"{len(self.train_urls)} training shard(s) cannot feed {parts} "
                             "replicas: each reads its own shards; write at least as many shards "
                             "as replicas")
        order = torch.randperm(len(self.train_urls), generator=generator).tolist()
        seed = int(torch.randint(2**31, (1,), generator=generator))
        urls = [self.train_urls[i] for i in order][part::parts]
        loader = self._loader(urls, batch_size, epoch, seed + part, pin_memory, augment)
        if parts == 1:
            return loader
        return itertools.islice(_repeated(loader), self.train_size // (batch_size * parts))

    def test_loader(self, batch_size: int, *, pin_memory: bool = False, part: int = 0,
                    parts: int = 1) -> Iterable[tuple[torch.Tensor, torch.Tensor, int]]:
        """The evaluation samples, single centre crops, in shard order (the `part`-th of `parts`
        shares: every `parts`-th shard)."""
        urls = list(self.test_urls)[part::parts]
        return self._loader(urls, batch_size, None, 0, pin_memory) if urls else []

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "train_shards": len(self.train_urls),
                "test_shards": len(self.test_urls), "train_size": self.train_size,
                "test_size": self.test_size, "num_classes": self.num_classes,
                "image_size": self.image_size, "augmentation": self.augmentation}


def _repeated(loader: torch.utils.data.DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """The loader's batches, over and over (a replica's shards read again when they run out)."""
    while True:
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        if not yielded:
            return


SHARD_KEYS = ("train", "val", "num_classes", "train_size", "val_size")


def load_shards(shards: dict[str, Any], *, image_size: int = 224,
                augmentation: Augmentation = "scale",
                loader_workers: int = DEFAULT_LOADER_WORKERS,
                seed: int = 0) -> ShardData:
    """A sharded data set from `shards`: {train: PATTERN, val: PATTERN, num_classes: N} and, for
    shards behind URLs, train_size and val_size (local shards are counted). Local shards are
    checked to exist now; a URL is read when trained."""
    unknown = sorted(set(shards) - set(SHARD_KEYS))
    missing = [k for k in ("train", "val", "num_classes") if k not in shards]
    if unknown or missing:
        raise ValueError(f"shards: {'unknown key(s) ' + ', '.join(unknown) if unknown else ''}"
                         f"{'; ' if unknown and missing else ''}"
                         f"{'missing ' + ', '.join(missing) if missing else ''}; "
                         f"valid keys: {', '.join(SHARD_KEYS)}")
    urls = {split: expand(str(shards[split])) for split in ("train", "val")}
    sizes = {}
    for split, size_key in (("train", "train_size"), ("val", "val_size")):
        local = [u for u in urls[split] if _is_local(u)]
        absent = [u for u in local if not Path(u).is_file()]
        if absent:
            raise FileNotFoundError(f"shards.{split}: {len(absent)} of {len(urls[split])} shards "
                                    f"not found, first {absent[0]}")
        if size_key in shards:
            sizes[split] = int(shards[size_key])
        elif len(local) == len(urls[split]):
            sizes[split] = count_samples(local)
        else:
            raise ValueError(f"shards.{size_key}: needed for shards behind URLs (local shards "
                             "are counted)")
    num_classes = shards["num_classes"]
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"shards.num_classes must be an int >= 2, got {num_classes!r}")
    return ShardData(tuple(urls["train"]), tuple(urls["val"]), num_classes, sizes["train"],
                     sizes["val"], image_size, augmentation, loader_workers, seed)
