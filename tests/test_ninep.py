"""vmwrap's 9P2000.L work dir server, spoken to directly (no VM): protocol, confinement, saved state."""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import struct
import threading
import time

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


# --- hardening: the guest is hostile -----------------------------------------------------------

def tstr(b: bytes) -> bytes:
    return struct.pack("<H", len(b)) + b


def serve_thread(tmp_path, server: ninep.Server):
    """Run serve() in a thread; returns (qemu-side socket, ask(cmd), thread, errors raised in it)."""
    lpath, cpath = str(tmp_path / "9p.sock"), str(tmp_path / "9p.ctl")
    for p in (lpath, cpath):
        if os.path.exists(p):
            os.unlink(p)
    listen, control = socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX)
    listen.bind(lpath), listen.listen(1), control.bind(cpath), control.listen(4)
    errors: list[BaseException] = []

    def run():
        try:
            ninep.serve(server, listen, control)
        except BaseException as e:  # noqa: BLE001 - the test asserts there is none
            errors.append(e)
        finally:
            control.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    qemu = socket.socket(socket.AF_UNIX)
    qemu.connect(lpath)
    qemu.settimeout(10)

    def ask(cmd: bytes) -> bytes:
        k = socket.socket(socket.AF_UNIX)
        k.settimeout(10)
        k.connect(cpath)
        k.sendall(cmd + b"\n")
        out = []
        while True:
            c = k.recv(1 << 20)
            out.append(c)
            if not c or c.endswith(b"\n"):
                break
        k.close()
        return b"".join(out)

    return qemu, ask, t, errors


def recv_reply(sock: socket.socket) -> bytes:
    head = b""
    while len(head) < 4:
        c = sock.recv(4 - len(head))
        assert c, "connection closed"
        head += c
    n = struct.unpack("<I", head)[0]
    data = head
    while len(data) < n:
        c = sock.recv(n - len(data))
        assert c, "connection closed"
        data += c
    return data


def closed(sock: socket.socket, timeout: float = 10.0) -> bool:
    """True when the peer closed (EOF or reset) within timeout; replies before that are skipped."""
    sock.settimeout(timeout)
    try:
        while sock.recv(1 << 20):
            pass
        return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def test_oversized_header_is_refused_before_it_is_buffered():
    """A size field above the limit is an error as soon as its 4 bytes are there, not after 4 GiB."""
    with pytest.raises(ninep.ProtocolError):
        ninep.split_messages(bytearray(b"\xff\xff\xff\xff\x64"))
    with pytest.raises(ninep.ProtocolError):
        ninep.split_messages(bytearray(struct.pack("<I", 70000)), 65536)
    with pytest.raises(ninep.ProtocolError):
        ninep.split_messages(bytearray(b"\x03\x00\x00\x00"))


def test_socket_closes_on_a_4_gib_header_with_bounded_memory(tmp_path, root):
    import tracemalloc

    qemu, ask, t, errors = serve_thread(tmp_path, ninep.Server(str(root)))
    tracemalloc.start()
    try:
        qemu.sendall(msg(ninep.Tversion, struct.pack("<I", 65536) + s("9P2000.L")))
        recv_reply(qemu)
        chunk = b"\0" * (1 << 20)
        try:
            qemu.sendall(struct.pack("<IBH", 0xFFFFFFFF, ninep.Twrite, 1))
            for _ in range(48):  # the rest of the "message"
                qemu.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert closed(qemu)
        t.join(10)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert not t.is_alive() and not errors
    assert peak < 8 << 20, f"peak {peak >> 20} MiB"


def test_message_above_negotiated_msize_closes(tmp_path, root):
    qemu, ask, t, errors = serve_thread(tmp_path, ninep.Server(str(root)))
    qemu.sendall(msg(ninep.Tversion, struct.pack("<I", 8192) + s("9P2000.L")))
    assert struct.unpack_from("<I", recv_reply(qemu), 7)[0] == 8192
    qemu.sendall(msg(ninep.Twrite, struct.pack("<IQI", 0, 0, 9000) + b"x" * 9000))
    assert closed(qemu)
    t.join(10)
    assert not t.is_alive() and not errors


def test_msize_never_above_the_server_maximum(root):
    c = Client(ninep.Server(str(root)))
    body = c.ok(ninep.Tversion, struct.pack("<I", 0xFFFFFFFF) + s("9P2000.L"))
    assert struct.unpack_from("<I", body)[0] == ninep.MAX_MSIZE <= (1 << 20) + 4096
    assert c.err(ninep.Twrite, struct.pack("<IQI", 0, 0, 0) + b"\0" * ninep.MAX_MSIZE) == errno.EMSGSIZE


E = errno
MALFORMED = {  # what each got from the old server: an exception out of handle() or a wrong answer
    "short header": (b"\x05\x00\x00\x00\x64", E.EINVAL),
    "size field not the length": (struct.pack("<IBH", 99, ninep.Tclunk, 1) + struct.pack("<I", 0), E.EINVAL),
    "trailing bytes": (msg(ninep.Tgetattr, struct.pack("<IQ", 0, 0x7FF) + b"junk"), E.EINVAL),
    "string longer than the message": (msg(ninep.Twalk, struct.pack("<IIH", 0, 1, 1) + struct.pack("<H", 500) + b"abc"),
                                       E.EINVAL),
    "write count above its data": (msg(ninep.Twrite, struct.pack("<IQI", 1, 0, 100) + b"abc"), E.EINVAL),
    "write count below its data": (msg(ninep.Twrite, struct.pack("<IQI", 1, 0, 1) + b"abc"), E.EINVAL),
    "too many walk names": (msg(ninep.Twalk, struct.pack("<IIH", 0, 1, 17) + s("a") * 17), E.EINVAL),
    "read offset above 2^63": (msg(ninep.Tread, struct.pack("<IQI", 1, 1 << 63, 10)), E.EINVAL),
    "readdir offset above 2^63": (msg(ninep.Treaddir, struct.pack("<IQI", 0, (1 << 64) - 1, 100)), E.EINVAL),
    "truncate to 2^64-1": (msg(ninep.Tsetattr, struct.pack("<IIIIIQQQQQ", 1, ninep.SETATTR_SIZE, 0, 0, 0,
                                                           (1 << 64) - 1, 0, 0, 0, 0)), E.EINVAL),
    "times beyond any clock": (msg(ninep.Tsetattr, struct.pack("<IIIIIQQQQQ", 1, 0x1B0, 0, 0, 0, 0,
                                                               (1 << 64) - 1, (1 << 64) - 1, 1, 1)), E.EINVAL),
    "symlink target with NUL": (msg(ninep.Tsymlink, struct.pack("<I", 0) + s("l") + tstr(b"a\0b") + struct.pack("<I", 0)),
                                E.EINVAL),
    "truncated lock": (msg(ninep.Tlock, struct.pack("<I", 0)), E.EINVAL),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_each_malformed_request_gets_an_rlerror(root, case):
    server = ninep.Server(str(root))
    c = Client(server)
    c.mount()
    c.walk(0, 1)
    c.create(1, "f")
    request, code = MALFORMED[case]
    before = {p: p.stat() for p in root.parent.rglob("*")}
    reply = server.handle(request)
    size, rtype, tag = struct.unpack_from("<IBH", reply)
    assert size == len(reply) and rtype == ninep.Rlerror
    assert struct.unpack_from("<I", reply, 7)[0] == code
    if len(request) >= 7:
        assert tag == struct.unpack_from("<H", request, 5)[0]
    else:
        assert tag == ninep.NOTAG
    assert {p: p.stat() for p in root.parent.rglob("*")}.keys() == before.keys()  # nothing created
    assert c.write(1, 0, b"still") == 5 and c.read(1, 0, 5) == b"still"  # and the server goes on


# --- confinement: never through a symlink, never above the root ---------------------------------

@pytest.fixture(params=["openat2", "nofollow-walk"])
def trap(request, tmp_path):
    """An export with symlinks out of it (relative, absolute, dangling); the server both ways."""
    export = tmp_path / "export"
    export.mkdir()
    out = tmp_path / "outside"
    out.mkdir()
    (out / "secret").write_text("host secret")
    (tmp_path / "outside.txt").write_text("host secret")
    os.chmod(tmp_path / "outside.txt", 0o640)
    os.symlink("../outside", export / "esc")
    os.symlink(str(out), export / "abs")
    os.symlink("../outside.txt", export / "f")
    os.symlink("../outside/created", export / "dangling")
    (export / "mine").write_text("mine")
    server = ninep.Server(str(export))
    if request.param == "nofollow-walk":
        server.openat2 = False
    else:
        assert server.openat2, "this kernel has openat2"
    c = Client(server)
    c.mount()

    def untouched() -> None:
        assert sorted(p.name for p in out.iterdir()) == ["secret"]
        assert (out / "secret").read_text() == "host secret"
        assert (tmp_path / "outside.txt").read_text() == "host secret"
        assert (tmp_path / "outside.txt").stat().st_mode & 0o777 == 0o640
        assert sorted(p.name for p in tmp_path.iterdir()) == ["9p.ctl", "9p.sock", "export", "outside", "outside.txt"][2:] \
            or sorted(p.name for p in tmp_path.iterdir()) == ["export", "outside", "outside.txt"]

    c.untouched = untouched
    c.export = export
    return c


def fid_at(c: Client, n: int, path: str, flags: int | None = None) -> int:
    """A fid naming path as a walk by an older server (or a saved state) might have left it."""
    c.server.fids[n] = ninep.Fid(path, flags)
    return n


@pytest.mark.parametrize("link", ["esc", "abs"])
def test_walk_stops_at_a_symlink(trap, link):
    c = trap
    body = c.ok(ninep.Twalk, struct.pack("<IIH", 0, 1, 2) + s(link) + s("secret"))
    assert struct.unpack_from("<H", body)[0] == 1 and 1 not in c.server.fids  # only the link itself
    qid_type = body[2]
    assert qid_type == ninep.QTSYMLINK
    assert c.err(ninep.Tgetattr, struct.pack("<IQ", fid_at(c, 5, f"{link}/secret"), 0x7FF)) == errno.ELOOP


def test_open_never_follows(trap):
    c = trap
    c.walk(0, 1, "f")
    assert c.err(ninep.Tlopen, struct.pack("<II", 1, os.O_RDONLY)) == errno.ELOOP
    assert c.err(ninep.Tlopen, struct.pack("<II", fid_at(c, 2, "esc/secret"), os.O_RDONLY)) == errno.ELOOP
    assert c.err(ninep.Tlopen, struct.pack("<II", fid_at(c, 3, "esc"), os.O_RDONLY | os.O_DIRECTORY)) in (
        errno.ELOOP, errno.ENOTDIR)
    # a fid a saved state reopens lazily goes the same way
    assert c.err(ninep.Tread, struct.pack("<IQI", fid_at(c, 4, "esc/secret", os.O_RDONLY), 0, 100)) == errno.ELOOP
    assert c.err(ninep.Treaddir, struct.pack("<IQI", fid_at(c, 6, "abs", os.O_RDONLY), 0, 4096)) in (
        errno.ELOOP, errno.ENOTDIR)
    c.untouched()


def test_lcreate_neither_through_a_symlinked_dir_nor_onto_a_dangling_link(trap):
    c = trap
    c.walk(0, 1, "esc")
    assert c.err(ninep.Tlcreate, struct.pack("<I", 1) + s("new") + struct.pack("<III", os.O_WRONLY, 0o644, 0)) in (
        errno.ELOOP, errno.ENOTDIR)
    assert c.err(ninep.Tlcreate, struct.pack("<I", fid_at(c, 2, "esc")) + s("new")
                 + struct.pack("<III", os.O_WRONLY, 0o644, 0)) in (errno.ELOOP, errno.ENOTDIR)
    c.walk(0, 3)
    assert c.err(ninep.Tlcreate, struct.pack("<I", 3) + s("dangling") + struct.pack("<III", os.O_WRONLY, 0o644, 0)) == errno.ELOOP
    c.untouched()


def test_setattr_on_a_symlink_never_reaches_its_target(trap):
    c = trap
    c.walk(0, 1, "f")
    sa = struct.Struct("<IIIIIQQQQQ")
    assert c.err(ninep.Tsetattr, sa.pack(1, ninep.SETATTR_MODE, 0o777, 0, 0, 0, 0, 0, 0, 0)) == errno.EOPNOTSUPP
    assert c.err(ninep.Tsetattr, sa.pack(1, ninep.SETATTR_SIZE, 0, 0, 0, 0, 0, 0, 0, 0)) == errno.EINVAL
    c.ok(ninep.Tsetattr, sa.pack(1, ninep.SETATTR_MTIME | ninep.SETATTR_MTIME_SET, 0, 0, 0, 0, 0, 0, 12345, 0))
    assert os.lstat(c.export / "f").st_mtime == 12345  # the link's own time
    assert os.stat(c.export / "f").st_mtime != 12345
    c.ok(ninep.Tsetattr, sa.pack(1, ninep.SETATTR_UID | ninep.SETATTR_GID, 0, 4321, 4321, 0, 0, 0, 0, 0))
    assert os.lstat(c.export / "f").st_uid == 4321 and os.stat(c.export / "f").st_uid == os.getuid()
    for path in ("esc/secret", "abs/secret"):
        fid = fid_at(c, 9, path)
        for valid in (ninep.SETATTR_MODE, ninep.SETATTR_SIZE, ninep.SETATTR_UID, ninep.SETATTR_MTIME):
            assert c.err(ninep.Tsetattr, sa.pack(fid, valid, 0o777, 4321, 4321, 0, 0, 0, 0, 0)) == errno.ELOOP
    # and an ordinary file still works
    c.walk(0, 2, "mine")
    c.ok(ninep.Tsetattr, sa.pack(2, ninep.SETATTR_MODE | ninep.SETATTR_SIZE, 0o600, 0, 0, 2, 0, 0, 0, 0))
    assert (c.export / "mine").read_text() == "mi" and (c.export / "mine").stat().st_mode & 0o777 == 0o600
    c.untouched()


def test_rename_link_unlink_stay_beneath_the_root(trap):
    c = trap
    c.walk(0, 1, "esc")
    c.walk(0, 2, "mine")
    assert c.err(ninep.Trename, struct.pack("<II", 2, 1) + s("moved")) in (errno.ELOOP, errno.ENOTDIR)
    assert c.err(ninep.Trenameat, struct.pack("<I", 0) + s("mine") + struct.pack("<I", 1) + s("moved")) in (
        errno.ELOOP, errno.ENOTDIR)
    assert c.err(ninep.Trenameat, struct.pack("<I", 1) + s("secret") + struct.pack("<I", 0) + s("stolen")) in (
        errno.ELOOP, errno.ENOTDIR)
    assert c.err(ninep.Trename, struct.pack("<II", fid_at(c, 3, "esc/secret"), 0) + s("stolen")) in (
        errno.ELOOP, errno.ENOTDIR)
    assert c.err(ninep.Tunlinkat, struct.pack("<I", 1) + s("secret") + struct.pack("<I", 0)) in (
        errno.ELOOP, errno.ENOTDIR)
    assert c.err(ninep.Tremove, struct.pack("<I", fid_at(c, 4, "esc/secret"))) in (errno.ELOOP, errno.ENOTDIR)
    assert c.err(ninep.Tlink, struct.pack("<II", 0, fid_at(c, 5, "esc/secret")) + s("hard")) in (
        errno.ELOOP, errno.ENOTDIR)
    assert c.err(ninep.Tlink, struct.pack("<II", 1, 2) + s("hard")) in (errno.ELOOP, errno.ENOTDIR)
    assert c.err(ninep.Tmkdir, struct.pack("<I", 1) + s("d") + struct.pack("<II", 0o755, 0)) in (
        errno.ELOOP, errno.ENOTDIR)
    assert c.err(ninep.Tmknod, struct.pack("<I", 1) + s("p") + struct.pack("<IIII", 0o10644, 0, 0, 0)) in (
        errno.ELOOP, errno.ENOTDIR)
    assert c.err(ninep.Tsymlink, struct.pack("<I", 1) + s("l") + s("x") + struct.pack("<I", 0)) in (
        errno.ELOOP, errno.ENOTDIR)
    c.untouched()
    assert not (c.export / "stolen").exists() and not (c.export / "hard").exists()
    # the links themselves are the guest's: rename, read and unlink them
    c.ok(ninep.Trenameat, struct.pack("<I", 0) + s("esc") + struct.pack("<I", 0) + s("esc2"))
    c.walk(0, 6, "esc2")
    assert c.ok(ninep.Treadlink, struct.pack("<I", 6))[2:] == b"../outside"
    c.ok(ninep.Tunlinkat, struct.pack("<I", 0) + s("esc2") + struct.pack("<I", 0))
    c.untouched()


def test_a_saved_state_cannot_name_paths_above_the_root(root):
    for bad in ("../outside.txt", "/etc/passwd", "a/../../outside.txt", "a//b", "a\0b", "x" * 5000):
        with pytest.raises(ValueError):
            ninep.Server(str(root), {"msize": 65536, "fids": {"1": {"path": bad, "flags": 0}}})
    with pytest.raises(ValueError):
        ninep.Server(str(root), {"msize": 1 << 30, "fids": {}})


def test_special_files_are_not_opened(root):
    """A FIFO opened by the server would block it (and with it DRAIN): refused without blocking."""
    c = Client(ninep.Server(str(root)))
    c.mount()
    c.ok(ninep.Tmknod, struct.pack("<I", 0) + s("p") + struct.pack("<IIII", 0o10644, 0, 0, 0))
    c.walk(0, 1, "p")
    assert c.err(ninep.Tlopen, struct.pack("<II", 1, os.O_RDONLY)) == errno.EOPNOTSUPP
    c.walk(0, 2)
    assert c.err(ninep.Tlcreate, struct.pack("<I", 2) + s("p") + struct.pack("<III", os.O_RDWR, 0o644, 0)) == errno.EOPNOTSUPP


def test_fid_table_is_bounded(root, monkeypatch):
    monkeypatch.setattr(ninep, "MAX_FIDS", 50)
    c = Client(ninep.Server(str(root)))
    c.mount()
    for n in range(1, 50):
        c.walk(0, n)
    assert c.err(ninep.Twalk, struct.pack("<IIH", 0, 50, 0)) == errno.ENFILE
    c.ok(ninep.Tclunk, struct.pack("<I", 1))
    c.walk(0, 50)


def test_readdir_keeps_nothing_between_calls(root):
    """The old server kept a stat snapshot of the whole directory per fid: 200 fids reading a
    large directory held them all. Now: pages straight from getdents64, offsets are its cookies."""
    import tracemalloc

    for i in range(3000):
        (root / f"file-with-a-longish-name-{i:04d}").touch()
    c = Client(ninep.Server(str(root)))
    c.mount()
    tracemalloc.start()
    try:
        for fid in range(1, 201):
            c.walk(0, fid)
            c.ok(ninep.Tlopen, struct.pack("<II", fid, os.O_RDONLY | os.O_DIRECTORY))
            c.ok(ninep.Treaddir, struct.pack("<IQI", fid, 0, 100))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"peak {peak >> 20} MiB"
    names, offset = [], 0
    while True:  # and the pages add up to the directory, each within its count
        body = c.ok(ninep.Treaddir, struct.pack("<IQI", 1, offset, 1000))
        n = struct.unpack_from("<I", body)[0]
        assert n <= 1000
        if n == 0:
            break
        r = ninep.Reader(body[4:4 + n])
        while r.pos < n:
            r.raw(13)
            offset = r.u64()
            r.u8()
            names.append(r.s())
    assert sorted(names) == sorted([".", ".."] + [f"file-with-a-longish-name-{i:04d}" for i in range(3000)])


def test_queue_while_drained_is_bounded(tmp_path, root, monkeypatch):
    """A guest flooding requests while the VM is being saved cannot grow the queue (or the state)."""
    monkeypatch.setattr(ninep, "MAX_QUEUED", 100)
    qemu, ask, t, errors = serve_thread(tmp_path, ninep.Server(str(root)))
    qemu.sendall(msg(ninep.Tversion, struct.pack("<I", 65536) + s("9P2000.L")))
    recv_reply(qemu)
    assert ask(b"DRAIN") == b"OK\n"
    clunk = msg(ninep.Tclunk, struct.pack("<I", 5))
    qemu.setblocking(False)
    sent = 0
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and sent < 20000 * len(clunk):
        try:
            sent += qemu.send(clunk * 1000)
        except BlockingIOError:
            time.sleep(0.01)
    state = json.loads(ask(b"STATE"))
    assert len(state["pending"]) <= 100 and len(state["partial"]) < 2 * ninep.RECV
    qemu.setblocking(True)
    assert ask(b"RESUME") == b"OK\n"
    qemu.settimeout(10)
    for _ in range(150):  # answered in order once resumed
        assert recv_reply(qemu)[4] == ninep.Rlerror
    qemu.close()
    t.join(10)
    assert not errors


def test_unread_replies_stop_reading_requests(tmp_path, root):
    """A guest that sends reads but never takes the replies cannot make the server buffer them all."""
    import tracemalloc

    (root / "big").write_bytes(os.urandom(1 << 20))
    qemu, ask, t, errors = serve_thread(tmp_path, ninep.Server(str(root)))
    c = [msg(ninep.Tversion, struct.pack("<I", 1 << 20) + s("9P2000.L")),
         msg(ninep.Tattach, struct.pack("<II", 0, ninep.NOFID) + s("u") + s("") + struct.pack("<I", 0)),
         msg(ninep.Twalk, struct.pack("<IIH", 0, 1, 1) + s("big")),
         msg(ninep.Tlopen, struct.pack("<II", 1, os.O_RDONLY))]
    for m in c:
        qemu.sendall(m)
        recv_reply(qemu)
    tracemalloc.start()
    try:
        qemu.sendall(msg(ninep.Tread, struct.pack("<IQI", 1, 0, 1 << 20)) * 100)  # 100 MiB of replies
        time.sleep(1.5)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < ninep.MAX_OUT + (16 << 20), f"peak {peak >> 20} MiB"
    for _ in range(100):
        assert len(recv_reply(qemu)) == 1 << 20  # msize: 11 bytes of header and msize - 11 of data
    qemu.close()
    t.join(10)
    assert not errors


def test_ask_reads_a_large_state_in_linear_time(tmp_path):
    """share._ask joined its answer quadratically: a 128 MiB partial message took 21 s."""
    from vmwrap import share

    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(tmp_path / share.CONTROL))
    srv.listen(1)
    payload = b"x" * share.STATE_MAX + b"\n"  # the largest answer taken

    def run():
        k, _ = srv.accept()
        k.recv(64)
        view = memoryview(payload)
        for i in range(0, len(payload), 1 << 16):
            k.sendall(view[i:i + (1 << 16)])
        k.close()

    th = threading.Thread(target=run, daemon=True)
    th.start()
    t0 = time.monotonic()
    out = share._ask(tmp_path, "STATE", timeout=30)
    assert len(out) == len(payload)
    assert time.monotonic() - t0 < 4



def _control_server(run_dir, answer):
    """A stand-in for a hostile job's 9P server on run_dir's control socket: answer(conn) talks."""
    from vmwrap import share

    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(run_dir / share.CONTROL))
    srv.listen(1)

    def run():
        k, _ = srv.accept()
        try:
            k.recv(64)
            answer(k)
        except OSError:
            pass  # root gave up on it
        finally:
            k.close()
            srv.close()
    threading.Thread(target=run, daemon=True).start()


def test_ask_gives_a_dribbling_server_one_deadline_not_one_per_read(tmp_path):
    """The server runs as the job's user: one byte every 0.3 s kept a per-read timeout of 1 s (10 s in
    real use) waiting forever. The whole answer has one deadline."""
    from vmwrap import share
    from vmwrap.errors import NodeError

    def dribble(k):
        for _ in range(15):  # 4.5 s (forever, for a real attacker)
            time.sleep(0.3)
            k.sendall(b"{")
    _control_server(tmp_path, dribble)
    t0 = time.monotonic()
    with pytest.raises(NodeError, match=r"did not answer STATE within 1 s"):
        share._ask(tmp_path, "STATE", timeout=1)
    assert time.monotonic() - t0 < 2


def test_ask_refuses_an_answer_a_checkpoint_could_not_restore(tmp_path):
    """The answer is capped at what a restore reads back (checkpoint.SHARE_MAX), not 4 times more."""
    from vmwrap import checkpoint, share
    from vmwrap.errors import NodeError

    assert checkpoint.SHARE_MAX == share.STATE_MAX
    chunk = b"x" * (1 << 20)

    def flood(k):
        for _ in range((share.STATE_MAX >> 20) + 8):
            k.sendall(chunk)
        k.sendall(b"\n")
    _control_server(tmp_path, flood)
    with pytest.raises(NodeError, match=f"answered STATE with over {share.STATE_MAX} bytes"):
        share._ask(tmp_path, "STATE", timeout=30)


def test_state_is_refused_if_its_checkpoint_copy_would_be_too_large(tmp_path):
    """share.json is json.dumps of the state: a server's compact JSON (no spaces, raw UTF-8) can grow by
    that; what a restore could not read back is refused at the save."""
    from vmwrap import share
    from vmwrap.errors import NodeError

    body = b'{"a":[' + b"0," * ((share.STATE_MAX - 100) // 2) + b'0]}\n'  # ", " doubles it
    assert len(body) <= share.STATE_MAX + 1
    _control_server(tmp_path, lambda k: k.sendall(body))
    with pytest.raises(NodeError, match="returned a state of over"):
        share.state(tmp_path)
    for bad in (b"[1, 2]\n", b"[" * 100000 + b"\n"):
        (tmp_path / share.CONTROL).unlink()
        _control_server(tmp_path, lambda k, bad=bad: k.sendall(bad))
        with pytest.raises(NodeError, match="returned no state"):
            share.state(tmp_path)



def test_share_stop_kills_only_the_server_it_started(tmp_path):
    """9p.pid names a process by pid, start time and the job's uid: after pid reuse the same pid may be
    another job's server (the same command line), which stop() must leave alone."""
    import subprocess
    import sys
    from pathlib import Path

    from vmwrap import procs, share

    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "vmwrap.ninep"])
    for _ in range(500):  # just after exec, /proc may show an empty command line for a moment
        if b"vmwrap.ninep" in Path(f"/proc/{p.pid}/cmdline").read_bytes():
            break
        time.sleep(0.01)
    pidfile = tmp_path / share.PIDFILE
    try:
        start, uid = procs.start_time(p.pid), os.geteuid()
        for text in (f"{p.pid}", f"{p.pid} {start - 1} {uid}", f"{p.pid} {start} 1234", "x", f"{p.pid} {start}"):
            pidfile.write_text(text)
            share.stop(tmp_path)
            assert not pidfile.exists()
            time.sleep(0.05)
            assert p.poll() is None, text
        pidfile.write_text(f"{p.pid} {start} {uid}\n")
        share.stop(tmp_path)
        assert not os.path.exists(f"/proc/{p.pid}") and not pidfile.exists()
    finally:
        p.kill()
        p.wait()


FUZZ_SECONDS = float(os.environ.get("VMWRAP_FUZZ_SECONDS", "12"))


def valid_corpus() -> list[bytes]:
    """One well-formed request of every type, on fids the fuzz set-up creates."""
    sa = struct.Struct("<IIIIIQQQQQ")
    return [
        msg(ninep.Tversion, struct.pack("<I", 65536) + s("9P2000.L")),
        msg(ninep.Tattach, struct.pack("<II", 0, ninep.NOFID) + s("u") + s("") + struct.pack("<I", 0)),
        msg(ninep.Twalk, struct.pack("<IIH", 0, 3, 2) + s("d") + s("g")),
        msg(ninep.Twalk, struct.pack("<IIH", 0, 4, 2) + s("esc") + s("secret")),
        msg(ninep.Tlopen, struct.pack("<II", 2, os.O_RDWR)),
        msg(ninep.Tlcreate, struct.pack("<I", 3) + s("n") + struct.pack("<III", os.O_RDWR, 0o644, 0)),
        msg(ninep.Tread, struct.pack("<IQI", 1, 0, 4096)),
        msg(ninep.Twrite, struct.pack("<IQI", 1, 3, 5) + b"hello"),
        msg(ninep.Tclunk, struct.pack("<I", 3)),
        msg(ninep.Tremove, struct.pack("<I", 3)),
        msg(ninep.Tstatfs, struct.pack("<I", 0)),
        msg(ninep.Tgetattr, struct.pack("<IQ", 2, 0x7FF)),
        msg(ninep.Tsetattr, sa.pack(2, 0x1FF, 0o644, 0, 0, 10, 1, 2, 3, 4)),
        msg(ninep.Treaddir, struct.pack("<IQI", 5, 0, 4096)),
        msg(ninep.Tfsync, struct.pack("<II", 1, 0)),
        msg(ninep.Tlock, struct.pack("<IBIQQI", 1, 0, 0, 0, 0, 1) + s("c")),
        msg(ninep.Tgetlock, struct.pack("<IBQQI", 1, 0, 0, 0, 1) + s("c")),
        msg(ninep.Tsymlink, struct.pack("<I", 0) + s("l") + s("../outside") + struct.pack("<I", 0)),
        msg(ninep.Tmknod, struct.pack("<I", 0) + s("p") + struct.pack("<IIII", 0o10644, 0, 0, 0)),
        msg(ninep.Trename, struct.pack("<II", 2, 0) + s("r")),
        msg(ninep.Treadlink, struct.pack("<I", 4)),
        msg(ninep.Tlink, struct.pack("<II", 0, 2) + s("h")),
        msg(ninep.Tmkdir, struct.pack("<I", 0) + s("m") + struct.pack("<II", 0o755, 0)),
        msg(ninep.Trenameat, struct.pack("<I", 0) + s("f") + struct.pack("<I", 0) + s("f2")),
        msg(ninep.Tunlinkat, struct.pack("<I", 0) + s("m") + struct.pack("<I", 0x200)),
        msg(ninep.Tflush, struct.pack("<H", 1)),
        msg(ninep.Txattrwalk, struct.pack("<II", 0, 6) + s("user.x")),
    ]


def mutate(rng, corpus: list[bytes], max_len: int) -> bytes:
    kind = rng.randrange(6)
    if kind == 0:  # random bytes, framed
        body = rng.randbytes(rng.randrange(0, 64))
        return struct.pack("<IBH", 7 + len(body), rng.randrange(256), rng.randrange(65536)) + body
    m = bytearray(rng.choice(corpus))
    if kind == 1:  # flip bits
        for _ in range(rng.randrange(1, 6)):
            i = rng.randrange(4, len(m))
            m[i] ^= 1 << rng.randrange(8)
    elif kind == 2:  # truncate
        del m[rng.randrange(7, len(m) + 1):]
    elif kind == 3:  # extend
        m += rng.randbytes(rng.randrange(1, 40))
    elif kind == 4:  # overwrite a field with an extreme value
        i = rng.randrange(7, max(8, len(m) - 1))
        w = rng.choice([1, 2, 4, 8])
        m[i:i + w] = rng.choice([b"\xff", b"\x00", b"\x7f", b"\x80"]) * w
    else:  # another type's body
        m[4] = rng.choice(list(ninep.Server.OPS) + [0, 1, 255])
    m = m[:max_len]
    m[:4] = struct.pack("<I", len(m))
    return bytes(m)


def fuzz_tree(base) -> None:
    base.mkdir()
    (base / "d").mkdir()
    (base / "d" / "g").write_text("g")
    (base / "f").write_text("f")
    os.symlink("../outside", base / "esc")


def fuzz_setup(c: Client) -> None:
    """Fids the corpus uses: 0 root, 1 open file d/g, 2 file f, 4 esc, 5 open dir d."""
    import shutil

    root = c.server.root
    os.chmod(root, 0o755)
    for p, is_dir in (("d", True), ("d/g", False), ("f", False)):  # by lstat: the fuzz makes symlinks too
        fp = os.path.join(root, p)
        try:
            mode = os.lstat(fp).st_mode
        except FileNotFoundError:
            mode = 0
        if mode and (stat.S_ISDIR(mode) != is_dir or stat.S_ISLNK(mode) or not (stat.S_ISDIR(mode) or stat.S_ISREG(mode))):
            shutil.rmtree(fp) if stat.S_ISDIR(mode) else os.unlink(fp)
            mode = 0
        if not mode:
            if is_dir:
                os.mkdir(fp)
            else:
                with open(fp, "w") as f:
                    f.write("x")
        os.chmod(fp, 0o755 if is_dir else 0o644)
    c.mount()
    c.walk(0, 1, "d", "g")
    c.ok(ninep.Tlopen, struct.pack("<II", 1, os.O_RDWR))
    c.walk(0, 2, "f")
    c.walk(0, 5, "d")
    c.ok(ninep.Tlopen, struct.pack("<II", 5, os.O_RDONLY | os.O_DIRECTORY))


def outside_snapshot(tmp_path) -> dict:
    return {str(p): (p.read_bytes(), p.stat().st_mode, p.stat().st_uid) for p in (tmp_path / "outside").rglob("*")}


def test_fuzz_handle(tmp_path):
    """Random, truncated, mutated-valid and oversized requests: every one answered, nothing escapes
    the root, memory stays bounded, and valid requests keep working."""
    import random
    import tracemalloc

    rng = random.Random(int(os.environ.get("VMWRAP_FUZZ_SEED", "1")))
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_text("host secret")
    before = outside_snapshot(tmp_path)
    fuzz_tree(tmp_path / "export")
    server = ninep.Server(str(tmp_path / "export"))
    c = Client(server)
    fuzz_setup(c)
    corpus = valid_corpus()
    tracemalloc.start()
    deadline, n = time.monotonic() + FUZZ_SECONDS * 0.6, 0
    try:
        while time.monotonic() < deadline and n < 300000:
            n += 1
            m = mutate(rng, corpus, 8192)
            if n % 97 == 0:  # a size field claiming 4 GiB
                m = b"\xff\xff\xff\xff" + m[4:]
            reply = server.handle(m)
            size, rtype, tag = struct.unpack_from("<IBH", reply)
            assert size == len(reply) <= server.msize
            assert rtype == ninep.Rlerror or (rtype == m[4] + 1 and tag == struct.unpack_from("<H", m, 5)[0])
            if n % 500 == 0:
                fuzz_setup(c)  # the fuzz may have clunked, moved or chmodded: a fresh mount must work
                assert c.read(1, 0, 1) and c.write(1, 0, b"y") == 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n > 1000
    assert peak < 32 << 20, f"peak {peak >> 20} MiB"
    fuzz_setup(c)
    assert c.write(1, 0, b"ok") == 2 and c.read(1, 0, 2) == b"ok"
    assert outside_snapshot(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "outside"]
    server.close()


def test_fuzz_socket(tmp_path):
    """The same through serve(): framed garbage is answered one reply per request, in order; then a
    valid mount still works; a 4 GiB header ends the connection without an exception."""
    import random

    rng = random.Random(int(os.environ.get("VMWRAP_FUZZ_SEED", "2")))
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_text("host secret")
    before = outside_snapshot(tmp_path)
    fuzz_tree(tmp_path / "export")
    server = ninep.Server(str(tmp_path / "export"))
    fuzz_setup(Client(server))
    qemu, ask, t, errors = serve_thread(tmp_path, server)
    corpus = valid_corpus()
    deadline, n = time.monotonic() + FUZZ_SECONDS * 0.4, 0
    while time.monotonic() < deadline and n < 100000:
        batch = [mutate(rng, corpus, 4096) for _ in range(rng.randrange(1, 50))]
        qemu.sendall(b"".join(batch))
        for m in batch:
            reply = recv_reply(qemu)
            assert reply[4] == ninep.Rlerror or reply[4] == m[4] + 1
            assert struct.unpack_from("<H", reply, 5)[0] == struct.unpack_from("<H", m, 5)[0]
        n += len(batch)
        if rng.random() < 0.05:  # a drain / resume cycle in between
            assert ask(b"DRAIN") in (b"OK\n", b"BUSY\n")
            assert ask(b"RESUME") == b"OK\n"
    assert n > 500
    for m in (msg(ninep.Tversion, struct.pack("<I", 65536) + s("9P2000.L")),
              msg(ninep.Tattach, struct.pack("<II", 0, ninep.NOFID) + s("u") + s("") + struct.pack("<I", 0)),
              msg(ninep.Tgetattr, struct.pack("<IQ", 0, 0x7FF))):
        qemu.sendall(m)
        assert recv_reply(qemu)[4] == m[4] + 1
    qemu.sendall(b"\xff\xff\xff\xff" + b"\0" * 100)
    assert closed(qemu)
    t.join(10)
    assert not t.is_alive() and not errors
    assert outside_snapshot(tmp_path) == before


@pytest.mark.skipif(os.geteuid() != 0, reason="starts the server as another user")
def test_share_start_keeps_log_and_state_private_and_python_isolated(tmp_path):
    """share-state.json (queued writes: the job's data) and 9p.log: 0600, the job's user's; the
    server's Python ignores PYTHON* variables and user site dirs (-I)."""
    import tempfile

    from vmwrap import share
    from vmwrap.job import Job

    run_dir = tempfile.mkdtemp(prefix="vmwrap-test-9p-", dir="/var/tmp")
    work = tempfile.mkdtemp(prefix="vmwrap-test-9p-work-", dir="/var/tmp")
    try:
        from pathlib import Path

        run, uid = Path(run_dir), 65534
        os.chmod(run, 0o711)
        os.chown(work, uid, uid)
        sf = run / "share-state.json"
        sf.write_text(json.dumps({"msize": 65536, "fids": {"3": {"path": "", "flags": None}}, "pending": []}))
        os.chmod(sf, 0o644)
        job = Job("9p1", "test", "nobody", uid, uid, work, "")
        pid = share.start(run, job, sf)
        try:
            for f in (sf, run / share.LOG):
                st = os.stat(f)
                assert (st.st_mode & 0o777, st.st_uid) == (0o600, uid), f
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            assert cmdline[1] == b"-I"
            qemu = socket.socket(socket.AF_UNIX)
            qemu.connect(str(run / share.SOCKET))
            qemu.settimeout(10)
            qemu.sendall(msg(ninep.Tgetattr, struct.pack("<IQ", 3, 0x7FF)))  # the restored fid
            assert recv_reply(qemu)[4] == ninep.Tgetattr + 1
        finally:
            share.stop(run)
        assert not os.path.exists(f"/proc/{pid}")  # the recorded server itself was killed
        qemu.close()
    finally:
        import shutil

        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


RELAY_CHILD = r"""
import hashlib, socket, struct, sys
s = socket.socket(fileno=3)
s.sendall(struct.pack("<IBH", 7 + 100000, 118, 1) + bytes(range(256)) * 390 + b"x" * 160)
first = s.recv(4 << 20)
data = first
while len(data) < 7 + 60000 + 7:
    data += s.recv(4 << 20)
print(len(first), len(data), hashlib.sha256(data).hexdigest(), flush=True)
"""


def test_relay_hands_the_9p_client_whole_messages_intact(tmp_path):
    """The guest relay (vmwrap-relay.c), built and run here on a pseudo-terminal standing in for the
    virtio-serial port: a 100 kB request reaches the host intact, and a reply the host delivers in
    small pieces (as QEMU does, 4 KiB per turn) reaches the 9p client as one whole message."""
    import hashlib
    import pty
    import subprocess
    import sys
    import tty
    from importlib import resources

    src = resources.files("vmwrap") / "templates" / "guest" / "vmwrap-relay.c"
    relay = tmp_path / "relay"
    subprocess.run(["gcc", "-O2", "-o", str(relay), str(src)], check=True)
    master, slave = pty.openpty()
    tty.setraw(slave)
    p = subprocess.Popen([str(relay), os.ttyname(slave), sys.executable, "-c", RELAY_CHILD],
                         stdout=subprocess.PIPE, text=True)
    try:
        want = struct.pack("<IBH", 7 + 100000, 118, 1) + bytes(range(256)) * 390 + b"x" * 160
        got = b""
        while len(got) < len(want):
            got += os.read(master, 1 << 16)
        assert got == want
        reply = struct.pack("<IBH", 7 + 60000, 117, 1) + os.urandom(60000)
        second = struct.pack("<IBH", 7, 121, 2)
        for i in range(0, len(reply), 1024):  # dribbled: a relay passing pieces on would show here
            os.write(master, reply[i:i + 1024])
            time.sleep(0.002)
        os.write(master, second)
        first, total, digest = p.communicate(timeout=30)[0].split()
        assert int(first) in (len(reply), len(reply) + len(second))  # whole: one message, or both
        assert (int(total), digest) == (len(reply) + len(second), hashlib.sha256(reply + second).hexdigest())
    finally:
        p.kill()
        p.wait()
        os.close(master)
        os.close(slave)
    # The relay (the forked background half) ends by itself once the 9p side closed its socket.
    end = time.time() + 5
    while time.time() < end:
        left = [d for d in os.listdir("/proc") if d.isdigit() and _exe(d) == str(relay)]
        if not left:
            break
        time.sleep(0.1)
    for pid in left:
        os.kill(int(pid), 9)
    assert not left, "the relay kept running after its 9p client closed"


def _exe(pid: str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None
