"""CIFAR-10 and CIFAR-100 in their official python format (``cifar-10-python.tar.gz``,
``cifar-100-python.tar.gz`` or the folders they extract to), read without normalising, and loaded
normalised per channel with training-set statistics, with the augmentation of He et al. (CVPR
2016, section 4.2): 4-pixel zero pad + random 32x32 crop + horizontal flip for training. The
paper's per-pixel mean subtraction is a recipe's `mean: pixel` (data/bundle.py's pixel_centred).

The batches are pickles: they are read by an unpickler that admits only the plain data they hold,
so a crafted file cannot run code; a download checks the archive's md5.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import os
import pickle
import tarfile
import urllib.request
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .augment import Augmentation
from .bundle import DataBundle, make_bundle
from .errors import DataUnavailable


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


def load_cifar(
    name: str, root: str | None, seed: int, validation: bool, validation_fraction: float,
    download: bool,
) -> DataBundle:
    fmt = CIFAR_FORMATS[name]
    if root is None:
        raise ValueError(
            f"{name} needs a root: a folder holding {fmt.folder}/ or {fmt.archive}, or the "
            "archive itself (a spec's dataset `root:`, Python's root=; with download, `download: "
            "true` or download=True, it is fetched into that folder)"
        )
    arrays = read_cifar(fmt, root, download=download)
    return make_bundle(
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
            f" (and whether {root} is one of them). Fix: set the data set's root (a spec's "
            f"`root:`, Python's root=) to a folder holding either, or to the archive itself, or "
            f"set download (`download: true`, download=True) to fetch {fmt.url} into {root}."
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
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    target = root / fmt.archive
    partial = root / (fmt.archive + ".part")
    try:
        # Written under another name first, so an interrupted download never looks like an
        # archive.
        urllib.request.urlretrieve(fmt.url, partial)
    except (OSError, ValueError) as error:  # urllib's URLError is an OSError
        partial.unlink(missing_ok=True)
        if created:  # leave no empty folder behind (another download may be filling it)
            with contextlib.suppress(OSError):
                root.rmdir()
        reason = getattr(error, "reason", None) or error
        # Unavailable: the same download fails again, so a trial meeting it is not retried.
        raise DataUnavailable(f"could not download {fmt.url} into {root}/ ({reason}); where this "
                              f"machine cannot reach it, put {fmt.archive} (or the folder it "
                              f"unpacks to) in {root}/ yourself") from None
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
