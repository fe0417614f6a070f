"""A small 9P2000.L file server for the job's work dir, whose state can be saved with the VM.

QEMU's own virtio-9p blocks VM save while the share is mounted, and virtiofs never migrates. The
guest instead mounts the work dir with the 9p client's `trans=fd` on a virtio-serial port (which
migrates), and this server answers on the host end. It runs as the job's user, so the host kernel
enforces permissions and new files get the right owner. Its whole state is a fid table of paths
and open flags: `drain()` + `state()` before a save, `Server(state=...)` on whichever node restores.
"""

from __future__ import annotations

import base64
import errno
import os
import select
import socket
import stat
import struct
import time
from dataclasses import dataclass, field

VERSION = "9P2000.L"
TRACE = bool(os.environ.get("VMWRAP_9P_TRACE"))
MAX_MSIZE = 1 << 19
NOFID = 0xFFFFFFFF

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


class Error(Exception):
    def __init__(self, code: int):
        self.code = code


@dataclass
class Fid:
    path: str                  # relative to the export root, '' for the root itself
    flags: int | None = None   # open flags once Tlopen/Tlcreate succeeded
    fd: int | None = None      # reopened lazily after a restore
    entries: list | None = field(default=None, repr=False)  # readdir snapshot


class Reader:
    def __init__(self, data: bytes, pos: int = 0):
        self.data, self.pos = data, pos

    def u8(self) -> int:
        self.pos += 1
        return self.data[self.pos - 1]

    def u16(self) -> int:
        self.pos += 2
        return struct.unpack_from("<H", self.data, self.pos - 2)[0]

    def u32(self) -> int:
        self.pos += 4
        return struct.unpack_from("<I", self.data, self.pos - 4)[0]

    def u64(self) -> int:
        self.pos += 8
        return struct.unpack_from("<Q", self.data, self.pos - 8)[0]

    def s(self) -> str:
        n = self.u16()
        self.pos += n
        return self.data[self.pos - n:self.pos].decode("utf-8", "surrogateescape")

    def raw(self, n: int) -> bytes:
        self.pos += n
        return self.data[self.pos - n:self.pos]


def _s(text: str) -> bytes:
    b = text.encode("utf-8", "surrogateescape")
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
    """A single path component from the guest: never a separator, never empty."""
    if not name or "/" in name or "\0" in name or name in (".", ".."):
        raise Error(errno.EINVAL)
    return name


class Server:
    """The protocol, independent of the transport: `handle(message) -> reply`."""

    def __init__(self, root: str, state: dict | None = None):
        self.root = os.path.realpath(root)
        self.fids: dict[int, Fid] = {}
        self.msize = 8192
        self.pending: list[bytes] = []
        self.partial = b""
        if state:
            self.msize = state["msize"]
            self.fids = {int(k): Fid(v["path"], v["flags"]) for k, v in state["fids"].items()}
            self.pending = [base64.b64decode(m) for m in state.get("pending", [])]
            self.partial = base64.b64decode(state.get("partial", ""))

    # --- state -------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"version": 1, "msize": self.msize,
                "fids": {str(k): {"path": f.path, "flags": f.flags} for k, f in self.fids.items()},
                "pending": [base64.b64encode(m).decode() for m in self.pending]}

    def close(self) -> None:
        for f in self.fids.values():
            self._close_fd(f)
        self.fids.clear()

    # --- helpers -----------------------------------------------------------------------------
    def _abs(self, rel: str) -> str:
        return os.path.join(self.root, rel) if rel else self.root

    def _fid(self, n: int) -> Fid:
        f = self.fids.get(n)
        if f is None:
            raise Error(errno.EBADF)
        return f

    def _fd(self, f: Fid) -> int:
        if f.flags is None:
            raise Error(errno.EBADF)
        if f.fd is None:  # after a restore: reopen by path, never re-truncate or re-create
            f.fd = os.open(self._abs(f.path), (f.flags & PASS_FLAGS & ~os.O_TRUNC) | os.O_CLOEXEC)
        return f.fd

    @staticmethod
    def _close_fd(f: Fid) -> None:
        if f.fd is not None:
            try:
                os.close(f.fd)
            except OSError:
                pass
            f.fd = None

    def _child(self, dirfid: int, name: str) -> str:
        d = self._fid(dirfid)
        return os.path.join(d.path, _name(name)) if d.path else _name(name)

    def _lstat(self, rel: str) -> os.stat_result:
        return os.lstat(self._abs(rel))

    # --- dispatch ----------------------------------------------------------------------------
    def handle(self, msg: bytes) -> bytes:
        r = Reader(msg, 4)
        mtype, tag = r.u8(), r.u16()
        try:
            fn = self.OPS.get(mtype)
            if fn is None:
                raise Error(errno.EOPNOTSUPP)
            body = fn(self, r)
            rtype = mtype + 1
        except Error as e:
            rtype, body = Rlerror, struct.pack("<I", e.code)
        except OSError as e:
            rtype, body = Rlerror, struct.pack("<I", e.errno or errno.EIO)
        except (struct.error, IndexError, UnicodeError):
            rtype, body = Rlerror, struct.pack("<I", errno.EINVAL)
        if TRACE:
            import sys

            print(f"T{mtype} tag={tag} {msg[7:40]!r} -> R{rtype} {body[:40]!r}", file=sys.stderr, flush=True)
        return struct.pack("<IBH", 7 + len(body), rtype, tag) + body

    def version(self, r: Reader) -> bytes:
        msize, ver = r.u32(), r.s()
        self.msize = max(4096, min(msize, MAX_MSIZE))
        self.close()
        return struct.pack("<I", self.msize) + _s(VERSION if ver.startswith(VERSION) else "unknown")

    def auth(self, r: Reader) -> bytes:
        raise Error(errno.EOPNOTSUPP)

    def attach(self, r: Reader) -> bytes:
        fid, _afid, _uname, _aname, _nuname = r.u32(), r.u32(), r.s(), r.s(), r.u32()
        self.fids[fid] = Fid("")
        return _qid(self._lstat(""))

    def flush(self, r: Reader) -> bytes:
        return b""  # requests are answered in order: nothing is ever in flight to cancel

    def walk(self, r: Reader) -> bytes:
        fid, newfid, n = r.u32(), r.u32(), r.u16()
        path = self._fid(fid).path
        qids = []
        for i in range(n):
            name = r.s()
            if name == "..":
                nxt = os.path.dirname(path)  # never above the root
            elif name == ".":
                nxt = path
            else:
                nxt = os.path.join(path, _name(name)) if path else _name(name)
            try:
                st = self._lstat(nxt)
            except OSError as e:
                if i == 0:
                    raise Error(e.errno)
                break
            qids.append(_qid(st))
            path = nxt
        if len(qids) == n:
            if newfid != fid and newfid in self.fids:
                raise Error(errno.EBADF)
            old = self.fids.get(newfid)
            if old is not None:
                self._close_fd(old)
            self.fids[newfid] = Fid(path)
        return struct.pack("<H", len(qids)) + b"".join(qids)

    def lopen(self, r: Reader) -> bytes:
        fid, flags = r.u32(), r.u32()
        f = self._fid(fid)
        self._close_fd(f)
        f.flags = flags & PASS_FLAGS
        f.fd = os.open(self._abs(f.path), f.flags | os.O_CLOEXEC)
        f.entries = None
        return _qid(os.fstat(f.fd)) + struct.pack("<I", 0)

    def lcreate(self, r: Reader) -> bytes:
        fid, name, flags, mode, _gid = r.u32(), r.s(), r.u32(), r.u32(), r.u32()
        f = self._fid(fid)
        path = self._child(fid, name)
        fd = os.open(self._abs(path), (flags & CREATE_FLAGS) | os.O_CREAT | os.O_CLOEXEC, mode & 0o7777)
        self._close_fd(f)
        f.path, f.fd, f.flags = path, fd, flags & PASS_FLAGS & ~os.O_TRUNC
        return _qid(os.fstat(fd)) + struct.pack("<I", 0)

    def read(self, r: Reader) -> bytes:
        fid, offset, count = r.u32(), r.u64(), r.u32()
        data = os.pread(self._fd(self._fid(fid)), min(count, self.msize - 11), offset)
        return struct.pack("<I", len(data)) + data

    def write(self, r: Reader) -> bytes:
        fid, offset, count = r.u32(), r.u64(), r.u32()
        data = r.raw(count)
        f = self._fid(fid)
        fd = self._fd(f)
        n = os.write(fd, data) if f.flags & os.O_APPEND else os.pwrite(fd, data, offset)
        return struct.pack("<I", n)

    def clunk(self, r: Reader) -> bytes:
        f = self.fids.pop(r.u32(), None)
        if f is None:
            raise Error(errno.EBADF)
        self._close_fd(f)
        return b""

    def remove(self, r: Reader) -> bytes:
        fid = r.u32()
        f = self.fids.pop(fid, None)
        if f is None:
            raise Error(errno.EBADF)
        self._close_fd(f)
        p = self._abs(f.path)
        if not f.path:
            raise Error(errno.EBUSY)
        if stat.S_ISDIR(os.lstat(p).st_mode):
            os.rmdir(p)
        else:
            os.unlink(p)
        return b""

    def statfs(self, r: Reader) -> bytes:
        self._fid(r.u32())
        s = os.statvfs(self.root)
        return struct.pack("<IIQQQQQQI", 0x01021997, s.f_bsize, s.f_blocks, s.f_bfree, s.f_bavail,
                           s.f_files, s.f_ffree, s.f_fsid & 0xFFFFFFFFFFFFFFFF, s.f_namemax)

    def getattr(self, r: Reader) -> bytes:
        f = self._fid(r.u32())
        st = os.fstat(f.fd) if f.fd is not None else self._lstat(f.path)

        def ts(t: int) -> tuple[int, int]:
            return t // 10**9, t % 10**9

        return struct.pack("<Q", 0x7FF) + _qid(st) + struct.pack(
            "<IIIQQQQQ" + "QQ" * 4 + "QQ", st.st_mode, st.st_uid, st.st_gid, st.st_nlink, st.st_rdev,
            st.st_size, st.st_blksize, st.st_blocks, *ts(st.st_atime_ns), *ts(st.st_mtime_ns),
            *ts(st.st_ctime_ns), 0, 0, 0, 0)

    def setattr(self, r: Reader) -> bytes:
        fid, valid, mode, uid, gid = r.u32(), r.u32(), r.u32(), r.u32(), r.u32()
        size, asec, ansec, msec, mnsec = r.u64(), r.u64(), r.u64(), r.u64(), r.u64()
        f = self._fid(fid)
        p = self._abs(f.path)
        if valid & SETATTR_MODE:
            os.chmod(p, mode & 0o7777)
        if valid & (SETATTR_UID | SETATTR_GID):
            os.lchown(p, uid if valid & SETATTR_UID else -1, gid if valid & SETATTR_GID else -1)
        if valid & SETATTR_SIZE:
            os.truncate(p, size)
        if valid & (SETATTR_ATIME | SETATTR_MTIME):
            st, now = os.lstat(p), time.time_ns()
            a = (asec * 10**9 + ansec if valid & SETATTR_ATIME_SET else now) if valid & SETATTR_ATIME else st.st_atime_ns
            m = (msec * 10**9 + mnsec if valid & SETATTR_MTIME_SET else now) if valid & SETATTR_MTIME else st.st_mtime_ns
            os.utime(p, ns=(a, m), follow_symlinks=False)
        return b""

    def xattrwalk(self, r: Reader) -> bytes:
        raise Error(errno.EOPNOTSUPP)

    def xattrcreate(self, r: Reader) -> bytes:
        raise Error(errno.EOPNOTSUPP)

    def readdir(self, r: Reader) -> bytes:
        fid, offset, count = r.u32(), r.u64(), r.u32()
        f = self._fid(fid)
        if f.entries is None or offset == 0:
            p = self._abs(f.path)
            ents = [(".", os.lstat(p)), ("..", os.lstat(os.path.dirname(p) if f.path else p))]
            with os.scandir(p) as it:
                for e in it:
                    try:
                        ents.append((e.name, e.stat(follow_symlinks=False)))
                    except OSError:
                        pass
            f.entries = ents
        out = bytearray()
        limit = min(count, self.msize - 11)
        for i in range(offset, len(f.entries)):
            name, st = f.entries[i]
            dtype = stat.S_IFMT(st.st_mode) >> 12
            rec = _qid(st) + struct.pack("<QB", i + 1, dtype) + _s(name)
            if len(out) + len(rec) > limit:
                break
            out += rec
        return struct.pack("<I", len(out)) + bytes(out)

    def fsync(self, r: Reader) -> bytes:
        fid, _datasync = r.u32(), r.u32()
        os.fsync(self._fd(self._fid(fid)))
        return b""

    def lock(self, r: Reader) -> bytes:
        self._fid(r.u32())
        return b"\x00"  # granted: the guest kernel is the only client, it arbitrates its own locks

    def getlock(self, r: Reader) -> bytes:
        self._fid(r.u32())
        _type, start, length, proc_id, client_id = r.u8(), r.u64(), r.u64(), r.u32(), r.s()
        return struct.pack("<BQQI", 2, start, length, proc_id) + _s(client_id)  # F_UNLCK

    def symlink(self, r: Reader) -> bytes:
        fid, name, target, _gid = r.u32(), r.s(), r.s(), r.u32()
        path = self._child(fid, name)
        os.symlink(target, self._abs(path))
        return _qid(self._lstat(path))

    def mknod(self, r: Reader) -> bytes:
        fid, name, mode, major, minor, _gid = r.u32(), r.s(), r.u32(), r.u32(), r.u32(), r.u32()
        path = self._child(fid, name)
        if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISREG(mode)):
            raise Error(errno.EPERM)  # no device nodes in a work dir
        os.mknod(self._abs(path), mode, os.makedev(major, minor))
        return _qid(self._lstat(path))

    def rename(self, r: Reader) -> bytes:
        fid, dfid, name = r.u32(), r.u32(), r.s()
        f = self._fid(fid)
        new = self._child(dfid, name)
        self._move(f.path, new)
        return b""

    def readlink(self, r: Reader) -> bytes:
        return _s(os.readlink(self._abs(self._fid(r.u32()).path)))

    def link(self, r: Reader) -> bytes:
        dfid, fid, name = r.u32(), r.u32(), r.s()
        os.link(self._abs(self._fid(fid).path), self._abs(self._child(dfid, name)), follow_symlinks=False)
        return b""

    def mkdir(self, r: Reader) -> bytes:
        dfid, name, mode, _gid = r.u32(), r.s(), r.u32(), r.u32()
        path = self._child(dfid, name)
        os.mkdir(self._abs(path), mode & 0o7777)
        return _qid(self._lstat(path))

    def renameat(self, r: Reader) -> bytes:
        ofid, oname, nfid, nname = r.u32(), r.s(), r.u32(), r.s()
        self._move(self._child(ofid, oname), self._child(nfid, nname))
        return b""

    def unlinkat(self, r: Reader) -> bytes:
        dfid, name, flags = r.u32(), r.s(), r.u32()
        p = self._abs(self._child(dfid, name))
        os.rmdir(p) if flags & AT_REMOVEDIR else os.unlink(p)
        return b""

    def _move(self, old: str, new: str) -> None:
        os.rename(self._abs(old), self._abs(new))
        prefix = old + "/"
        for f in self.fids.values():  # keep the fid table's paths true (they are the saved state)
            if f.path == old:
                f.path = new
            elif f.path.startswith(prefix):
                f.path = new + f.path[len(old):]

    OPS = {Tversion: version, Tauth: auth, Tattach: attach, Tflush: flush, Twalk: walk, Tlopen: lopen,
           Tlcreate: lcreate, Tread: read, Twrite: write, Tclunk: clunk, Tremove: remove, Tstatfs: statfs,
           Tgetattr: getattr, Tsetattr: setattr, Txattrwalk: xattrwalk, Txattrcreate: xattrcreate,
           Treaddir: readdir, Tfsync: fsync, Tlock: lock, Tgetlock: getlock, Tsymlink: symlink,
           Tmknod: mknod, Trename: rename, Treadlink: readlink, Tlink: link, Tmkdir: mkdir,
           Trenameat: renameat, Tunlinkat: unlinkat}


def split_messages(buf: bytearray) -> list[bytes]:
    """Cut complete messages off the front of buf (in place)."""
    out = []
    while len(buf) >= 4:
        n = struct.unpack_from("<I", buf)[0]
        if n < 7:
            raise ValueError(f"malformed 9P message of size {n}")
        if len(buf) < n:
            break
        out.append(bytes(buf[:n]))
        del buf[:n]
    return out


def unread_bytes(sock: socket.socket) -> int:
    """Bytes we sent that the peer (QEMU) has not read yet (SIOCOUTQ)."""
    import fcntl

    return struct.unpack("i", fcntl.ioctl(sock.fileno(), 0x5411, b"\0\0\0\0"))[0]


def serve(server: Server, listen: socket.socket, control: socket.socket, accept_timeout: float = 60.0) -> None:
    """Serve QEMU's connection until it closes; obey DRAIN / STATE / RESUME on the control socket.

    DRAIN: stop answering (new requests are queued), wait until QEMU has read every reply; then
    STATE returns the fid table and the queued requests as JSON. Quiesced replies are never lost:
    after a restore the queued requests are answered first.
    """
    import json

    ready, _, _ = select.select([listen], [], [], accept_timeout)
    if not ready:
        return
    conn, _ = listen.accept()
    listen.close()
    buf = bytearray(server.partial)
    draining = False
    clients: list[socket.socket] = []
    out = bytearray()

    def answer(msgs: list[bytes]) -> None:
        for m in msgs:
            out.extend(server.handle(m))

    answer(server.pending)
    server.pending = []
    try:
        while True:
            rl = [conn, control] + clients
            wl = [conn] if out else []
            r, w, _ = select.select(rl, wl, [], 0.05 if draining else None)
            if conn in w and out:
                n = conn.send(out)
                del out[:n]
            if conn in r:
                data = conn.recv(1 << 20)
                if not data:
                    return
                buf.extend(data)
                msgs = split_messages(buf)
                if draining:
                    server.pending.extend(msgs)
                else:
                    answer(msgs)
            if control in r:
                c, _ = control.accept()
                clients.append(c)
            for c in list(r):
                if c not in clients:
                    continue
                cmd = c.recv(64).strip()
                if cmd == b"DRAIN":
                    draining = True
                    while out:  # flush our replies, then wait for QEMU to take them into the guest
                        n = conn.send(out)
                        del out[:n]
                    for _ in range(200):
                        if unread_bytes(conn) == 0:
                            break
                        select.select([], [], [], 0.01)
                    c.sendall(b"OK\n" if unread_bytes(conn) == 0 else b"BUSY\n")
                elif cmd == b"STATE":
                    # Take what QEMU still flushed to us after the pause into the queue too.
                    while select.select([conn], [], [], 0.05)[0]:
                        data = conn.recv(1 << 20)
                        if not data:
                            break
                        buf.extend(data)
                        server.pending.extend(split_messages(buf))
                    st = server.state()
                    st["partial"] = base64.b64encode(bytes(buf)).decode()
                    c.sendall(json.dumps(st).encode() + b"\n")
                elif cmd == b"RESUME":
                    draining = False
                    answer(server.pending)
                    server.pending = []
                    c.sendall(b"OK\n")
                c.close()
                clients.remove(c)
    finally:
        conn.close()
        server.close()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the per-job server process (already running as the job's user)."""
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="vmwrap-9p")
    ap.add_argument("--root", required=True)
    ap.add_argument("--listen-fd", type=int, required=True)
    ap.add_argument("--control-fd", type=int, required=True)
    ap.add_argument("--state", help="JSON state saved with the VM (restore)")
    a = ap.parse_args(argv)
    os.umask(0)  # the guest kernel already applied the job's umask to every mode it sends
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
