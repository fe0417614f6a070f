"""A clean process environment for root entry points (scheduler prologs/epilogs).

Grid Engine hands its root prolog the job's own environment (`qsub -v PATH=...,PYTHONPATH=...`), so
nothing a root hook does may depend on inherited variables: the hook replaces os.environ, first
thing, with a fixed PATH and locale plus only the scheduler facts its plugin names (a whitelist).
Subprocesses then inherit this clean environment; binaries are still called by absolute path.
"""

from __future__ import annotations

import os
from typing import Iterable, Mapping

SAFE_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
BASE: dict[str, str] = {"PATH": SAFE_PATH, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}


def clean_environment(keep: Iterable[str], fixed: Mapping[str, str] | None = None) -> dict[str, str]:
    """Replace os.environ with BASE, the variables named in `keep` (if set) and `fixed`; return a copy.

    `keep` is an exact-name whitelist (no patterns: a prefix like SLURM_* would let through whatever
    a future scheduler version copies from the job); BASE cannot be overridden by it.
    """
    old = dict(os.environ)
    new = dict(BASE)
    for name in keep:
        if name in old and name not in BASE:
            new[name] = old[name]
    new.update(fixed or {})
    os.environ.clear()
    os.environ.update(new)
    return dict(new)
