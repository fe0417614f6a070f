"""The job's work dir share: start vmwrap's 9P server as the job's user, quiesce it before a save.

Root creates both sockets in the root-owned run dir and hands them over as file descriptors; the
server process then runs with the job's uid, gids and no umask. QEMU connects to `9p.sock` (the
guest's `trans=fd` mount); only root reaches `9p.ctl` (DRAIN, STATE) to take the server's state
into a checkpoint.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

from . import procs
from .errors import NodeError
from .job import Job

SOCKET, CONTROL, PIDFILE, LOG = "9p.sock", "9p.ctl", "9p.pid", "9p.log"
# The server's state as JSON (fid table plus queued requests, each up to 512 KiB in base64): its own
# bounds keep it far below this. A checkpoint stores it as share.json, and a restore reads no more.
STATE_MAX = 64 << 20


def start(run_dir: Path, job: Job, state_file: Path | None = None) -> int:
    """Start the server for `job` (root only); returns its pid. QEMU must connect within ninep.ACCEPT_TIMEOUT."""
    stop(run_dir)
    socks = []
    for name in (SOCKET, CONTROL):
        p = run_dir / name
        p.unlink(missing_ok=True)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(p))
        os.chmod(p, 0o600)
        s.listen(4)
        socks.append(s)
    # The log and the state hold the job's data (trace lines, queued writes): root and the job's user only.
    log = _private(run_dir / LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, job)
    pkg = str(Path(__file__).resolve().parent.parent)
    # -I: no PYTHON* variables, no user site, no cwd on sys.path; the package dir comes from argv only.
    argv = [sys.executable, "-I", "-c", "import sys; sys.path.insert(0, sys.argv.pop(1)); "
            "from vmwrap.ninep import main; sys.exit(main())", pkg, "--root", job.work_dir,
            "--listen-fd", str(socks[0].fileno()), "--control-fd", str(socks[1].fileno())]
    if state_file is not None:
        os.close(_private(state_file, os.O_RDONLY, job))  # the server reads it as the job's user
        argv += ["--state", str(state_file)]
    env = {"PATH": "/usr/bin:/bin"}
    if os.environ.get("VMWRAP_9P_TRACE"):
        env["VMWRAP_9P_TRACE"] = "1"
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd="/", env=env,
                                pass_fds=[s.fileno() for s in socks], start_new_session=True,
                                user=job.uid, group=job.gid, extra_groups=list(job.groups))
    except OSError as e:
        raise NodeError(f"cannot start the work dir server for job {job.job_id}: {e}") from None
    finally:
        for s in socks:
            s.close()
        os.close(log)
    try:
        procs.record(run_dir / PIDFILE, proc.pid, job.uid)
    except (OSError, NodeError) as e:
        proc.kill()
        proc.wait()
        raise NodeError(f"cannot record the work dir server of job {job.job_id}: {e}") from None
    return proc.pid


def _private(path: Path, flags: int, job: Job) -> int:
    """Open path (never through a symlink) as a 0600 file of the job's user; returns the fd."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise NodeError(f"cannot open {path} for the work dir server: {e}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NodeError(f"{path} is not a regular file")
        os.fchown(fd, job.uid, job.gid)
        os.fchmod(fd, 0o600)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _ask(run_dir: Path, command: str, timeout: float = 10.0) -> bytes:
    """Send `command` to the server's control socket; its answer, up to the first newline.

    The server runs as the job's user, so it may answer slowly, never, or too much: `timeout` bounds
    the whole exchange (not each read) and the answer is at most STATE_MAX bytes plus its newline.
    NodeError otherwise (callers save a checkpoint: the job's save fails, the node is not drained)."""
    deadline = time.monotonic() + timeout
    where = f"the work dir server of {run_dir.name}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

    def left() -> float:
        t = deadline - time.monotonic()
        if t <= 0:
            raise NodeError(f"{where} did not answer {command} within {timeout:g} s")
        return t
    try:
        s.settimeout(left())
        s.connect(str(run_dir / CONTROL))
        s.settimeout(left())
        s.sendall(command.encode() + b"\n")
        chunks, size = [], 0  # a list joined once: the state can be tens of MiB
        while True:
            s.settimeout(left())
            chunk = s.recv(min(1 << 20, STATE_MAX + 2 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > STATE_MAX + 1:
                raise NodeError(f"{where} answered {command} with over {STATE_MAX} bytes")
            if chunk.endswith(b"\n"):
                break
        return b"".join(chunks)
    except TimeoutError:
        raise NodeError(f"{where} did not answer {command} within {timeout:g} s") from None
    except OSError as e:
        raise NodeError(f"{where} did not answer {command}: {e}") from None
    finally:
        s.close()


def drain(run_dir: Path) -> None:
    """Stop answering the guest and wait until QEMU took every reply (call before pausing the VM)."""
    if _ask(run_dir, "DRAIN").strip() != b"OK":
        raise NodeError(f"the work dir server of {run_dir.name} could not flush its replies to QEMU")


def resume(run_dir: Path) -> None:
    """Undo drain() when the save did not happen."""
    _ask(run_dir, "RESUME")


def state(run_dir: Path) -> dict:
    """The server's fid table and queued requests (after drain() and the VM is paused)."""
    raw = _ask(run_dir, "STATE", timeout=30.0)
    try:
        st = json.loads(raw)
    except (ValueError, RecursionError):
        raise NodeError(f"the work dir server of {run_dir.name} returned no state") from None
    if not isinstance(st, dict):
        raise NodeError(f"the work dir server of {run_dir.name} returned no state")
    if len(json.dumps(st).encode()) > STATE_MAX:  # as the checkpoint will store it: a restore reads no more
        raise NodeError(f"the work dir server of {run_dir.name} returned a state of over {STATE_MAX} bytes")
    return st


def stop(run_dir: Path) -> None:
    """Kill the server if it still runs (it exits by itself when QEMU goes). Only the process the
    pidfile recorded is killed, with its start time and the job's uid (procs.kill): after pid reuse
    that pid may be another job's server. A pidfile of an older vmwrap (a bare pid) is only removed."""
    procs.kill(run_dir / PIDFILE)
