"""Debian root trees for image-import tests, made without vmwrap (plain debootstrap) and cached.

Each tree is built once per (suite, packages) under /var/cache/vmwrap/test-images (outside the
repository, like the appliances) and reused by every later test run; a lock keeps two test
processes from building the same tree at once. Tests must treat a tree as read-only.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

CACHE = Path(os.environ.get("VMWRAP_TEST_IMAGES", "/var/cache/vmwrap/test-images"))


def mirror() -> str:
    """The Debian mirror this host's apt already uses (as scripts/build-condor-root.sh picks it)."""
    if os.environ.get("VMWRAP_DEBIAN_MIRROR"):
        return os.environ["VMWRAP_DEBIAN_MIRROR"]
    sources = [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*")]
    for p in sources:
        try:
            m = re.search(r"(https?://\S+/debian)/?(\s|$)", p.read_text())
        except OSError:
            continue
        if m:
            return m.group(1)
    return "http://deb.debian.org/debian"


def debian_root(suite: str = "bookworm", packages: tuple[str, ...] = ()) -> Path:
    """A debootstrap --variant=minbase tree of `suite` with `packages` (no recommends), cached."""
    key = hashlib.sha256(f"{suite} {' '.join(sorted(packages))}".encode()).hexdigest()[:12]
    root = CACHE / f"{suite}-{key}"
    done = CACHE / f"{suite}-{key}.done"
    if done.exists():
        return root
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f".{suite}-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists():
            return root
        work = CACHE / f".{suite}-{key}.work"
        shutil.rmtree(work, ignore_errors=True)
        argv = ["debootstrap", "--variant=minbase", f"--cache-dir={CACHE / '.debs'}"]
        if packages:
            argv.append("--include=" + ",".join(packages))
        (CACHE / ".debs").mkdir(exist_ok=True)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        r = subprocess.run([*argv, suite, str(work), mirror()], capture_output=True, text=True, env=env)
        if r.returncode != 0:
            raise RuntimeError(f"debootstrap {suite} failed: {r.stdout[-1500:]}{r.stderr[-1500:]}")
        shutil.rmtree(work / "var" / "cache" / "apt" / "archives", ignore_errors=True)
        (work / "var" / "cache" / "apt" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root, ignore_errors=True)
        os.rename(work, root)
        done.write_text(f"{suite} {' '.join(sorted(packages))}\n")
    return root
