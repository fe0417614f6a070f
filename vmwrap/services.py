"""vmwrap's long-running daemons as a site deploys them: one name each, one command line each.

The systemd units (debian/*.service) and `vmwrap daemons start` (nodes without systemd) both run
`vmwrap daemons run NAME`, so the command a daemon runs is decided here once, from the site config
(`scheduler`, `daemons`), never twice. Without systemd a daemon is a detached process with a pid file
in state_dir/daemons/ and its output appended to `log_file` (default LOG_DIR/NAME.log); with systemd
its stderr goes to journald with syslog levels (vmwrap.logsetup).
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .config import Settings
from .errors import NodeError
from .rootenv import BASE

LOG_DIR = Path("/var/log/vmwrap")


@dataclass(frozen=True)
class Daemon:
    name: str
    where: str                        # "node" (every compute node) or "head" (next to the controller)
    what: str
    argv: dict[str, tuple[str, ...]]  # scheduler -> vmwrap arguments ("*": any scheduler)


DAEMONS: dict[str, Daemon] = {d.name: d for d in (
    Daemon("agent", "node", "node agent: job users pause/resume their VMs; repairs the node (reconcile)",
           {"*": ("agent", "--reconcile", "{scheduler}"), "none": ("agent",)}),
    Daemon("prestage", "node", "fetches images of jobs planned on this node, publishes cached images",
           {"slurm": ("slurm", "prestage"), "sge": ("sge", "prestage"), "condor": ("condor", "prestage")}),
    Daemon("prestage-controller", "head", "steers jobs to nodes that hold their image (next to slurmctld)",
           {"slurm": ("slurm", "prestage", "--controller")}),
    Daemon("plan", "head", "gap planner: runs queue heads before advance reservations (docs/plan.md)",
           {"slurm": ("plan",), "sge": ("sge", "plan")}),
    Daemon("gc", "head", "deletes checkpoints of jobs that ended while saved",
           {s: (s, "gc") for s in ("slurm", "sge", "condor", "torque", "pbs")}),
    Daemon("bridge", "node", "HTCondor execute node: boots the VMs of the job wrappers",
           {"condor": ("condor", "bridge")}),
)}


def argv(name: str, settings: Settings) -> list[str]:
    """The `vmwrap` arguments daemon `name` runs with on this site; NodeError if it has none here."""
    d = DAEMONS.get(name)
    if d is None:
        raise NodeError(f"unknown daemon {name!r} (one of {', '.join(DAEMONS)})")
    if settings.scheduler == "none":
        args = d.argv.get("none")
    else:
        args = d.argv.get(settings.scheduler) or d.argv.get("*")
    if not args:
        raise NodeError(f"daemon {name!r} does not exist for scheduler = {settings.scheduler!r} "
                        f"(it does for: {', '.join(s for s in d.argv if s not in ('*', 'none'))})")
    return [a.format(scheduler=settings.scheduler) for a in args]


def configured(settings: Settings) -> list[str]:
    """The daemons this node runs (setting `daemons`, comma-separated), each checked."""
    names = [n.strip() for n in settings.daemons.split(",") if n.strip()]
    for n in names:
        if n not in DAEMONS:
            raise NodeError(f"daemons: unknown daemon {n!r} (one of {', '.join(DAEMONS)})")
        try:
            argv(n, settings)
        except NodeError as e:
            raise NodeError(f"daemons: {e}") from None
    return names


def pid_file(settings: Settings, name: str) -> Path:
    """Per site (state_dir), not /run: several test sites share a host; a stale file after a reboot
    is harmless (running() checks the process)."""
    return Path(settings.state_dir) / "daemons" / f"{name}.pid"


def running(settings: Settings, name: str) -> int | None:
    """The pid of daemon `name` started by start(), if that process still runs it (a recycled pid
    running something else does not count)."""
    try:
        pid = int(pid_file(settings, name).read_text().strip())
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    # the daemon's own command line: ... vmwrap.cli [--config F] daemons run NAME
    return pid if cmd[-4:-1] == [b"daemons", b"run", name.encode()] else None


def start(name: str, settings: Settings, config_path: str | None) -> tuple[int, bool]:
    """Start daemon `name` detached (own session, stdin /dev/null, output appended to its log)
    unless it runs. Returns (pid, started_now)."""
    argv(name, settings)  # refuse a daemon this site has not got before forking anything
    pid = running(settings, name)
    if pid:
        return pid, False
    pid_file(settings, name).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    log = Path(settings.log_file) if settings.log_file else LOG_DIR / f"{name}.log"
    log.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    cmd = [sys.executable, "-I", "-m", "vmwrap.cli"] + (["--config", config_path] if config_path else [])
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
    try:
        p = subprocess.Popen(cmd + ["daemons", "run", name], stdin=subprocess.DEVNULL, stdout=fd, stderr=fd,
                             cwd="/", env=dict(BASE), start_new_session=True)
    finally:
        os.close(fd)
    pid_file(settings, name).write_text(f"{p.pid}\n")
    return p.pid, True


def stop(settings: Settings, name: str, timeout: float = 30.0) -> int | None:
    """SIGTERM daemon `name` and wait for it (SIGKILL after `timeout`); its pid, or None if it was not
    running."""
    pid = running(settings, name)
    if pid is None:
        pid_file(settings, name).unlink(missing_ok=True)
        return None
    os.kill(pid, signal.SIGTERM)
    end = time.monotonic() + timeout
    while running(settings, name) == pid:
        if time.monotonic() > end:
            os.kill(pid, signal.SIGKILL)
        _reap(pid)
        time.sleep(0.1)
    pid_file(settings, name).unlink(missing_ok=True)
    return pid


def _reap(pid: int) -> None:
    """Collect `pid` if this process started it (start() then stop() in one process: tests)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except OSError as e:
        if e.errno != errno.ECHILD:
            raise
