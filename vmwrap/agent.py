"""Node agent (root): lets a job's own user pause and resume that job's VM, nothing else.

Batch steps (Slurm), suspend methods (Grid Engine) and wrappers run as the job's user, who must not get
libvirt access (that is root on the node). They ask this agent over a Unix socket; the caller's uid
comes from the kernel (SO_PEERCRED) and must own the job (or be root).
Protocol: one JSON line {"op": "pause"|"resume", "job": ID} -> one JSON line {"ok": bool, "error": str}.
"""

from __future__ import annotations

import json
import os
import socket
import socketserver
import struct
from pathlib import Path

from . import domain, safeio
from .config import Settings
from .errors import NodeError, UserError
from .job import Job
from .ledger import Ledger

OPS = ("pause", "resume")


def socket_path(settings: Settings) -> Path:
    return Path(settings.state_dir) / "agent.sock"


def _owner(settings: Settings, job_id: str) -> int:
    Job(job_id=job_id, scheduler="none", user="x", uid=0, gid=0, work_dir="/", script="")  # validates the id
    try:
        return int((safeio.read_capped(settings.jobs_dir / job_id / "ctl" / "ids", 4096) or b"").split()[0])
    except (OSError, ValueError, IndexError):
        raise UserError(f"no VM for job {job_id} on this node") from None


def handle(settings: Settings, conn, peer_uid: int, op: str, job_id: str) -> None:
    if op not in OPS:
        raise UserError(f"unknown operation {op!r}")
    owner = _owner(settings, job_id)
    if peer_uid not in (0, owner):
        raise UserError(f"uid {peer_uid} does not own job {job_id}")
    dom = domain.lookup(conn, f"vmwrap-{job_id}")
    if dom is None:
        raise UserError(f"no VM for job {job_id} on this node")
    import libvirt

    try:
        domain.guarded(conn, f"vmwrap-{job_id}", op, dom.suspend if op == "pause" else dom.resume)
    except libvirt.libvirtError as e:
        raise NodeError(f"{op} failed: {e.get_error_message()}") from None
    Ledger(settings.ledger_path).record(job_id, f"vmwrap-{job_id}", "paused" if op == "pause" else "resumed",
                                        by_uid=peer_uid, via="agent")


def serve(settings: Settings) -> None:
    path = socket_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    conn = domain.connect(settings.libvirt_uri)

    class Handler(socketserver.StreamRequestHandler):
        def handle(self):
            creds = self.request.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            _pid, uid, _gid = struct.unpack("3i", creds)
            try:
                req = json.loads(self.rfile.readline(4096) or b"{}")
                handle(settings, conn, uid, str(req.get("op")), str(req.get("job")))
                reply = {"ok": True}
            except (UserError, NodeError, ValueError) as e:
                reply = {"ok": False, "error": str(e)}
            self.wfile.write(json.dumps(reply).encode() + b"\n")

    class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
        daemon_threads = True

    with Server(str(path), Handler) as srv:
        os.chmod(path, 0o666)  # anyone may ask; only a job's owner is obeyed
        srv.serve_forever()


def request(settings: Settings, op: str, job_id: str, timeout: float = 2.0) -> None:
    """Ask the node agent; raises NodeError if it is unreachable or refuses."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(socket_path(settings)))
            s.sendall(json.dumps({"op": op, "job": job_id}).encode() + b"\n")
            reply = json.loads(s.makefile("rb").readline() or b"{}")
    except (OSError, ValueError) as e:
        raise NodeError(f"vmwrap node agent unreachable at {socket_path(settings)}: {e}") from None
    if not reply.get("ok"):
        raise NodeError(f"vmwrap node agent refused {op}: {reply.get('error', 'no reason')}")
