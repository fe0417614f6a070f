"""Where image bytes come from: a path (shared storage) or HTTP(S) with resume. Pluggable by scheme.

A transport returns a readable stream of the whole artifact; the cache hashes what it reads, so every
transfer ends in the checksum check whatever the transport.
"""

from __future__ import annotations

import http.client
import socket
import urllib.error
import urllib.request
from typing import BinaryIO, Callable
from urllib.parse import urlsplit

from .errors import ImageError

HTTP_RETRIES = 5


class ResumingHTTPReader:
    """Reads a URL to the end, reconnecting with a Range request when the connection breaks."""

    def __init__(self, url: str, timeout: float = 30.0):
        self.url = url
        self.timeout = timeout
        self.offset = 0
        self.resumes = 0
        self.resp = self._connect()

    def _connect(self):
        req = urllib.request.Request(self.url)
        if self.offset:
            req.add_header("Range", f"bytes={self.offset}-")
        try:
            resp = urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            raise ImageError(f"cannot fetch image {self.url}: HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ImageError(f"cannot fetch image {self.url}: {reason}") from None
        if self.offset:
            crange = resp.headers.get("Content-Range", "")
            if resp.status != 206 or not crange.startswith(f"bytes {self.offset}-"):
                resp.close()
                raise ImageError(f"cannot resume {self.url} at byte {self.offset}: server ignored the Range request")
        return resp

    def read(self, n: int) -> bytes:
        for attempt in range(HTTP_RETRIES + 1):
            try:
                buf = self.resp.read(n)
                length = self.resp.length  # bytes still announced by the server for this response
                if not buf and length:
                    raise http.client.IncompleteRead(b"", length)
                self.offset += len(buf)
                return buf
            except (http.client.IncompleteRead, ConnectionError, socket.timeout, http.client.HTTPException) as e:
                if attempt == HTTP_RETRIES:
                    raise ImageError(f"transfer of {self.url} kept breaking at byte {self.offset}: {e!r}") from None
                self.resp.close()
                self.resumes += 1
                self.resp = self._connect()
        return b""

    def close(self) -> None:
        self.resp.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_path(source: str) -> BinaryIO:
    path = source[len("file://"):] if source.startswith("file://") else source
    if not path.startswith("/"):
        raise ImageError(f"image source {source!r} must be an absolute path or a URL")
    try:
        return open(path, "rb")
    except OSError as e:
        raise ImageError(f"cannot read image source {path}: {e.strerror}") from None


def open_http(source: str) -> ResumingHTTPReader:
    return ResumingHTTPReader(source)


TRANSPORTS: dict[str, Callable[[str], BinaryIO]] = {"": open_path, "file": open_path,
                                                     "http": open_http, "https": open_http}


def register(scheme: str, opener: Callable[[str], BinaryIO]) -> None:
    """Let a site add its own transport (e.g. 's3'): opener(source) -> object with read(n) and close()."""
    TRANSPORTS[scheme] = opener


def open_source(source: str):
    scheme = urlsplit(source).scheme if "://" in source else ""
    opener = TRANSPORTS.get(scheme)
    if opener is None:
        raise ImageError(f"no transport for {scheme}:// (image source {source}); known: "
                         f"{', '.join(s for s in TRANSPORTS if s)}")
    return opener(source)
