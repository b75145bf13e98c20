"""What a shard is, as this package writes and reads it: a tar file whose samples are the
members sharing a key, an image (IMAGE_EXTENSIONS) and a `.cls` member holding the class index;
its table of contents counted and checked without decoding an image (count_samples); and the
errors a shard that cannot be read raises. convert-imagenet (imagenet_layout.py) writes this
format and shards.py reads it."""

from __future__ import annotations

import contextlib
import http.client
import re
import tarfile
import urllib.error
from collections.abc import Iterator
from typing import BinaryIO

from .shard_urls import local_path

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


class ShardError(RuntimeError):
    """A shard that cannot be read (missing, unreachable, not a tar file, cut short)."""


class CorruptShard(ShardError):
    """A shard whose bytes are wrong (not a tar file, cut short, a label that is no class index):
    deterministic, where a connection lost while reading may not be, so a trial that meets it
    is recorded as data_unavailable and not retried."""


@contextlib.contextmanager
def reading_shard(url: str) -> Iterator[None]:
    """Within: a failure to read shard `url` becomes one error naming it: CorruptShard for wrong
    bytes (not a tar file, cut short), ShardError for the connection or the file system."""
    try:
        yield
    except (tarfile.TarError, EOFError) as error:
        # (A streamed reader's message may end in " @ <the stream object>": not for a reader.)
        said = re.sub(r" @ <[^>]*>$", "", str(error))
        raise CorruptShard(f"shard {url} cannot be read: {type(error).__name__}: "
                           f"{said}") from error
    except (OSError, urllib.error.URLError, http.client.HTTPException,
            http.client.InvalidURL) as error:
        raise ShardError(f"shard {url} cannot be read: {type(error).__name__}: "
                         f"{error}") from error


class EndWatch:
    """A shard's stream as a tar reader reads it, remembering the last block's worth of bytes:
    after the last member, a tar file's end-of-archive blocks are zeros, and a shard cut at a
    member's boundary reads as a whole, shorter one without them (`check_ended`). Compressed
    streams are not judged (their bytes are not the archive's)."""

    _COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.head: bytes | None = None
        self.tail = b""

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        if self.head is None:
            self.head = data[:6]
        # Only the chunk's own last block joins the tail: a shard's every read is not copied.
        self.tail = (self.tail + data[-tarfile.BLOCKSIZE:])[-tarfile.BLOCKSIZE:]
        return data

    def check_ended(self, url: str) -> None:
        """CorruptShard where the stream, read to its archive's end, ended without zeros."""
        if self.head is not None and self.head.startswith(self._COMPRESSED):
            return
        if self.tail != bytes(tarfile.BLOCKSIZE):
            raise CorruptShard(f"shard {url} cannot be read: cut short (no end-of-archive blocks "
                               "after its last member)")


def split_key(name: str) -> tuple[str | None, str | None]:
    """(key, extension) of a tar member's name: the extension is what follows the last dot, and
    the key the rest, less an image extension left before it (ImageNet's `x.JPEG.jpg` and
    `x.JPEG.cls` or `x.cls` are all sample `x`); (None, None) for a name without an extension.
    Counting and decoding both use this rule, so they agree on what a sample is."""
    folder, slash, base = name.rpartition("/")
    stem, dot, extension = base.rpartition(".")
    if not dot or not stem:
        return None, None
    inner_stem, inner_dot, inner = stem.rpartition(".")
    if inner_dot and inner_stem and inner.lower() in IMAGE_EXTENSIONS:
        stem = inner_stem
    return folder + slash + stem, extension.lower()


def count_samples(urls: list[str], num_classes: int | None = None) -> int:
    """Samples in local shards, from their member names (no image is decoded): the keys with an
    image. With `num_classes`, each sample's label (its .cls member) is checked to be a class
    index, so that a bad one is named before training rather than failing it an epoch in."""
    keys = set()
    for url in urls:
        try:
            with tarfile.open(local_path(url)) as archive:
                names = archive.getnames()
                _check_end_of_archive(archive, url)
                if num_classes is not None:
                    for member in archive.getmembers():
                        key, kind = split_key(member.name)
                        if kind == "cls" and member.isfile():
                            label_of(archive.extractfile(member).read(), num_classes,
                                     f"shard {url}, sample {key}")
        except (OSError, tarfile.TarError, EOFError) as error:
            # tarfile's message lists each compression it tried, a line each: its first says it
            first = (str(error).splitlines() or [""])[0].rstrip(":")
            what = "not a tar file, or cut short" if isinstance(error, tarfile.TarError) else \
                type(error).__name__
            kind = CorruptShard if isinstance(error, (tarfile.TarError, EOFError)) else ShardError
            raise kind(f"shard {url} cannot be read: {what} ({first})") from error
        for name in names:
            key, extension = split_key(name)
            if extension in IMAGE_EXTENSIONS:
                keys.add((url, key))
    return len(keys)


def _check_end_of_archive(archive: tarfile.TarFile, url: str) -> None:
    """CorruptShard where nothing marks the archive's end after its last member: a tar file ends
    in zero blocks, and one cut at a member's boundary reads as a whole, shorter shard."""
    archive.fileobj.seek(archive.offset)
    end = archive.fileobj.read(tarfile.BLOCKSIZE)
    if len(end) < tarfile.BLOCKSIZE or end.count(0) != tarfile.BLOCKSIZE:
        raise CorruptShard(f"shard {url} cannot be read: cut short (no end-of-archive blocks "
                           f"after its {len(archive.getmembers())} members)")


def label_of(text: bytes, num_classes: int | None, where: str) -> int:
    """A sample's label from its .cls member: a class index in [0, num_classes); a ShardError
    naming `where` (the shard and key), the label and the valid range for anything else."""
    shown = text.decode(errors="replace").strip()
    try:
        label = int(shown)
    except ValueError:
        label = None
    if label is None or label < 0 or (num_classes is not None and label >= num_classes):
        valid = f"0 to {num_classes - 1}" if num_classes is not None else "0 or more"
        raise CorruptShard(f"{where}: label {shown[:40]!r} is not a class index ({valid}): a "
                         ".cls member holds the class's index, as convert-imagenet writes it")
    return label
