"""Where shards are read from: local paths, file:// and http(s):// URLs opened by the toolkit
itself, never through a shell (a spec is data: webdataset's own opener runs `pipe:` URLs in a
shell and other schemes as commands); a `pipe:` URL only where the user opted in
(`resnet-ablate run --allow-pipe-urls`, which sets ALLOW_PIPE_URLS_ENV for the trials'
processes). `probe_shard` asks whether a shard can be read, without reading it."""

from __future__ import annotations

import http.client
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO
from urllib.parse import urlparse
from urllib.request import url2pathname

# Set to 1 (by `resnet-ablate run --allow-pipe-urls`) to let `pipe:` shard URLs run their command.
ALLOW_PIPE_URLS_ENV = "RESNET_ABLATE_ALLOW_PIPE_URLS"
HTTP_TIMEOUT_SECONDS = 60.0
PROBE_TIMEOUT_SECONDS = 15.0  # per shard URL, when a trial starts
_LOCAL_SCHEMES = ("", "file")
_HTTP_SCHEMES = ("http", "https")


def pipe_urls_allowed() -> bool:
    """Whether this process may run `pipe:` URLs' commands (see ALLOW_PIPE_URLS_ENV)."""
    return os.environ.get(ALLOW_PIPE_URLS_ENV) == "1"


def _scheme(url: str) -> str:
    return urlparse(url).scheme.lower()


def is_local(url: str) -> bool:
    return _scheme(url) in _LOCAL_SCHEMES


def local_path(url: str) -> Path:
    return Path(url2pathname(urlparse(url).path)) if _scheme(url) == "file" else Path(url)


def check_url(url: str, where: str) -> None:
    """ValueError unless this toolkit may open `url` (`where` names the spec field): a local
    path, file://, http(s)://, or `pipe:` with the opt-in; never a scheme that runs a command
    unasked."""
    scheme = _scheme(url)
    if scheme in _LOCAL_SCHEMES or scheme in _HTTP_SCHEMES:
        return
    if scheme == "pipe" and pipe_urls_allowed():
        return
    valid = "valid: a local path, file://, http:// or https://"
    if scheme == "pipe":
        raise ValueError(f"{where}: {url!r} is a pipe: URL, which runs a shell command; {valid}, "
                         "or pipe: with `resnet-ablate run --allow-pipe-urls` "
                         f"({ALLOW_PIPE_URLS_ENV}=1) for a spec you trust")
    raise ValueError(f"{where}: {url!r} has the scheme {scheme}:, which this toolkit does not "
                     f"open; {valid} (other stores through a pipe: URL, e.g. `pipe:gsutil cat "
                     "gs://...`, with `resnet-ablate run --allow-pipe-urls`)")


def open_shard(url: str) -> IO[bytes]:
    """A binary stream of the shard at `url`, opened without a shell (a `pipe:` URL only with the
    opt-in, checked again here: the trial's process may not be the one that loaded the spec)."""
    check_url(url, "shard")
    scheme = _scheme(url)
    if scheme in _LOCAL_SCHEMES:
        return open(local_path(url), "rb")
    if scheme in _HTTP_SCHEMES:
        return urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_SECONDS)  # noqa: S310 - http(s) only
    from webdataset.gopen import gopen_pipe

    return gopen_pipe(url, "rb")


def probe_shard(url: str) -> str | None:
    """Why the shard at `url` cannot be read, in a few words, or None where it can: a local file
    must exist, an http(s) URL answer a HEAD request (or, where HEAD is refused, a one-byte GET)
    with success. A `pipe:` URL is not probed: its command runs only to read it."""
    scheme = _scheme(url)
    if scheme in _LOCAL_SCHEMES:
        return None if local_path(url).is_file() else "no such file"
    if scheme not in _HTTP_SCHEMES:
        return None
    for request in (urllib.request.Request(url, method="HEAD"),
                    urllib.request.Request(url, headers={"Range": "bytes=0-0"})):
        try:
            with urllib.request.urlopen(request, timeout=PROBE_TIMEOUT_SECONDS):  # noqa: S310
                return None
        except urllib.error.HTTPError as error:
            if request.get_method() == "HEAD" and error.code in (405, 501):
                continue  # a server that does not answer HEAD: ask for one byte instead
            return f"HTTP {error.code} {error.reason}"
        except (OSError, http.client.HTTPException, ValueError) as error:
            reason = getattr(error, "reason", None) or error
            return f"unreachable ({type(error).__name__}: {reason})"
    return None

