"""`vmwrap shell JOBID [COMMAND]`: a shell (or one command) on a new terminal inside a running job's VM.

Why this shape: the VM's shell port (org.vmwrap.shell, a unix socket QEMU binds in the run dir, root's
0600) is opened only by the node agent (root), and only for the job's own user or root, whose uid the
kernel tells it (SO_PEERCRED, vmwrap/agent.py); the agent hands the connected socket over (SCM_RIGHTS)
and is out of the way. The guest end (templates/guest/vmwrap-shell.c) runs the shell as the job's user
in the job's root, work dir and environment. A VM has rundir.SHELL_PORTS ports, one session each at a
time (QEMU's socket takes one connection and queues the next behind it): the agent hands out a port
whose lock it could take (`shellN.lock` in the run dir, root's), with the lock, which the caller holds
as long as its session lasts (the kernel lets go of it when the caller dies). All taken: the agent
answers "busy" at once; a multi-node step's tasks then ask again, `vmwrap shell` gives up. (A VM of an
older vmwrap has the one port and no locks: its next sessions wait in QEMU's listen queue.)

Frames both ways: 1 type byte, 4-byte big-endian length, payload (at most FRAME_MAX). Host to guest:
O "ROWS COLS TERM tty|pipe[ split]" [NUL COMMAND] opens, D data, W "ROWS COLS" on a resize, E the end of stdin.
Guest to host: D output, e errors (split pipes only), X "STATUS" (the exit code, 128+N for signal N). The
guest is hostile: frames are bounded, garbage is dropped, and its bytes only reach the caller's own
terminal (as ssh's do).
"""

from __future__ import annotations

import array
import fcntl
import json
import os
import re
import select
import signal
import socket
import stat
import struct
import sys
import time
from pathlib import Path

from . import rundir
from .errors import BusyError, NodeError, NotReadyError, UserError

SOCKET = rundir.SHELL_SOCKET  # in the run dir: the guest's first shell port (QEMU binds it; root's 0600)
CHANNEL = "org.vmwrap.shell"  # its virtio port's name (domain.xml.j2); port i's is CHANNEL.i
READY_WAIT_S = 600.0    # how long a session waits for a starting VM to open its shell port
BUSY_POLL_MAX_S = 0.5   # a task waiting for a free shell port asks the agent at least this often
FRAME_MAX = 65536
HEADER = struct.Struct(">cI")
LOST = 255              # the VM went away before the shell said how it ended, or no session (as ssh's 255)
PENDING_MAX = 4 * FRAME_MAX  # caller's input the guest has not taken yet
_TERM = re.compile(r"^[A-Za-z0-9._+-]{1,63}$")


def port_path(settings, job_id: str, i: int = 0) -> Path:
    return rundir.path(settings, job_id) / rundir.shell_socket(i)


def channel(i: int) -> str:
    return CHANNEL if i == 0 else f"{CHANNEL}.{i}"


def connect_port(settings, job_id: str, opened: dict[str, bool] | None = None) -> tuple[socket.socket, int | None]:
    """The agent's side (root): a connection to a free shell port of the job's VM, and the port's lock
    (None for a VM of one port), which the session's caller must hold until it ends. `opened`: which
    ports the guest has open (domain.channel_states); a port it has not opened yet is skipped.
    UserError if the job has no port here, NotReadyError if the guest opened none yet, BusyError if
    other sessions hold them all (never wait on QEMU's queue)."""
    rd = rundir.path(settings, job_id)
    ports = []
    for i in range(rundir.SHELL_PORTS):
        p = rd / rundir.shell_socket(i)
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            continue
        if not stat.S_ISSOCK(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o077:
            raise NodeError(f"{p} is not root's own socket (mode {st.st_mode & 0o7777:o}, uid {st.st_uid}): not used")
        ports.append(i)
    if not ports:
        raise UserError(f"job {job_id}'s VM has no shell port on this node (started by an older vmwrap, "
                        "or not running here)")
    ready = [i for i in ports if (opened or {}).get(channel(i)) is not False]
    if not ready:
        raise NotReadyError(f"job {job_id}'s VM has not opened its shell port yet (it is still starting)")
    for i in ready:
        lock = _take(rd, i) if len(ports) > 1 else None
        if lock is False:
            continue
        try:
            return _connect(port_path(settings, job_id, i), job_id), lock
        except BusyError:
            if lock is None:
                raise
            os.close(lock)   # a session of an older agent (no lock) holds it
        except BaseException:
            if lock is not None:
                os.close(lock)
            raise
    raise BusyError(f"{len(ports)} sessions of job {job_id} are open (as many as its VM serves at once): "
                    "try again when one ends")


def _take(rd: Path, i: int) -> int | bool:
    """Port i's lock (a descriptor holding it), or False while another session holds it. The run dir is
    root's: nobody else can have put a link there. Read-only: the caller gets the descriptor, and must
    not be able to write into a file of root's (no quota would bound it)."""
    fd = os.open(rd / f"shell{i}.lock", os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    except BaseException:
        os.close(fd)
        raise
    return fd


def _connect(p: Path, job_id: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setblocking(False)  # QEMU's listen queue full (a session open, two more waiting): busy at once
    try:
        s.connect(str(p))
    except (BlockingIOError, TimeoutError):
        s.close()
        raise BusyError(f"another `vmwrap shell` session of job {job_id} is open: try again when it ends") from None
    except OSError as e:
        s.close()
        raise UserError(f"cannot reach job {job_id}'s VM: {os.strerror(e.errno) if e.errno else e}") from None
    s.setblocking(True)  # the descriptor's mode travels with it to the caller
    return s


def frame(kind: bytes, payload: bytes = b"") -> bytes:
    return HEADER.pack(kind, len(payload)) + payload


def frames(buf: bytearray):
    """Complete frames at the head of `buf` (consumed), as (type, payload); a bad length drops the buffer."""
    while len(buf) >= HEADER.size:
        kind, n = HEADER.unpack_from(buf)
        if n > FRAME_MAX:
            del buf[:]
            return
        if len(buf) < HEADER.size + n:
            return
        payload = bytes(buf[HEADER.size:HEADER.size + n])
        del buf[:HEADER.size + n]
        yield kind, payload


def open_request(rows: int, cols: int, term: str, command: str | None, tty: bool = True,
                 split: bool = False) -> bytes:
    """O: the terminal's size and TERM and "tty", or "pipe" when the caller has no terminal (the command
    then gets pipes: its bytes pass untouched and the end of stdin is an end of file); "pipe split":
    its errors apart, as e frames (a guest agent older than that ignores the word: one stream)."""
    if not _TERM.match(term):
        term = "dumb"
    body = f"{rows} {cols} {term} {'tty' if tty else 'pipe split' if split else 'pipe'}".encode()
    if command is not None:
        if "\0" in command:
            raise UserError("the command must not contain NUL bytes")
        body += b"\0" + command.encode()
    if len(body) > FRAME_MAX:
        raise UserError(f"the command is longer than {FRAME_MAX - 64} bytes")
    return frame(b"O", body)


class Port(socket.socket):
    """A connection to a VM's shell port, with the port's lock (the agent's `connect_port`): closing one
    lets go of the other, for the next session."""
    __slots__ = ("lock",)

    def close(self) -> None:
        try:
            super().close()
        finally:
            lock, self.lock = getattr(self, "lock", None), None
            if lock is not None:
                os.close(lock)


def request_port(settings, job_id: str, timeout: float = 5.0) -> Port:
    """Ask the node agent for a shell port of the job's VM (the caller's uid must own the job)."""
    from .agent import socket_path

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(socket_path(settings)))
            s.sendall(json.dumps({"op": "shell", "job": job_id}).encode() + b"\n")
            fds = array.array("i")
            msg, anc, _flags, _addr = s.recvmsg(4096, socket.CMSG_SPACE(fds.itemsize))
        except OSError as e:
            raise NodeError(f"vmwrap node agent unreachable at {socket_path(settings)}: {e}") from None
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
        try:
            reply = json.loads(msg.split(b"\n", 1)[0] or b"{}")
        except ValueError:
            reply = {}
        if not isinstance(reply, dict) or not reply.get("ok") or not fds:
            for fd in fds:
                os.close(fd)
            why = reply.get("error", "no answer") if isinstance(reply, dict) else "no answer"
            if isinstance(reply, dict) and reply.get("retry") is True:
                raise NotReadyError(str(why))
            if isinstance(reply, dict) and reply.get("busy") is True:
                raise BusyError(str(why))
            if "unknown operation" in str(why):
                why += " (the node agent predates `vmwrap shell`: restart it)"
            raise UserError(f"no shell in job {job_id}: {why}")
        for fd in fds[2:]:
            os.close(fd)
        port = Port(fileno=fds[0])
        port.lock = fds[1] if len(fds) > 1 else None
        return port


def ready_port(settings, job_id: str, waiting_note_s: float, ready_wait_s: float = READY_WAIT_S,
               wait_busy: bool = False) -> Port:
    """The shell port once the job's VM has opened it (the agent says when it has not yet: a VM still
    starting, a step that reached a node before its VM booted); UserError after `ready_wait_s`.
    `wait_busy`: while other sessions hold the ports, wait for them (as long as they last) instead of
    refusing (a step's tasks on one node, each a session of that node's VM). Asked again after
    0.1 s, then less and less often, up to every BUSY_POLL_MAX_S: each ask costs the node agent a
    thread and a libvirt call, and a step of many tasks per node has many of them waiting."""
    start = time.monotonic()
    noted = False
    busy_delay = 0.1
    while True:
        try:
            return request_port(settings, job_id)
        except BusyError:
            if not wait_busy:
                raise
            time.sleep(busy_delay)
            busy_delay = min(busy_delay * 1.5, BUSY_POLL_MAX_S)
        except NotReadyError as e:
            waited = time.monotonic() - start
            if waited >= ready_wait_s:
                raise UserError(f"{e} after {waited:.0f} s: giving up") from None
            if not noted and waited >= waiting_note_s:
                noted = True
                sys.stderr.write(f"vmwrap shell: waiting for job {job_id}'s VM to start\r\n")
            time.sleep(0.25)


def run(settings, job_id: str, command: str | None = None, stdin: int = 0, stdout: int = 1,
        waiting_note_s: float = 5.0, ready_wait_s: float = READY_WAIT_S, wait_busy: bool = False,
        stderr: int | None = None) -> int:
    """The session, relayed between this process's stdin/stdout and the VM; returns its exit status.
    `stderr`: without a terminal, the command's errors go there apart (else with its output)."""
    port = ready_port(settings, job_id, waiting_note_s, ready_wait_s, wait_busy)
    tty = os.isatty(stdin)
    rows, cols = 24, 80
    if tty:
        try:
            cols, rows = os.get_terminal_size(stdin)
        except OSError:
            pass
    port.sendall(open_request(rows, cols, os.environ.get("TERM", "dumb"), command, tty, split=stderr is not None))
    saved = None
    if tty:
        import termios
        import tty as ttymod

        saved = termios.tcgetattr(stdin)
        ttymod.setraw(stdin)
    resized = []
    old_winch = signal.signal(signal.SIGWINCH, lambda *_: resized.append(1)) if tty else None

    def ended(sig, _frame):
        raise SystemExit(128 + sig)  # through the finally below: the caller's terminal is restored
    old_ends = {sig: signal.signal(sig, ended) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        status = _relay(port, stdin, stdout, job_id, resized, waiting_note_s, stdout if stderr is None else stderr)
    except OSError:
        status = None  # the VM's end went away mid-write: as a closed session
    finally:
        if saved is not None:
            import termios

            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
        if old_winch is not None:
            signal.signal(signal.SIGWINCH, old_winch)
        for sig, handler in old_ends.items():
            signal.signal(sig, handler)
        port.close()
    if status is None:
        sys.stderr.write(f"vmwrap shell: job {job_id}'s VM closed the session (the job ended?)\n")
        return LOST
    return status


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            select.select([], [fd], [], 1.0)


def _relay(port: socket.socket, stdin: int, stdout: int, job_id: str, resized: list,
           waiting_note_s: float, stderr: int) -> int | None:
    """Frames until the guest says how the session ended (its status) or the port closes (None).
    Nothing blocks: what the guest has not taken yet waits here (stdin is not read while over
    PENDING_MAX), so its output is always read."""
    port.setblocking(False)
    buf, pending = bytearray(), bytearray()
    status, seen, start, reading = None, False, time.monotonic(), True
    while status is None:
        if resized:
            resized.clear()
            try:
                c, r = os.get_terminal_size(stdin)
                pending += frame(b"W", f"{r} {c}".encode())
            except OSError:
                pass
        rlist = [port] + ([stdin] if reading and len(pending) < PENDING_MAX else [])
        try:
            ready, writable, _ = select.select(rlist, [port] if pending else [], [], 0.5)
        except InterruptedError:
            continue
        if not seen and time.monotonic() - start > waiting_note_s:
            seen = True
            os.write(2, f"vmwrap shell: waiting for job {job_id}'s VM\r\n".encode())
        if writable:
            try:
                del pending[:port.send(pending)]
            except BlockingIOError:
                pass
        if stdin in ready:
            data = os.read(stdin, FRAME_MAX)
            if data:
                pending += frame(b"D", data)
            else:
                reading = False
                pending += frame(b"E")
        if port in ready:
            try:
                data = port.recv(1 << 16)
            except BlockingIOError:
                continue
            if not data:
                break
            seen = True
            buf += data
            for kind, payload in frames(buf):
                if kind == b"D":
                    _write_all(stdout, payload)
                elif kind == b"e":
                    _write_all(stderr, payload)
                elif kind == b"X":
                    try:
                        status = max(0, min(255, int(payload)))
                    except ValueError:
                        status = LOST
    return status
