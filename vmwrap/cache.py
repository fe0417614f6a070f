"""Node image cache: content-addressed, size-bounded (LRU), pin-aware, one fetch per image at a time.

Layout under the cache root:
  blobs/<sha256>      read-only verified bytes
  meta/<sha256>.json  size + stamp (size, mtime_ns) taken when verified, last use
  pins/<sha256>/<job> one file per job that needs the blob (running or suspended): never evicted
  locks/<sha256>      flock: serialises fetches of one blob across processes
  tmp/                partial downloads, renamed into blobs/ only after the checksum matched
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import struct
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from .catalog import Artifact
from .errors import CacheFullError, ImageError, NodeError

CHUNK = 1 << 20


@dataclass
class Fetched:
    path: Path
    hit: bool
    bytes_transferred: int


@dataclass
class Entry:
    sha256: str
    size: int
    last_use: float
    pins: list[str]


class Cache:
    def __init__(self, root: str | os.PathLike, max_bytes: int, verify_on_use: bool = False):
        self.root = Path(root)
        self.max_bytes = int(max_bytes)
        self.verify_on_use = verify_on_use
        for d in ("blobs", "meta", "pins", "locks", "tmp", "reserve"):
            (self.root / d).mkdir(parents=True, exist_ok=True)

    # -- paths -------------------------------------------------------------
    def blob(self, sha: str) -> Path:
        return self.root / "blobs" / sha

    def _meta(self, sha: str) -> Path:
        return self.root / "meta" / f"{sha}.json"

    @contextmanager
    def _lock(self, name: str) -> Iterator[None]:
        with open(self.root / "locks" / name, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # -- public API --------------------------------------------------------
    def has(self, art: Artifact) -> bool:
        """A valid copy is cached (no fetch, no wait for a fetch in progress)."""
        return self._valid(art)

    def fetch(self, art: Artifact, rate: float | None = None,
              on_bytes: Callable[[int], None] | None = None) -> Fetched:
        """Return a verified local copy of `art`, fetching it at most once however many jobs ask.

        `rate` caps the transfer in bytes/s (prestaging must not starve running jobs' I/O);
        `on_bytes` hears each chunk's size (an admin's progress bar; never set on a job's path)."""
        with self._lock(art.sha256):
            if self._valid(art):
                self._touch(art.sha256)
                return Fetched(self.blob(art.sha256), True, 0)
            self._drop(art.sha256)
            self._reserve(art)
            try:
                n = self._download(art, rate, on_bytes)
            finally:
                (self.root / "reserve" / art.sha256).unlink(missing_ok=True)
            self._touch(art.sha256)
            return Fetched(self.blob(art.sha256), False, n)

    def pin(self, sha: str, job_id: str, uid: int | None = None) -> None:
        """Keep the blob while the job needs it; `uid` (QEMU's) may read it if the blob is restricted."""
        d = self.root / "pins" / sha
        d.mkdir(exist_ok=True)
        (d / job_id).write_text("" if uid is None else str(int(uid)))

    def unpin(self, sha: str, job_id: str) -> None:
        p = self.root / "pins" / sha / job_id
        if p.exists():
            p.unlink(missing_ok=True)
            self._sync_access(sha)

    def unpin_job(self, job_id: str) -> None:
        for d in (self.root / "pins").iterdir():
            if (d / job_id).exists():
                (d / job_id).unlink(missing_ok=True)
                self._sync_access(d.name)

    # Blobs arrive root-only (0400). An open image's blobs are published to everyone (0444): QEMU runs
    # as the job's user and reads them. A restricted image's blobs stay 0400 with a POSIX ACL naming
    # exactly the uids of the jobs pinning them now, so nobody else on the node can read the image.
    def grant(self, image) -> None:
        """Let QEMU read every blob of `image` (a catalog.Image; call once they are pinned and fetched).

        A restricted image's kernel and initrd get what its disk gets: readable by the pinning jobs'
        uids only; the kernel or initrd may hold what the site restricts the image for. A blob with
        the same bytes as an open image's may be published again by that image's next job: those
        bytes are everyone's anyway."""
        for art in image.artifacts().values():
            if image.restricted:
                self.restrict(art.sha256)
            else:
                self.publish(art.sha256)

    def publish(self, sha: str) -> None:
        with self._lock(sha):
            p = self.blob(sha)
            _set_acl(p, None)
            p.chmod(0o444)

    def restrict(self, sha: str) -> None:
        with self._lock(sha):
            self.blob(sha).chmod(0o400)
            self._sync_access(sha, locked=True)

    def readers(self, sha: str) -> set[int]:
        """uids of the jobs pinning the blob now."""
        out = set()
        d = self.root / "pins" / sha
        for p in (d.iterdir() if d.is_dir() else ()):
            try:
                out.add(int(p.read_text()[:12]))
            except (OSError, ValueError):
                pass
        return out

    def _sync_access(self, sha: str, locked: bool = False) -> None:
        p = self.blob(sha)
        try:
            if p.stat().st_mode & 0o004:
                return  # published: everybody may read it anyway
        except FileNotFoundError:
            return
        if locked:
            _set_acl(p, self.readers(sha))
        else:
            with self._lock(sha):
                _set_acl(p, self.readers(sha))

    def pins(self, sha: str) -> list[str]:
        d = self.root / "pins" / sha
        return sorted(p.name for p in d.iterdir()) if d.is_dir() else []

    def entries(self) -> list[Entry]:
        out = []
        for p in (self.root / "blobs").iterdir():
            meta = self._read_meta(p.name) or {}
            out.append(Entry(p.name, p.stat().st_size, meta.get("last_use", 0.0), self.pins(p.name)))
        return sorted(out, key=lambda e: e.last_use)

    def used_bytes(self) -> int:
        return sum(e.size for e in self.entries())

    def evict(self, sha: str) -> bool:
        """Remove one blob unless it is pinned; True if removed."""
        with self._lock(sha):
            if self.pins(sha):
                return False
            self._drop(sha)
            return True

    def verify(self, sha: str) -> bool:
        """Full re-hash of one cached blob; a mismatch removes it."""
        with self._lock(sha):
            p = self.blob(sha)
            if not p.exists():
                return False
            if sha256_file(p) == sha:
                return True
            self._drop(sha)
            return False

    def gc(self, keep: set[str]) -> list[str]:
        """Remove unpinned blobs not in `keep`, and what crashed fetches left behind; returns what went."""
        gone = []
        for e in self.entries():
            if e.sha256 not in keep and not e.pins and self.evict(e.sha256):
                gone.append(e.sha256)
        gone += self.clear_crashed_fetches()
        for d in (self.root / "pins").iterdir():
            if not any(d.iterdir()):
                d.rmdir()
        return gone

    def clear_crashed_fetches(self) -> list[str]:
        """Remove the partial downloads and size reservations of fetches whose process died (a prolog
        killed by its scheduler's timeout, a node crash): a live fetch holds its blob's lock. A stale
        reservation would count against the cache bound for ever. Returns what went."""
        gone = []
        for p in list((self.root / "tmp").iterdir()) + list((self.root / "reserve").iterdir()):
            sha = p.name.split(".")[0]
            with open(self.root / "locks" / sha, "a") as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a fetch is running right now
                try:
                    p.unlink(missing_ok=True)
                    gone.append(str(p.relative_to(self.root)))
                finally:
                    fcntl.flock(f, fcntl.LOCK_UN)
        return gone

    # -- internals ---------------------------------------------------------
    def _read_meta(self, sha: str) -> dict | None:
        try:
            return json.loads(self._meta(sha).read_text())
        except (OSError, ValueError):
            return None

    def _valid(self, art: Artifact) -> bool:
        """Cheap check on every use (size and the stamp taken at verification); full hash if configured."""
        p = self.blob(art.sha256)
        meta = self._read_meta(art.sha256)
        try:
            st = p.stat()
        except FileNotFoundError:
            return False
        if meta is None or st.st_size != art.size or meta.get("stamp") != [st.st_size, st.st_mtime_ns]:
            return False
        if self.verify_on_use and sha256_file(p) != art.sha256:
            return False
        return True

    def _touch(self, sha: str) -> None:
        meta = self._read_meta(sha) or {}
        meta["last_use"] = time.time()
        tmp = self._meta(sha).with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, self._meta(sha))

    def _drop(self, sha: str) -> None:
        p = self.blob(sha)
        if p.exists():
            p.chmod(0o644)
            p.unlink()
        self._meta(sha).unlink(missing_ok=True)

    def _reserve(self, art: Artifact) -> None:
        """Make room for `art` under the size bound by evicting unpinned blobs, least recently used first."""
        if art.size > self.max_bytes:
            raise NodeError(f"image {art.sha256[:12]} ({art.size} B) is larger than the whole cache bound ({self.max_bytes} B)")
        with self._lock(".global"):
            reserved = sum(int(p.read_text() or 0) for p in (self.root / "reserve").iterdir())
            used = self.used_bytes() + reserved
            for e in self.entries():
                if used + art.size <= self.max_bytes:
                    break
                if e.pins or e.sha256 == art.sha256:
                    continue
                # Never block on a blob another process is fetching or using right now.
                with open(self.root / "locks" / e.sha256, "a") as f:
                    try:
                        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue
                    try:
                        if not self.pins(e.sha256):
                            self._drop(e.sha256)
                            used -= e.size
                    finally:
                        fcntl.flock(f, fcntl.LOCK_UN)
            if used + art.size > self.max_bytes:
                pinned = [f"{e.sha256[:12]} (jobs {', '.join(e.pins)})" for e in self.entries() if e.pins]
                raise CacheFullError(
                    f"image cache full: need {art.size} B, bound {self.max_bytes} B, "
                    f"{used} B in use; pinned: {'; '.join(pinned) or 'none'}"
                )
            (self.root / "reserve" / art.sha256).write_text(str(art.size))

    def _download(self, art: Artifact, rate: float | None = None,
                  on_bytes: Callable[[int], None] | None = None) -> int:
        tmp = self.root / "tmp" / f"{art.sha256}.{os.getpid()}.part"
        h = hashlib.sha256()
        n = 0
        t0 = time.monotonic()
        from . import transport  # here: its HTTP and TLS modules cost a cached job's start ~10 ms

        try:
            with transport.open_source(art.source) as src, open(tmp, "wb") as dst:
                while True:
                    buf = src.read(CHUNK)
                    if not buf:
                        break
                    h.update(buf)
                    dst.write(buf)
                    n += len(buf)
                    if on_bytes:
                        on_bytes(len(buf))
                    if n > art.size:
                        raise ImageError(f"image source {art.source} is larger than the catalog's size {art.size}")
                    if rate:
                        ahead = n / rate - (time.monotonic() - t0)
                        if ahead > 0:
                            time.sleep(ahead)
                dst.flush()
                os.fsync(dst.fileno())
            if n != art.size:
                raise ImageError(f"image source {art.source} is truncated: {n} of {art.size} bytes")
            if h.hexdigest() != art.sha256:
                raise ImageError(
                    f"checksum mismatch for {art.source}: expected sha256 {art.sha256}, got {h.hexdigest()}"
                )
            tmp.chmod(0o400)  # root-only until publish() or restrict() says who may read it
            st = tmp.stat()
            os.replace(tmp, self.blob(art.sha256))
            meta = {"stamp": [st.st_size, st.st_mtime_ns], "verified_at": time.time()}
            self._meta(art.sha256).write_text(json.dumps(meta))
            return n
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NodeError(f"cache disk full while fetching {art.source} into {self.root}") from None
            raise ImageError(f"cannot fetch image {art.source}: {e.strerror or e}") from None
        finally:
            tmp.unlink(missing_ok=True)


_ACL_XATTR = "system.posix_acl_access"
_USER_OBJ, _USER, _GROUP_OBJ, _MASK, _OTHER = 0x01, 0x02, 0x04, 0x10, 0x20


def _set_acl(path: Path, uids: set[int] | None) -> None:
    """Give read access to exactly `uids` (a POSIX access ACL); None or empty: no ACL at all."""
    if not uids:
        try:
            os.removexattr(path, _ACL_XATTR)
        except OSError as e:
            if e.errno not in (errno.ENODATA, errno.ENOENT, errno.EOPNOTSUPP):
                raise
        return
    undef = 0xFFFFFFFF
    entries = [(_USER_OBJ, 4, undef)] + [(_USER, 4, u) for u in sorted(uids)] + \
              [(_GROUP_OBJ, 0, undef), (_MASK, 4, undef), (_OTHER, 0, undef)]
    data = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)
    try:
        os.setxattr(path, _ACL_XATTR, data)
    except OSError as e:
        raise NodeError(f"cannot set the access list of cached image {path} (file system without ACLs?): "
                        f"{e.strerror}") from None


def sha256_file(p: str | os.PathLike, on_bytes: Callable[[int], None] | None = None) -> str:
    """SHA-256 of a file, read in chunks (images and checkpoints are GBs); `on_bytes` hears each chunk."""
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while buf := f.read(CHUNK):
            h.update(buf)
            if on_bytes:
                on_bytes(len(buf))
    return h.hexdigest()


def disk_free(path: str | os.PathLike) -> int:
    return shutil.disk_usage(path).free
