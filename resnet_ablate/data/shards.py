"""Sharded data sets: tar shards in the webdataset layout, read from local paths or http(s) URLs,
so that no cluster node needs a shared filesystem.

Each sample is a group of tar members sharing a key: the image (`.jpg`, `.jpeg`, `.png` or
`.webp`) and its class index as text (`.cls`), the layout ImageNet shards conventionally have
(shard_format.py says what a shard is; convert-imagenet writes it).
A member's key is its name without the extension, and without an image extension left before it
(`split_key`), so ImageNet's `n01440764_10026.JPEG.jpg` and `.JPEG.cls` or `n01440764_10026.cls`
are one sample; counting and decoding use that one rule. Decoding and augmentation are the image
folder's (decode.py), with each image's draws seeded by (data set seed, trial's augmentation
seed, epoch, key). Shards are split among the loader's workers and read in an order drawn per
epoch, so the sample order depends on the number of workers; an image's crops never do. A
sample whose image cannot be decoded (or that has no label) is skipped and counted; a shard that
cannot be read fails the trial, naming it.

Shards are opened by shard_urls.py, never through a shell (`pipe:` URLs only where the user
opted in).
"""

from __future__ import annotations

import functools
import io
import random
import re
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch

from ..spec.catalogue import DEFAULT_LOADER_WORKERS, REQUIRED_SHARD_KEYS, SHARD_KEYS
from ..spec.dataset import shard_urls
from .decode import (PLAIN, CropAugmentation, PixelStatistics, Preprocess, centre_pixels,
                     check_streamed_options, collate, collate_views, decode_sample, decode_views,
                     one_thread)
from .device_decode import collate_encoded, encoded_crop
from .errors import DataUnavailable, SizeMisstated
from .replica_epoch import ReplicaBatches
from .shard_format import (IMAGE_EXTENSIONS, EndWatch, ShardError, count_samples, decompressed,
                           label_of, reading_shard, split_key)
from .shard_urls import check_url, is_local, local_path, open_shard, probe_shard

STATISTICS_SAMPLE = 256  # training images whose centre crops give the per-pixel mean and PCA
SHUFFLE_BUFFER = 1000  # samples mixed across the shards a worker reads
PROBE_THREADS = 16  # ImageNet's train shards are ~1,000 URLs: asked side by side


class _NamingTheShard:
    """A DataLoader whose ShardError, raised in a decoding worker, comes out as the worker raised
    it: its message, naming the shard. (The loader re-raises a worker's error as "Caught
    ShardError in DataLoader worker process 0.", the message only at the end of the traceback
    under it.)"""

    def __init__(self, loader: torch.utils.data.DataLoader) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[Any]:
        try:
            yield from self.loader
        except ShardError as error:
            text = str(error)
            # The traceback's last "<module>.<Name>: " starts the worker's own message.
            marker = re.compile(rf"^(?:[\w.]+\.)?{type(error).__name__}: ", re.MULTILINE)
            found = list(marker.finditer(text))
            if not text.startswith("Caught ") or not found:
                raise
            raise type(error)(text[found[-1].end():].rstrip()) from None


def _members(sources: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """The files of each shard in `sources` ({"url": ...}), as webdataset's grouping stage takes
    them, and an empty end-of-shard marker after each, so no sample spans two shards."""
    from webdataset.tariterators import tar_file_iterator

    for source in sources:
        url = source["url"]
        with reading_shard(url), open_shard(url) as stream:
            watched = EndWatch(decompressed(stream))
            for member in tar_file_iterator(watched):
                yield {**member, "__url__": url}
            watched.check_ended(url)  # read to its end: a shard cut between members is named
        yield {}


def _sample(record: dict[str, Any], *, image_size: int, augmentation: CropAugmentation,
            seed: tuple[int, int], epoch: int | None, preprocess: Preprocess = PLAIN,
            view: str | None = None, encoded: bool = False,
            num_classes: int | None = None) -> tuple[Any, int]:
    """(image, label) of a grouped record; (None, label) for one the loader skips: no image, an
    image that cannot be decoded, or no label."""
    key = record["__key__"]
    label = label_of(record["cls"], num_classes,
                     f"shard {record.get('__url__', '?')}, sample {key}") if "cls" in record else -1
    image = next((record[e] for e in IMAGE_EXTENSIONS if e in record), None)
    if image is None or label < 0:
        return None, label
    if view is not None:
        return decode_views(io.BytesIO(image), image_size=image_size, view=view,
                            preprocess=preprocess), label
    rng = None
    if epoch is not None:  # training: draws seeded by the sample, not by the worker reading it
        rng = np.random.default_rng([*seed, epoch, zlib.crc32(key.encode())])
    if encoded:  # the bytes and the crop's box, for the GPU to decode
        return encoded_crop(io.BytesIO(image), image_size=image_size, augmentation=augmentation,
                            rng=rng, preprocess=preprocess), label
    return decode_sample(io.BytesIO(image), image_size=image_size, augmentation=augmentation,
                  rng=rng, preprocess=preprocess), label


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
    augmentation: CropAugmentation
    loader_workers: int
    seed: int = 0
    name: str = "webdataset"
    in_channels: int = 3
    eval_split: str = "val"  # what both layouts call the split that scores (ILSVRC's val)
    # The splits ("train", "val") whose sizes the spec stated, for shards behind URLs, where the
    # others' were counted: a pass over such a split checks its size (check_read).
    sizes_stated: tuple[str, ...] = ()

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(str(i) for i in range(self.num_classes))

    @functools.cached_property
    def pixel_statistics(self) -> PixelStatistics:
        """The training images' PixelStatistics, from the centre crops of STATISTICS_SAMPLE
        training images (all of them where there are fewer): an equal share from the start of
        each of up to STATISTICS_SAMPLE shards drawn in a seeded order, so that shards written
        class by class still give a sample of many classes."""
        urls = list(self.train_urls)
        np.random.default_rng(self.seed).shuffle(urls)
        urls = urls[:STATISTICS_SAMPLE]
        crops: list[np.ndarray] = []
        tried = 0
        for index, url in enumerate(urls):
            # An equal share of what is left: a shard with fewer images leaves its shortfall to
            # the shards after it.
            share = -(-(STATISTICS_SAMPLE - tried) // (len(urls) - index))
            with reading_shard(url), open_shard(url) as stream, \
                    tarfile.open(fileobj=stream, mode="r|*") as archive:
                read = 0
                for member in archive:
                    if read == share:
                        break
                    if member.isfile() and split_key(member.name)[1] in IMAGE_EXTENSIONS:
                        crop = centre_pixels(io.BytesIO(archive.extractfile(member).read()),
                                             self.image_size)
                        crops += [] if crop is None else [crop]
                        read, tried = read + 1, tried + 1
        return PixelStatistics.of(crops, tried=tried)

    def _loader(self, urls: list[str], batch_size: int, epoch: int | None, order_seed: int,
                pin_memory: bool, augment: bool = True, augment_seed: int = 0,
                preprocess: Preprocess = PLAIN, view: str | None = None,
                encoded: bool = False) -> Iterable[Any]:
        """Training batches where `epoch` is given (shuffled; augmented unless `augment` is
        false), else the evaluation's, in shard order; `encoded` as in train_loader."""
        workers = min(self.loader_workers, len(urls))  # a worker without a shard would idle
        stages = [] if epoch is None else [_shuffle_stage(order_seed)]
        dataset = _pipeline(urls, *stages, partial(
            _map_stage, partial(_sample, image_size=self.image_size,
                                augmentation=self.augmentation, seed=(self.seed, augment_seed),
                                epoch=epoch if augment else None, preprocess=preprocess,
                                view=view, encoded=encoded, num_classes=self.num_classes)))
        collate_fn = collate_views if view is not None else collate_encoded if encoded else collate
        return _NamingTheShard(torch.utils.data.DataLoader(
            dataset, batch_size=1 if view == "multi_scale" else batch_size,
            collate_fn=collate_fn, num_workers=workers,
            pin_memory=pin_memory, prefetch_factor=4 if workers else None,
            worker_init_fn=one_thread if workers else None,
            drop_last=epoch is not None))  # as the image folder's (a batch of one cannot train BN)

    def train_loader(self, batch_size: int, epoch: int, generator: torch.Generator, *,
                     augment: bool = True, pin_memory: bool = False, part: int = 0,
                     parts: int = 1, augment_seed: int = 0, preprocess: Preprocess = PLAIN,
                     encoded: bool = False) -> Iterable[tuple[Any, torch.Tensor, int]]:
        """One epoch of training batches (augmented, or centre crops with `augment=False`):
        shards in an order drawn from `generator`, each image's crop drawn from (the data set's
        seed, `augment_seed` (the trial's), `epoch`, its key); with `encoded`, batches of
        device_decode.EncodedCrop for the GPU to decode.

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

        def loader(urls: list[str]) -> Iterable[Any]:
            return self._loader(urls, batch_size, epoch, seed + part, pin_memory, augment,
                                augment_seed, preprocess, encoded=encoded)

        if parts == 1:
            return loader(urls)
        return ReplicaBatches(loader, urls, batch_size, self.train_size // (batch_size * parts))

    def test_loader(self, batch_size: int, *, pin_memory: bool = False, part: int = 0,
                    parts: int = 1, preprocess: Preprocess = PLAIN,
                    view: str | None = None) -> Iterable[tuple[Any, torch.Tensor, int]]:
        """The evaluation samples, single centre crops (or `view`'s, as the image folder's),
        in shard order (the `part`-th of `parts` shares: every `parts`-th shard)."""
        urls = list(self.test_urls)[part::parts]
        return self._loader(urls, batch_size, None, 0, pin_memory, preprocess=preprocess,
                            view=view) if urls else []

    def check_read(self, split: str, read: int, slack: int = 0, whole: bool = True) -> None:
        """SizeMisstated where a whole pass over `split` ("train" or "val") read `read` samples
        (decoded or skipped) and the size stated for it is not in [read, read + slack] (`slack`:
        the samples a pass may leave out unread, as a training epoch's last partial batches), or,
        where the pass did not end (`whole` False: replicas whose epoch ended before their first
        pass did), read more than that size. Nothing to check where the size was counted."""
        size, key = (self.train_size, "train_size") if split == "train" else \
            (self.test_size, "val_size")
        if split not in self.sizes_stated or read <= size <= (read + slack if whole else size):
            return
        if whole:
            told = f"a pass over the {split} shards read {read:,} images" + (
                f" (give or take {slack:,} in partial batches)" if slack else "")
        else:
            told = f"the replicas read {read:,} distinct {split} images within part of a pass"
        raise SizeMisstated(f"shards.{key}: {size:,} stated, but {told}: give their count ({key} "
                            "sets each epoch's length, costs and data-parallel steps)")

    def training_slack(self, batch_size: int) -> int:
        """The samples one training epoch in one process may leave unread: each loader worker
        drops its last partial batch."""
        return max(1, min(self.loader_workers, len(self.train_urls))) * (batch_size - 1)

    def check_available(self) -> None:
        """DataUnavailable naming the first shard (of the training ones, then the evaluation's)
        that is missing or does not answer, and how many more: checked when a trial starts, so
        that a missing shard fails it before training rather than at the epoch that reads it."""
        for split, urls in (("train", self.train_urls), ("val", self.test_urls)):
            with ThreadPoolExecutor(min(PROBE_THREADS, len(urls))) as pool:
                problems = [(url, why) for url, why in zip(urls, pool.map(probe_shard, urls))
                            if why is not None]
            if problems:
                url, why = problems[0]
                more = f" (and {len(problems) - 1} more of its {len(urls)})" if len(problems) > 1 \
                    else ""
                raise DataUnavailable(f"shards.{split}: shard {url} cannot be read: {why}{more}")


def _pipeline(urls: list[str], *stages: Any) -> torch.utils.data.IterableDataset:
    """The samples of `urls`, read by the toolkit's own opener (never a shell), each loader worker
    reading every n-th shard. No node splitting: each replica of a data-parallel run is already
    handed its own shards (`train_loader`'s part and parts), and webdataset's default splitter
    refuses to run under a process group of several."""
    import webdataset  # imported when a sharded data set is read: the others never need it
    from webdataset.tariterators import group_by_keys

    return webdataset.DataPipeline(webdataset.SimpleShardList(urls), webdataset.split_by_worker,
                                   _members, partial(group_by_keys, keys=split_key), *stages)


def _shuffle_stage(seed: int) -> Any:
    import webdataset

    return webdataset.shuffle(SHUFFLE_BUFFER, rng=random.Random(seed))


def _map_stage(function: Any, samples: Iterable[dict[str, Any]]) -> Iterator[Any]:
    return map(function, samples)


def _given_size(given: Any, size_key: str, split: str, counted: int, all_local: bool) -> int:
    """A spec's train_size or val_size, checked against what the local shards were counted to
    hold (`counted`): equal where every shard is local, at least that where some are behind URLs.
    An epoch reads its size's worth of batches, so a wrong one would train on the real images
    round and round (or stop short) without a word."""
    if isinstance(given, bool) or not isinstance(given, int) or given < 1:
        raise ValueError(f"shards.{size_key} must be an int >= 1 (the images the {split} "
                         f"shards hold), got {given!r}")
    if all_local and given != counted:
        raise ValueError(f"shards.{size_key}: {given:,} given, but the {split} shards hold "
                         f"{counted:,} images (local shards are counted as the data set loads: "
                         f"leave {size_key} out, or give {counted:,})")
    if given < counted:
        raise ValueError(f"shards.{size_key}: {given:,} given, but the local {split} shards "
                         f"alone hold {counted:,} images")
    return given


def load_shards(shards: dict[str, Any], *, image_size: int = 224,
                augmentation: CropAugmentation = "scale",
                loader_workers: int = DEFAULT_LOADER_WORKERS,
                seed: int = 0) -> ShardData:
    """A sharded data set from `shards`: {train: PATTERN, val: PATTERN, num_classes: N} and, for
    shards behind URLs, train_size and val_size (local shards are counted). Every URL is checked
    now (`check_url`: no `pipe:` without the opt-in), and local shards to exist; a URL is read
    when trained."""
    check_streamed_options(augmentation, image_size, loader_workers)
    unknown = sorted(set(shards) - set(SHARD_KEYS))
    missing = [k for k in REQUIRED_SHARD_KEYS if k not in shards]
    if unknown or missing:
        raise ValueError(f"shards: {'unknown key(s) ' + ', '.join(unknown) if unknown else ''}"
                         f"{'; ' if unknown and missing else ''}"
                         f"{'missing ' + ', '.join(missing) if missing else ''}; "
                         f"valid keys: {', '.join(SHARD_KEYS)}")
    urls = {split: shard_urls(str(shards[split])) for split in ("train", "val")}
    for split in urls:
        for url in urls[split]:
            check_url(url, f"shards.{split}")
    num_classes = shards["num_classes"]
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"shards.num_classes must be an int >= 2, got {num_classes!r}")
    sizes = {}
    for split, size_key in (("train", "train_size"), ("val", "val_size")):
        local = [u for u in urls[split] if is_local(u)]
        absent = [u for u in local if not local_path(u).is_file()]
        if absent:
            glob = any(c in str(shards[split]) for c in "*?[")
            raise DataUnavailable(f"shards.{split}: {len(absent)} of {len(urls[split])} shards "
                                  f"not found, first {absent[0]}" + (
                                      " (a pattern names shards by brace ranges, as "
                                      "train-{000000..000146}.tar; * and ? are not expanded)"
                                      if glob else ""))
        # Local shards are read now, given sizes or not: one cut short or with a bad label is
        # named before training (a given size would have trained on what it holds).
        counted = count_samples(local, num_classes) if local else 0
        if local and len(local) == len(urls[split]) and counted == 0:
            raise ValueError(f"shards.{split}: its {len(local)} shard(s) hold no image (first "
                             f"{local[0]}): nothing to {'train' if split == 'train' else 'score'} "
                             "on")
        if shards.get(size_key) is not None:  # (a spec's `train_size: null` is no size)
            sizes[split] = _given_size(shards[size_key], size_key, split, counted,
                                       all_local=len(local) == len(urls[split]))
        elif len(local) == len(urls[split]):
            sizes[split] = counted
        else:
            raise ValueError(f"shards.{size_key}: needed for shards behind URLs (local shards "
                             "are counted)")
    stated = tuple(split for split in urls if not all(map(is_local, urls[split])))
    return ShardData(tuple(urls["train"]), tuple(urls["val"]), num_classes, sizes["train"],
                     sizes["val"], image_size, augmentation, loader_workers, seed,
                     sizes_stated=stated)
