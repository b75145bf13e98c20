"""The `dataset` section of a spec: a name from the catalogue and the options that name takes
(a root folder, a validation split, synthetic sizes, crop size and decoding workers of a streamed
data set, a webdataset's shards), each checked once here, before anything loads."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .catalogue import (DATASETS, MAX_SYNTHETIC_BYTES, MAX_SYNTHETIC_IMAGES,
                        REQUIRED_SHARD_KEYS, SHARD_KEYS, STREAMED_AUGMENTATIONS,
                        STREAMED_DATASETS, SYNTHETIC_INTS)
from .checker import Checker
from .sections import DatasetSpec

STREAMED_ONLY = ("image_size", "augmentation", "loader_workers")


def dataset_section(check: Checker, value: Any) -> DatasetSpec:
    """`dataset`: a name (str) or a mapping of DatasetSpec fields."""
    if isinstance(value, str):
        value = {"name": value}
    section = check.dataclass_section("dataset", value, DatasetSpec)
    name = section.get("name")
    if name is None:
        raise check.fail("dataset.name", f"required; valid: {', '.join(DATASETS)}")
    if name not in DATASETS:
        raise check.fail("dataset.name", f"{name!r} is not a dataset; valid: {', '.join(DATASETS)}")
    if section.get("synthetic") is not None:
        _synthetic(check, section["synthetic"])
    streamed_only = [key for key in STREAMED_ONLY if section.get(key) is not None]
    if name not in STREAMED_DATASETS and streamed_only:
        raise check.fail(f"dataset.{streamed_only[0]}",
                         f"applies to {' and '.join(STREAMED_DATASETS)} only, not to {name}")
    if section.get("shards") is not None and name != "webdataset":
        raise check.fail("dataset.shards", f"applies to webdataset only, not to {name}")
    if section.get("val_labels") is not None and name != "imagefolder":
        raise check.fail("dataset.val_labels", f"applies to imagefolder only, not to {name}")
    if name == "webdataset":
        _shards(check, section)
    if name in STREAMED_DATASETS:
        _streamed(check, section)
    if name in ("cifar10", "cifar100") and not section.get("root"):
        archive = name.replace("cifar", "cifar-") + "-python.tar.gz"
        raise check.fail("dataset.root", f"{name} needs the folder that holds (or will hold) "
                                         f"{archive}")
    return DatasetSpec(**section)


def _shards(check: Checker, section: Mapping[str, Any]) -> None:
    """A webdataset's `shards`: two patterns and the class count, the split sizes optional."""
    shards = check.mapping("dataset.shards", section.get("shards"), SHARD_KEYS)
    for key in REQUIRED_SHARD_KEYS:
        if key not in shards:
            raise check.fail(f"dataset.shards.{key}", "required: webdataset needs shards: "
                             "{train: PATTERN, val: PATTERN, num_classes: N}")
    for key in ("train", "val"):
        check.typed(f"dataset.shards.{key}", shards[key], str,
                    "one pattern (str), e.g. \"train-{000..099}.tar\"; brace ranges name "
                    "several shards")
        if not shards[key].strip():
            raise check.fail(f"dataset.shards.{key}", "empty; name the shards, e.g. "
                                                      "\"train-{000..099}.tar\"")
    for key, low in (("num_classes", 2), ("train_size", 1), ("val_size", 1)):
        if shards.get(key) is not None:
            number = check.typed(f"dataset.shards.{key}", shards[key], int, "an int")
            if not low <= number <= MAX_SYNTHETIC_IMAGES * 100:
                raise check.fail(f"dataset.shards.{key}", f"must be an int from {low} to "
                                                          f"{MAX_SYNTHETIC_IMAGES * 100:.0e}, "
                                                          f"got {number}")
    if section.get("root"):
        raise check.fail("dataset.root", "webdataset reads dataset.shards, not a root folder")


def _streamed(check: Checker, section: Mapping[str, Any]) -> None:
    """What a data set read batch by batch needs: its folder, its own val split, a crop size and
    decoding workers in range, a known augmentation."""
    name = section["name"]
    if name == "imagefolder" and not section.get("root"):
        raise check.fail("dataset.root", "imagefolder needs the folder that holds "
                                         "train/<class>/ and val/<class>/")
    if section.get("validation"):
        raise check.fail("dataset.validation", f"{name} evaluates on its val split")
    for key, low in (("image_size", 8), ("loader_workers", 0)):
        if section.get(key) is not None and section[key] < low:
            raise check.fail(f"dataset.{key}", f"must be >= {low}, got {section[key]}")
    if section.get("augmentation") not in (None, *STREAMED_AUGMENTATIONS):
        raise check.fail("dataset.augmentation", f"{section['augmentation']!r} is not an "
                                                 f"augmentation; valid: "
                                                 f"{', '.join(STREAMED_AUGMENTATIONS)}")


def _synthetic(check: Checker, value: Any) -> None:
    """`dataset.synthetic`: each field in its range, and the images few enough to hold in memory
    (a trial makes them all as float32 before it trains)."""
    section = check.mapping("dataset.synthetic", value, (*SYNTHETIC_INTS, "noise"))
    for name, (low, high) in SYNTHETIC_INTS.items():
        if name in section:
            number = check.typed(f"dataset.synthetic.{name}", section[name], int, "an int")
            if not low <= number <= high:
                raise check.fail(f"dataset.synthetic.{name}", f"must be an int from {low} to "
                                                              f"{high:,}, got {number}")
    if "noise" in section:
        noise = check.typed("dataset.synthetic.noise", section["noise"], (int, float), "a number")
        if noise < 0:
            raise check.fail("dataset.synthetic.noise", f"must be >= 0, got {noise}")
    sizes = {name: section.get(name, default) for name, default in
             (("channels", 1), ("image_size", 8), ("train_size", 256), ("test_size", 128))}
    images = sizes["train_size"] + sizes["test_size"]
    size = images * sizes["channels"] * sizes["image_size"] ** 2 * 4
    if size > MAX_SYNTHETIC_BYTES:
        raise check.fail("dataset.synthetic", f"{images:,} images of {sizes['channels']}x"
                                              f"{sizes['image_size']}x{sizes['image_size']} "
                                              f"float32 hold {size / 2**30:.1f} GiB; at most "
                                              f"{MAX_SYNTHETIC_BYTES / 2**30:.0f} GiB")
