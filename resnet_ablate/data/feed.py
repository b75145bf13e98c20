"""A data set placed for one run: its training and evaluation batches on the run's device, this
replica's share of them, drawn from the run's own seeded generators.

Every data set serves the loop through the same `Feed` protocol, so the loop never asks which
kind it has: an in-memory one (`MemoryFeed`: tensors moved to the device once, batches cut there)
or a streamed one (`StreamFeed`: the data set's loaders, decoded by their workers).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from .augment import draw_crops, gather_crops
from .bundle import DataBundle, pixel_centred
from .decode import PLAIN, PixelStatistics, Preprocess, normalise
from .device_decode import DeviceCrops
from .errors import NoImages
from .load import Streamed
from .replica_epoch import ReplicaBatches
from .shards import ShardData

# A training batch: images and labels on the device, and the factor its mean loss is scaled by
# before backward (a replica's share of a global batch that did not split evenly).
Batch = tuple[torch.Tensor, torch.Tensor, float]

_ORDER_STREAM, _AUGMENT_STREAM = 1, 2


def derived_seed(seed: int, stream: int) -> int:
    """An independent seed per random stream, so one stream's draws never shift another's."""
    entropy = [seed & 0xFFFFFFFF, seed >> 32 & 0xFFFFFFFF, stream]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0])


@dataclass(frozen=True)
class Placement:
    """Where and how a run takes its batches: the device, what prepares images for the model
    (precision and memory format), the run's seed, whether training batches are augmented,
    and this replica's `part` of `parts`."""

    device: torch.device
    prepare: Callable[[torch.Tensor], torch.Tensor]
    seed: int
    augment: bool
    part: int = 0
    parts: int = 1
    # The paper's preprocessing and test protocol (recipe.py): AlexNet's PCA lighting on training
    # crops (alpha's std), the per-pixel mean subtracted (every data set), and the test-time views
    # (decode.VIEWS) scored after the last epoch beside the centre crop (streamed image data
    # sets: lighting and views).
    lighting: float = 0.0
    pixel_mean: bool = False
    test_views: tuple[str, ...] = ()
    # Each number summed over the replicas (Replicas.sums): how a streamed feed weighs a batch
    # that lost images it could not decode. None in a single process.
    sum_over_replicas: Callable[[list[float]], list[float]] | None = None
    # A streamed data set's training crops decoded on the device (device_decode.py).
    decode_on_device: bool = False


class Feed(Protocol):
    """What the training loop needs of a data set."""

    # Whether every epoch's batches have the shapes `example_batches` gives (nothing skipped
    # while decoding), which compilation and CUDA graph capture need.
    fixed_shapes: bool
    # Whether evaluations report top-5 error, and whether they run in the data set's order over
    # every image (so that per-image outcomes can be recorded).
    measures_top5: bool
    ordered_evaluation: bool
    # Images left out so far because they could not be decoded; the loop resets it.
    skipped: int

    def train_batches(self, epoch: int, batch_size: int) -> Iterator[Batch]: ...
    def eval_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...
    # The test-time views the run scores after its last epoch (decode.VIEWS), and their batches:
    # (views, labels), each view (B * V, C, h, w) with V views of each of the B images.
    test_views: tuple[str, ...]
    def view_batches(self, view: str, batch_size: int) -> Iterator[
        tuple[list[torch.Tensor], torch.Tensor]]: ...
    def example_batches(self, batch_size: int, eval_batch_size: int) -> tuple[
        list[tuple[torch.Tensor, torch.Tensor]], list[torch.Tensor]]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
    # Raises data.SizeMisstated where one evaluation, summed over the replicas, read (decoded or
    # skipped) another number of images than the data set was said to hold.
    def check_evaluation_read(self, read: int) -> None: ...


class _Generators:
    """The run's data order and augmentation generators, each seeded apart from the run's seed."""

    def __init__(self, seed: int) -> None:
        self.order_generator = torch.Generator().manual_seed(derived_seed(seed, _ORDER_STREAM))
        self.augment_generator = torch.Generator().manual_seed(derived_seed(seed, _AUGMENT_STREAM))

    def state_dict(self) -> dict[str, Any]:
        return {"order_generator": self.order_generator.get_state(),
                "augment_generator": self.augment_generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.order_generator.set_state(state["order_generator"])
        self.augment_generator.set_state(state["augment_generator"])


class MemoryFeed(_Generators):
    """An in-memory data set on the device. Moved once: a whole data set is small next to a
    model's activations, and per-batch host-to-device copies would dominate short trials."""

    fixed_shapes = True
    measures_top5 = False
    test_views: tuple[str, ...] = ()

    def __init__(self, data: DataBundle, placement: Placement) -> None:
        if placement.lighting or placement.test_views:
            raise ValueError("lighting and test_views apply to streamed image data sets "
                             f"(imagefolder, webdataset), not to {data.name}, whose images are "
                             "normalised and augmented in memory")
        super().__init__(placement.seed)
        device, prepare = placement.device, placement.prepare
        self.placement = placement
        if placement.pixel_mean:  # computed on the device, beside the images it centres
            data = pixel_centred(dataclasses.replace(data, train_x=data.train_x.to(device),
                                                     test_x=data.test_x.to(device)))
        self.train_x = prepare(data.train_x.to(device))
        self.train_y = data.train_y.to(device)
        share = slice(placement.part, data.test_x.shape[0], placement.parts)
        self.test_x = prepare(data.test_x[share].to(device))
        self.test_y = data.test_y[share].to(device)
        self.augmentation = data.augmentation if placement.augment else None
        # Per image only where one process sees every image in one order: the replicas' shares
        # would have to be gathered back into the data set's order.
        self.ordered_evaluation = placement.parts == 1
        self.skipped = 0

    def train_batches(self, epoch: int, batch_size: int) -> Iterator[Batch]:
        """The epoch's batches: a seeded order, crops drawn for the whole epoch at once and cut on
        the device. A replica takes every `parts`-th image of each global batch (the same order
        and crops on every replica), and its loss is weighted by its share of the batch, so that
        averaging the replicas' gradients gives the global batch's."""
        count = self.train_x.shape[0]
        device, rank, world = self.placement.device, self.placement.part, self.placement.parts
        order = torch.randperm(count, generator=self.order_generator).to(device)
        crops = None
        if self.augmentation is not None:
            crops = draw_crops(count, self.augmentation, self.augment_generator).to(device)
        # A last batch too small to give every replica an image is left out.
        if 0 < count % batch_size < world:
            count -= count % batch_size
        for start in range(0, count, batch_size):
            in_batch = min(batch_size, count - start)
            share = slice(start + rank, start + in_batch, world)
            index = order[share]
            images, labels = self.train_x[index], self.train_y[index]
            if crops is not None:
                c = crops[share]
                images = gather_crops(images, self.augmentation.pad, c.top, c.left, c.flip)
            yield self.placement.prepare(images), labels, world * index.shape[0] / in_batch

    def view_batches(self, view: str, batch_size: int) -> Iterator[
            tuple[list[torch.Tensor], torch.Tensor]]:
        raise ValueError(f"test-time views need a streamed image data set, not {view!r} here")

    def eval_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, self.test_x.shape[0], batch_size):
            yield (self.placement.prepare(self.test_x[start : start + batch_size]),
                   self.test_y[start : start + batch_size])

    def example_batches(self, batch_size: int, eval_batch_size: int) -> tuple[
            list[tuple[torch.Tensor, torch.Tensor]], list[torch.Tensor]]:
        """One training batch (images, labels) of each size an epoch has, and one evaluation
        batch of images of each size an evaluation has."""
        train = [(self.train_x[:size], self.train_y[:size])
                 for size in _batch_sizes(self.train_x.shape[0], batch_size)]
        evaluation = [self.test_x[:size]
                      for size in _batch_sizes(self.test_x.shape[0], eval_batch_size)]
        return train, evaluation

    def check_evaluation_read(self, read: int) -> None:
        pass  # its tensors are what it holds


def _pixel_statistics(data: Streamed, placement: Placement) -> PixelStatistics:
    """The data set's pixel statistics; where no image decodes, NoImages naming what in the
    recipe needs them (it named both, whichever was used)."""
    try:
        return data.pixel_statistics
    except NoImages as error:
        needs = [what for what, used in (("the per-pixel mean (mean: pixel)", placement.pixel_mean),
                                         ("PCA lighting (lighting)", placement.lighting)) if used]
        raise NoImages(f"{' and '.join(needs)} need{'s' if len(needs) == 1 else ''} training "
                       f"images: {error}") from None


class StreamFeed(_Generators):
    """A streamed data set (image folders, shards): batches decoded by its loaders' workers; the
    copies to the device overlap the step before them (pinned memory, non-blocking)."""

    fixed_shapes = False
    ordered_evaluation = False

    def __init__(self, data: Streamed, placement: Placement) -> None:
        super().__init__(placement.seed)
        self.data = data
        self.placement = placement
        # Five classes or fewer: every label is among the top five, a top-5 error of 0 that says
        # nothing; it is left unmeasured rather than shown as 0.00%.
        self.measures_top5 = len(data.classes) > 5
        self.pin_memory = placement.device.type == "cuda"
        self.skipped = 0
        self.test_views = placement.test_views
        self.preprocess = PLAIN
        if placement.lighting or placement.pixel_mean:  # the statistics cost a pass over a sample
            self.preprocess = Preprocess(placement.lighting, placement.pixel_mean,
                                         _pixel_statistics(data, placement))
        # Lighting is drawn for training crops only (decode passes no draws to evaluation).
        self.device_crops = None
        if placement.decode_on_device:
            self.device_crops = DeviceCrops(placement.device, data.image_size,
                                            preprocess=self.preprocess)

    def train_batches(self, epoch: int, batch_size: int) -> Iterator[Batch]:
        """This replica's share of each of the epoch's batches of `batch_size`. Its loss is
        weighted by its share of the images the replicas kept (`parts` x kept here / kept by all),
        so that where an image could not be decoded the averaged gradient is still the mean over
        the global batch's images, as in one process; full batches weigh 1. An epoch checks a
        size the spec stated for the training shards: in one process it reads each once; a
        data-parallel epoch is that size's worth of steps, its replicas' first passes over their
        shards reading each once (where every replica's ends within the epoch; else it checks
        that they read no more than stated)."""
        p = self.placement
        loader = self.data.train_loader(batch_size // p.parts, epoch, self.order_generator,
                                        augment=p.augment, pin_memory=self.pin_memory,
                                        part=p.part, parts=p.parts,
                                        augment_seed=derived_seed(p.seed, _AUGMENT_STREAM),
                                        preprocess=self.preprocess,
                                        encoded=self.device_crops is not None)
        read = 0
        for images, labels, skipped in loader:
            if self.device_crops is not None:  # files and boxes: decoded and cropped here
                images, kept, undecodable = self.device_crops(images)
                labels, skipped = labels[kept], skipped + undecodable
            self.skipped += skipped
            read += labels.shape[0] + skipped
            weight = 1.0
            if p.parts > 1 and p.sum_over_replicas is not None:
                kept, = p.sum_over_replicas([labels.shape[0]])
                if kept == 0:
                    continue  # no replica decoded an image of this batch: all skip it alike
                # A replica whose share decoded nothing still steps, with an empty batch and
                # weight 0 (the others would wait for it forever): its gradients are zero, and
                # its running statistics take nothing from it (per-replica BatchNorm leaves
                # them, synchronised BatchNorm updates them from the others' images).
                weight = p.parts * labels.shape[0] / kept
                if labels.shape[0] == 0:  # collate's empty batch has no image shape
                    size = self.data.image_size
                    images = torch.empty((0, 3, size, size))
            elif labels.shape[0] == 0:
                if p.parts > 1:  # no way to tell the others: they would wait for this step
                    raise ValueError(
                        f"replica {p.part}: none of the {skipped} images of a batch could be "
                        "decoded, and the replicas of a data-parallel run step together")
                continue
            images = normalise(images.to(p.device, non_blocking=True))  # uint8 crops mostly
            yield p.prepare(images), labels.to(p.device, non_blocking=True), weight
        if isinstance(self.data, ShardData) and "train" in self.data.sizes_stated:
            self._check_training_read(loader, read, batch_size)

    def _check_training_read(self, epoch: Iterable[Any], read: int, batch_size: int) -> None:
        """A size stated for training shards behind URLs against what the epoch read: in one
        process every shard once; with replicas, their first passes over their own shards summed
        (one collective, which every replica makes at its epoch's end)."""
        p, data = self.placement, self.data
        assert isinstance(data, ShardData)
        if p.parts == 1:
            data.check_read("train", read, data.training_slack(batch_size))
        elif p.sum_over_replicas is not None and isinstance(epoch, ReplicaBatches):
            first = epoch.first_pass
            total, unended = p.sum_over_replicas([first.read, not first.ended])
            slack = p.parts * data.training_slack(batch_size // p.parts)
            data.check_read("train", int(total), slack, whole=unended == 0)

    def check_evaluation_read(self, read: int) -> None:
        if isinstance(self.data, ShardData):
            self.data.check_read("val", read)

    def eval_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This replica's share of the evaluation split, single centre crops."""
        p = self.placement
        loader = self.data.test_loader(batch_size, pin_memory=self.pin_memory, part=p.part,
                                       parts=p.parts, preprocess=self.preprocess)
        for images, labels, left_out in loader:
            self.skipped += left_out
            if labels.shape[0] == 0:
                continue
            images = p.prepare(normalise(images.to(p.device, non_blocking=True)))
            yield images, labels.to(p.device, non_blocking=True)

    def view_batches(self, view: str, batch_size: int) -> Iterator[
            tuple[list[torch.Tensor], torch.Tensor]]:
        """This replica's share of the evaluation split as `view`'s views (decode_views), each
        flattened to (B * V, C, h, w) and prepared for the model."""
        p = self.placement
        loader = self.data.test_loader(batch_size, pin_memory=self.pin_memory, part=p.part,
                                       parts=p.parts, preprocess=self.preprocess, view=view)
        for views, labels, left_out in loader:
            self.skipped += left_out
            if labels.shape[0] == 0:
                continue
            yield ([p.prepare(v.flatten(0, 1).to(p.device, non_blocking=True)) for v in views],
                   labels.to(p.device, non_blocking=True))

    def example_batches(self, batch_size: int, eval_batch_size: int) -> tuple[
            list[tuple[torch.Tensor, torch.Tensor]], list[torch.Tensor]]:
        raise ValueError("compile and cuda_graphs need an in-memory data set (their batches are "
                         f"precompiled or captured); {self.data.name} is streamed from disk")


def feed_for(data: DataBundle | Streamed, placement: Placement) -> Feed:
    """`data` placed for one run."""
    if isinstance(data, DataBundle):
        return MemoryFeed(data, placement)
    return StreamFeed(data, placement)


def _batch_sizes(count: int, batch_size: int) -> list[int]:
    """The distinct batch sizes of one pass over `count` items: full batches and the remainder."""
    return sorted({min(batch_size, count), count % batch_size} - {0})
