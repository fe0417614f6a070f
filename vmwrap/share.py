"""The job's work dir share: start vmwrap's 9P server as the job's user, quiesce it before a save.

Root creates both sockets in the root-owned run dir and hands them over as file descriptors; the
server process then runs with the job's uid, gids and no umask. QEMU connects to `9p.sock` (the
guest's `trans=fd` mount); only root reaches `9p.ctl` (DRAIN, STATE) to take the server's state
into a checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

from .errors import NodeError
from .job import Job

SOCKET, CONTROL, PIDFILE, LOG = "9p.sock", "9p.ctl", "9p.pid", "9p.log"
ANSWER_MAX = 256 << 20  # the server's bounds keep its state far below this


def start(run_dir: Path, job: Job, state_file: Path | None = None) -> int:
    """Start the server for `job` (root only); returns its pid. QEMU must connect within 60 s."""
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
    (run_dir / PIDFILE).write_text(str(proc.pid))
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
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(run_dir / CONTROL))
        s.sendall(command.encode() + b"\n")
        chunks, size = [], 0  # a list joined once: the state can be tens of MiB
        while True:
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > ANSWER_MAX:
                raise NodeError(f"the work dir server of {run_dir.name} answered {command} with over {ANSWER_MAX} bytes")
            if chunk.endswith(b"\n"):
                break
        return b"".join(chunks)
    except OSError as e:
        raise NodeError(f"the work dir server of {run_dir.name} did not answer {command}: {e}") from None
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
        return json.loads(raw)
    except ValueError:
        raise NodeError(f"the work dir server of {run_dir.name} returned no state") from None


def stop(run_dir: Path) -> None:
    """Kill the server if it still runs (it exits by itself when QEMU goes)."""
    pidfile = run_dir / PIDFILE
    try:
        pid = int(pidfile.read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        pidfile.unlink(missing_ok=True)
        return
    if b"vmwrap.ninep" not in cmdline:  # gone long ago, the pid now belongs to someone else
        pidfile.unlink(missing_ok=True)
        return
    try:
        os.kill(pid, signal.SIGKILL)
        for _ in range(100):
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.01)
    except (ProcessLookupError, ChildProcessError):
        pass
    pidfile.unlink(missing_ok=True)
