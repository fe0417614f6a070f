"""vmwrap's 9P2000.L work dir server, spoken to directly (no VM): protocol, confinement, saved state."""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
import threading

import pytest

from vmwrap import ninep


def s(text: str) -> bytes:
    b = text.encode()
    return struct.pack("<H", len(b)) + b


def msg(mtype: int, body: bytes, tag: int = 1) -> bytes:
    return struct.pack("<IBH", 7 + len(body), mtype, tag) + body


class Client:
    def __init__(self, server: ninep.Server):
        self.server = server

    def call(self, mtype: int, body: bytes) -> tuple[int, bytes]:
        reply = self.server.handle(msg(mtype, body))
        size, rtype, _tag = struct.unpack_from("<IBH", reply)
        assert size == len(reply)
        return rtype, reply[7:]

    def ok(self, mtype: int, body: bytes) -> bytes:
        rtype, body = self.call(mtype, body)
        assert rtype == mtype + 1, f"error {struct.unpack('<I', body)[0] if rtype == ninep.Rlerror else rtype}"
        return body

    def err(self, mtype: int, body: bytes) -> int:
        rtype, body = self.call(mtype, body)
        assert rtype == ninep.Rlerror
        return struct.unpack("<I", body)[0]

    def mount(self) -> None:
        self.ok(ninep.Tversion, struct.pack("<I", 65536) + s("9P2000.L"))
        self.ok(ninep.Tattach, struct.pack("<II", 0, ninep.NOFID) + s("u") + s("") + struct.pack("<I", 1234))

    def walk(self, fid: int, newfid: int, *names: str) -> int:
        body = self.ok(ninep.Twalk, struct.pack("<IIH", fid, newfid, len(names)) + b"".join(s(n) for n in names))
        return struct.unpack_from("<H", body)[0]

    def create(self, dirfid: int, name: str, flags: int = os.O_RDWR, mode: int = 0o644) -> None:
        self.ok(ninep.Tlcreate, struct.pack("<I", dirfid) + s(name) + struct.pack("<III", flags, mode, 0))

    def write(self, fid: int, offset: int, data: bytes) -> int:
        return struct.unpack(
            "<I", self.ok(ninep.Twrite, struct.pack("<IQI", fid, offset, len(data)) + data))[0]

    def read(self, fid: int, offset: int, count: int) -> bytes:
        body = self.ok(ninep.Tread, struct.pack("<IQI", fid, offset, count))
        return body[4:4 + struct.unpack_from("<I", body)[0]]

    def readdir(self, fid: int) -> list[str]:
        body = self.ok(ninep.Treaddir, struct.pack("<IQI", fid, 0, 8192))
        n = struct.unpack_from("<I", body)[0]
        r = ninep.Reader(body[4:4 + n])
        names = []
        while r.pos < n:
            r.raw(13), r.u64(), r.u8()
            names.append(r.s())
        return names


@pytest.fixture
def root(tmp_path):
    (tmp_path / "export").mkdir()
    (tmp_path / "outside.txt").write_text("host secret")
    return tmp_path / "export"


def test_create_write_read_list(root):
    c = Client(ninep.Server(str(root)))
    c.mount()
    c.ok(ninep.Tmkdir, struct.pack("<I", 0) + s("sub") + struct.pack("<II", 0o755, 0))
    assert c.walk(0, 1, "sub") == 1
    c.create(1, "file.txt")  # fid 1 is now the open file sub/file.txt
    assert c.write(1, 0, b"hello world") == 11
    assert c.read(1, 6, 100) == b"world"
    assert (root / "sub" / "file.txt").read_bytes() == b"hello world"
    c.walk(0, 2)
    c.ok(ninep.Tlopen, struct.pack("<II", 2, os.O_RDONLY | os.O_DIRECTORY))
    assert sorted(c.readdir(2)) == [".", "..", "sub"]


def test_walk_never_leaves_the_export(root):
    c = Client(ninep.Server(str(root)))
    c.mount()
    assert c.walk(0, 1, "..", "..") == 2
    assert c.server.fids[1].path == ""  # '..' of the root is the root
    assert c.err(ninep.Twalk, struct.pack("<IIH", 0, 2, 1) + s("../outside.txt")) == errno.EINVAL
    assert c.err(ninep.Tlcreate, struct.pack("<I", 0) + s("a/b") + struct.pack("<III", 0, 0o644, 0)) == errno.EINVAL
    assert c.err(ninep.Twalk, struct.pack("<IIH", 0, 2, 1) + s("missing")) == errno.ENOENT


def test_no_device_nodes(root):
    c = Client(ninep.Server(str(root)))
    c.mount()
    mode = 0o20644  # S_IFCHR
    assert c.err(ninep.Tmknod, struct.pack("<I", 0) + s("mem") + struct.pack("<IIII", mode, 1, 1, 0)) == errno.EPERM


def test_rename_keeps_open_fids_true(root):
    c = Client(ninep.Server(str(root)))
    c.mount()
    c.ok(ninep.Tmkdir, struct.pack("<I", 0) + s("d") + struct.pack("<II", 0o755, 0))
    c.walk(0, 1, "d")
    c.create(1, "f")
    c.ok(ninep.Trenameat, struct.pack("<I", 0) + s("d") + struct.pack("<I", 0) + s("e"))
    assert c.server.fids[1].path == "e/f"


def test_state_round_trip_reopens_without_truncating(root):
    """What a checkpoint carries: a new server (another node) continues the old one's open files."""
    c = Client(ninep.Server(str(root)))
    c.mount()
    c.walk(0, 1)
    c.create(1, "log", os.O_WRONLY | os.O_TRUNC)
    c.write(1, 0, b"before save\n")
    state = json.loads(json.dumps(c.server.state()))
    c.server.close()
    c2 = Client(ninep.Server(str(root), state))
    assert c2.server.fids[1].fd is None  # reopened lazily, by path
    c2.write(1, 12, b"after restore\n")
    assert (root / "log").read_bytes() == b"before save\nafter restore\n"


def test_drain_queues_requests_and_a_restored_server_answers_them(tmp_path, root):
    """The quiesce protocol: after DRAIN nothing is answered; STATE carries the queued requests."""
    lpath, cpath = str(tmp_path / "9p.sock"), str(tmp_path / "9p.ctl")
    listen, control = socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX)
    listen.bind(lpath), listen.listen(1), control.bind(cpath), control.listen(4)
    server = ninep.Server(str(root))
    t = threading.Thread(target=ninep.serve, args=(server, listen, control), daemon=True)
    t.start()
    qemu = socket.socket(socket.AF_UNIX)
    qemu.connect(lpath)
    qemu.sendall(msg(ninep.Tversion, struct.pack("<I", 65536) + s("9P2000.L"), tag=0xFFFF))
    assert qemu.recv(100)[4] == ninep.Tversion + 1

    def ask(cmd: bytes) -> bytes:
        k = socket.socket(socket.AF_UNIX)
        k.connect(cpath)
        k.sendall(cmd + b"\n")
        out = b""
        while not out.endswith(b"\n"):
            out += k.recv(65536)
        k.close()
        return out

    assert ask(b"DRAIN") == b"OK\n"
    attach = msg(ninep.Tattach, struct.pack("<II", 0, ninep.NOFID) + s("u") + s("") + struct.pack("<I", 0), tag=7)
    qemu.sendall(attach + attach[:5])  # one whole request and the start of another
    qemu.settimeout(0.3)
    with pytest.raises(socket.timeout):
        qemu.recv(100)  # not answered while drained
    state = json.loads(ask(b"STATE"))
    assert len(state["pending"]) == 1 and state["partial"]
    qemu.close()
    t.join(5)

    # "Restore": a new server with that state answers the queued request first, then the rest.
    listen2, control2 = socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX)
    os.unlink(lpath), os.unlink(cpath)
    listen2.bind(lpath), listen2.listen(1), control2.bind(cpath), control2.listen(4)
    t2 = threading.Thread(target=ninep.serve, args=(ninep.Server(str(root), state), listen2, control2), daemon=True)
    t2.start()
    qemu2 = socket.socket(socket.AF_UNIX)
    qemu2.connect(lpath)
    qemu2.settimeout(5)
    first = qemu2.recv(100)
    assert first[4] == ninep.Tattach + 1 and struct.unpack_from("<H", first, 5)[0] == 7
    qemu2.sendall(attach[5:])  # the rest of the partial request completes it
    second = qemu2.recv(100)
    assert second[4] == ninep.Tattach + 1
    qemu2.close()
    t2.join(5)
