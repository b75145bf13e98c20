"""Datasets for the ablation studies, as normalised in-memory tensors, plus batched augmentation.

Six datasets, one entry point (`load_dataset`):

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 real images, no download),
  split train/test with a seeded stratified split. The default: real data that trains in seconds.
- ``cifar10``: the official ``cifar-10-python.tar.gz`` (or its extracted folder) with the recipe of
  He et al. (CVPR 2016, section 4.2): per-channel normalisation with training-set statistics,
  4-pixel zero pad + random 32x32 crop + horizontal flip for training, optional 45k/5k validation.
- ``cifar100``: the same for ``cifar-100-python.tar.gz``, with its 100 fine labels.
- ``imagefolder``: the ImageNet layout on disk, streamed (imagefolder.py), and ``webdataset``:
  tar shards, local or behind URLs, streamed (shards.py): the data sets not held in memory.
- ``synthetic``: small, seeded, learnable random data for tests.

Whole datasets live in memory as tensors: every one of them fits (CIFAR-10 is 0.7 GB as float32)
and a study runs many short trials, so per-batch decoding would cost more than the training.
`load_dataset` caches per process, so repeated trials in one Ray worker load the data once.
The cached tensors are shared between callers: treat them as read-only.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import math
import os
import pickle
import tarfile
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO, Literal

import numpy as np
import torch

from ..imagefolder import FolderData, load_image_folder
from ..shards import ShardData, load_shards
from ..spec import DATASETS
from ..splits import stratified_split
from .augment import Augmentation, CropDraws, crop_and_flip, draw_crops, gather_crops, random_crop_flip


@dataclass(frozen=True)
class CifarFormat:
    """Where one of the CIFAR data sets keeps what, in its official python format."""

    title: str  # as messages name it
    url: str
    md5: str
    archive: str  # the .tar.gz
    folder: str  # what the archive extracts to
    train_members: tuple[str, ...]
    test_member: str
    meta_member: str
    label_key: bytes  # the labels a batch holds
    names_key: bytes  # the class names the meta file holds
    num_classes: int


CIFAR10 = CifarFormat(
    "CIFAR-10", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "c58f30108f718f92721af3b95e74349a", "cifar-10-python.tar.gz", "cifar-10-batches-py",
    tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta", b"labels",
    b"label_names", 10)
# CIFAR-100's 100 "fine" classes (its 20 "coarse" superclasses are not used).
CIFAR100 = CifarFormat(
    "CIFAR-100", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    "eb9058c3a382ffc7106e4002c42a8d85", "cifar-100-python.tar.gz", "cifar-100-python",
    ("train",), "test", "meta", b"fine_labels", b"fine_label_names", 100)
CIFAR_FORMATS = {"cifar10": CIFAR10, "cifar100": CIFAR100}



# A fifth of the digits is held out: 360 test images, at least 35 of each class.
DIGITS_TEST_FRACTION = 0.2


@dataclass(frozen=True)
class SyntheticSpec:
    """Shape and difficulty of the `synthetic` dataset: a random prototype per class plus noise."""

    num_classes: int = 4
    channels: int = 1
    image_size: int = 8
    train_size: int = 256
    test_size: int = 128
    noise: float = 1.0

    def __post_init__(self) -> None:
        for name in ("num_classes", "channels", "image_size", "train_size", "test_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SyntheticSpec.{name} must be a positive int, got {value!r}")
        if self.num_classes < 2:
            raise ValueError(f"SyntheticSpec.num_classes must be >= 2, got {self.num_classes}")
        if isinstance(self.noise, bool) or not isinstance(self.noise, (int, float)) or not (
                math.isfinite(self.noise) and self.noise >= 0):
            raise ValueError(f"SyntheticSpec.noise must be a finite number >= 0, got "
                             f"{self.noise!r}")


# eq=False: tensors do not compare to a single bool, and identity is what the cache hands out.
@dataclass(frozen=True, eq=False)
class DataBundle:
    """A dataset ready to train on: normalised float32 images (N, C, H, W) and int64 labels.

    `test_x`/`test_y` hold the evaluation set: the official test set, or the validation split
    carved from the training set when `eval_split` is "validation" (the test set is then unused).
    `mean`/`std` are the per-channel statistics of the raw training pixels used to normalise both.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    in_channels: int
    image_size: int
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    eval_split: Literal["test", "validation"] = "test"
    augmentation: Augmentation | None = None
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        expected = (self.in_channels, self.image_size, self.image_size)
        splits = (("train", self.train_x, self.train_y), ("test", self.test_x, self.test_y))
        for split, x, y in splits:
            if x.dim() != 4 or tuple(x.shape[1:]) != expected:
                raise ValueError(
                    f"{self.name}: {split}_x has shape {tuple(x.shape)}, "
                    f"expected (N, {expected[0]}, {expected[1]}, {expected[2]})"
                )
            if y.shape != (x.shape[0],):
                raise ValueError(
                    f"{self.name}: {split}_y has shape {tuple(y.shape)}, expected ({x.shape[0]},)"
                )

    @property
    def train_size(self) -> int:
        return int(self.train_x.shape[0])

    @property
    def test_size(self) -> int:
        return int(self.test_x.shape[0])

    def metadata(self) -> dict[str, Any]:
        """JSON-ready description for results stores (no tensors)."""
        return {
            "name": self.name,
            "train_size": self.train_size,
            "test_size": self.test_size,
            "eval_split": self.eval_split,
            "num_classes": self.num_classes,
            "in_channels": self.in_channels,
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "augmentation": None
            if self.augmentation is None
            else {"pad": self.augmentation.pad, "flip": self.augmentation.flip},
            "seed": self.seed,
            **self.extra,
        }


@dataclass(frozen=True, eq=False)
class CifarArrays:
    """CIFAR-10 or -100 as stored: uint8 images (N, 3, 32, 32) in RGB order, int64 labels, class
    names."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: tuple[str, ...]
    source: Path


# The data sets read batch by batch from disk or the network, not held in memory.
Streamed = FolderData | ShardData


# ----------------------------------------------------------------------------------------------
# Entry point


def load_dataset(
    name: str = "digits",
    *,
    root: str | os.PathLike[str] | None = None,
    seed: int = 0,
    validation: bool = False,
    validation_fraction: float = 0.1,
    download: bool = False,
    synthetic: SyntheticSpec | None = None,
    image_size: int | None = None,
    augmentation: str | None = None,
    loader_workers: int | None = None,
    shards: Mapping[str, Any] | None = None,
    cache: bool = True,
) -> DataBundle | Streamed:
    """Load a dataset by name; cached per process on all the arguments when `cache` is true.

    `seed` fixes the dataset's own randomness (the digits split, the validation split, the
    synthetic data), not the training run's: keep it fixed across the trials of a study so that
    every trial sees the same split. `validation=True` evaluates on a seeded stratified
    `validation_fraction` of the training set (0.1 gives CIFAR-10's 45k/5k) instead of the test set.
    `root` and `download` are for cifar10 and cifar100 only; `synthetic` for synthetic only.
    ``imagefolder`` (streamed from disk: a `FolderData`, see imagefolder.py) needs `root` and
    takes `image_size` (default 224), `augmentation` ("scale", the paper's, or
    "random_resized_crop") and `loader_workers` (default 2); it evaluates on its val/ split.
    """
    # Only the options given: their defaults live with each loader (imagefolder.py, shards.py).
    streamed = tuple((key, value) for key, value in (
        ("image_size", image_size), ("augmentation", augmentation),
        ("loader_workers", loader_workers)) if value is not None)
    if name == "webdataset":
        if shards is None:
            raise ValueError("webdataset needs shards=: {train: PATTERN, val: PATTERN, "
                             "num_classes: N} (see resnet_ablate/shards.py)")
        if root is not None or validation or download or synthetic is not None:
            raise ValueError("webdataset reads its shards only: root=, validation=, download= "
                             "and synthetic= do not apply")
        load = _load_shards_cached if cache else _load_shards
        return load(tuple(sorted(shards.items())), seed, streamed)
    if shards is not None:
        raise ValueError(f"shards= applies to webdataset only, not to {name!r}")
    if name == "imagefolder":
        if root is None:
            raise ValueError("imagefolder needs root=: the folder holding train/<class>/ and "
                             "val/<class>/")
        if validation or download or synthetic is not None:
            raise ValueError("imagefolder evaluates on its val/ split and reads only its folder: "
                             "validation=, download= and synthetic= do not apply")
        load = _load_folder_cached if cache else _load_folder
        return load(str(Path(root).expanduser().resolve()), seed, streamed)
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
    if name == "synthetic" and synthetic is None:
        synthetic = SyntheticSpec()
    # Resolved so that "data" and "./data" share one cache entry, and a later chdir cannot alias.
    root_key = None if root is None else str(Path(root).expanduser().resolve())
    loader = _load_cached if cache else _load
    return loader(name, root_key, seed, validation, validation_fraction, download, synthetic)


@dataclass(frozen=True)
class DatasetShape:
    """What building and costing a model needs to know of a data set."""

    num_classes: int
    in_channels: int
    image_size: int
    train_size: int


def dataset_shape(
    name: str = "digits",
    *,
    validation: bool = False,
    validation_fraction: float = 0.1,
    synthetic: SyntheticSpec | None = None,
    **load_options: Any,
) -> DatasetShape:
    """The shape of a data set, without reading CIFAR (its official format fixes the shape) or
    decoding an image folder (its index has the counts)."""
    if name in CIFAR_FORMATS:
        train_size = 50_000 - (round(50_000 * validation_fraction) if validation else 0)
        return DatasetShape(num_classes=CIFAR_FORMATS[name].num_classes, in_channels=3,
                            image_size=32, train_size=train_size)
    bundle = load_dataset(name, validation=validation, validation_fraction=validation_fraction,
                          synthetic=synthetic, **load_options)
    return DatasetShape(bundle.num_classes, bundle.in_channels, bundle.image_size, bundle.train_size)


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
        return _load_digits(seed, validation, validation_fraction)
    if name in CIFAR_FORMATS:
        return _load_cifar(name, root, seed, validation, validation_fraction, download)
    assert synthetic is not None
    return _load_synthetic(synthetic, seed, validation, validation_fraction)


# A few entries: a worker typically serves one study (one dataset), tests may hold several.
_load_cached = functools.lru_cache(maxsize=4)(_load)


def _load_folder(root: str, seed: int, options: tuple[tuple[str, Any], ...]) -> FolderData:
    return load_image_folder(root, seed=seed, **dict(options))


_load_folder_cached = functools.lru_cache(maxsize=4)(_load_folder)


def _load_shards(shards: tuple[tuple[str, Any], ...], seed: int,
                 options: tuple[tuple[str, Any], ...]) -> ShardData:
    return load_shards(dict(shards), seed=seed, **dict(options))


_load_shards_cached = functools.lru_cache(maxsize=4)(_load_shards)


# ----------------------------------------------------------------------------------------------
# Shared preparation: validation split, statistics, normalisation


def _stratified_split(
    labels: np.ndarray, fraction: float, seed: int, *, what: str
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, held_out), each sorted, with `fraction` of every class held out, seeded.
    Sorted so that the kept images keep their original order; shuffling is training's job."""
    try:
        return stratified_split(labels, fraction, seed)
    except ValueError as error:
        raise ValueError(
            f"cannot split {what} ({len(labels)} images, {len(np.unique(labels))} classes) with "
            f"a stratified fraction of {fraction}: {error}"
        ) from error


def _channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and population std of (N, C, H, W) pixels, accumulated in float64.

    Chunked so that CIFAR-10 never needs a float64 copy of the whole training set (1.2 GB).
    """
    channels = images.shape[1]
    count = images.shape[0] * images.shape[2] * images.shape[3]
    sums = np.zeros(channels)
    for start in range(0, images.shape[0], 4096):
        sums += images[start : start + 4096].sum(axis=(0, 2, 3), dtype=np.float64)
    means = sums / count
    squares = np.zeros(channels)
    for start in range(0, images.shape[0], 4096):
        centred = images[start : start + 4096].astype(np.float64) - means[None, :, None, None]
        squares += (centred * centred).sum(axis=(0, 2, 3))
    stds = np.sqrt(squares / count)
    if np.any(stds == 0):
        raise ValueError(f"a channel of the training images is constant (std {stds.tolist()})")
    return tuple(float(m) for m in means), tuple(float(s) for s in stds)


def _normalise(images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32)
    x.sub_(torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
    x.div_(torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
    return x


def _bundle(
    name: str,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    *,
    classes: tuple[str, ...],
    seed: int,
    validation: bool,
    validation_fraction: float,
    augmentation: Augmentation | None,
    extra: dict[str, Any] | None = None,
) -> DataBundle:
    """Split off validation if asked, normalise with the statistics of what is trained on."""
    if validation:
        kept, held = _stratified_split(
            train_labels, validation_fraction, seed, what=f"the {name} training set"
        )
        test_images, test_labels = train_images[held], train_labels[held]
        train_images, train_labels = train_images[kept], train_labels[kept]
    # Statistics from the images trained on only, so the evaluation set does not leak into them.
    mean, std = _channel_stats(train_images)
    return DataBundle(
        name=name,
        train_x=_normalise(train_images, mean, std),
        train_y=torch.from_numpy(np.asarray(train_labels, dtype=np.int64)),
        test_x=_normalise(test_images, mean, std),
        test_y=torch.from_numpy(np.asarray(test_labels, dtype=np.int64)),
        num_classes=len(classes),
        in_channels=int(train_images.shape[1]),
        image_size=int(train_images.shape[2]),
        classes=classes,
        mean=mean,
        std=std,
        eval_split="validation" if validation else "test",
        augmentation=augmentation,
        seed=seed,
        extra=extra or {},
    )


# ----------------------------------------------------------------------------------------------
# digits


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits: images (1797, 8, 8) of integers 0..16 and their labels,
    read from the package's data file as its `load_digits` reads it, without importing
    scikit-learn (a second of CPU in the driver and in each worker)."""
    data_file = _bundled_digits_file()
    if data_file is not None:
        table = np.loadtxt(data_file, delimiter=",")  # a row: 64 pixels, then the label
        return table[:, :-1].reshape(-1, 8, 8), table[:, -1]
    from sklearn.datasets import load_digits  # a scikit-learn that keeps its data elsewhere

    digits = load_digits()
    return digits.images, digits.target


def _bundled_digits_file() -> Path | None:
    package = importlib.util.find_spec("sklearn")  # finds the package; runs none of it
    for folder in (package.submodule_search_locations or []) if package is not None else []:
        data_file = Path(folder) / "datasets" / "data" / "digits.csv.gz"
        if data_file.is_file():
            return data_file
    return None


def _load_digits(seed: int, validation: bool, validation_fraction: float) -> DataBundle:
    pixels, targets = _digits_arrays()
    # Pixel values are integers 0..16; uint8 keeps them exact and the memory small.
    images = pixels.astype(np.uint8)[:, None, :, :]
    labels = targets.astype(np.int64)
    train_idx, test_idx = _stratified_split(
        labels, DIGITS_TEST_FRACTION, seed, what="the digits dataset"
    )
    return _bundle(
        "digits",
        images[train_idx],
        labels[train_idx],
        images[test_idx],
        labels[test_idx],
        classes=tuple(str(c) for c in range(10)),
        seed=seed,
        validation=validation,
        validation_fraction=validation_fraction,
        # 8x8 images have no room for 4-pixel shifts; the paper's augmentation is for CIFAR.
        augmentation=None,
    )


# ----------------------------------------------------------------------------------------------
# synthetic


def _load_synthetic(
    spec: SyntheticSpec, seed: int, validation: bool, validation_fraction: float
) -> DataBundle:
    generator = torch.Generator().manual_seed(seed)
    shape = (spec.channels, spec.image_size, spec.image_size)
    prototypes = torch.randn((spec.num_classes, *shape), generator=generator)

    def sample(count: int) -> tuple[np.ndarray, np.ndarray]:
        # Balanced classes in a shuffled order, so any prefix of the data holds every class.
        labels = torch.arange(count) % spec.num_classes
        labels = labels[torch.randperm(count, generator=generator)]
        noise = torch.randn((count, *shape), generator=generator)
        return (prototypes[labels] + spec.noise * noise).numpy(), labels.numpy()

    train_images, train_labels = sample(spec.train_size)
    test_images, test_labels = sample(spec.test_size)
    return _bundle(
        "synthetic",
        train_images,
        train_labels,
        test_images,
        test_labels,
        classes=tuple(str(c) for c in range(spec.num_classes)),
        seed=seed,
        validation=validation,
        validation_fraction=validation_fraction,
        augmentation=None,
        extra={"synthetic": {k: getattr(spec, k) for k in spec.__dataclass_fields__}},
    )


# ----------------------------------------------------------------------------------------------
# CIFAR-10


def _load_cifar(
    name: str, root: str | None, seed: int, validation: bool, validation_fraction: float,
    download: bool,
) -> DataBundle:
    fmt = CIFAR_FORMATS[name]
    if root is None:
        raise ValueError(
            f"{name} needs root=: a folder holding {fmt.folder}/ or {fmt.archive}, "
            "or the archive itself (add download=True to fetch it into that folder)"
        )
    arrays = read_cifar(fmt, root, download=download)
    return _bundle(
        name,
        arrays.train_images,
        arrays.train_labels,
        arrays.test_images,
        arrays.test_labels,
        classes=arrays.classes,
        seed=seed,
        validation=validation,
        validation_fraction=validation_fraction,
        augmentation=Augmentation(pad=4, flip=True),
        extra={"source": str(arrays.source)},
    )


def read_cifar(fmt: CifarFormat, root: str | os.PathLike[str], *,
               download: bool = False) -> CifarArrays:
    """Read CIFAR-10 or CIFAR-100 (`fmt`) in its official python format, without normalising.

    `root` is the .tar.gz itself, the extracted folder, or a folder holding either (the extracted
    folder is preferred: no decompression). The batches are pickles, read by an unpickler that
    admits only the plain data they hold, so a crafted file cannot run code; `download=True`
    fetches the official archive and checks its md5.
    """
    root = Path(root).expanduser()
    source = _find_cifar(fmt, root)
    if source is None and download:
        source = download_cifar(fmt, root)
    if source is None:
        raise FileNotFoundError(
            f"{fmt.title} not found: looked for {root / fmt.folder}/ and {root / fmt.archive}"
            f" (and whether {root} is one of them). Fix: pass root= a folder holding either, or "
            f"the archive itself, or add download=True to fetch {fmt.url} into {root}."
        )
    if source.is_dir():
        return _assemble_cifar(fmt, functools.partial(_read_from_folder, fmt, source), source)
    try:
        with tarfile.open(source, "r:gz") as archive:
            return _assemble_cifar(fmt, functools.partial(_read_from_archive, fmt, archive,
                                                          source), source)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise ValueError(f"{source}: not a readable {fmt.title} archive, damaged or cut short "
                         f"({error or type(error).__name__}); fetch {fmt.archive} again "
                         "(download: true checks its md5)") from None


def read_cifar10(root: str | os.PathLike[str], *, download: bool = False) -> CifarArrays:
    """`read_cifar(CIFAR10, ...)`."""
    return read_cifar(CIFAR10, root, download=download)


def read_cifar100(root: str | os.PathLike[str], *, download: bool = False) -> CifarArrays:
    """`read_cifar(CIFAR100, ...)`: the 100 fine labels."""
    return read_cifar(CIFAR100, root, download=download)


def _read_from_folder(fmt: CifarFormat, folder: Path, member: str) -> dict[bytes, Any]:
    path = folder / member
    if not path.is_file():
        raise FileNotFoundError(f"{fmt.title} folder {folder} lacks the batch file {member}")
    with path.open("rb") as handle:
        return _unpickle(handle, str(path))


def _read_from_archive(fmt: CifarFormat, archive: tarfile.TarFile, source: Path,
                       member: str) -> dict[bytes, Any]:
    name = f"{fmt.folder}/{member}"
    try:
        handle = archive.extractfile(name)
    except KeyError:
        handle = None
    if handle is None:
        raise FileNotFoundError(f"{fmt.title} archive {source} lacks the member {name}")
    with handle:
        return _unpickle(handle, f"{source}:{name}")


def _find_cifar(fmt: CifarFormat, root: Path) -> Path | None:
    if root.is_file() and root.name.endswith((".tar.gz", ".tgz")):
        return root
    if root.is_dir():
        if (root / fmt.train_members[0]).is_file():
            return root
        if (root / fmt.folder).is_dir():
            return root / fmt.folder
        if (root / fmt.archive).is_file():
            return root / fmt.archive
    return None


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickles the plain data a CIFAR batch holds (dicts, lists, strings, numbers and numpy
    arrays) and refuses every other global: a crafted batch file cannot run code."""

    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),  # how Python 3 pickles the bytes inside numpy arrays
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing {module}.{name}: a CIFAR batch holds only dicts, lists, strings, "
                "numbers and numpy arrays"
            )
        return super().find_class(module, name)


def _unpickle(handle: BinaryIO, where: str) -> dict[bytes, Any]:
    # encoding="bytes": the batches were pickled by Python 2, and their keys stay bytes (b"data").
    try:
        batch = _PlainDataUnpickler(handle, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as error:
        raise ValueError(f"{where}: not a CIFAR batch: {error or type(error).__name__}") from None
    if not isinstance(batch, dict):
        raise ValueError(f"{where}: expected a pickled dict, got {type(batch).__name__}")
    return batch


def _shown_value(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _cifar_array(value: Any, dtype: type, where: str, valid: str) -> np.ndarray:
    """A batch's value as a numpy array of `dtype`, or one ValueError naming `where` and what
    was valid: a number out of the type's range (10**30, a pixel of 300) or no array at all."""
    try:
        array = np.asarray(value)
        if array.dtype == object or not (np.issubdtype(array.dtype, np.integer)
                                         or array.dtype == np.bool_):
            raise TypeError(f"a {array.dtype} array")
        info = np.iinfo(dtype)
        if array.size and (array.min() < info.min or array.max() > info.max):
            raise OverflowError(f"values up to {array.max()}")
        return array.astype(dtype)
    except (TypeError, ValueError, OverflowError) as error:
        raise ValueError(f"{where}: not {valid} ({error}): {_shown_value(value)}") from None


def _assemble_cifar(fmt: CifarFormat, read: Callable[[str], dict[bytes, Any]],
                    source: Path) -> CifarArrays:
    def images_and_labels(member: str) -> tuple[np.ndarray, np.ndarray]:
        batch = read(member)
        if b"data" not in batch or fmt.label_key not in batch:
            raise ValueError(
                f"{source}/{member}: expected keys b'data' and {fmt.label_key!r}, got {sorted(batch)}"
            )
        data = _cifar_array(batch[b"data"], np.uint8, f"{source}/{member}: b'data'",
                            "3072 pixel values in 0..255 per image")
        labels = _cifar_array(batch[fmt.label_key], np.int64,
                              f"{source}/{member}: {fmt.label_key!r}",
                              f"class indices in 0..{fmt.num_classes - 1}")
        if labels.ndim != 1 or (labels.size and not (
                0 <= labels.min() and labels.max() < fmt.num_classes)):
            bad = labels.ravel()[(labels.ravel() < 0) | (labels.ravel() >= fmt.num_classes)]
            shown = f"{int(bad[0])}" if bad.size else f"an array of shape {labels.shape}"
            raise ValueError(f"{source}/{member}: {fmt.label_key!r} holds {shown}; expected "
                             f"a list of class indices in 0..{fmt.num_classes - 1} "
                             f"({fmt.title} has {fmt.num_classes} classes)")
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != labels.shape[0]:
            raise ValueError(
                f"{source}/{member}: b'data' has shape {data.shape} for {labels.shape[0]} labels, "
                f"expected ({labels.shape[0]}, 3072) uint8"
            )
        # Each row is three row-major 32x32 planes, R then G then B: a plain reshape is NCHW.
        return data.reshape(-1, 3, 32, 32), labels

    train = [images_and_labels(member) for member in fmt.train_members]
    test_images, test_labels = images_and_labels(fmt.test_member)
    meta = read(fmt.meta_member)
    names = meta.get(fmt.names_key, [str(i) for i in range(fmt.num_classes)])
    if not isinstance(names, (list, tuple)) or len(names) != fmt.num_classes or not all(
            isinstance(name, (bytes, str)) for name in names):
        raise ValueError(f"{source}/{fmt.meta_member}: {fmt.names_key!r} holds "
                         f"{_shown_value(names)}; expected a list of {fmt.num_classes} class "
                         "names")
    classes = tuple(name.decode(errors="replace") if isinstance(name, bytes) else name
                    for name in names)
    return CifarArrays(
        train_images=np.concatenate([images for images, _ in train]),
        train_labels=np.concatenate([labels for _, labels in train]),
        test_images=test_images,
        test_labels=test_labels,
        classes=classes,
        source=source,
    )


def download_cifar(fmt: CifarFormat, root: str | os.PathLike[str]) -> Path:
    """Fetch the official archive into `root` and check its md5; returns the archive's path."""
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    target = root / fmt.archive
    partial = root / (fmt.archive + ".part")
    # Written under another name first, so an interrupted download never looks like an archive.
    urllib.request.urlretrieve(fmt.url, partial)
    digest = hashlib.md5()
    with partial.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != fmt.md5:
        partial.unlink()
        raise OSError(
            f"download of {fmt.url} has md5 {digest.hexdigest()}, expected {fmt.md5}; "
            f"deleted it, try again"
        )
    os.replace(partial, target)
    return target
