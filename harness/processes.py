"""Host processes as the fault tests see them: what to SIGKILL when a test plays a host crash."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path


def tree(pids: list[int]) -> set[int]:
    """The given processes and all their descendants (read from /proc at this instant)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            f = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(f[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            pass
    out, todo = set(), list(pids)
    while todo:
        p = todo.pop()
        if p not in out:
            out.add(p)
            todo += children.get(p, [])
    return out


def matching(pattern: str) -> list[int]:
    """Pids whose whole command line matches `pattern` (pgrep -f)."""
    return [int(p) for p in subprocess.run(["/usr/bin/pgrep", "-f", "--", pattern], capture_output=True,
                                           text=True).stdout.split()]


def crash(pids: list[int | None]) -> set[int]:
    """Play a host crash: the given processes and all their descendants die together, none able to react
    to another's death. Killed one by one, a shepherd that outlived its job's processes for an instant
    recorded the job as ended and started its epilog, which deleted the job's checkpoint (the rescheduled
    run then started over). Every process is stopped first, the tree read again until nothing new is
    in it, then every one is killed. Returns the pids killed."""
    stopped: set[int] = set()
    todo = tree([p for p in pids if p])
    while todo - stopped:
        for p in todo - stopped:
            try:
                os.kill(p, signal.SIGSTOP)
            except ProcessLookupError:
                pass
        stopped |= todo
        todo = tree(sorted(stopped))
    for p in stopped:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return stopped
