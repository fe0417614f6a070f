"""Node agent (root): lets a job's own user pause and resume that job's VM, nothing else.

Batch steps (Slurm), suspend methods (Grid Engine) and wrappers run as the job's user, who must not get
libvirt access (that is root on the node). They ask this agent over a Unix socket; the caller's uid
comes from the kernel (SO_PEERCRED) and must own the job (or be root).
Protocol: one JSON line {"op": "pause"|"resume"|"checkpoint"|"shell", "job": ID} -> one JSON line {"ok":
bool, "error": str, "protocol": PROTOCOL} (pause and resume add "changed": false when the VM already was so,
which a request repeated after a lost answer finds; a periodic checkpoint, vmwrap/periodic.py, adds "saved" and
"pause_s" or "error"; "shell" sends a socket connected to a free shell port of the VM, and that port's
lock, with its reply, SCM_RIGHTS, vmwrap/shell.py; "retry": true instead while the guest has not opened its
ports, "busy": true while other sessions hold them all: ask again shortly); {"op": "ping", "job": ""}
(anyone) -> {"ok": true, "protocol": PROTOCOL}: health checks (`vmwrap status`), and a client newer than
the agent learns what it speaks.

The socket is open to every local user, so the agent bounds what any of them can hold: the request
line must arrive within REQUEST_TIMEOUT s in all (not per read) and within REQUEST_MAX bytes; at most
MAX_CLIENTS connections are served at once, MAX_CLIENTS_PER_UID of them one uid's, and more are
refused at once. Every malformed request gets {"ok": false, "error": ...}, never a traceback.
"""

from __future__ import annotations

import json
import os
import socket
import socketserver
import struct
import sys
import threading
import time
from pathlib import Path

from . import domain, rundir, safeio
from .config import Settings
from .errors import BusyError, NodeError, NotReadyError, UserError, VmwrapError
from .job import Job
from .ledger import Ledger

OPS = ("pause", "resume", "checkpoint", "shell", "peer")
PROTOCOL = 1  # raised when a request or reply changes meaning; keys are only ever added
REQUEST_MAX = 4096         # bytes of the one request line
REQUEST_TIMEOUT = 5.0      # s for the whole request line (and for sending the reply)
MAX_CLIENTS = 64           # connections served at once; more are refused at once ...
MAX_CLIENTS_PER_UID = 8    # ... and so are a uid's beyond these: one user cannot take every slot
FIELD_MAX = 128            # characters of "op" and "job" (a job id has at most 64)
USAGE = 'one JSON line {"op": "pause" or "resume", "job": "<job id>"}'


def socket_path(settings: Settings) -> Path:
    return Path(settings.state_dir) / "agent.sock"


def _owner(settings: Settings, job_id: str) -> int:
    Job(job_id=job_id, scheduler="none", user="x", uid=0, gid=0, work_dir="/", script="")  # validates the id
    try:
        return int((safeio.read_capped(rundir.ctl(rundir.path(settings, job_id)) / rundir.CTL_IDS, 4096) or b"").split()[0])
    except (OSError, ValueError, IndexError):
        raise UserError(f"no VM for job {job_id} on this node") from None


_peer_locks: dict[str, threading.Lock] = {}
_peer_locks_lock = threading.Lock()


def _peer(settings: Settings, peer_pid: int, peer_uid: int, job_id: str) -> dict:
    """Boot this node's VM of a job spanning nodes for the job's first task here, on schedulers that
    run no hook on a job's other nodes (Grid Engine's slave hosts): the adapter's `peer_job` checks that
    the caller is a task of the job its uid owns and says what the VM gets. Later tasks of the same
    run find it; a VM of an earlier run of the job (restarted on this node) goes first."""
    from . import adapter, lifecycle

    Job.check_id(job_id)
    sched = adapter.scheduler(settings.scheduler)
    peer_job = getattr(sched, "peer_job", None)
    if peer_job is None:
        raise UserError(f"{settings.scheduler} starts each node's VM of a job itself")
    found = peer_job(settings, peer_pid, peer_uid, job_id)   # checked on every call, first or not
    with _peer_locks_lock:   # a lock per job that passed the check (kept: a waiter must find the same one)
        lock = _peer_locks.setdefault(job_id, threading.Lock())
    with lock:
        try:
            still = found.running()
        except Exception:  # noqa: BLE001 - unsure is running
            still = True
        if not still:   # waited behind another run's start: this run is over, its task with it
            raise UserError(f"job {job_id} no longer runs this run on this node")
        run_dir = rundir.path(settings, job_id)
        if run_dir.exists():
            have = _peer_run(run_dir)
            if have == found.run:
                _ensure_watcher(settings, sched.name, job_id, found)   # the agent may have restarted
                return {"changed": False}
            if have is None:
                raise UserError(f"job {job_id}'s VM on this node was not started for its tasks")
            _end_peer(settings, sched.name, job_id)   # an earlier run's, never saved
        out = lifecycle.start(settings, job_id, lambda: found.job, sched.name)
        try:
            if out.verdict is not lifecycle.Verdict.RUN:
                raise UserError(f"job {job_id}'s VM on this node did not start: {out.reason}")
            fd = os.open(run_dir / PEER_RUN, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600)
            with os.fdopen(fd, "wb") as f:   # the run dir is root's (the job's user has only ctl/user)
                f.write(found.run.encode())
            _ensure_watcher(settings, sched.name, job_id, found)
        except BaseException:
            try:   # what the start left: no epilog comes
                _end_peer(settings, sched.name, job_id)
            except Exception as e:  # noqa: BLE001 - the reason that counts is the first
                print(f"vmwrap agent: job {job_id}'s VM on this node: {e}", file=sys.stderr)
            raise
        return {"changed": True}


_peer_watchers: dict[tuple[str, str], threading.Thread] = {}   # (job, run) -> its watcher


def _ensure_watcher(settings: Settings, scheduler: str, job_id: str, found) -> None:
    with _peer_locks_lock:
        t = _peer_watchers.get((job_id, found.run))
        if t is not None and t.is_alive():
            return
        t = threading.Thread(target=_watch_peer, args=(settings, scheduler, job_id, found.run, found.running),
                             name=f"vmwrap peer {job_id}", daemon=True)
        _peer_watchers[(job_id, found.run)] = t
    t.start()


PEER_RUN = "peer-run"   # in a peer VM's run dir (root's): which run of the job the agent booted it for
PEER_POLL = 2.0         # s between looks at whether a peer VM's job still runs on this node
PEER_END_TRIES = 10     # libvirt unreachable: tried again PEER_POLL * 15 s apart, then left to reconcile


def _peer_run(run_dir: Path) -> str | None:
    try:
        data = safeio.read_capped(run_dir / PEER_RUN, 256)
    except OSError:
        return None
    return None if data is None else data.decode("ascii", "replace")


def _end_peer(settings: Settings, scheduler: str, job_id: str) -> bool:
    from . import lifecycle

    out = lifecycle.end(settings, job_id, requeued=False, restarts=0, scheduler=scheduler)
    if out.verdict is lifecycle.Verdict.NODE_FAULT:
        print(f"vmwrap agent: job {job_id}'s VM on this node: {out.reason}", file=sys.stderr)
        return False
    return True


def _watch_peer(settings: Settings, scheduler: str, job_id: str, run: str, running, poll: float = PEER_POLL) -> None:
    """No epilog runs on such a node: once the scheduler no longer runs this run of the job here, its
    VM is torn down as an epilog would (never saved: such jobs are refused a checkpoint), unless
    another run's VM has taken its place. Should the agent stop first, `vmwrap reconcile` removes it."""
    while True:
        try:
            if not running():
                break
        except Exception:  # noqa: BLE001 - unsure is running: a VM is never torn down on a failed look
            pass
        time.sleep(poll)
    with _peer_locks_lock:
        lock = _peer_locks.setdefault(job_id, threading.Lock())
    try:
        for _ in range(PEER_END_TRIES):
            with lock:
                if _peer_run(rundir.path(settings, job_id)) != run:
                    return   # gone already, or another run's VM now
                try:
                    if _end_peer(settings, scheduler, job_id):
                        return
                except Exception as e:  # noqa: BLE001 - the repair pass removes it later
                    print(f"vmwrap agent: job {job_id}'s VM on this node: {e}", file=sys.stderr)
                    return
            time.sleep(poll * 15)
    finally:
        with _peer_locks_lock:
            if _peer_watchers.get((job_id, run)) is threading.current_thread():
                del _peer_watchers[(job_id, run)]


def handle(settings: Settings, conn, peer_uid: int, op: str, job_id: str, peer_pid: int = 0) -> dict | None:
    if op not in OPS:
        raise UserError(f"unknown operation {op!r}")
    if op == "peer":
        return _peer(settings, peer_pid, peer_uid, job_id)
    owner = _owner(settings, job_id)
    if peer_uid not in (0, owner):
        raise UserError(f"uid {peer_uid} does not own job {job_id}")
    if op == "checkpoint":  # periodic checkpoints (vmwrap/periodic.py): {"saved": bool, ...}
        from . import periodic

        return periodic.handle(settings, conn, job_id, peer_uid)
    if op == "shell":  # the caller gets the connected port itself (Handler sends it); nothing else of root's
        from . import shell

        dom = domain.lookup(conn, rundir.vm_name(settings, job_id))
        port, lock = shell.connect_port(settings, job_id, domain.channel_states(dom) if dom is not None else None)
        try:
            Ledger(settings.ledger_path).record(job_id, rundir.vm_name(settings, job_id), "shell", by_uid=peer_uid,
                                                via="agent")
        except BaseException:
            port.close()
            if lock is not None:
                os.close(lock)  # never a port left locked by nobody's session
            raise
        return {"_fd": port, "_lock": lock}
    name = rundir.vm_name(settings, job_id)
    dom = domain.lookup(conn, name)
    if dom is None:
        raise UserError(f"no VM for job {job_id} on this node")
    import libvirt

    try:
        changed = domain.set_paused(conn, name, dom, op == "pause")
    except libvirt.libvirtError as e:
        raise NodeError(f"{op} failed: {e.get_error_message()}") from None
    if changed:
        Ledger(settings.ledger_path).record(job_id, name, "paused" if op == "pause" else "resumed",
                                            by_uid=peer_uid, via="agent")
    return {"changed": changed}


def parse(line: bytes) -> tuple[str, str]:
    """(op, job id) of one request line; UserError saying what is wrong with anything else."""
    try:
        req = json.loads(line)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError; "[[[[..." recurses
        raise UserError(f"the request is not JSON: send {USAGE}") from None
    if not isinstance(req, dict):
        raise UserError(f"the request is a JSON {type(req).__name__}, not an object: send {USAGE}")
    op, job_id = req.get("op"), req.get("job")
    for key, v in (("op", op), ("job", job_id)):
        if not isinstance(v, str):
            raise UserError(f'the request\'s "{key}" must be a string: send {USAGE}')
        if len(v) > FIELD_MAX:
            raise UserError(f'the request\'s "{key}" is longer than {FIELD_MAX} characters')
    return op, job_id


def read_request(sock: socket.socket, timeout: float | None = None) -> bytes:
    """The request line (without its newline) from a client, which must send it within `timeout` s
    in all (REQUEST_TIMEOUT by default) and within REQUEST_MAX bytes; UserError otherwise."""
    timeout = REQUEST_TIMEOUT if timeout is None else timeout
    deadline = time.monotonic() + timeout
    buf = bytearray()
    while True:
        left = deadline - time.monotonic()
        try:
            if left <= 0:
                raise TimeoutError
            sock.settimeout(left)
            chunk = sock.recv(REQUEST_MAX + 1 - len(buf))
        except TimeoutError:
            raise UserError(f"no complete request within {timeout:g} s: send {USAGE}") from None
        if not chunk:
            return bytes(buf)  # the client closed: what it sent is the request
        buf += chunk
        end = buf.find(b"\n")
        if end >= 0:
            return bytes(buf[:end])
        if len(buf) > REQUEST_MAX:
            raise UserError(f"the request is longer than {REQUEST_MAX} bytes: send {USAGE}")


def _reply(sock: socket.socket, reply: dict, timeout: float, fds: tuple[int, ...] = ()) -> None:
    try:
        if timeout:
            sock.settimeout(timeout)
        else:
            sock.setblocking(False)  # a line fits the empty send buffer; never wait on the client
        line = json.dumps(reply).encode() + b"\n"
        if fds:  # the line and the descriptors in one message: the client reads them at once
            sent = sock.sendmsg([line], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))])
            line = line[sent:]
        sock.sendall(line)
    except OSError:
        pass  # the client went away (or reads nothing): its loss


def _peer_pid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("iII"))
    return struct.unpack("iII", creds)[0]


def _peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("iII"))
    return struct.unpack("iII", creds)[1]  # struct ucred: pid_t pid; uid_t uid; gid_t gid


class _Libvirt:
    """The agent's one libvirt connection, opened again when libvirtd restarted (a restart closes every
    client's connection; the agent outlives it, and the VMs do too)."""

    def __init__(self, uri: str):
        self.uri = uri
        self.lock = threading.Lock()
        self._conn = domain.connect(uri)

    def conn(self):
        with self.lock:
            try:   # a round trip: isAlive() still says 1 on a connection whose libvirtd went away
                self._conn.getLibVersion()
                alive = True
            except Exception:  # noqa: BLE001 (libvirtError: broken pipe, socket closed)
                alive = False
            if not alive:
                try:
                    self._conn.close()
                except Exception:  # noqa: BLE001 (already gone)
                    pass
                self._conn = domain.connect(self.uri)   # NodeError: this request fails, the agent goes on
            return self._conn


def serve(settings: Settings) -> None:
    path = socket_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    libvirt = _Libvirt(settings.libvirt_uri)

    class Handler(socketserver.BaseRequestHandler):
        def handle(self):
            uid = self.client_address  # Server.process_request hands over the caller's uid
            try:
                op, job_id = parse(read_request(self.request))
                pid = _peer_pid(self.request)
                extra = handle(settings, libvirt.conn(), uid, op, job_id, pid) if op != "ping" else None
                reply = {**(extra or {}), "ok": True, "protocol": PROTOCOL}
            except (VmwrapError, ValueError) as e:
                reply = {"ok": False, "error": str(e)}
                if isinstance(e, NotReadyError):
                    reply["retry"] = True
                elif isinstance(e, BusyError):
                    reply["busy"] = True
            except Exception as e:  # noqa: BLE001 (a bug or a libvirt surprise: this request fails, not the agent)
                print(f"vmwrap agent: request of uid {uid} failed: {e!r}", file=sys.stderr, flush=True)
                reply = {"ok": False, "error": f"the node agent failed: {e}"}
            port, lock = reply.pop("_fd", None), reply.pop("_lock", None)
            fds = () if port is None else (port.fileno(),) if lock is None else (port.fileno(), lock)
            try:
                _reply(self.request, reply, REQUEST_TIMEOUT, fds)
            finally:
                if port is not None:
                    port.close()  # the caller holds its own copies now (or, gone, let go of the lock)
                if lock is not None:
                    os.close(lock)

    class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
        daemon_threads = True
        block_on_close = False

        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.lock = threading.Lock()
            self.clients: dict[int, int] = {}  # uid -> connections being served

        def process_request(self, request, client_address):
            uid = _peer_uid(request)
            with self.lock:
                total, mine = sum(self.clients.values()), self.clients.get(uid, 0)
                busy = total >= MAX_CLIENTS or mine >= MAX_CLIENTS_PER_UID
                if not busy:
                    self.clients[uid] = mine + 1
            if busy:
                why = (f"uid {uid} already has {mine} requests open" if mine >= MAX_CLIENTS_PER_UID
                       else f"{total} requests are open")
                _reply(request, {"ok": False, "error": f"the node agent is busy ({why}): try again", "busy": True}, 0)
                self.shutdown_request(request)
                return
            try:
                super().process_request(request, uid)
            except BaseException:
                self._done(uid)
                raise

        def process_request_thread(self, request, uid):
            try:
                super().process_request_thread(request, uid)
            finally:
                self._done(uid)

        def _done(self, uid: int) -> None:
            with self.lock:
                self.clients[uid] -= 1
                if not self.clients[uid]:
                    del self.clients[uid]

    with Server(str(path), Handler) as srv:
        os.chmod(path, 0o666)  # anyone may ask; only a job's owner is obeyed
        srv.serve_forever()


class Busy(NodeError):
    """The agent refused for load (too many requests open, every shell port taken): ask again shortly."""


class Unanswered(NodeError):
    """The agent took the request and gave no answer (killed, restarted, too slow): it may have done it."""


def request(settings: Settings, op: str, job_id: str, timeout: float = 2.0) -> dict:
    """Ask the node agent (its reply); raises NodeError if it is unreachable or refuses, Unanswered if
    the request reached it but no answer came back."""
    sent = False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(socket_path(settings)))
            try:
                s.sendall(json.dumps({"op": op, "job": job_id}).encode() + b"\n")
                sent = True
            except (BrokenPipeError, ConnectionResetError):
                pass   # turned away at once (busy): its answer may be there to read all the same
            reply = json.loads(s.makefile("rb").readline() or b"null")
    except (OSError, ValueError) as e:
        if sent:
            raise Unanswered(f"vmwrap node agent at {socket_path(settings)} gave no answer to {op}: {e}") from None
        raise NodeError(f"vmwrap node agent unreachable at {socket_path(settings)}: {e}") from None
    if not isinstance(reply, dict):
        if not sent:
            raise NodeError(f"vmwrap node agent at {socket_path(settings)} hung up before taking {op}")
        raise Unanswered(f"vmwrap node agent at {socket_path(settings)} gave no answer to {op}")
    if not reply.get("ok"):
        refused = Busy if reply.get("busy") is True else NodeError
        raise refused(f"vmwrap node agent refused {op}: {reply.get('error', 'no reason')}")
    return reply


def ping(settings: Settings, timeout: float = 2.0) -> int:
    """The running agent's protocol version; NodeError if it does not answer."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(socket_path(settings)))
            s.sendall(b'{"op": "ping", "job": ""}\n')
            reply = json.loads(s.makefile("rb").readline(4096) or b"{}")
    except (OSError, ValueError) as e:
        raise NodeError(f"vmwrap node agent unreachable at {socket_path(settings)}: {e}") from None
    if not isinstance(reply, dict) or reply.get("ok") is not True:
        raise NodeError(f"vmwrap node agent at {socket_path(settings)} did not answer a ping")
    return int(reply.get("protocol", 0))
