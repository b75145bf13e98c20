"""Loading a data set by name (`load_dataset`), with each data set's options checked, and its
shape (`dataset_shape`) for building and costing models; cached per process, so repeated trials
in one Ray worker load the data once. The cached data sets are shared between callers: treat
them as read-only."""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..spec.catalogue import DATASETS, STREAMED_DATASETS
from .bundle import DataBundle
from .cifar import CIFAR_FORMATS, load_cifar
from .digits import load_digits
from .folders import FolderData, load_image_folder
from .shards import ShardData, load_shards
from .synthetic import SyntheticSpec, load_synthetic

# The data sets read batch by batch from disk or the network, not held in memory.
Streamed = FolderData | ShardData


def load_dataset(
    name: str = "digits",
    *,
    root: str | os.PathLike[str] | None = None,
    seed: int = 0,
    validation: bool = False,
    validation_fraction: float = 0.1,
    download: bool = False,
    synthetic: SyntheticSpec | Mapping[str, Any] | None = None,
    image_size: int | None = None,
    augmentation: str | None = None,
    loader_workers: int | None = None,
    shards: Mapping[str, Any] | None = None,
    val_labels: str | os.PathLike[str] | None = None,
    cache: bool = True,
) -> DataBundle | Streamed:
    """Load a dataset by name; cached per process on all the arguments when `cache` is true.

    `seed` fixes the dataset's own randomness (the digits split, the validation split, the
    synthetic data), not the training run's: keep it fixed across the trials of a study so that
    every trial sees the same split. `validation=True` evaluates on a seeded stratified
    `validation_fraction` of the training set (0.1 gives CIFAR-10's 45k/5k) instead of the test set.
    `root` and `download` are for cifar10 and cifar100 only; `synthetic` (a SyntheticSpec, or
    its fields as a spec's `dataset.synthetic` holds them) for synthetic only.
    ``imagefolder`` (streamed from disk: a `FolderData`, see folders.py) needs `root` and
    takes `image_size` (default 224), `augmentation` ("scale", the paper's, or
    "random_resized_crop") and `loader_workers` (default 2); it evaluates on its val/ split,
    class folders or, with `val_labels` (a label file), ILSVRC's flat folder of images.
    """
    # Only the options given: their defaults live with each loader (folders.py, shards.py).
    streamed = tuple((key, value) for key, value in (
        ("image_size", image_size), ("augmentation", augmentation),
        ("loader_workers", loader_workers)) if value is not None)
    if val_labels is not None and name != "imagefolder":
        raise ValueError(f"val_labels= applies to imagefolder only, not to {name!r}")
    if val_labels is not None:
        streamed += (("val_labels", str(val_labels)),)
    if name in STREAMED_DATASETS:
        return _load_streamed(name, root=root, seed=seed, shards=shards, streamed=streamed,
                              in_memory_options=validation or download or synthetic is not None,
                              cache=cache)
    if shards is not None:
        raise ValueError(f"shards= applies to webdataset only, not to {name!r}")
    if streamed:
        raise ValueError(f"image_size=, augmentation= and loader_workers= apply to imagefolder "
                         f"and webdataset only, not to {name!r}")
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    if name not in CIFAR_FORMATS and (root is not None or download):
        raise ValueError(f"root= and download= apply to cifar10 and cifar100 only, not to {name!r}")
    if name != "synthetic" and synthetic is not None:
        raise ValueError(f"synthetic= applies to the synthetic dataset only, not to {name!r}")
    if name == "synthetic" and not isinstance(synthetic, SyntheticSpec):
        synthetic = SyntheticSpec(**(synthetic or {}))
    # Resolved so that "data" and "./data" share one cache entry, and a later chdir cannot alias.
    root_key = None if root is None else str(Path(root).expanduser().resolve())
    loader = _load_cached if cache else _load
    return loader(name, root_key, seed, validation, validation_fraction, download, synthetic)


def _load_streamed(name: str, *, root: str | os.PathLike[str] | None, seed: int,
                   shards: Mapping[str, Any] | None, streamed: tuple[tuple[str, Any], ...],
                   in_memory_options: bool, cache: bool) -> Streamed:
    """An image folder or a sharded data set, its options checked (`in_memory_options`: whether
    validation=, download= or synthetic= was given, which apply to neither)."""
    if name == "webdataset":
        if shards is None:
            raise ValueError("webdataset needs shards=: {train: PATTERN, val: PATTERN, "
                             "num_classes: N} (see resnet_ablate/data/shards.py)")
        if root is not None or in_memory_options:
            raise ValueError("webdataset reads its shards only: root=, validation=, download= "
                             "and synthetic= do not apply")
        load = _load_shards_cached if cache else _load_shards
        return load(tuple(sorted(shards.items())), seed, streamed)
    if shards is not None:
        raise ValueError(f"shards= applies to webdataset only, not to {name!r}")
    if root is None:
        raise ValueError("imagefolder needs root=: the folder holding train/<class>/ and "
                         "val/<class>/")
    if in_memory_options:
        raise ValueError("imagefolder evaluates on its val/ split and reads only its folder: "
                         "validation=, download= and synthetic= do not apply")
    load_folder = _load_folder_cached if cache else _load_folder
    return load_folder(str(Path(root).expanduser().resolve()), seed, streamed)


@dataclass(frozen=True)
class DatasetShape:
    """What building and costing a model needs to know of a data set, and what a dry run says
    of it: how many images each split holds and what the scored split is called."""

    num_classes: int
    in_channels: int
    image_size: int
    train_size: int
    test_size: int
    eval_split: str  # "test", "validation" (carved from train) or "val" (ILSVRC's)


def dataset_shape(
    name: str = "digits",
    *,
    validation: bool = False,
    validation_fraction: float = 0.1,
    synthetic: SyntheticSpec | Mapping[str, Any] | None = None,
    **load_options: Any,
) -> DatasetShape:
    """The shape of a data set, without decoding an image folder (its index has the counts).
    CIFAR is read (from the process's cache where a run has checked it already): an archive in
    the official format may hold a subset, which a cost taken at 50,000 images overstates."""
    bundle = load_dataset(name, validation=validation, validation_fraction=validation_fraction,
                          synthetic=synthetic, **load_options)
    return DatasetShape(bundle.num_classes, bundle.in_channels, bundle.image_size,
                        bundle.train_size, bundle.test_size, bundle.eval_split)


def clear_dataset_cache() -> None:
    """Forget the datasets this process has cached (frees their memory once unreferenced)."""
    _load_cached.cache_clear()
    _load_folder_cached.cache_clear()
    _load_shards_cached.cache_clear()


def _load(
    name: str,
    root: str | None,
    seed: int,
    validation: bool,
    validation_fraction: float,
    download: bool,
    synthetic: SyntheticSpec | None,
) -> DataBundle:
    if name == "digits":
        return load_digits(seed, validation, validation_fraction)
    if name in CIFAR_FORMATS:
        return load_cifar(name, root, seed, validation, validation_fraction, download)
    assert synthetic is not None
    return load_synthetic(synthetic, seed, validation, validation_fraction)


# A few entries: a worker typically serves one study (one dataset), tests may hold several.
_load_cached = functools.lru_cache(maxsize=4)(_load)


def _load_folder(root: str, seed: int, options: tuple[tuple[str, Any], ...]) -> FolderData:
    return load_image_folder(root, seed=seed, **dict(options))


_load_folder_cached = functools.lru_cache(maxsize=4)(_load_folder)


def _load_shards(shards: tuple[tuple[str, Any], ...], seed: int,
                 options: tuple[tuple[str, Any], ...]) -> ShardData:
    return load_shards(dict(shards), seed=seed, **dict(options))


_load_shards_cached = functools.lru_cache(maxsize=4)(_load_shards)
