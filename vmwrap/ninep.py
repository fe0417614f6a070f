"""A small 9P2000.L file server for the job's work dir, whose state can be saved with the VM.

QEMU's own virtio-9p blocks VM save while the share is mounted, and virtiofs never migrates. The
guest instead mounts the work dir with the 9p client's `trans=fd` on a virtio-serial port (which
migrates), and this server answers on the host end. It runs as the job's user, so the host kernel
enforces permissions and new files get the right owner. Its whole state is a fid table of paths
and open flags: `drain()` + `state()` before a save, `Server(state=...)` on whichever node restores.

The guest is root in its VM and hostile: every byte it sends is attacker input. Hence
- messages are framed against the negotiated msize (never above MAX_MSIZE) before any is buffered,
  and every queue (requests while drained, replies QEMU has not taken, fids) has a fixed bound;
- every malformed request gets an Rlerror, nothing a request carries ends the server;
- no path operation ever follows a symlink or leaves the work dir: paths are resolved from a
  descriptor of the root with openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS), or one O_NOFOLLOW
  component at a time on kernels without it, and then acted on with `*at` calls. Symlinks may
  exist and be read (the guest resolves them itself), the server never goes through one.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import ctypes
import errno
import os
import select
import socket
import stat
import struct
import sys
import time
from dataclasses import dataclass
from typing import Iterator

VERSION = "9P2000.L"
TRACE = bool(os.environ.get("VMWRAP_9P_TRACE"))
MAX_MSIZE = (1 << 20) + 4096    # fixed server maximum: 1 MiB of data plus headers (the guest asks 1 MiB)
MIN_MSIZE = 4096
NOFID = 0xFFFFFFFF
NOTAG = 0xFFFF
MAXWELEM = 16                   # names per Twalk (the protocol's limit)
MAX_FIDS = 1 << 16              # cache=none guests hold a fid per open file or dentry in use
MAX_PATH = 4095                 # a fid's path below the root: longer ones no syscall accepts anyway
MAX_PATH_CHARS = 4 << 20        # all fid paths together: bounds memory and the saved state
MAX_QUEUED = 4096               # requests queued while drained ...
MAX_QUEUED_BYTES = 8 << 20      # ... and their bytes: beyond these the guest's requests wait in QEMU
MAX_OUT = 4 << 20               # replies QEMU has not taken yet before requests stop being read
RECV = 1 << 18

# Message types (T = request; R = T + 1)
Tlerror, Rlerror = 6, 7
Tstatfs, Tlopen, Tlcreate, Tsymlink, Tmknod, Trename, Treadlink = 8, 12, 14, 16, 18, 20, 22
Tgetattr, Tsetattr, Txattrwalk, Txattrcreate, Treaddir, Tfsync = 24, 26, 30, 32, 40, 50
Tlock, Tgetlock, Tlink, Tmkdir, Trenameat, Tunlinkat = 52, 54, 70, 72, 74, 76
Tversion, Tauth, Tattach, Tflush, Twalk, Tread, Twrite, Tclunk, Tremove = 100, 102, 104, 108, 110, 116, 118, 120, 122

QTDIR, QTSYMLINK, QTFILE = 0x80, 0x02, 0x00
# Open flags the guest may pass through (Linux x86 values, which 9P2000.L uses on the wire).
PASS_FLAGS = (os.O_ACCMODE | os.O_TRUNC | os.O_APPEND | os.O_NONBLOCK | os.O_DSYNC | os.O_SYNC
              | os.O_DIRECTORY | os.O_NOFOLLOW | 0o100000)  # O_LARGEFILE
CREATE_FLAGS = PASS_FLAGS | os.O_CREAT | os.O_EXCL
SETATTR_MODE, SETATTR_UID, SETATTR_GID, SETATTR_SIZE = 0x1, 0x2, 0x4, 0x8
SETATTR_ATIME, SETATTR_MTIME, SETATTR_ATIME_SET, SETATTR_MTIME_SET = 0x10, 0x20, 0x80, 0x100
AT_REMOVEDIR = 0x200
OFF_MAX = (1 << 63) - 1

# openat2(2): one syscall that resolves a path below a directory fd without following symlinks.
SYS_openat2 = 437  # the same number on every architecture (added after the syscall table unification)
RESOLVE_NO_MAGICLINKS, RESOLVE_NO_SYMLINKS, RESOLVE_BENEATH = 0x02, 0x04, 0x08
RESOLVE = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS
SYS_getdents64 = {"x86_64": 217, "aarch64": 61, "ppc64le": 202, "s390x": 220, "riscv64": 61}

_libc = ctypes.CDLL(None, use_errno=True)


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_sys_openat2 = _libc["syscall"]  # a function object of our own: its argtypes bind nobody else
_sys_openat2.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t]
_sys_openat2.restype = ctypes.c_long
_hows: dict[tuple[int, int], _OpenHow] = {}


def _openat2(dirfd: int, path: bytes, flags: int, mode: int = 0) -> int:
    how = _hows.get((flags, mode))
    if how is None:
        if len(_hows) > 256:
            _hows.clear()
        how = _hows[flags, mode] = _OpenHow(flags | os.O_CLOEXEC, mode, RESOLVE)
    for _ in range(16):  # EAGAIN: a concurrent rename elsewhere on the fs; the kernel asks to retry
        fd = _sys_openat2(SYS_openat2, dirfd, path, ctypes.addressof(how), 24)
        if fd >= 0:
            return fd
        e = ctypes.get_errno()
        if e not in (errno.EAGAIN, errno.EINTR):
            raise OSError(e, os.strerror(e))
    raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))


if hasattr(_libc, "getdents64"):
    def _getdents(fd: int, buf: ctypes.Array, size: int) -> int:
        return _libc.getdents64(ctypes.c_int(fd), buf, ctypes.c_size_t(size))
elif os.uname().machine in SYS_getdents64:  # glibc < 2.30 has no wrapper
    def _getdents(fd: int, buf: ctypes.Array, size: int) -> int:
        return _libc.syscall(ctypes.c_long(SYS_getdents64[os.uname().machine]), ctypes.c_int(fd), buf,
                             ctypes.c_size_t(size))
else:
    def _getdents(fd: int, buf: ctypes.Array, size: int) -> int:
        ctypes.set_errno(errno.EOPNOTSUPP)
        return -1


class Error(Exception):
    """A request the server refuses: answered with Rlerror(code)."""

    def __init__(self, code: int):
        self.code = code


class ProtocolError(ValueError):
    """The byte stream itself is unusable (a size field out of bounds): the connection is closed."""


@dataclass
class Fid:
    path: str                  # relative to the export root, '' for the root itself
    flags: int | None = None   # open flags once Tlopen/Tlcreate succeeded
    fd: int | None = None      # reopened lazily after a restore


class Reader:
    """Fields of one message; reading past its end is EINVAL, never a short value."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes, pos: int = 0):
        self.data, self.pos = data, pos

    def _take(self, n: int) -> int:
        p = self.pos
        if p + n > len(self.data):
            raise Error(errno.EINVAL)
        self.pos = p + n
        return p

    def u8(self) -> int:
        return self.data[self._take(1)]

    def u16(self) -> int:
        return struct.unpack_from("<H", self.data, self._take(2))[0]

    def u32(self) -> int:
        return struct.unpack_from("<I", self.data, self._take(4))[0]

    def u64(self) -> int:
        return struct.unpack_from("<Q", self.data, self._take(8))[0]

    def s(self) -> str:
        n = self.u16()
        p = self._take(n)
        return bytes(self.data[p:p + n]).decode("utf-8", "surrogateescape")

    def raw(self, n: int) -> bytes:
        p = self._take(n)
        return self.data[p:p + n]

    def left(self) -> int:
        return len(self.data) - self.pos

    def end(self) -> None:
        """Every field read: trailing bytes mean the guest and we disagree about the message."""
        if self.pos != len(self.data):
            raise Error(errno.EINVAL)


def _b(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _s(text: str | bytes) -> bytes:
    b = _b(text) if isinstance(text, str) else text
    return struct.pack("<H", len(b)) + b


def _qid(st: os.stat_result) -> bytes:
    if stat.S_ISDIR(st.st_mode):
        t = QTDIR
    elif stat.S_ISLNK(st.st_mode):
        t = QTSYMLINK
    else:
        t = QTFILE
    return struct.pack("<BIQ", t, int(st.st_mtime) & 0xFFFFFFFF, st.st_ino)


def _name(name: str) -> str:
    """A single path component from the guest: never a separator, NUL, '.', '..' or empty."""
    if not name or "/" in name or "\0" in name or name in (".", ".."):
        raise Error(errno.EINVAL)
    return name


def _join(path: str, name: str) -> str:
    p = os.path.join(path, name) if path else name
    if len(p) > MAX_PATH:
        raise Error(errno.ENAMETOOLONG)
    return p


def _valid_path(path: object) -> bool:
    return (isinstance(path, str) and len(path) <= MAX_PATH
            and (path == "" or all(c and "\0" not in c and c not in (".", "..") for c in path.split("/"))))


class Server:
    """The protocol, independent of the transport: `handle(message) -> reply`."""

    def __init__(self, root: str, state: dict | None = None):
        self.root = os.path.realpath(root)
        self.rootfd = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.close(_openat2(self.rootfd, b".", os.O_PATH))
            self.openat2 = True
        except OSError:  # kernel < 5.6 or a seccomp filter: walk one component at a time
            self.openat2 = False
        self.fids: dict[int, Fid] = {}
        self.path_chars = 0
        self.msize = MAX_MSIZE  # until Tversion: the fixed maximum is the only bound
        self.pending: collections.deque[bytes] = collections.deque()
        self.pending_bytes = 0
        self.partial = b""
        self._dents = ctypes.create_string_buffer(MAX_MSIZE)
        if state:
            self._load(state)

    # --- state -------------------------------------------------------------------------------
    def _load(self, state: dict) -> None:
        """A state saved by another server; checked, since the checkpoint store is another machine's."""
        msize = state.get("msize")
        if type(msize) is not int or not MIN_MSIZE <= msize <= MAX_MSIZE:
            raise ValueError(f"9P state: msize {msize!r} outside {MIN_MSIZE}..{MAX_MSIZE}")
        self.msize = msize
        fids = state.get("fids", {})
        if not isinstance(fids, dict) or len(fids) > MAX_FIDS:
            raise ValueError("9P state: unusable fid table")
        for k, v in fids.items():
            flags = v.get("flags") if isinstance(v, dict) else None
            if (not isinstance(v, dict) or not str(k).isdigit() or int(k) > NOFID or not _valid_path(v.get("path"))
                    or not (flags is None or type(flags) is int and 0 <= flags <= 0xFFFFFFFF)):
                raise ValueError(f"9P state: unusable fid {k!r}")
            self._new_fid(int(k), v["path"])
            self.fids[int(k)].flags = None if flags is None else flags & PASS_FLAGS
        for m in state.get("pending", []):
            self.queue(base64.b64decode(m, validate=True))
        self.partial = base64.b64decode(state.get("partial", ""), validate=True)
        if len(self.partial) > MAX_MSIZE + RECV:
            raise ValueError("9P state: partial request too large")

    def state(self) -> dict:
        """What a restoring server needs; linear in its size, which the bounds above keep small."""
        return {"version": 1, "msize": self.msize,
                "fids": {str(k): {"path": f.path, "flags": f.flags} for k, f in self.fids.items()},
                "pending": [base64.b64encode(m).decode() for m in self.pending],
                "partial": base64.b64encode(self.partial).decode()}

    def queue(self, msg: bytes) -> None:
        """Keep a request for later (drained); framed like any other, within the queue bounds."""
        if len(msg) < 7 or int.from_bytes(msg[:4], "little") != len(msg) or len(msg) > MAX_MSIZE:
            raise ProtocolError(f"queued 9P message of {len(msg)} bytes is malformed")
        if self.queue_full():
            raise ProtocolError("too many queued 9P requests")
        self.pending.append(msg)
        self.pending_bytes += len(msg)

    def queue_full(self) -> bool:
        return len(self.pending) >= MAX_QUEUED or self.pending_bytes >= MAX_QUEUED_BYTES

    def unqueue(self) -> bytes | None:
        if not self.pending:
            return None
        m = self.pending.popleft()
        self.pending_bytes -= len(m)
        return m

    def close(self) -> None:
        for f in self.fids.values():
            self._close_fd(f)
        self.fids.clear()
        self.path_chars = 0

    # --- fids --------------------------------------------------------------------------------
    def _fid(self, n: int) -> Fid:
        f = self.fids.get(n)
        if f is None:
            raise Error(errno.EBADF)
        return f

    def _new_fid(self, n: int, path: str) -> None:
        """fid n now names path (replacing what it named): within the fid bounds."""
        old = self.fids.get(n)
        freed = len(old.path) if old is not None else 0
        if old is None and len(self.fids) >= MAX_FIDS:
            raise Error(errno.ENFILE)
        if self.path_chars - freed + len(path) > MAX_PATH_CHARS:
            raise Error(errno.ENOMEM)
        if old is not None:
            self._close_fd(old)
        self.path_chars += len(path) - freed
        self.fids[n] = Fid(path)

    def _drop_fid(self, n: int) -> Fid:
        f = self.fids.pop(n, None)
        if f is None:
            raise Error(errno.EBADF)
        self.path_chars -= len(f.path)
        self._close_fd(f)
        return f

    def _repath(self, f: Fid, path: str) -> None:
        if self.path_chars - len(f.path) + len(path) > MAX_PATH_CHARS:
            raise Error(errno.ENOMEM)
        self.path_chars += len(path) - len(f.path)
        f.path = path

    @staticmethod
    def _close_fd(f: Fid) -> None:
        if f.fd is not None:
            try:
                os.close(f.fd)
            except OSError:
                pass
            f.fd = None

    def _child(self, dirfid: int, name: str) -> str:
        return _join(self._fid(dirfid).path, _name(name))

    # --- paths: always beneath the root, never through a symlink ------------------------------
    def _resolve(self, rel: str, flags: int, mode: int = 0) -> int:
        """Open rel (relative to the root) with O_NOFOLLOW; no component may be a symlink or '..'."""
        flags |= os.O_NOFOLLOW | os.O_CLOEXEC
        if not rel:
            return os.open(".", flags, dir_fd=self.rootfd)
        b = _b(rel)
        if self.openat2:
            return _openat2(self.rootfd, b, flags, mode)
        parts = b.split(b"/")
        d = self.rootfd
        try:
            for p in parts[:-1]:
                if p in (b"", b".", b".."):
                    raise OSError(errno.EINVAL, "bad path component")
                try:
                    nd = os.open(p, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=d)
                except NotADirectoryError:  # the same answer as openat2 for a symlink on the way
                    if stat.S_ISLNK(os.stat(p, dir_fd=d, follow_symlinks=False).st_mode):
                        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP)) from None
                    raise
                if d != self.rootfd:
                    os.close(d)
                d = nd
            if parts[-1] in (b"", b".", b".."):
                raise OSError(errno.EINVAL, "bad path component")
            return os.open(parts[-1], flags, mode, dir_fd=d)
        finally:
            if d != self.rootfd:
                os.close(d)

    @contextlib.contextmanager
    def _at(self, rel: str) -> Iterator[tuple[int, bytes]]:
        """(fd of rel's directory, rel's last name) for the `*at` calls; the root has no parent."""
        if not rel:
            raise Error(errno.EBUSY)
        head, _, name = rel.rpartition("/")
        d = self._resolve(head, os.O_PATH | os.O_DIRECTORY)
        try:
            yield d, _b(name)
        finally:
            os.close(d)

    def _lstat(self, rel: str) -> os.stat_result:
        fd = self._resolve(rel, os.O_PATH)
        try:
            return os.fstat(fd)
        finally:
            os.close(fd)

    def _open_file(self, rel: str, flags: int, mode: int = 0) -> int:
        """An fd for I/O on a regular file or directory: a FIFO or device would block or act."""
        fd = self._resolve(rel, flags | os.O_NONBLOCK, mode)
        try:
            st = os.fstat(fd)
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
                raise Error(errno.EOPNOTSUPP)
            if not flags & os.O_NONBLOCK:
                os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _fd(self, f: Fid) -> int:
        if f.flags is None:
            raise Error(errno.EBADF)
        if f.fd is None:  # after a restore: reopen by path, never re-truncate or re-create
            f.fd = self._open_file(f.path, f.flags & PASS_FLAGS & ~os.O_TRUNC)
        return f.fd

    # --- dispatch ----------------------------------------------------------------------------
    def handle(self, msg: bytes) -> bytes:
        """One request in, one reply out; whatever the request holds, the reply is R* or Rlerror."""
        mtype, tag = -1, NOTAG
        try:
            if len(msg) < 7:
                raise Error(errno.EINVAL)
            size, mtype, tag = struct.unpack_from("<IBH", msg)
            if size != len(msg):
                raise Error(errno.EINVAL)
            if size > self.msize:
                raise Error(errno.EMSGSIZE)
            fn = self.OPS.get(mtype)
            if fn is None:
                raise Error(errno.EOPNOTSUPP)
            body = fn(self, Reader(msg, 7))
            rtype = mtype + 1
        except Error as e:
            rtype, body = Rlerror, struct.pack("<I", e.code)
        except OSError as e:
            rtype, body = Rlerror, struct.pack("<I", e.errno or errno.EIO)
        except (struct.error, IndexError, UnicodeError, ValueError, OverflowError):
            rtype, body = Rlerror, struct.pack("<I", errno.EINVAL)
        except MemoryError:
            rtype, body = Rlerror, struct.pack("<I", errno.ENOMEM)
        except Exception as e:  # a bug of ours: the guest gets EIO, the log says what
            print(f"vmwrap-9p: T{mtype}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            rtype, body = Rlerror, struct.pack("<I", errno.EIO)
        if TRACE:
            print(f"T{mtype} tag={tag} {msg[7:40]!r} -> R{rtype} {body[:40]!r}", file=sys.stderr, flush=True)
        return struct.pack("<IBH", 7 + len(body), rtype, tag) + body

    def version(self, r: Reader) -> bytes:
        msize, ver = r.u32(), r.s()
        r.end()
        self.msize = max(MIN_MSIZE, min(msize, MAX_MSIZE))
        self.close()
        return struct.pack("<I", self.msize) + _s(VERSION if ver.startswith(VERSION) else "unknown")

    def auth(self, r: Reader) -> bytes:
        raise Error(errno.EOPNOTSUPP)

    def attach(self, r: Reader) -> bytes:
        fid, _afid, _uname, _aname, _nuname = r.u32(), r.u32(), r.s(), r.s(), r.u32()
        r.end()
        st = os.fstat(self.rootfd)
        self._new_fid(fid, "")
        return _qid(st)

    def flush(self, r: Reader) -> bytes:
        r.u16()
        r.end()
        return b""  # requests are answered in order: nothing is ever in flight to cancel

    def walk(self, r: Reader) -> bytes:
        fid, newfid, n = r.u32(), r.u32(), r.u16()
        if n > MAXWELEM:
            raise Error(errno.EINVAL)
        names = [r.s() for _ in range(n)]
        r.end()
        path = self._fid(fid).path
        if newfid != fid and newfid in self.fids:
            raise Error(errno.EBADF)
        qids = []
        for i, name in enumerate(names):
            if name == "..":
                nxt = os.path.dirname(path)  # lexical, so never above the root
            elif name == ".":
                nxt = path
            else:
                nxt = _join(path, _name(name))
            try:
                st = self._lstat(nxt)  # a symlink is a walk's end: the guest resolves it, not us
            except OSError as e:
                if i == 0:
                    raise Error(e.errno or errno.ENOENT)
                break
            qids.append(_qid(st))
            path = nxt
        if len(qids) == n:
            self._new_fid(newfid, path)
        return struct.pack("<H", len(qids)) + b"".join(qids)

    def lopen(self, r: Reader) -> bytes:
        fid, flags = r.u32(), r.u32()
        r.end()
        f = self._fid(fid)
        fd = self._open_file(f.path, flags & PASS_FLAGS)
        self._close_fd(f)
        f.fd, f.flags = fd, flags & PASS_FLAGS
        return _qid(os.fstat(fd)) + struct.pack("<I", 0)

    def lcreate(self, r: Reader) -> bytes:
        fid, name, flags, mode, _gid = r.u32(), r.s(), r.u32(), r.u32(), r.u32()
        r.end()
        f = self._fid(fid)
        path = self._child(fid, name)
        fd = self._open_file(path, (flags & CREATE_FLAGS) | os.O_CREAT, mode & 0o7777)
        try:
            self._repath(f, path)
        except Error:
            os.close(fd)
            raise
        self._close_fd(f)
        f.fd, f.flags = fd, flags & PASS_FLAGS & ~os.O_TRUNC
        return _qid(os.fstat(fd)) + struct.pack("<I", 0)

    def read(self, r: Reader) -> bytes:
        fid, offset, count = r.u32(), r.u64(), r.u32()
        r.end()
        if offset > OFF_MAX:
            raise Error(errno.EINVAL)
        data = os.pread(self._fd(self._fid(fid)), min(count, self.msize - 11), offset)
        return struct.pack("<I", len(data)) + data

    def write(self, r: Reader) -> bytes:
        fid, offset, count = r.u32(), r.u64(), r.u32()
        if count != r.left() or offset > OFF_MAX:
            raise Error(errno.EINVAL)
        data = memoryview(r.data)[r.pos:]
        f = self._fid(fid)
        fd = self._fd(f)
        n = os.write(fd, data) if f.flags & os.O_APPEND else os.pwrite(fd, data, offset)
        return struct.pack("<I", n)

    def clunk(self, r: Reader) -> bytes:
        fid = r.u32()
        r.end()
        self._drop_fid(fid)
        return b""

    def remove(self, r: Reader) -> bytes:
        fid = r.u32()
        r.end()
        f = self._drop_fid(fid)  # clunked whether or not the remove succeeds
        with self._at(f.path) as (d, name):
            if stat.S_ISDIR(os.stat(name, dir_fd=d, follow_symlinks=False).st_mode):
                os.rmdir(name, dir_fd=d)
            else:
                os.unlink(name, dir_fd=d)
        return b""

    def statfs(self, r: Reader) -> bytes:
        self._fid(r.u32())
        r.end()
        s = os.statvfs(self.rootfd)
        return struct.pack("<IIQQQQQQI", 0x01021997, s.f_bsize, s.f_blocks, s.f_bfree, s.f_bavail,
                           s.f_files, s.f_ffree, s.f_fsid & 0xFFFFFFFFFFFFFFFF, s.f_namemax)

    def getattr(self, r: Reader) -> bytes:
        f = self._fid(r.u32())
        r.u64()  # request mask: we always answer the basic set
        r.end()
        st = os.fstat(f.fd) if f.fd is not None else self._lstat(f.path)

        def ts(t: int) -> tuple[int, int]:
            return t // 10**9, t % 10**9

        return struct.pack("<Q", 0x7FF) + _qid(st) + struct.pack(
            "<IIIQQQQQ" + "QQ" * 4 + "QQ", st.st_mode, st.st_uid, st.st_gid, st.st_nlink, st.st_rdev,
            st.st_size, st.st_blksize, st.st_blocks, *ts(st.st_atime_ns), *ts(st.st_mtime_ns),
            *ts(st.st_ctime_ns), 0, 0, 0, 0)

    def setattr(self, r: Reader) -> bytes:
        """On the fid's own inode: a symlink's target is never touched (chmod/truncate on one: refused)."""
        fid, valid, mode, uid, gid = r.u32(), r.u32(), r.u32(), r.u32(), r.u32()
        size, asec, ansec, msec, mnsec = r.u64(), r.u64(), r.u64(), r.u64(), r.u64()
        r.end()
        f = self._fid(fid)
        fd = self._resolve(f.path, os.O_PATH)
        try:
            st = os.fstat(fd)
            link = stat.S_ISLNK(st.st_mode)
            inode = f"/proc/self/fd/{fd}"  # the magic link reaches exactly this inode, whatever its path
            if valid & (SETATTR_MODE | SETATTR_SIZE) and link:
                raise Error(errno.EOPNOTSUPP if valid & SETATTR_MODE else errno.EINVAL)
            if valid & SETATTR_MODE:
                os.chmod(inode, mode & 0o7777)
            if valid & (SETATTR_UID | SETATTR_GID):
                u = uid if valid & SETATTR_UID and uid != NOFID else -1
                g = gid if valid & SETATTR_GID and gid != NOFID else -1
                if link:
                    with self._at(f.path) as (d, name):
                        os.chown(name, u, g, dir_fd=d, follow_symlinks=False)
                else:
                    os.chown(inode, u, g)
            if valid & SETATTR_SIZE:
                if size > OFF_MAX:
                    raise Error(errno.EINVAL)
                if f.fd is not None and f.flags is not None and f.flags & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR):
                    os.ftruncate(f.fd, size)  # like the guest's ftruncate: no permission check again
                else:
                    os.truncate(inode, size)
            if valid & (SETATTR_ATIME | SETATTR_MTIME):
                now = time.time_ns()
                a = (asec * 10**9 + ansec if valid & SETATTR_ATIME_SET else now) if valid & SETATTR_ATIME else st.st_atime_ns
                m = (msec * 10**9 + mnsec if valid & SETATTR_MTIME_SET else now) if valid & SETATTR_MTIME else st.st_mtime_ns
                if link:
                    with self._at(f.path) as (d, name):
                        os.utime(name, ns=(a, m), dir_fd=d, follow_symlinks=False)
                else:
                    os.utime(inode, ns=(a, m))
        finally:
            os.close(fd)
        return b""

    def xattrwalk(self, r: Reader) -> bytes:
        raise Error(errno.EOPNOTSUPP)

    def xattrcreate(self, r: Reader) -> bytes:
        raise Error(errno.EOPNOTSUPP)

    def readdir(self, r: Reader) -> bytes:
        """Straight from getdents64 on the open directory: offsets are the fs's own cookies, so
        nothing is kept between calls and a restored server continues the same listing."""
        fid, offset, count = r.u32(), r.u64(), r.u32()
        r.end()
        if offset > OFF_MAX:
            raise Error(errno.EINVAL)
        fd = self._fd(self._fid(fid))
        limit = min(count, self.msize - 11)
        os.lseek(fd, offset, os.SEEK_SET)
        buf = self._dents
        n = _getdents(fd, buf, max(limit, 512))  # at least one entry of any name length fits
        if n < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        raw = ctypes.string_at(buf, n)
        out = bytearray()
        pos = 0
        while pos < n:
            ino, off, reclen, dtype = struct.unpack_from("<QqHB", raw, pos)
            name = raw[pos + 19:pos + reclen].split(b"\0", 1)[0]
            pos += reclen
            qtype = QTDIR if dtype == 4 else QTSYMLINK if dtype == 10 else QTFILE
            rec = struct.pack("<BIQQB", qtype, 0, ino, off & 0xFFFFFFFFFFFFFFFF, dtype) + _s(name)
            if len(out) + len(rec) > limit:
                break
            out += rec
        return struct.pack("<I", len(out)) + bytes(out)

    def fsync(self, r: Reader) -> bytes:
        fid, datasync = r.u32(), r.u32()
        r.end()
        fd = self._fd(self._fid(fid))
        os.fdatasync(fd) if datasync else os.fsync(fd)
        return b""

    def lock(self, r: Reader) -> bytes:
        fid, _type, _flags, _start, _length, _proc, _client = r.u32(), r.u8(), r.u32(), r.u64(), r.u64(), r.u32(), r.s()
        r.end()
        self._fid(fid)
        return b"\x00"  # granted: the guest kernel is the only client, it arbitrates its own locks

    def getlock(self, r: Reader) -> bytes:
        fid, _type, start, length, proc_id, client_id = r.u32(), r.u8(), r.u64(), r.u64(), r.u32(), r.s()
        r.end()
        self._fid(fid)
        return struct.pack("<BQQI", 2, start, length, proc_id) + _s(client_id)  # F_UNLCK

    def symlink(self, r: Reader) -> bytes:
        fid, name, target, _gid = r.u32(), r.s(), r.s(), r.u32()
        r.end()
        if not target or "\0" in target:
            raise Error(errno.EINVAL if target else errno.ENOENT)
        with self._at(self._child(fid, name)) as (d, n):
            os.symlink(_b(target), n, dir_fd=d)
            return _qid(os.stat(n, dir_fd=d, follow_symlinks=False))

    def mknod(self, r: Reader) -> bytes:
        fid, name, mode, _major, _minor, _gid = r.u32(), r.s(), r.u32(), r.u32(), r.u32(), r.u32()
        r.end()
        path = self._child(fid, name)
        if stat.S_IFMT(mode) not in (stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFREG):
            raise Error(errno.EPERM)  # no device nodes in a work dir
        with self._at(path) as (d, n):
            os.mknod(n, stat.S_IFMT(mode) | (mode & 0o7777), 0, dir_fd=d)
            return _qid(os.stat(n, dir_fd=d, follow_symlinks=False))

    def rename(self, r: Reader) -> bytes:
        fid, dfid, name = r.u32(), r.u32(), r.s()
        r.end()
        f = self._fid(fid)
        self._move(f.path, self._child(dfid, name))
        return b""

    def readlink(self, r: Reader) -> bytes:
        f = self._fid(r.u32())
        r.end()
        if not f.path:
            raise Error(errno.EINVAL)
        with self._at(f.path) as (d, n):
            return _s(os.readlink(n, dir_fd=d))

    def link(self, r: Reader) -> bytes:
        dfid, fid, name = r.u32(), r.u32(), r.s()
        r.end()
        src, dst = self._fid(fid).path, self._child(dfid, name)
        if not src:
            raise Error(errno.EPERM)
        with self._at(src) as (sd, sn), self._at(dst) as (dd, dn):
            os.link(sn, dn, src_dir_fd=sd, dst_dir_fd=dd, follow_symlinks=False)
        return b""

    def mkdir(self, r: Reader) -> bytes:
        dfid, name, mode, _gid = r.u32(), r.s(), r.u32(), r.u32()
        r.end()
        with self._at(self._child(dfid, name)) as (d, n):
            os.mkdir(n, mode & 0o7777, dir_fd=d)
            return _qid(os.stat(n, dir_fd=d, follow_symlinks=False))

    def renameat(self, r: Reader) -> bytes:
        ofid, oname, nfid, nname = r.u32(), r.s(), r.u32(), r.s()
        r.end()
        self._move(self._child(ofid, oname), self._child(nfid, nname))
        return b""

    def unlinkat(self, r: Reader) -> bytes:
        dfid, name, flags = r.u32(), r.s(), r.u32()
        r.end()
        with self._at(self._child(dfid, name)) as (d, n):
            os.rmdir(n, dir_fd=d) if flags & AT_REMOVEDIR else os.unlink(n, dir_fd=d)
        return b""

    def _move(self, old: str, new: str) -> None:
        if not old:
            raise Error(errno.EBUSY)
        prefix = old + "/"
        moved = [f for f in self.fids.values() if f.path == old or f.path.startswith(prefix)]
        grow = len(new) - len(old)
        if any(len(f.path) + grow > MAX_PATH for f in moved) or self.path_chars + grow * len(moved) > MAX_PATH_CHARS:
            raise Error(errno.ENAMETOOLONG)
        with self._at(old) as (od, on), self._at(new) as (nd, nn):
            os.rename(on, nn, src_dir_fd=od, dst_dir_fd=nd)
        for f in moved:  # keep the fid table's paths true (they are the saved state)
            self._repath(f, new + f.path[len(old):])

    OPS = {Tversion: version, Tauth: auth, Tattach: attach, Tflush: flush, Twalk: walk, Tlopen: lopen,
           Tlcreate: lcreate, Tread: read, Twrite: write, Tclunk: clunk, Tremove: remove, Tstatfs: statfs,
           Tgetattr: getattr, Tsetattr: setattr, Txattrwalk: xattrwalk, Txattrcreate: xattrcreate,
           Treaddir: readdir, Tfsync: fsync, Tlock: lock, Tgetlock: getlock, Tsymlink: symlink,
           Tmknod: mknod, Trename: rename, Treadlink: readlink, Tlink: link, Tmkdir: mkdir,
           Trenameat: renameat, Tunlinkat: unlinkat}


def take_message(buf: bytearray, limit: int = MAX_MSIZE) -> bytes | None:
    """Cut one complete message off the front of buf, or None if it is not all there yet.

    The size field is checked as soon as it arrived: a message above `limit` is a ProtocolError
    before a byte of it is kept.
    """
    if len(buf) < 4:
        return None
    n = int.from_bytes(buf[:4], "little")
    if n < 7 or n > limit:
        raise ProtocolError(f"9P message of {n} bytes (allowed 7..{limit})")
    if len(buf) < n:
        return None
    m = bytes(buf[:n])
    del buf[:n]
    return m


def split_messages(buf: bytearray, limit: int = MAX_MSIZE) -> list[bytes]:
    """Cut every complete message off the front of buf (in place); see take_message."""
    out = []
    while (m := take_message(buf, limit)) is not None:
        out.append(m)
    return out


def unread_bytes(sock: socket.socket) -> int:
    """Bytes we sent that the peer (QEMU) has not read yet (SIOCOUTQ)."""
    import fcntl

    return struct.unpack("i", fcntl.ioctl(sock.fileno(), 0x5411, b"\0\0\0\0"))[0]


def _pump(server: Server, buf: bytearray, out: bytearray, draining: bool) -> bool:
    """Answer (drained: queue) complete requests while the bounds allow. True: a bound is reached,
    read nothing more from the guest until it clears (the rest waits in the socket and QEMU)."""
    while True:
        if draining:
            if server.queue_full():
                return True
            m = take_message(buf, server.msize)
            if m is None:
                return False
            server.queue(m)
        else:
            if len(out) >= MAX_OUT:
                return True
            m = server.unqueue()
            if m is None:
                m = take_message(buf, server.msize)
                if m is None:
                    return False
            out += server.handle(m)


def _poll(wanted: dict[int, int], timeout: float | None) -> dict[int, int]:
    """poll(2), not select(2): with up to MAX_FIDS files open, descriptors go past FD_SETSIZE."""
    p = select.poll()
    for fd, ev in wanted.items():
        p.register(fd, ev)
    return dict(p.poll(None if timeout is None else max(0, int(timeout * 1000))))


def _send(conn: socket.socket, out: bytearray) -> None:
    try:
        n = conn.send(out)
    except BlockingIOError:
        return
    del out[:n]


# QEMU connects while libvirt starts it, which domain.guarded allows up to CALL_TIMEOUT (600 s) on a
# saturated host; the server waits as long (teardown stops it sooner when the start failed).
ACCEPT_TIMEOUT = 600.0


def serve(server: Server, listen: socket.socket, control: socket.socket, accept_timeout: float = ACCEPT_TIMEOUT) -> None:
    """Serve QEMU's connection until it closes; obey DRAIN / STATE / RESUME on the control socket.

    DRAIN: stop answering (new requests are queued), wait until QEMU has read every reply; then
    STATE returns the fid table and the queued requests as JSON. Quiesced replies are never lost:
    after a restore the queued requests are answered first. A size field out of bounds closes the
    connection (the stream can no longer be framed).
    """
    import json

    IN = select.POLLIN | select.POLLHUP | select.POLLERR
    if not _poll({listen.fileno(): select.POLLIN}, accept_timeout):
        # QEMU connects while it starts (before the guest runs): it never started, or is gone.
        print(f"vmwrap.ninep: QEMU did not connect within {accept_timeout:.0f} s; the work dir is not served",
              file=sys.stderr, flush=True)
        return
    conn, _ = listen.accept()
    listen.close()
    conn.setblocking(False)  # a guest that stops taking replies must not stop the control socket
    buf = bytearray(server.partial)
    server.partial = b""
    draining = False
    clients: list[socket.socket] = []
    out = bytearray()
    try:
        while True:
            full = _pump(server, buf, out, draining)
            wanted = {control.fileno(): IN, **{c.fileno(): IN for c in clients}}
            ev = (0 if full else IN) | (select.POLLOUT if out else 0)
            if ev:
                wanted[conn.fileno()] = ev
            ready = _poll(wanted, None)
            got = ready.get(conn.fileno(), 0)
            if got & select.POLLOUT or got & (select.POLLHUP | select.POLLERR) and out:
                _send(conn, out)  # a hang-up shows here as EPIPE
            if got & IN and not full:
                try:
                    data = conn.recv(RECV)
                except BlockingIOError:
                    data = None
                if data == b"":
                    return
                if data:
                    buf += data
            if control.fileno() in ready:
                c, _ = control.accept()
                c.settimeout(10)
                clients.append(c)
            for c in [c for c in clients if c.fileno() in ready]:
                clients.remove(c)
                try:
                    cmd = c.recv(64).strip()
                    if cmd == b"DRAIN":
                        draining = True
                        deadline = time.monotonic() + 5
                        while out and time.monotonic() < deadline:  # flush our replies ...
                            _poll({conn.fileno(): select.POLLOUT}, deadline - time.monotonic())
                            _send(conn, out)
                        for _ in range(200):  # ... then wait for QEMU to take them into the guest
                            if unread_bytes(conn) == 0:
                                break
                            time.sleep(0.01)
                        c.sendall(b"OK\n" if not out and unread_bytes(conn) == 0 else b"BUSY\n")
                    elif cmd == b"STATE":
                        # Take what QEMU still flushed to us after the pause into the queue too.
                        draining = True
                        while not _pump(server, buf, out, True) and _poll({conn.fileno(): IN}, 0.05):
                            try:
                                data = conn.recv(RECV)
                            except BlockingIOError:
                                continue
                            if not data:
                                break
                            buf += data
                        server.partial = bytes(buf)
                        c.sendall(json.dumps(server.state()).encode() + b"\n")
                    elif cmd == b"RESUME":
                        draining = False
                        c.sendall(b"OK\n")
                except OSError as e:
                    print(f"vmwrap-9p: control client: {e}", file=sys.stderr, flush=True)
                finally:
                    c.close()
    except ProtocolError as e:
        print(f"vmwrap-9p: closing the guest's connection: {e}", file=sys.stderr, flush=True)
    except (ConnectionError, BlockingIOError) as e:
        print(f"vmwrap-9p: the guest's connection failed: {e}", file=sys.stderr, flush=True)
    finally:
        for c in clients:
            c.close()
        conn.close()
        server.close()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the per-job server process (already running as the job's user)."""
    import argparse
    import json
    import resource

    ap = argparse.ArgumentParser(prog="vmwrap-9p")
    ap.add_argument("--root", required=True)
    ap.add_argument("--listen-fd", type=int, required=True)
    ap.add_argument("--control-fd", type=int, required=True)
    ap.add_argument("--state", help="JSON state saved with the VM (restore)")
    a = ap.parse_args(argv)
    os.umask(0)  # the guest kernel already applied the job's umask to every mode it sends
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = MAX_FIDS + 64 if hard == resource.RLIM_INFINITY else min(hard, MAX_FIDS + 64)
    if soft != resource.RLIM_INFINITY and soft < want:  # each open fid holds one descriptor
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    state = None
    if a.state:
        with open(a.state) as f:
            state = json.load(f)
    listen = socket.socket(fileno=a.listen_fd)
    control = socket.socket(fileno=a.control_fd)
    serve(Server(a.root, state), listen, control)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
