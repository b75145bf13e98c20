"""What a shard is, as this package writes and reads it: a tar file whose samples are the
members sharing a key, an image (IMAGE_EXTENSIONS) and a `.cls` member holding the class index;
its table of contents counted and checked without decoding an image (count_samples); and the
errors a shard that cannot be read raises. convert-imagenet (imagenet_layout.py) writes this
format and shards.py reads it."""

from __future__ import annotations

import bz2
import contextlib
import gzip
import http.client
import io
import lzma
import re
import tarfile
import urllib.error
import zlib
from collections.abc import Callable, Iterator
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
    """A shard's archive bytes as a tar reader reads them, remembering the last block's worth:
    after the last member, a tar file's end-of-archive blocks are zeros, and a shard cut at a
    member's boundary reads as a whole, shorter one without them (`check_ended`). Give it the
    archive's own bytes: a compressed shard's decompressed (`decompressed`)."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.tail = b""

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        # Only the chunk's own last block joins the tail: a shard's every read is not copied.
        self.tail = (self.tail + data[-tarfile.BLOCKSIZE:])[-tarfile.BLOCKSIZE:]
        return data

    def check_ended(self, url: str, members: int | None = None) -> None:
        """CorruptShard where the archive, read to its end, ended without zeros."""
        if self.tail != bytes(tarfile.BLOCKSIZE):
            after = "its last member" if members is None else f"its {members} members"
            raise CorruptShard(f"shard {url} cannot be read: cut short (no end-of-archive blocks "
                               f"after {after})")


# The magic numbers of the compressions tarfile reads ("r:*"), and their streaming readers.
_COMPRESSIONS: tuple[tuple[bytes, Callable[[BinaryIO], BinaryIO]], ...] = (
    (b"\x1f\x8b", lambda stream: gzip.GzipFile(fileobj=stream, mode="rb")),
    (b"BZh", bz2.BZ2File), (b"\xfd7zXZ\x00", lzma.LZMAFile))


def decompressed(stream: BinaryIO) -> BinaryIO:
    """The archive bytes of a shard's stream, read once from its start: decompressed where the
    stream starts with a compression's magic number, else the stream's own bytes (the first few,
    read to tell, given back first). Reads only forward, so it serves streams from URLs."""
    head = stream.read(6)
    prefixed: BinaryIO = _Prefixed(head, stream)  # type: ignore[assignment]
    reader = _reader_for(head)
    return prefixed if reader is None else _Decompressed(reader, prefixed)  # type: ignore


def _reader_for(head: bytes) -> Callable[[BinaryIO], BinaryIO] | None:
    """The decompressing reader for a stream that starts with `head`; None for plain bytes."""
    return next((reader for magic, reader in _COMPRESSIONS if head.startswith(magic)), None)


class _SourceFault(Exception):
    """The source stream's own fault (a lost connection) on its way through a decompressor."""

    def __init__(self, error: OSError) -> None:
        super().__init__(error)
        self.error = error


class _Reader(io.RawIOBase):
    """A readable stream whose subclass gives `read`; `readinto` (what some readers call) reads
    through it."""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)


class _Faults(_Reader):
    """`stream`'s reads, its faults marked as its own (_SourceFault)."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream

    def read(self, size: int = -1) -> bytes:
        try:
            return self.stream.read(size)
        except OSError as error:
            raise _SourceFault(error) from error


class _Decompressed(_Reader):
    """A compressed stream's bytes decompressed, where wrong bytes are a tarfile.ReadError (a
    corrupt shard: the decompressors raise zlib.error, lzma.LZMAError, OSError or EOFError for
    them) and the source's own faults stay what they were (a lost connection is no corrupt
    shard)."""

    def __init__(self, reader: Callable[[BinaryIO], BinaryIO], source: BinaryIO) -> None:
        self.reader = reader(_Faults(source))  # type: ignore[arg-type]

    def read(self, size: int = -1) -> bytes:
        try:
            return self.reader.read(size)
        except _SourceFault as fault:
            raise fault.error from None
        except (OSError, EOFError, ValueError, zlib.error, lzma.LZMAError) as error:
            raise tarfile.ReadError(f"cannot be decompressed ({type(error).__name__}: "
                                    f"{error})") from error


class _Prefixed(_Reader):
    """`head`, then the rest of `stream`: a stream whose first bytes were read to look at them."""

    def __init__(self, head: bytes, stream: BinaryIO) -> None:
        self.head, self.stream = head, stream

    def read(self, size: int = -1) -> bytes:
        if not self.head:
            return self.stream.read(size)
        if size is None or size < 0:
            data, self.head = self.head + self.stream.read(), b""
            return data
        data, self.head = self.head[:size], self.head[size:]
        if len(data) < size:
            data += self.stream.read(size - len(data))
        return data


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
    index, so that a bad one is named before training rather than failing it an epoch in. A
    shard without its end-of-archive blocks (cut between members) is refused."""
    keys = set()
    for url in urls:
        try:
            names = _checked_names(url, num_classes)
        except (OSError, tarfile.TarError, EOFError) as error:
            # tarfile's message lists each compression it tried, a line each: its first says it
            first = (str(error).splitlines() or [""])[0].rstrip(":")
            what = "not a tar file, or cut short" if isinstance(error, tarfile.TarError) else \
                type(error).__name__
            kind = CorruptShard if isinstance(error, (tarfile.TarError, EOFError)) else ShardError
            raise kind(f"shard {url} cannot be read: {what} ({first})") from error
        members: dict[tuple[str | None, str | None], str] = {}
        last: dict[str | None, str] = {}  # each key's latest member
        previous = None
        for name in names:
            key, extension = split_key(name)
            if key is not None and (key, extension) in members:
                raise CorruptShard(
                    f"shard {url}: members {members[key, extension]} and {name} are both sample "
                    f"{key}'s {extension} (the reader groups members by their name less its "
                    "extensions): give each sample a key of its own")
            if key is not None and key != previous and key in last:
                # The reader groups a sample's members as they follow one another: apart, they
                # are two samples, an image without its label and a label without its image.
                raise CorruptShard(
                    f"shard {url}: members {last[key]} and {name} of sample {key} are not next "
                    f"to each other (the reader takes a sample's members as they follow one "
                    "another): write each sample's members together, as convert-imagenet does")
            members[key, extension] = name
            if key is not None:  # (a member without a key, a folder say, the reader passes over)
                last[key], previous = name, key
            if extension in IMAGE_EXTENSIONS:
                keys.add((url, key))
        if num_classes is not None:
            _check_every_image_labelled(url, members)
    return len(keys)


def _check_every_image_labelled(url: str, members: dict[tuple[str | None, str | None], str]
                                ) -> None:
    """CorruptShard where a sample has an image and no .cls member: the reader skips it in every
    epoch (a shard of such samples was accepted, and its trial failed an epoch in)."""
    images = [(key, name) for (key, extension), name in members.items()
              if extension in IMAGE_EXTENSIONS]
    unlabelled = [name for key, name in images if (key, "cls") not in members]
    if unlabelled:
        raise CorruptShard(f"shard {url}: {len(unlabelled)} of its {len(images)} images have no "
                           f".cls member (e.g. {unlabelled[0]}): each sample holds its class "
                           "index as a .cls member beside its image, as convert-imagenet writes "
                           "it")


def _checked_names(url: str, num_classes: int | None) -> list[str]:
    """The member names of local shard `url`, its labels and its end checked. A plain tar is
    read by its headers alone (a seek over each member's bytes); a compressed one, which has to
    be decompressed to find them, in one pass from its start (seeking back in it decompresses
    it again from its start)."""
    with open(local_path(url), "rb") as file:
        compressed = _reader_for(file.read(6)) is not None
        file.seek(0)
        if compressed:
            watched = EndWatch(decompressed(file))
            with tarfile.open(fileobj=watched, mode="r|") as archive:
                names = []
                for member in archive:
                    names.append(member.name)
                    _check_label(archive, member, num_classes, url)
            watched.check_ended(url, len(names))
            return names
        with tarfile.open(fileobj=file) as archive:
            names = archive.getnames()
            _check_end_of_archive(archive, url)
            for member in archive.getmembers():
                _check_label(archive, member, num_classes, url)
        return names


def _check_label(archive: tarfile.TarFile, member: tarfile.TarInfo, num_classes: int | None,
                 url: str) -> None:
    """With `num_classes`, CorruptShard where `member` is a .cls member holding no class index."""
    key, kind = split_key(member.name)
    if num_classes is not None and kind == "cls" and member.isfile():
        label_of(archive.extractfile(member).read(), num_classes, f"shard {url}, sample {key}")


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
