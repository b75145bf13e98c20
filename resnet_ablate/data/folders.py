"""Image-folder data sets, streamed from disk: the ImageNet layout (`ROOT/train/<class>/*.jpg`,
`ROOT/val/<class>/*.jpg`), which Imagenette, ImageNet-100 and Tiny-ImageNet (after a one-line
reshuffle of its val folder) also use.

Images are decoded by Pillow in DataLoader worker processes, with pinned memory and prefetching,
cropped and augmented as decode.py says.

Every random draw of an image comes from a generator seeded by (data set seed, the trial's
augmentation seed, epoch, index), so trials of different seeds see different crops, and which
worker decodes an image, and how many workers there are, never changes them. A corrupt or
unreadable image is skipped and counted (in each epoch's record), never a crashed trial. The
folder is checked before anything runs: a missing folder, split, class folder, an empty class or
an unknown validation class is one error that names it.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..spec import DEFAULT_LOADER_WORKERS
from .decode import (PLAIN, CropAugmentation, PixelStatistics, Preprocess, centre_pixels,
                     check_streamed_options, collate, collate_views, decode_sample, decode_views,
                     one_thread)
from .device_decode import collate_encoded, encoded_crop
from .errors import DataUnavailable
from .val_labels import read_val_labels

# Training images whose centre crops give the per-pixel mean and the RGB covariance.
STATISTICS_SAMPLE = 256
# The suffixes torchvision's ImageFolder reads, so that a data set is the same images in both.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff")


@dataclass(frozen=True)
class FolderIndex:
    """The images of an image folder: (path, class index) per split, classes in sorted order."""

    root: Path
    classes: tuple[str, ...]
    train: tuple[tuple[str, int], ...]
    test: tuple[tuple[str, int], ...]


def _image_name(name: str) -> bool:
    """A name with an image's suffix, in any case, as torchvision's ImageFolder tests it."""
    return name.lower().endswith(IMAGE_SUFFIXES)


def _is_image(path: Path) -> bool:
    """A file with an image's suffix; a link to nothing with one too, so that it is counted as an
    undecodable image (and refused by the converter) rather than left out without a word."""
    return (path.is_file() or path.is_symlink()) and _image_name(path.name)


def scan_image_folder(root: str | os.PathLike[str], *, train: str = "train", test: str = "val",
                      val_labels: str | os.PathLike[str] | None = None) -> FolderIndex:
    """Index an image folder, checking its layout; DataUnavailable or ValueError naming what is
    missing or empty. With `val_labels` (a label file; relative to `root` unless absolute), the
    `test` split is ILSVRC's flat folder of images, labelled by that file (val_labels.py)."""
    root = Path(root).expanduser()
    # Any of IMAGE_SUFFIXES, in any case (ILSVRC's are .JPEG); a flat val/ with a label file.
    layout = (f"expected {root}/{train}/<class>/*.jpg and {root}/{test}/<class>/*.jpg, or a "
              f"flat {root}/{test}/ of images with a label file as val_labels")
    if val_labels is not None:
        layout = f"expected {root}/{train}/<class>/*.jpg and {root}/{test}/*.jpg"
    if not root.is_dir():
        raise DataUnavailable(f"image folder {root} does not exist; {layout} (the ImageNet "
                              "layout)")
    for split in (train, test):
        if not (root / split).is_dir():
            raise DataUnavailable(f"image folder {root} has no {split}/ split; {layout}")
    images = _class_folders(root / train, layout)
    classes = tuple(images)
    if len(classes) < 2:
        raise ValueError(f"{root / train} holds one class folder ({classes[0]}); a classifier "
                         "needs two classes or more")
    label = {c: i for i, c in enumerate(classes)}
    train_samples = tuple((path, label[c]) for c, paths in images.items() for path in paths)
    if val_labels is not None:
        flat = _flat_split(root / test, layout)
        labels = read_val_labels(root / Path(val_labels).expanduser(), flat, classes)
        return FolderIndex(root, classes, train_samples,
                           tuple((str(path), y) for path, y in zip(flat, labels)))
    test_images = _class_folders(root / test, layout)
    unknown = sorted(set(test_images) - set(classes))
    if unknown:
        hint = (" (a flat val/ folder of images? give its label file as val_labels (--val-labels))"
                if flat_images(root / test) else "")
        raise ValueError(f"{root / test}: class folder(s) {', '.join(unknown[:5])} are not "
                         f"classes of {root / train}{hint}")
    return FolderIndex(root, classes, train_samples, tuple(
        (path, label[c]) for c, paths in test_images.items() for path in paths))


def _class_folders(folder: Path, layout: str) -> dict[str, list[str]]:
    """Each class folder's images (_images_under); ValueError where there is no class folder or
    one holds no image."""
    entries = list(folder.iterdir())
    dangling = [p for p in entries if p.is_symlink() and not p.exists()]
    if dangling:  # a class folder behind a broken link would drop the class, shifting labels
        raise ValueError(f"{dangling[0]} links to {os.readlink(dangling[0])}, which does not "
                         "exist: fix or remove the link (a class folder, left out, would change "
                         "every later class's label)")
    classes = sorted(p.name for p in entries if p.is_dir())
    loose = sorted(p.name for p in entries if _is_image(p))
    if classes and loose:
        raise ValueError(f"{folder} holds {len(loose)} image(s) beside its class folders "
                         f"({', '.join(loose[:3])}{', ...' if len(loose) > 3 else ''}), which "
                         "belong to no class: move them into their class folders, or out")
    if not classes:
        hint = (" (a flat folder of images: give its label file as val_labels (--val-labels))"
                if flat_images(folder) else "")
        raise ValueError(f"{folder} holds no class folders{hint}; {layout}")
    images: dict[str, list[str]] = {}
    others: list[str] = []  # one pass: an ImageNet's 1.28M files are each looked at once
    for c in classes:
        images[c] = _images_under(folder / c, others)
    _warn_of_other_files(folder, others)
    empty = [c for c, found in images.items() if not found]
    if empty:
        raise ValueError(f"{folder}: class folder(s) {', '.join(empty[:5])} hold no image "
                         f"({', '.join(IMAGE_SUFFIXES)})")
    return images


def _images_under(folder: Path, others: list[str]) -> list[str]:
    """The images anywhere under a class folder, in the order torchvision's ImageFolder lists
    them (folders sorted by path, each one's files sorted, links followed), so that both read the
    same samples at the same indices (an index seeds its crops); what else a class folder holds
    is appended to `others`. A link back up its own tree is not followed (a cycle)."""
    walked: list[tuple[str, list[str]]] = []
    real: dict[str, str] = {}
    for at, dirs, files in os.walk(folder, followlinks=True):
        real[at] = os.path.realpath(at)
        up = os.path.dirname(at)
        while up in real:
            if real[up] == real[at]:
                dirs.clear()
                break
            up = os.path.dirname(up)
        else:
            walked.append((at, files))
    found: list[str] = []
    for at, files in sorted(walked):
        for name in sorted(files):
            if _image_name(name):
                found.append(os.path.join(at, name))
            elif not name.startswith("."):  # hidden files (.DS_Store) go without a word
                others.append(name)
    return found


def _warn_of_other_files(folder: Path, others: list[str]) -> None:
    """Say what in the class folders is left out, by suffix (a .gif, a .heic): as torchvision's
    ImageFolder, such files are not read, but here not in silence."""
    if not others:
        return
    kinds = Counter(Path(name).suffix.lower() or name for name in others)
    shown = ", ".join(f"{kind}: {n}" for kind, n in
                      sorted(kinds.items(), key=lambda item: (-item[1], item[0]))[:5])
    files = "1 file" if len(others) == 1 else f"{len(others)} files"
    warnings.warn(f"{folder}: {files} in its class folders left out, not being "
                  f"images ({shown}); images are {', '.join(IMAGE_SUFFIXES)} anywhere in a "
                  "class folder", stacklevel=3)


def _flat_split(folder: Path, layout: str) -> list[Path]:
    """The images of a flat split (ILSVRC's val/, labelled by a file); ValueError where it holds
    none, or holds images in sub-folders too (val/ half sorted into class folders, as an
    interrupted valprep.sh leaves it), which the label file would leave out without a word."""
    flat = flat_images(folder)
    nested: dict[str, int] = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        count = len(_images_under(sub, []))
        if count:
            nested[sub.name] = count
    if nested and not flat:
        raise ValueError(f"{folder} holds class folders ({', '.join(list(nested)[:3])}"
                         f"{', ...' if len(nested) > 3 else ''}), not a flat folder of images: "
                         "leave out val_labels (it labels a flat val/)")
    if nested:
        raise ValueError(f"{folder} holds {len(flat)} image(s) directly and "
                         f"{sum(nested.values())} in sub-folders ({', '.join(list(nested)[:3])}"
                         f"{', ...' if len(nested) > 3 else ''}), which a label file of a flat "
                         "val/ leaves out: move them all back into val/ (a half-sorted val/, "
                         "as an interrupted valprep.sh leaves it), or all into class folders "
                         "and leave out val_labels")
    if not flat:
        raise ValueError(f"{folder} holds no image ({', '.join(IMAGE_SUFFIXES)}); {layout}")
    return flat


def flat_images(folder: Path) -> list[Path]:
    """The images directly in `folder`, sorted by name."""
    return sorted(p for p in folder.iterdir() if _is_image(p))


class ImageFolderSplit(torch.utils.data.Dataset):
    """One split's images, decoded and transformed on access (augmented where `train`, else the
    evaluation's centre crop); (None, label) for a corrupt one."""

    def __init__(self, samples: tuple[tuple[str, int], ...], *, image_size: int, train: bool,
                 augmentation: CropAugmentation, seed: int, augment_seed: int = 0,
                 preprocess: Preprocess = PLAIN, view: str | None = None,
                 encoded: bool = False) -> None:
        self.samples = samples
        self.encoded = encoded  # hand on the file and its crop's box, for the GPU to decode
        self.preprocess = preprocess
        self.view = view  # a test-time view (decode.VIEWS) instead of the single centre crop
        self.image_size = image_size
        self.train = train
        self.augmentation = augmentation
        self.seed = seed
        self.augment_seed = augment_seed  # the trial's: crops differ between trials' seeds
        self.epoch = 0  # set before each epoch's loader starts (workers copy it then)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        if self.view is not None:
            return decode_views(path, image_size=self.image_size, view=self.view,
                                preprocess=self.preprocess), label
        rng = None
        if self.train:
            rng = np.random.default_rng([self.seed, self.augment_seed, self.epoch, index])
        if self.encoded:
            return encoded_crop(path, image_size=self.image_size,
                                augmentation=self.augmentation, rng=rng,
                                preprocess=self.preprocess), label
        return decode_sample(path, image_size=self.image_size, augmentation=self.augmentation,
                      rng=rng, preprocess=self.preprocess), label



# eq=False: identity is what the data-set cache hands out.
@dataclass(frozen=True, eq=False)
class FolderData:
    """A data set read from disk batch by batch (see the module docstring); the training loop
    asks it for one loader per epoch and one for evaluation."""

    name: str
    index: FolderIndex
    image_size: int
    augmentation: CropAugmentation
    loader_workers: int
    seed: int = 0
    in_channels: int = 3
    eval_split: str = "val"  # what both layouts call the split that scores (ILSVRC's val)

    @property
    def num_classes(self) -> int:
        return len(self.index.classes)

    @property
    def classes(self) -> tuple[str, ...]:
        return self.index.classes

    @property
    def train_size(self) -> int:
        return len(self.index.train)

    @property
    def test_size(self) -> int:
        return len(self.index.test)

    @functools.cached_property
    def pixel_statistics(self) -> PixelStatistics:
        """The training images' PixelStatistics, from the centre crops of a seeded sample of
        up to STATISTICS_SAMPLE of them (all of them where there are fewer)."""
        paths = [path for path, _ in self.index.train]
        rng = np.random.default_rng(self.seed)
        if len(paths) > STATISTICS_SAMPLE:
            paths = [paths[i] for i in sorted(rng.choice(len(paths), STATISTICS_SAMPLE, False))]
        crops = [c for c in (centre_pixels(p, self.image_size) for p in paths) if c is not None]
        return PixelStatistics.of(crops, tried=len(paths))

    def _loader(self, split: torch.utils.data.Dataset, batch_size: int, order: list[int] | None,
                pin_memory: bool, views: bool = False,
                encoded: bool = False) -> torch.utils.data.DataLoader:
        workers = self.loader_workers
        return torch.utils.data.DataLoader(
            split, batch_size=batch_size, sampler=order,
            collate_fn=collate_views if views else collate_encoded if encoded else collate,
            num_workers=workers, pin_memory=pin_memory, prefetch_factor=4 if workers else None,
            worker_init_fn=one_thread if workers else None,
            # Training drops each epoch's last partial batch, as ImageNet training does: a batch
            # of one cannot train BatchNorm, and the next epoch's order reaches those images.
            drop_last=order is not None)

    def train_loader(self, batch_size: int, epoch: int, generator: torch.Generator, *,
                     augment: bool = True, pin_memory: bool = False, part: int = 0,
                     parts: int = 1, augment_seed: int = 0, preprocess: Preprocess = PLAIN,
                     encoded: bool = False) -> torch.utils.data.DataLoader:
        """One epoch of training batches (augmented, or centre crops with `augment=False`), in an
        order drawn from `generator`, each image's crop drawn from (the data set's seed,
        `augment_seed` (the trial's), `epoch`, its index). With `parts` replicas, the `part`-th one's batches of
        `batch_size`: every `parts`-th image of the order cut to whole global batches, so that
        every replica takes the same number of steps. With `encoded`, batches of
        device_decode.EncodedCrop (the files and their crops' boxes) for the GPU to decode."""
        split = ImageFolderSplit(self.index.train, image_size=self.image_size, train=augment,
                                 augmentation=self.augmentation, seed=self.seed,
                                 augment_seed=augment_seed, preprocess=preprocess,
                                 encoded=encoded)
        split.epoch = epoch
        order = torch.randperm(len(split), generator=generator).tolist()
        if parts > 1:
            whole = len(order) - len(order) % (batch_size * parts)
            order = order[:whole][part::parts]
        return self._loader(split, batch_size, order, pin_memory, encoded=encoded)

    def test_loader(self, batch_size: int, *, pin_memory: bool = False, part: int = 0,
                    parts: int = 1, preprocess: Preprocess = PLAIN,
                    view: str | None = None) -> torch.utils.data.DataLoader:
        """The evaluation images, single centre crops (or `view`'s batches of views, see
        decode.decode_views; one image a batch for "multi_scale"), in a fixed order (the
        `part`-th of `parts` shares: every `parts`-th image)."""
        split = ImageFolderSplit(self.index.test, image_size=self.image_size, train=False,
                                 augmentation=self.augmentation, seed=self.seed,
                                 preprocess=preprocess, view=view)
        if parts > 1:
            split = torch.utils.data.Subset(split, range(part, len(split), parts))
        batch_size = 1 if view == "multi_scale" else batch_size
        return self._loader(split, batch_size, None, pin_memory, views=view is not None)

    def check_available(self) -> None:
        """DataUnavailable where the folder or one of its splits is gone (a trial checks when
        it starts; its images were indexed when the data set was loaded)."""
        for folder in (self.index.root / "train", self.index.root / "val"):
            if not folder.is_dir():
                raise DataUnavailable(f"image folder {self.index.root}: {folder} is gone")


def load_image_folder(root: str | os.PathLike[str], *, image_size: int = 224,
                      augmentation: CropAugmentation = "scale",
                      loader_workers: int = DEFAULT_LOADER_WORKERS, seed: int = 0,
                      val_labels: str | os.PathLike[str] | None = None) -> FolderData:
    """An image folder as a streaming data set (checked and indexed now, decoded when trained);
    `val_labels` for ILSVRC's flat val/ folder (see scan_image_folder)."""
    check_streamed_options(augmentation, image_size, loader_workers)
    return FolderData("imagefolder", scan_image_folder(root, val_labels=val_labels), image_size,
                      augmentation, loader_workers, seed)
