"""ILSVRC's layout (`train/<wnid>/*.JPEG` and a flat `val/` with a label file, or class folders)
converted to class folders or tar shards: `resnet-ablate convert-imagenet`."""

from __future__ import annotations

import io
import os
import random
import shutil
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .folders import scan_image_folder
from .shard_format import split_key

SHARD_SIZE = 1000  # images a shard (about 110 MB of ImageNet's JPEGs)
# What a shard's image member may be called (shard_format.IMAGE_EXTENSIONS), by the file's suffix.
_SHARD_SUFFIXES = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}


@dataclass(frozen=True)
class Converted:
    """What `convert_imagenet` wrote: the images of each split, the classes, and where."""

    out: Path
    to: str
    train_images: int
    val_images: int
    classes: int
    train_pattern: str | None = None  # shards: the brace patterns a spec's `shards` takes
    val_pattern: str | None = None

    def spec_lines(self) -> list[str]:
        """The `dataset` section of a spec that reads the converted data set."""
        if self.to == "folders":
            return ["dataset:", "  name: imagefolder", f"  root: {self.out}"]
        return ["dataset:", "  name: webdataset", "  shards:",
                f"    train: \"{self.train_pattern}\"", f"    val: \"{self.val_pattern}\"",
                f"    num_classes: {self.classes}"]


def convert_imagenet(root: str | os.PathLike[str], out: str | os.PathLike[str], *,
                     val_labels: str | os.PathLike[str] | None = None, to: str = "folders",
                     shard_size: int = SHARD_SIZE, seed: int = 0,
                     progress: Callable[[str, int, int], None] | None = None) -> Converted:
    """ILSVRC's layout under `root` (a flat val/ with `val_labels`, or val/<class>/) as class
    folders (`to="folders"`: hard links where the file system allows, else copies) or as tar
    shards of `shard_size` samples (`to="shards"`: `KEY.jpg` + `KEY.cls`, the class index; the
    training samples in a seeded random order, so each shard mixes the classes). `progress`,
    where given, is called with (split, images written, the split's images) after each image:
    ImageNet's 1.33M take hours to write as shards."""
    if to not in ("folders", "shards"):
        raise ValueError(f"to={to!r}: valid: folders, shards")
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be an int >= 1, got {shard_size!r}")
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file: convert into a new folder")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty: convert into a new folder")
    index = scan_image_folder(root, val_labels=val_labels)
    splits = {"train": list(index.train), "val": list(index.test)}
    random.Random(seed).shuffle(splits["train"])
    # Before anything is written: a refusal leaves no half-written folder. Images are read
    # through links (a class subset is often a folder of links): the copy holds the files.
    for path, _ in (sample for samples in splits.values() for sample in samples):
        if not os.path.isfile(path):
            raise ValueError(f"{path}: a link to nothing (or not a file): every image must "
                             "resolve to a file to be converted")
        if to == "shards" and Path(path).suffix.lower() not in _SHARD_SUFFIXES:
            raise ValueError(f"{path}: a shard holds {', '.join(_SHARD_SUFFIXES)} images, "
                             f"not {Path(path).suffix.lower()}; convert to folders instead")
    out.mkdir(parents=True, exist_ok=True)
    patterns = {}
    for split, samples in splits.items():
        written = _report_to(progress, split, len(samples))
        if to == "folders":
            _link_into_classes(samples, out / split, index.root / split, index.classes,
                               written)
        else:
            patterns[split] = _write_shards(samples, out, split, shard_size, written)
    return Converted(out, to, len(index.train), len(index.test), len(index.classes),
                     patterns.get("train"), patterns.get("val"))


def _report_to(progress: Callable[[str, int, int], None] | None, split: str,
               total: int) -> Callable[[int], None]:
    """A split's `written(images done)`, which tells `progress` (where given) the split too."""
    if progress is None:
        return lambda done: None
    return lambda done: progress(split, done, total)


def _link_into_classes(samples: list[tuple[str, int]], folder: Path, source: Path,
                       classes: tuple[str, ...], written: Callable[[int], None]) -> None:
    """Each sample at its path under its class folder in `source` (an image in a sub-folder
    keeps it: two sub-folders' 0.jpg stay two images), or by name where `source` is flat."""
    for done, (path, label) in enumerate(samples, start=1):
        try:
            within = Path(path).relative_to(source / classes[label])
        except ValueError:  # a flat val/ folder, labelled by its file
            within = Path(Path(path).name)
        target = folder / classes[label] / within
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(os.path.realpath(path), target)  # the file, not a link that may dangle
        except OSError:  # another file system, or no hard links there
            shutil.copy2(path, target)
        written(done)


def _sample_keys(paths: list[str]) -> list[str]:
    """Each sample's key in a split's shards, unique within it (a shard's reader groups members
    by key): the file's stem, as ILSVRC's unique names give them; where stems repeat (cat/0.jpg
    and dog/0.jpg), the class folder's name and the stem; where those still repeat (0.jpg and
    0.png in one folder), the sample's place in the split too."""
    # The key the reader will find: the name less its extension and an image extension before
    # it (shard_format.split_key: photo.png.jpg is sample photo, as photo.jpg is).
    stems = [split_key(Path(p).name)[0] or Path(p).stem for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    named = [f"{Path(p).parent.name}_{stem}" for p, stem in zip(paths, stems)]
    if len(set(named)) == len(named):
        return named
    return [f"{index:08d}_{name}" for index, name in enumerate(named)]


def _write_shards(samples: list[tuple[str, int]], out: Path, split: str, size: int,
                  written: Callable[[int], None]) -> str:
    count = max(1, -(-len(samples) // size))
    digits = max(6, len(str(count - 1)))
    keys = _sample_keys([path for path, _ in samples])
    for shard in range(count):
        with tarfile.open(out / f"{split}-{shard:0{digits}d}.tar", "w") as archive:
            for index in range(shard * size, min((shard + 1) * size, len(samples))):
                (path, label), key = samples[index], keys[index]
                archive.add(os.path.realpath(path), arcname=f"{key}.{_SHARD_SUFFIXES[Path(path).suffix.lower()]}")
                info = tarfile.TarInfo(f"{key}.cls")
                data = str(label).encode()
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
                written(index + 1)
    return str(out / f"{split}-{{{0:0{digits}d}..{count - 1:0{digits}d}}}.tar")
