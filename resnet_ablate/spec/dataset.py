"""The data-set description (DatasetSpec) and the `dataset` section of a spec: a name from the
catalogue and the options that name takes (a root folder, a validation split, synthetic sizes,
crop size and decoding workers of a streamed data set, a webdataset's shards), each checked once
here, by the description itself, before anything loads. Torch-free."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .catalogue import (DATASETS, DEFAULT_LOADER_WORKERS, MAX_SYNTHETIC_BYTES,
                        MAX_SYNTHETIC_IMAGES, REQUIRED_SHARD_KEYS, SHARD_KEYS,
                        STREAMED_AUGMENTATIONS, STREAMED_DATASETS, SYNTHETIC_INTS)
from .checker import Checker, SpecFieldError, checked_fields

STREAMED_ONLY = ("image_size", "augmentation", "loader_workers")


# Fields that say how data is read, not which data: decoding processes, whether to fetch it.
# They do not make another study (study/opening.py).
DATASET_EXECUTION_ONLY = ("loader_workers", "download")


@dataclass(frozen=True)
class DatasetSpec:
    """The data set a study trains on: a name from the catalogue (catalogue.DATASETS) and its
    options, as resnet_ablate.data.load_dataset takes them. It validates itself, built from a
    spec or in Python: every field of its type, every option one its data set takes, in range
    (SpecFieldError naming the field)."""

    name: str = "digits"
    root: str | None = None
    validation: bool = False
    download: bool = False
    split_seed: int = 0
    synthetic: Mapping[str, Any] | None = None  # SyntheticSpec fields
    # imagefolder only: crop size, training augmentation ("scale" or "random_resized_crop"), and
    # decoding processes per trial (counted in resources.cpus).
    image_size: int | None = None
    augmentation: str | None = None
    loader_workers: int | None = None
    # webdataset only: {train: PATTERN, val: PATTERN, num_classes: N[, train_size, val_size]}.
    shards: Mapping[str, Any] | None = None
    # imagefolder only: the label file of ILSVRC's flat val/ folder (relative to root).
    val_labels: str | None = None

    def __post_init__(self) -> None:
        _check(checked_fields("dataset", self), dataclasses.asdict(self))

    def load_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `resnet_ablate.data.load_dataset` (plain values: Ray ships them)."""
        kwargs = {
            "name": self.name, "root": self.root, "validation": self.validation,
            "download": self.download, "seed": self.split_seed,
            "synthetic": dict(self.synthetic) if self.synthetic is not None else None,
        }
        for name in ("image_size", "augmentation", "loader_workers", "val_labels"):
            if getattr(self, name) is not None:
                kwargs[name] = getattr(self, name)
        if self.shards is not None:
            kwargs["shards"] = dict(self.shards)
        return kwargs

    @property
    def decoding_workers(self) -> int:
        """CPUs of a trial that decode images rather than train (imagefolder's loader)."""
        if self.name not in STREAMED_DATASETS:
            return 0
        return DEFAULT_LOADER_WORKERS if self.loader_workers is None else self.loader_workers


def dataset_section(check: Checker, value: Any) -> DatasetSpec:
    """`dataset`: a name (str) or a mapping of DatasetSpec fields, the name required."""
    if isinstance(value, str):
        value = {"name": value}
    section = check.mapping("dataset", value, [f.name for f in dataclasses.fields(DatasetSpec)])
    if section.get("name") is None:
        raise check.fail("dataset.name", f"required; valid: {', '.join(DATASETS)}")
    try:
        return DatasetSpec(**section)
    except SpecFieldError as error:
        raise check.named(error) from None


def _check(check: Checker, section: Mapping[str, Any]) -> None:
    """Every option of a data-set description (its type checked) one its data set takes."""
    name = section["name"]
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


def shard_urls(pattern: str) -> list[str]:
    """A shard pattern's URLs in brace notation, as webdataset takes it: "train-{000..009}.tar"
    is ten shards."""
    import braceexpand

    return list(braceexpand.braceexpand(pattern))


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
