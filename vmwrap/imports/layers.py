"""Apply image layers (tar streams) to a root-owned staging dir, the way OCI defines it, without trusting them.

A layer is hostile input read by root. Every member is created relative to directory fds opened with
O_NOFOLLOW, so no symlink in the tree (one a lower layer made, or this one) is ever followed: a member
whose parent path holds a symlink is refused, as are absolute names and `..`. Hard links must name a
regular file already extracted inside the root. Whiteouts (`.wh.NAME`) and opaque directories
(`.wh..wh..opq`) remove what lower layers made. Device nodes and FIFOs are skipped (the guest mounts
devtmpfs). Owners, modes (setuid included: it matters only inside the VM) and mtimes are kept.

Bounded: total file bytes (`max_bytes`), member count, the size of one tar header (pax, GNU long
names), the decompressed stream; sparse members are refused. Python's tarfile parses in stream mode
(never extractall): this module decides what reaches the disk.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import tarfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..errors import ImageError

MAX_MEMBERS = 1_000_000       # all layers together; each costs Python memory while extracting
HEADER_MAX = 256 * 1024       # one pax or GNU long-name header
NAME_MAX = 4096               # a member's name or link target (Linux's PATH_MAX)
HEADER_CHAIN_MAX = 8          # extended headers in front of one member
HEADERS_ALLOWANCE = 1 << 30   # tar headers and padding on top of max_bytes in the decompressed streams
CHUNK = 1 << 20
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
NOTE = "note: "  # on_note's lines start so: the CLI shows them after the import, stages only on a terminal
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
GZIP, ZSTD = b"\x1f\x8b", b"\x28\xb5\x2f\xfd"


@dataclass
class Tally:
    """What the layers put into the root (an upper bound: later layers may delete some of it)."""

    bytes: int = 0
    members: int = 0
    skipped_special: int = 0


class Digested(io.RawIOBase):
    """A blob read once, hashed while read: finish() reads what is left and checks size and sha256
    (`digest` None: only hashes, for provenance). `label` names it in the error ("layer sha256:...
    digest mismatch")."""

    def __init__(self, f: BinaryIO, digest: str | None, size: int | None, label: str):
        self.f, self.digest, self.size, self.label = f, digest, size, label
        self.h = hashlib.sha256()
        self.n = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        want = len(b)
        if self.size is not None:
            want = min(want, self.size + 1 - self.n)  # one byte past the size is enough to tell
        if want <= 0:
            return 0
        data = self.f.read(want)
        b[:len(data)] = data
        self.h.update(data)
        self.n += len(data)
        return len(data)

    def finish(self) -> None:
        while self.read(CHUNK):
            pass
        if self.digest is None:
            return
        if (self.size is not None and self.n != self.size) or "sha256:" + self.h.hexdigest() != self.digest:
            raise ImageError(f"{self.label} {self.digest} digest mismatch (read {self.n} bytes"
                             + (f", expected {self.size})" if self.size is not None else ")"))


class _Decompressed(io.RawIOBase):
    """gzip (multi-member), zstd (only with the zstandard module) or plain tar, with a byte budget."""

    def __init__(self, raw: BinaryIO, label: str, budget: list[int] | None):
        self.raw, self.label, self.budget = raw, label, budget
        head = raw.read(4)
        self.pending = b""
        if head[:2] == GZIP:
            self.z = zlib.decompressobj(16 + zlib.MAX_WBITS)
            self.pending = self.z.decompress(head)
        elif head == ZSTD:
            try:
                import zstandard
            except ImportError:
                raise ImageError(f"{label} is zstd-compressed: not supported on this host (the Python module "
                                 "zstandard is not installed)") from None
            self.z = None
            self.raw = zstandard.ZstdDecompressor().stream_reader(_Prefixed(head, raw), read_across_frames=True)
        else:
            self.z = None
            self.pending = head
        self.gzip = head[:2] == GZIP

    def readable(self) -> bool:
        return True

    def _more(self, n: int) -> bytes:
        if not self.gzip:
            return self.raw.read(n)
        while True:
            if self.z.eof:  # a gzip stream may have several members
                rest = self.z.unused_data or self.raw.read(CHUNK)
                if not rest.startswith(GZIP[:len(rest)]) or not rest:
                    self.z = _Ended()  # the end, or padding after the last member: ignored, as gzip(1) does
                    return b""
                self.z = zlib.decompressobj(16 + zlib.MAX_WBITS)
                out = self.z.decompress(rest, n)
            else:
                tail = self.z.unconsumed_tail
                src = tail if tail else self.raw.read(CHUNK)
                if not src:
                    if not self.z.eof:
                        raise ImageError(f"{self.label}: truncated gzip stream")
                    return b""
                out = self.z.decompress(src, n)
            if out:
                return out

    def readinto(self, b) -> int:
        data = self.pending[:len(b)] if self.pending else self._more(len(b))
        self.pending = self.pending[len(data):] if self.pending else b""
        if self.budget is not None:
            self.budget[0] -= len(data)
            if self.budget[0] < 0:
                raise ImageError(f"{self.label}: the layers decompress to more than the import size limit allows")
        b[:len(data)] = data
        return len(data)


class _Ended:
    """A finished gzip stream: nothing more comes out of it."""

    eof, unused_data = True, b""


class _Prefixed(io.RawIOBase):
    def __init__(self, head: bytes, raw: BinaryIO):
        self.head, self.raw = head, raw

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self.head:
            n = min(len(b), len(self.head))
            b[:n], self.head = self.head[:n], self.head[n:]
            return n
        data = self.raw.read(len(b))
        b[:len(data)] = data
        return len(data)


class _Refused(Exception):
    """A header tarfile must not process (too large, sparse): turned into an ImageError by apply()."""


class SafeTarInfo(tarfile.TarInfo):
    """TarInfo that refuses what would make tarfile read unbounded data into memory: a pax or GNU
    long-name header above HEADER_MAX, chains of them, and sparse members (their maps are unbounded).
    These hooks are tarfile internals, stable across CPython 3.8-3.13."""

    def _proc_member(self, tf):
        if self.type in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
                         tarfile.SOLARIS_XHDTYPE):
            if self.size > HEADER_MAX:
                raise _Refused(f"a {self.size}-byte extended tar header (at most {HEADER_MAX})")
            depth = getattr(tf, "_vmwrap_depth", 0)
            if depth >= HEADER_CHAIN_MAX:
                raise _Refused("a chain of extended tar headers")
            tf._vmwrap_depth = depth + 1
            try:
                return super()._proc_member(tf)
            finally:
                tf._vmwrap_depth = depth
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise _Refused(f"sparse member {self.name!r} (not supported)")
        return super()._proc_member(tf)

    def _proc_gnusparse_10(self, next, pax_headers, tf):
        raise _Refused("a sparse member (not supported)")


def open_tar(f: BinaryIO, mode: str = "r|") -> tarfile.TarFile:
    """tarfile with SafeTarInfo: stream mode over an uncompressed tar (layers), or `mode` (archives)."""
    return tarfile.open(fileobj=f, mode=mode, tarinfo=SafeTarInfo)


def tar_errors() -> tuple[type[BaseException], ...]:
    return (tarfile.TarError, _Refused, EOFError, zlib.error, UnicodeError)


def member_parts(name: str) -> list[str]:
    """A member name as path components; ValueError for an absolute name or a `..` (never allowed)."""
    if name.startswith("/"):
        raise ValueError("has an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ValueError("escapes the image root ('..')")
    return parts


class Extractor:
    """Layers applied in order to `root`, every path relative to directory fds, never following links."""

    def __init__(self, root: Path, source: str, max_bytes: int | None, max_members: int = MAX_MEMBERS,
                 on_note: Callable[[str], None] | None = None):
        self.source = str(source)
        self.max_bytes = max_bytes
        self.max_members = max_members
        self.note = on_note or (lambda _m: None)
        self.tally = Tally()
        self.budget = None if max_bytes is None else [max_bytes + HEADERS_ALLOWANCE]
        self.root_fd = os.open(root, DIR_FLAGS)
        self._noted_special = False

    def close(self) -> None:
        if self.root_fd >= 0:
            os.close(self.root_fd)
            self.root_fd = -1

    def __enter__(self) -> "Extractor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- one layer ---------------------------------------------------------------------------------
    def apply(self, label: str, raw: BinaryIO) -> None:
        """Apply one layer (a tar, maybe gzip/zstd-compressed). A Digested `raw` is checked at its end;
        a digest mismatch is reported before any error its damage caused."""
        self.label = label
        # What this layer made, which its own whiteouts and opaque markers must not remove: entries as
        # (parent dir inode, name), and the inodes of the directories it wrote into. Inodes, not path
        # strings: memory stays linear in the members (a path's every prefix would be quadratic).
        self.written: set[tuple[int, str]] = set()
        self.touched: set[int] = set()
        try:
            try:
                tf = open_tar(_Decompressed(raw, f"{self.source}: {label}", self.budget))
                while (m := tf.next()) is not None:
                    tf.members.clear()  # stream mode keeps every TarInfo otherwise
                    self._member(tf, m)
            except ImageError:
                raise
            except tar_errors() as e:
                raise ImageError(f"{self.source}: {label}: not a valid tar layer ({_why(e)})") from None
            except OSError as e:
                raise ImageError(f"{self.source}: {label}: {e.strerror or e}") from None
        except ImageError:
            if isinstance(raw, Digested):
                raw.finish()  # damage shows as a digest mismatch first
            raise
        if isinstance(raw, Digested):
            raw.finish()

    def _bad(self, name: str, why: str) -> ImageError:
        return ImageError(f"{self.source}: {self.label}: member {name[:200]!r} {why}")

    def _count(self) -> None:
        self.tally.members += 1
        if self.tally.members > self.max_members:
            raise ImageError(f"{self.source}: more than {self.max_members} tar members: refused")

    def _member(self, tf: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        self._count()
        try:
            parts = member_parts(m.name)
        except ValueError as e:
            raise self._bad(m.name, str(e)) from None
        if len(m.name) > NAME_MAX or len(m.linkname) > NAME_MAX:
            raise self._bad(m.name, f"has a name or link target longer than {NAME_MAX} bytes")
        if not parts:
            return  # the root itself: vmwrap owns its mode (0755, root)
        base = parts[-1]
        try:
            if base == OPAQUE:
                return self._opaque(parts[:-1], m.name)
            if base.startswith(WHITEOUT):
                target = base[len(WHITEOUT):]
                if target.startswith(WHITEOUT) or target in ("", ".", ".."):
                    return  # aufs bookkeeping (.wh..wh.plnk, ...): nothing to apply
                return self._whiteout(parts[:-1] + [target], m.name)
            if m.ischr() or m.isblk() or m.isfifo():
                self.tally.skipped_special += 1
                if not self._noted_special:
                    self._noted_special = True
                    self.note(f"{NOTE}{self.source}: device nodes and FIFOs skipped (the guest mounts its own "
                              f"/dev), first: {m.name[:200]}")
                return
            if not (m.isreg() or m.isdir() or m.issym() or m.islnk()):
                raise self._bad(m.name, f"has an unsupported tar type {m.type!r}")
            if m.isreg():
                if self.max_bytes is not None and self.tally.bytes + m.size > self.max_bytes:
                    raise ImageError(f"{self.source}: the image holds more than the import size limit "
                                     f"(image_import_max_size = {self.max_bytes} bytes)")
                self.tally.bytes += m.size
            self._create(tf, m, parts)
        except ImageError:
            raise
        except (OSError, OverflowError, ValueError) as e:
            raise self._bad(m.name, f"cannot be extracted: {getattr(e, 'strerror', None) or e}") from None

    # -- path walking ------------------------------------------------------------------------------
    def _parent(self, parts: list[str], name: str, create: bool) -> int | None:
        """An fd of the directory holding parts[-1], walked from the root with O_NOFOLLOW; missing
        directories are made (root-owned, 0755, counted as members) when `create`, which also records
        every directory on the way as written into by this layer; else None for a missing one."""
        fd = os.dup(self.root_fd)
        try:
            for i, comp in enumerate(parts[:-1]):
                try:
                    nfd = os.open(comp, DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        return None
                    self._count()
                    os.mkdir(comp, 0o755, dir_fd=fd)
                    nfd = os.open(comp, DIR_FLAGS, dir_fd=fd)
                except OSError:
                    st = os.stat(comp, dir_fd=fd, follow_symlinks=False)
                    what = "a symlink (links are never followed while extracting)" if stat.S_ISLNK(st.st_mode) \
                        else "not a directory"
                    raise self._bad(name, f"lies below {'/'.join(parts[:i + 1])!r}, which is {what}") from None
                os.close(fd)
                fd = nfd
                if create:
                    self.touched.add(os.fstat(fd).st_ino)
            out, fd = fd, -1
            return out
        finally:
            if fd >= 0:
                os.close(fd)

    def _mine(self, dfd: int, name: str) -> bool:
        """Whether this layer made `name` in the directory `dfd`, or wrote into it (a directory)."""
        if (os.fstat(dfd).st_ino, name) in self.written:
            return True
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return stat.S_ISDIR(st.st_mode) and st.st_ino in self.touched

    @staticmethod
    def _remove(dfd: int, name: str) -> None:
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(name, dir_fd=dfd)  # fd-based: never follows a link inside
        else:
            os.unlink(name, dir_fd=dfd)

    # -- whiteouts ---------------------------------------------------------------------------------
    def _whiteout(self, parts: list[str], name: str) -> None:
        """Remove what lower layers made at the path; what this layer made there stays (a directory it
        wrote into keeps only this layer's entries, as an opaque one)."""
        dfd = self._parent(parts, name, create=False)
        if dfd is None:
            return
        try:
            if not self._mine(dfd, parts[-1]):
                self._remove(dfd, parts[-1])
            elif (os.fstat(dfd).st_ino, parts[-1]) not in self.written:
                self._clear(dfd, parts[-1])
        finally:
            os.close(dfd)

    def _clear(self, pfd: int, dname: str) -> None:
        """Remove the directory's entries this layer did not make."""
        dfd = os.open(dname, DIR_FLAGS, dir_fd=pfd)
        try:
            for entry in os.listdir(dfd):
                if not self._mine(dfd, entry):
                    self._remove(dfd, entry)
        finally:
            os.close(dfd)

    def _opaque(self, dparts: list[str], name: str) -> None:
        """Everything lower layers put into the directory goes; what this layer put there stays."""
        if dparts:
            pfd = self._parent(dparts, name, create=True)
            try:
                try:
                    st = os.stat(dparts[-1], dir_fd=pfd, follow_symlinks=False)
                except FileNotFoundError:
                    st = None
                if st is not None and not stat.S_ISDIR(st.st_mode):
                    self._remove(pfd, dparts[-1])
                    st = None
                if st is None:
                    os.mkdir(dparts[-1], 0o755, dir_fd=pfd)
                dfd = os.open(dparts[-1], DIR_FLAGS, dir_fd=pfd)
            finally:
                os.close(pfd)
        else:
            dfd = os.dup(self.root_fd)
        try:
            for entry in os.listdir(dfd):
                if not self._mine(dfd, entry):
                    self._remove(dfd, entry)
            self.touched.add(os.fstat(dfd).st_ino)
        finally:
            os.close(dfd)

    # -- creating ----------------------------------------------------------------------------------
    def _create(self, tf: tarfile.TarFile, m: tarfile.TarInfo, parts: list[str]) -> None:
        last = parts[-1]
        link_src = None
        if m.islnk():
            link_src = self._link_source(m, parts)
            if link_src is None:
                return  # a link to itself: nothing to do
        try:
            pfd = self._parent(parts, m.name, create=True)
        except BaseException:
            if link_src is not None:
                os.close(link_src[0])
            raise
        try:
            try:
                st = os.stat(last, dir_fd=pfd, follow_symlinks=False)
            except FileNotFoundError:
                st = None
            if st is not None and not (m.isdir() and stat.S_ISDIR(st.st_mode)):
                self._remove(pfd, last)
            self.written.add((os.fstat(pfd).st_ino, last))
            if m.isdir():
                if st is None or not stat.S_ISDIR(st.st_mode):
                    os.mkdir(last, 0o700, dir_fd=pfd)
                fd = os.open(last, DIR_FLAGS, dir_fd=pfd)
                try:
                    self._meta(fd, m, set_time=False)
                finally:
                    os.close(fd)
            elif m.isreg():
                fd = os.open(last, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                             dir_fd=pfd)
                try:
                    src = tf.extractfile(m)
                    left = m.size
                    while left > 0:
                        buf = src.read(min(CHUNK, left))
                        if not buf:
                            raise ImageError(f"{self.source}: {self.label}: member {m.name[:200]!r} is truncated")
                        _write_all(fd, buf)
                        left -= len(buf)
                    self._meta(fd, m)
                finally:
                    os.close(fd)
            elif m.issym():
                os.symlink(m.linkname, last, dir_fd=pfd)
                os.chown(last, m.uid, m.gid, dir_fd=pfd, follow_symlinks=False)
                try:
                    os.utime(last, (m.mtime, m.mtime), dir_fd=pfd, follow_symlinks=False)
                except (OverflowError, ValueError, OSError):
                    pass
            else:
                os.link(link_src[1], last, src_dir_fd=link_src[0], dst_dir_fd=pfd, follow_symlinks=False)
        finally:
            os.close(pfd)
            if link_src is not None:
                os.close(link_src[0])

    def _link_source(self, m: tarfile.TarInfo, parts: list[str]) -> tuple[int, str] | None:
        """(dir fd, name) of the regular file a hard link names, already extracted inside the root."""
        try:
            tparts = member_parts(m.linkname)
        except ValueError as e:
            raise self._bad(m.name, f"is a hard link whose target {m.linkname[:200]!r} {e}") from None
        if tparts == parts:
            return None
        bad = self._bad(m.name, f"is a hard link to {m.linkname[:200]!r}, which is not a regular file already "
                                "extracted in the image")
        if not tparts:
            raise bad
        sfd = self._parent(tparts, m.name, create=False)
        if sfd is None:
            raise bad
        try:
            st = os.stat(tparts[-1], dir_fd=sfd, follow_symlinks=False)
        except FileNotFoundError:
            os.close(sfd)
            raise bad from None
        if not stat.S_ISREG(st.st_mode):
            os.close(sfd)
            raise bad
        return sfd, tparts[-1]

    @staticmethod
    def _meta(fd: int, m: tarfile.TarInfo, set_time: bool = True) -> None:
        os.fchown(fd, m.uid, m.gid)
        os.fchmod(fd, m.mode & 0o7777)  # after chown, which clears setuid/setgid
        if set_time:
            try:
                os.utime(fd, (m.mtime, m.mtime))
            except (OverflowError, ValueError, OSError):
                pass


def _write_all(fd: int, buf: bytes) -> None:
    view = memoryview(buf)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _why(e: BaseException) -> str:
    return str(e) or type(e).__name__


def apply_layers(layers: Iterable[tuple[str, BinaryIO]], root: Path, source: str, max_bytes: int | None,
                 max_members: int = MAX_MEMBERS, on_note: Callable[[str], None] | None = None) -> Tally:
    """Apply (label, stream) layers in order to the root-owned directory `root`; ImageError on bad input."""
    with Extractor(root, source, max_bytes, max_members, on_note) as ex:
        for label, stream in layers:
            ex.apply(label, stream)
        return ex.tally
