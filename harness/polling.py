"""What every scheduler's test modules share around a job: its work dir, polling a condition, and
reading the counter job's output (its `n=K` lines)."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from pathlib import Path


def wait_for(cond, what: str, timeout: float = 120, detail: Callable[[], str] | None = None):
    """`cond()`'s first true value within `timeout` s, else AssertionError naming `what` (and what
    `detail()` says then: the daemons' logs, say)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = cond()
        if v:
            return v
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}" + (f"\n{detail()}" if detail else ""))


def values(text: str) -> list[int]:
    """The counter job's values, in the order it printed them."""
    return [int(m) for m in re.findall(r"^n=(\d+)$", text, re.M)]


def jobdir(site, user) -> Path:
    """A new work dir under `site.base` (a cluster, cell or pool) owned by `user`."""
    d = site.base / "work" / f"t{os.urandom(3).hex()}"
    d.mkdir(parents=True)
    os.chown(d, user.pw_uid, user.pw_gid)
    return d
