"""ILSVRC's layout (`train/<wnid>/*.JPEG` and a flat `val/` with a label file, or class folders)
converted to class folders or tar shards: `resnet-ablate convert-imagenet`."""

from __future__ import annotations

import io
import itertools
import os
import random
import shutil
import tarfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .decode import decodable
from .folders import scan_image_folder
from .shard_format import split_key

SHARD_SIZE = 1000  # images a shard (about 110 MB of ImageNet's JPEGs)
# What a shard's image member may be called (shard_format.IMAGE_EXTENSIONS), by the file's suffix.
_SHARD_SUFFIXES = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
UNDECODABLE = "undecodable.txt"  # the images left out, a `split<TAB>path` line each
CHECK_CHUNK = 256  # images decoded at once by the check, on threads


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
    undecodable: int = 0  # images left out, named in UNDECODABLE under `out`

    def spec_lines(self) -> list[str]:
        """The `dataset` section of a spec that reads the converted data set."""
        if self.to == "folders":
            return ["dataset:", "  name: imagefolder", f"  root: {self.out}"]
        return ["dataset:", "  name: webdataset", "  shards:",
                f"    train: \"{self.train_pattern}\"", f"    val: \"{self.val_pattern}\"",
                f"    num_classes: {self.classes}"]


def convert_imagenet(root: str | os.PathLike[str], out: str | os.PathLike[str], *,
                     val_labels: str | os.PathLike[str] | None = None, to: str = "folders",
                     shard_size: int = SHARD_SIZE, seed: int = 0, check: bool = True,
                     progress: Callable[[str, int, int], None] | None = None) -> Converted:
    """ILSVRC's layout under `root` (a flat val/ with `val_labels`, or val/<class>/) as class
    folders (`to="folders"`: hard links where the file system allows, else copies) or as tar
    shards of `shard_size` samples (`to="shards"`: `KEY.jpg` + `KEY.cls`, the class index; the
    training samples in a seeded random order, so each shard mixes the classes). With `check`,
    each image is decoded first (`decode.decodable`) and one that does not decode is left out,
    named in `UNDECODABLE` under `out` (a trial would skip it in every epoch); a class left with
    no training image is refused. A conversion that fails or is interrupted removes what it
    wrote. `progress`, where given, is called with (split, images done, the split's images)
    after each image: ImageNet's 1.33M take hours to write as shards."""
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
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    patterns, left_out = {}, {split: [] for split in splits}
    try:
        for split, samples in splits.items():
            kept = _screened(samples, check, _report_to(progress, split, len(samples)),
                             left_out[split])
            if to == "folders":
                _link_into_classes(kept, out / split, index.root / split, index.classes)
            else:
                patterns[split] = _write_shards(kept, _sample_keys([p for p, _ in samples]),
                                                out, split, shard_size, len(samples))
        _check_every_class_kept(splits["train"], left_out["train"], index.classes)
        _check_val_kept(splits["val"], left_out["val"])
    except BaseException:  # a failure, or Ctrl-C: no half-written data set, which a rerun refuses
        _remove(out, created)
        raise
    if left_out["train"] or left_out["val"]:
        (out / UNDECODABLE).write_text("".join(
            f"{split}\t{path}\n" for split, paths in left_out.items() for path in paths))
    return Converted(out, to, len(index.train) - len(left_out["train"]),
                     len(index.test) - len(left_out["val"]), len(index.classes),
                     patterns.get("train"), patterns.get("val"),
                     undecodable=len(left_out["train"]) + len(left_out["val"]))


def _check_every_class_kept(samples: list[tuple[str, int]], left_out: list[str],
                            classes: tuple[str, ...]) -> None:
    """Refuse a conversion that left a class no training image (every one failed to decode): a
    trial would score that class without ever training on it, and its folders would not read."""
    lost = set(left_out)
    kept = {label for path, label in samples if path not in lost}
    empty = [(label, name) for label, name in enumerate(classes) if label not in kept]
    if empty:
        label, name = empty[0]
        example = next(path for path, of in samples if of == label)
        raise ValueError(f"train/{name}: none of its images decodes (e.g. {example}), so the "
                         f"converted data set would have no training image of "
                         f"{len(empty)} class(es), {name} first; nothing was written: repair or "
                         "remove those images and convert again")


def _check_val_kept(samples: list[tuple[str, int]], left_out: list[str]) -> None:
    """Refuse a conversion whose validation split kept no image: it printed a spec whose data
    set was then refused (no val/ folder; an empty shard), and said it had written it."""
    if samples and len(left_out) == len(samples):
        raise ValueError(f"val: none of its {len(samples)} images decodes (e.g. {samples[0][0]}), "
                         "so the converted data set would have no test image; nothing was "
                         "written: repair or remove those images and convert again")


def _remove(out: Path, created: bool) -> None:
    """What a conversion wrote under `out`, which was new or empty: all of it."""
    if created:
        shutil.rmtree(out, ignore_errors=True)
        return
    for entry in out.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _report_to(progress: Callable[[str, int, int], None] | None, split: str,
               total: int) -> Callable[[int], None]:
    """A split's `written(images done)`, which tells `progress` (where given) the split too."""
    if progress is None:
        return lambda done: None
    return lambda done: progress(split, done, total)


def _screened(samples: list[tuple[str, int]], check: bool, written: Callable[[int], None],
              left_out: list[str]) -> Iterator[tuple[int, str, int]]:
    """(position, path, label) of each of `samples` to write, in order, `written` told after
    each; with `check`, only those whose image decodes, the others' paths added to `left_out`.
    Decoded CHECK_CHUNK at a time on threads (Pillow decodes without holding the GIL)."""
    with ThreadPoolExecutor(max(1, os.cpu_count() or 1)) as pool:
        for start in range(0, len(samples), CHECK_CHUNK):
            chunk = samples[start:start + CHECK_CHUNK]
            fine = pool.map(decodable, [path for path, _ in chunk]) if check \
                else itertools.repeat(True)
            for position, ((path, label), ok) in enumerate(zip(chunk, fine), start=start):
                if ok:
                    yield position, path, label
                else:
                    left_out.append(path)
                written(position + 1)


def _link_into_classes(samples: Iterable[tuple[int, str, int]], folder: Path, source: Path,
                       classes: tuple[str, ...]) -> None:
    """Each sample at its path under its class folder in `source` (an image in a sub-folder
    keeps it: two sub-folders' 0.jpg stay two images), or by name where `source` is flat."""
    for _, path, label in samples:
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


def _write_shards(samples: Iterable[tuple[int, str, int]], keys: list[str], out: Path,
                  split: str, size: int, total: int) -> str:
    """`samples` (position in the split, path, label) as shards of `size` under `out`, each
    sample's key `keys[position]`; the brace pattern that names them. A split of no sample is one
    empty shard (which the loader refuses, naming it)."""
    digits = max(6, len(str(max(1, -(-total // size)) - 1)))
    shard = -1
    for shard, group in enumerate(_in_groups(samples, size)):
        with tarfile.open(out / f"{split}-{shard:0{digits}d}.tar", "w") as archive:
            for position, path, label in group:
                suffix = _SHARD_SUFFIXES[Path(path).suffix.lower()]
                archive.add(os.path.realpath(path), arcname=f"{keys[position]}.{suffix}")
                info = tarfile.TarInfo(f"{keys[position]}.cls")
                data = str(label).encode()
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    if shard < 0:
        shard = 0
        tarfile.open(out / f"{split}-{shard:0{digits}d}.tar", "w").close()
    return str(out / f"{split}-{{{0:0{digits}d}..{shard:0{digits}d}}}.tar")


def _in_groups(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    group: list[Any] = []
    for item in items:
        group.append(item)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group
