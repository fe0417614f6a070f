"""Pidfiles root can act on safely after pid reuse: the pid, the process's start time and its uid.

Root stops its helper processes (the 9P work dir server, the disk limit watcher) by the pid it wrote
when it started them. By then that process may be gone and its pid taken by another job's helper,
with the same command line. So a pidfile holds one line `<pid> <start time> <uid>`: the start time
(field 22 of /proc/<pid>/stat, in clock ticks since boot) names one process for the node's uptime,
and root signals it only while /proc still shows that very start time and uid, through a pidfd.

A pidfile in any other form (the bare pid older vmwrap versions wrote) cannot be verified: kill()
then leaves the process alone and only removes the file. Those helpers exit by themselves once the
VM's QEMU is gone, so nothing is left running for long.
"""

from __future__ import annotations

import os
import select
import signal
from pathlib import Path

from . import safeio
from .errors import NodeError

LINE_MAX = 64          # "<pid> <start> <uid>\n": three integers
STAT_MAX = 4096        # /proc/<pid>/stat: a 16-byte comm and 50 numbers
STATUS_MAX = 1 << 16   # /proc/<pid>/status (Uid: is near its top)


def start_time(pid: int) -> int | None:
    """The start time of process `pid` (clock ticks after boot), or None if there is no such process.

    The name (field 2, in parentheses) is the process's own choice and may hold ')' and spaces: the
    fields are counted from after its last ')'."""
    raw = safeio.read_proc(f"/proc/{int(pid)}/stat", STAT_MAX)
    if not raw:
        return None
    fields = raw[raw.rfind(b")") + 1:].split()
    try:
        return int(fields[19])  # field 22; fields[0] is field 3 (the state)
    except (IndexError, ValueError):
        return None


def uids(pid: int) -> tuple[int, ...] | None:
    """Real, effective, saved and file-system uid of process `pid`, or None."""
    raw = safeio.read_proc(f"/proc/{int(pid)}/status", STATUS_MAX)
    for line in (raw or b"").splitlines():
        if line.startswith(b"Uid:"):
            try:
                return tuple(int(x) for x in line.split()[1:])
            except ValueError:
                return None
    return None


def record(pidfile: Path, pid: int, uid: int) -> None:
    """Write the pidfile of `pid`, which must run (or come to run) as `uid`.

    Call it while `pid` is the caller's child that it has not reaped (a Popen it just made): its pid
    cannot have been reused yet, so the start time read here is that child's."""
    start = start_time(pid)
    if start is None:
        raise NodeError(f"cannot read the start time of process {pid} from /proc")
    tmp = pidfile.with_name(f".{pidfile.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, f"{int(pid)} {start} {int(uid)}\n".encode())
    finally:
        os.close(fd)
    os.replace(tmp, pidfile)


def read(pidfile: Path) -> tuple[int, int, int] | None:
    """(pid, start time, uid) from a pidfile record() wrote; None for anything else."""
    raw = safeio.read_capped(pidfile, LINE_MAX + 1)
    if raw is None or len(raw) > LINE_MAX:
        return None
    parts = raw.split()
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        return None
    pid, start, uid = (int(p) for p in parts)
    return (pid, start, uid) if pid > 0 else None


def kill(pidfile: Path, wait: float = 1.0) -> bool:
    """SIGKILL the process the pidfile names if it is still that process (same start time, and every
    uid the recorded one), wait up to `wait` s for it to end, and remove the pidfile. True if
    signalled. An unverifiable pidfile (old format, garbage) is only removed: nothing is killed."""
    rec = read(pidfile)
    done = False
    if rec is not None:
        pid, start, uid = rec
        try:
            fd = os.pidfd_open(pid)
        except OSError:  # gone (ProcessLookupError), or no fd to spare: leave it, it ends with QEMU
            fd = None
        if fd is not None:
            try:
                # Checked after pidfd_open: if it is that process now, the fd holds that process.
                if start_time(pid) == start and set(uids(pid) or (-1,)) == {uid}:
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
                    done = True
                    select.select([fd], [], [], wait)
                    try:
                        os.waitid(os.P_PIDFD, fd, os.WEXITED | os.WNOHANG)  # reaps it if it is our child
                    except ChildProcessError:
                        pass
            except ProcessLookupError:
                pass
            finally:
                os.close(fd)
    pidfile.unlink(missing_ok=True)
    return done
