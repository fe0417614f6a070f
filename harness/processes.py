"""Host processes as the fault tests see them: what to SIGKILL when a test plays a host crash."""

from __future__ import annotations

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
