"""The label file of ILSVRC's flat `val/` folder (images whose classes are not in folder names),
as an image folder's `val_labels` reads it (folders.scan_image_folder).

A label file is either
- "filename label" lines (whitespace or a comma between them; a header line such as Kaggle's
  `ImageId,PredictionString` is skipped), the label a class folder's name (a wnid; of Kaggle's
  `LOC_val_solution.csv` the first word of the prediction string) or a class index in 0..N-1 of
  the sorted class folders; or
- one label a line for the images in sorted file-name order, as the devkit's
  `ILSVRC2012_validation_ground_truth.txt` holds them: wnids, or the devkit's 1-based
  ILSVRC2012_IDs, which the devkit's `meta.mat` (beside the label file) maps to wnids. Where
  the images' names carry their numbers, as ILSVRC's do, val/ must hold exactly images 1 to N of
  the N lines: a missing or stray image would shift every later label.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import DataUnavailable

_SEPARATOR = re.compile(r"[,\s]+")


def read_val_labels(label_file: str | os.PathLike[str], images: list[Path],
                    classes: tuple[str, ...]) -> list[int]:
    """The class index (in `classes`' order) of each of `images`, from `label_file` (see the
    module docstring); one ValueError naming the file, the line and what is valid otherwise."""
    path = Path(label_file).expanduser()
    if path.is_dir():
        raise ValueError(f"val_labels: {path} is a folder, not a label file (expected 'filename "
                         "label' lines, or ILSVRC2012_validation_ground_truth.txt)")
    if not path.is_file():
        raise DataUnavailable(f"val_labels: {path} does not exist (expected a label file: "
                              "'filename label' lines, or ILSVRC2012_validation_ground_truth.txt)")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a spreadsheet's byte-order mark: not a label
    except UnicodeDecodeError:
        raise ValueError(f"val_labels: {path} is not a text file (expected 'filename label' "
                         "lines, or ILSVRC2012_validation_ground_truth.txt)") from None
    rows = [(number, _SEPARATOR.split(line.strip()))
            for number, line in enumerate(text.splitlines(), start=1)
            if line.strip() and not line.lstrip().startswith("#")]
    index = {name: i for i, name in enumerate(classes)}
    if rows and all(len(words) == 1 for _, words in rows):
        return _labels_in_order(path, rows, images, classes, index)
    by_stem: dict[str, int] = {}
    first_line: dict[str, int] = {}  # where each image was labelled first
    present = {p.stem for p in images}
    for position, (number, words) in enumerate(rows):
        if len(words) > 1 and Path(words[0]).stem not in present:
            continue  # an image not in val/ (a class subset with the full file): its label unread
        label = _class_of(words[1], index, len(classes)) if len(words) > 1 else None
        if label is None:
            if position == 0 and Path(words[0]).stem not in present:
                continue  # a header line (not one naming an image of val/, whose label is wrong)
            if len(words) > 1:
                raise ValueError(f"{path}:{number}: label {words[1]!r} is none of train/'s "
                                 f"{len(classes)} class folders (e.g. {classes[0]}) and no index "
                                 f"in 0..{len(classes) - 1}: is its class folder missing from "
                                 "train/ (still a .tar, say)?")
            raise ValueError(f"{path}:{number}: {words[0]!r} is not 'filename label' with a label "
                             f"among {len(classes)} class folders' names (e.g. {classes[0]}) or "
                             f"an index in 0..{len(classes) - 1}")
        stem = Path(words[0]).stem
        if by_stem.get(stem, label) != label:  # (the same label twice is only a repeated line)
            raise ValueError(f"{path}:{number}: {words[0]!r} is labelled {words[1]!r} here and "
                             f"{classes[by_stem[stem]]!r} on line {first_line[stem]}: one label "
                             "an image")
        by_stem[stem] = label
        first_line.setdefault(stem, number)
    unlabelled = [p.name for p in images if p.stem not in by_stem]
    if unlabelled:
        raise ValueError(f"{path}: no label for {len(unlabelled)} of the {len(images)} images "
                         f"in val/, first {unlabelled[0]}")
    return [by_stem[p.stem] for p in images]


def _class_of(word: str, index: dict[str, int], count: int) -> int | None:
    if word in index:
        return index[word]
    if word.isdigit() and int(word) < count:
        return int(word)
    return None


def _labels_in_order(path: Path, rows: list[tuple[int, list[str]]], images: list[Path],
                     classes: tuple[str, ...], index: dict[str, int]) -> list[int]:
    """One label a line, for the images in sorted name order (the devkit's ground truth)."""
    _check_numbering(path, len(rows), images)
    if len(rows) != len(images):
        raise ValueError(f"{path}: {len(rows)} labels for the {len(images)} images in val/ "
                         "(one label a line labels the images in sorted file-name order)")
    words = [row[0] for _, row in rows]
    if all(word.isdigit() for word in words):
        wnids = _devkit_wnids(path.parent / "meta.mat", path)
        words = [wnids.get(int(word), word) for word in words]
    unknown = [(number, word) for (number, _), word in zip(rows, words) if word not in index]
    if unknown:
        number, word = unknown[0]
        raise ValueError(f"{path}:{number}: {word!r} is not a class of train/ ({len(classes)} "
                         f"class folders, e.g. {classes[0]}): is its class folder missing from "
                         "train/ (still a .tar, say)?")
    return [index[word] for word in words]


_NUMBERED = re.compile(r"_(\d+)$")  # ILSVRC2012_val_00000042: line 42 labels it


def _check_numbering(path: Path, lines: int, images: list[Path]) -> None:
    """Where the images' names carry their numbers (ILSVRC's do), that line k labels image k: a
    missing or a stray image would otherwise shift every later label onto the wrong image."""
    numbers = [_NUMBERED.search(p.stem) for p in images]
    numbered = [p.stem[:n.start()] for p, n in zip(images, numbers) if n is not None]
    if not images or len(numbered) * 2 <= len(images) or len(set(numbered)) > 1:
        return  # names of the user's own (holiday_2019 among them): labelled by their place
    if None in numbers:  # one stray file among numbered images shifts every later label
        stray = [p.name for p, number in zip(images, numbers) if number is None]
        raise ValueError(
            f"{path}: its lines label val/'s images by their place, and val/ holds numbered "
            f"images (as {next(p for p, n in zip(images, numbers) if n).name}) beside "
            f"{len(stray)} without a number ({', '.join(stray[:3])}"
            f"{', ...' if len(stray) > 3 else ''}), which would shift every later label: remove "
            "them, or write 'filename label' lines")
    found = [int(number.group(1)) for number in numbers]
    if len(found) < lines and found == sorted(set(found)) and found[-1] <= lines \
            and found != list(range(1, len(found) + 1)):
        raise ValueError(
            f"{path}: its {lines} lines label images 1 to {lines} in order, but val/ holds "
            f"{len(found)} of them, numbered {found[0]} to {found[-1]} with gaps: an incomplete "
            "extraction, or a class subset? One label a line cannot label a subset: write "
            "'filename label' lines (or use LOC_val_solution.csv), whose lines for images not in "
            "val/ are skipped")
    for position, (image, number) in enumerate(zip(images, numbers), start=1):
        if int(number.group(1)) != position:
            raise ValueError(
                f"{path}: line {position} labels image number {position}, but the image at that "
                f"place in val/ (sorted by name) is {image.name}: val/ must hold exactly the "
                f"images its {lines} lines label, numbered 1 to {lines} (is one missing, or "
                "one extra?)")
    if len(images) < lines:
        raise ValueError(f"{path}: its {lines} lines label images 1 to {lines}, but val/ holds "
                         f"only 1 to {len(images)} (an incomplete extraction?)")


def _devkit_wnids(meta: Path, label_file: Path) -> dict[int, str]:
    """ILSVRC2012_ID -> wnid from the devkit's meta.mat."""
    if not meta.is_file():
        raise ValueError(f"{label_file}: its labels are ILSVRC2012_IDs, which the devkit's "
                         f"meta.mat maps to class folders; put meta.mat at {meta}, or write "
                         "'filename wnid' lines instead")
    from scipy.io import loadmat

    try:
        synsets = loadmat(str(meta), squeeze_me=True)["synsets"]
        return {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets}
    except Exception as error:  # scipy's read errors have no common base but Exception
        raise ValueError(f"{meta}: not the devkit's meta.mat, whose 'synsets' map the "
                         f"ILSVRC2012_IDs of {label_file.name} to wnids ({_reason(error)}); "
                         "put the devkit's meta.mat there, or write 'filename wnid' lines "
                         "instead") from None


def _reason(error: Exception) -> str:
    """What a meta.mat that could not be read as the devkit's lacks, in a few words."""
    if isinstance(error, KeyError):  # loadmat's dict (a synset's missing field: ValueError)
        return f"it holds no {error}"
    return f"{type(error).__name__}: {error}"
