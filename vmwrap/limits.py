"""Per-job disk limits on what a job's VM writes into its run dir, enforced by a root watcher.

QEMU (the job's uid, driven by a possibly hostile guest) appends the job's stdout/stderr, the status
port and the serial console to files in the run dir, and grows the qcow2 overlay. Left alone they fill
the node's state disk and the next job's prolog fails. The batch step runs as the job's user and can
be killed by them, so it cannot be the one to enforce this: `start()` spawns one small root process per
VM (`python -m vmwrap.limits`) that polls the sizes (stat only, no reads) and, when one is over its
setting, writes the reason to `run_dir/limit` (root-owned) and SIGKILLs that VM's QEMU through a
pidfd (no pid reuse race). The attachment then fails the job with the reason and exit code
128 + SIGXFSZ, as a bare job exceeding a file size limit would. It exits by itself with QEMU;
teardown stops it.

Why not RLIMIT_FSIZE on QEMU: one per-process limit for every file QEMU writes (overlay, console,
streams, virtio-9p work dir files); measured on QEMU 7.2, a virtio-serial write past it kills QEMU
with SIGXFSZ (no reason left for the job) while a serial console write just fails silently; and
prlimit on another process needs CAP_SYS_RESOURCE. Why not a libvirt chardev with rollover: that is
virtlogd, which rolls over at 2 MB and silently lost job output (docs/design.md).
"""

from __future__ import annotations

import json
import os
import select
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import procs, rundir, safeio, share
from .errors import NodeError

REASON, PIDFILE = "limit", "limits.pid"
EXIT_LIMIT = 128 + signal.SIGXFSZ
INTERVAL = 0.25
STREAMS = (rundir.STDOUT, rundir.STDERR, share.LOG)  # what the job's output limit counts
LOGS = (rundir.CONSOLE, rundir.STATUS)               # evidence only: each is held to console_max_bytes


@dataclass
class Limits:
    """Byte limits; 0 disables one."""

    output: int = 0   # job_output_max_bytes: stdout + stderr (+ the work dir server's log)
    console: int = 0  # console_max_bytes: console.log, and the status port, each
    disk: int = 0     # job_disk_max_bytes: the overlay's allocated size

    @classmethod
    def from_settings(cls, settings) -> "Limits":
        return cls(int(settings.job_output_max_bytes), int(settings.console_max_bytes),
                   int(settings.job_disk_max_bytes))

    def any(self) -> bool:
        return bool(self.output or self.console or self.disk)


def human(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def _size(run_dir: Path, name: str, allocated: bool = False) -> int:
    try:
        st = os.lstat(run_dir / name)
    except OSError:
        return 0
    if not stat.S_ISREG(st.st_mode):
        return 0
    return st.st_blocks * 512 if allocated else st.st_size


def check(run_dir: Path, limits: Limits) -> str | None:
    """The message naming the limit the job's files are over now, or None. Stat only, never reads."""
    run_dir = Path(run_dir)
    if limits.output:
        used = sum(_size(run_dir, n) for n in STREAMS)
        if used > limits.output:
            return (f"the job's output exceeded job_output_max_bytes = {limits.output} ({human(limits.output)}): "
                    f"{used} bytes written to stdout/stderr; its VM was stopped")
    if limits.console:
        for name in LOGS:
            used = _size(run_dir, name)
            if used > limits.console:
                what = "serial console" if name == rundir.CONSOLE else "status port"
                return (f"the guest's {what} output exceeded console_max_bytes = {limits.console} "
                        f"({human(limits.console)}): {used} bytes; its VM was stopped")
    if limits.disk:
        used = _size(run_dir, rundir.OVERLAY, allocated=True)
        if used > limits.disk:
            return (f"the job's disk (overlay) exceeded job_disk_max_bytes = {limits.disk} ({human(limits.disk)}): "
                    f"{used} bytes allocated; its VM was stopped")
    return None


def record(run_dir: Path, message: str) -> None:
    """Leave the reason where the attachment finds it (written before QEMU is killed)."""
    tmp = Path(run_dir) / f".{REASON}.tmp"
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, f"vmwrap: {message}\n".encode())
        os.fchmod(fd, 0o644)
    finally:
        os.close(fd)
    os.rename(tmp, Path(run_dir) / REASON)


def reason(run_dir: Path) -> str | None:
    """Why the watcher stopped the job's VM, if it did."""
    data = safeio.read_capped(Path(run_dir) / REASON, 4096)
    return data.decode(errors="replace") if data else None


def qemu_pid(name: str, tries: int = 10) -> int | None:
    """The pid of the QEMU running domain `name` (libvirt's pidfile, checked against the command line;
    else any process with that command line: other libvirt set-ups keep the pidfile elsewhere)."""
    for attempt in range(tries):
        data = safeio.read_capped(f"/run/libvirt/qemu/{name}.pid", 32)
        candidates = []
        if data and data.strip().isdigit():
            candidates.append(int(data.strip()))
        candidates += [int(p) for p in os.listdir("/proc") if p.isdigit()]
        for pid in candidates:
            if _is_qemu_of(pid, name):
                return pid
        time.sleep(0.1)  # a process just started may not show its command line yet
    return None


def _is_qemu_of(pid: int, name: str) -> bool:
    try:
        cmd = safeio.read_capped(f"/proc/{pid}/cmdline", 1 << 16) or b""
    except OSError:  # exiting while we look
        return False
    return f"guest={name},".encode() in cmd or f"guest={name}\0".encode() in cmd


def watch(run_dir: Path, name: str, pid: int, limits: Limits, ledger: str | None = None,
          interval: float = INTERVAL) -> str | None:
    """Poll until QEMU `pid` (domain `name`) exits; kill it when a limit is exceeded. Returns the reason."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return None
    try:
        if not _is_qemu_of(pid, name):  # checked after pidfd_open: the fd is this very process
            return None
        while True:
            if not Path(run_dir).is_dir():
                return None
            msg = check(run_dir, limits)
            if msg is not None:
                record(run_dir, msg)
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                if ledger:
                    from .ledger import Ledger

                    Ledger(ledger).record(Path(run_dir).name, name, "failed", kind="limit", message=msg)
                return msg
            if select.select([pidfd], [], [], interval)[0]:
                return None  # QEMU exited
    except ProcessLookupError:
        return None
    finally:
        os.close(pidfd)


def start(run_dir: Path, name: str, settings) -> int | None:
    """Spawn the root watcher for the VM `name` that was just created (root only); its pid, or None
    when the site set no limit."""
    limits = Limits.from_settings(settings)
    if not limits.any():
        return None
    stop(run_dir)
    pid = qemu_pid(name)
    if pid is None:
        if os.path.exists(f"/run/libvirt/qemu/{name}.pid"):  # it runs, but not as a QEMU we recognise
            raise NodeError(f"cannot find the QEMU process of {name} to enforce the job's disk limits")
        return None  # it already ended (a restored job that finished at once): nothing left to grow
    argv = [sys.executable, "-m", "vmwrap.limits", str(run_dir), name, str(pid),
            json.dumps(limits.__dict__), str(settings.ledger_path)]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                cwd="/", env=env, start_new_session=True, close_fds=True)
    except OSError as e:
        raise NodeError(f"cannot start the disk limit watcher of {name}: {e}") from None
    try:
        procs.record(Path(run_dir) / PIDFILE, proc.pid, os.geteuid())  # it runs as root, as we do
    except (OSError, NodeError) as e:
        proc.kill()
        proc.wait()
        raise NodeError(f"cannot record the disk limit watcher of {name}: {e}") from None
    return proc.pid


def stop(run_dir: Path) -> None:
    """Kill the watcher if it still runs (it exits by itself when QEMU goes). Only the process the
    pidfile recorded is killed, with its start time and uid (procs.kill): after pid reuse that pid
    may be another VM's watcher. A pidfile of an older vmwrap (a bare pid) is only removed."""
    procs.kill(Path(run_dir) / PIDFILE)


def main(argv: list[str]) -> int:
    run_dir, name, pid, limits, ledger = argv
    watch(Path(run_dir), name, int(pid), Limits(**json.loads(limits)), ledger or None)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
