"""What is left of a VM that failed: kept for the admin after teardown removed the run dir.

A guest that dies without an exit status leaves nothing but its console log and the agent's own
timeline, both in the run dir that teardown deletes. Before it goes, their bounded tails are copied
to `<state_dir>/failed/<job>/` (root-only), and the ledger says where. Old copies are pruned by age
and total size, so a node never fills with them.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from . import limits, rundir, safeio, share

CONSOLE_TAIL = 64 * 1024
STATUS_HEAD = 16 * 1024
KEEP_DAYS = 14
KEEP_BYTES = 64 * 1024 * 1024


def died_without_status(run_dir: Path) -> bool:
    """The guest never said `exit N` (what the job's payload reports as exit 70)."""
    status = safeio.read_capped(Path(run_dir) / rundir.STATUS, STATUS_HEAD) or b""
    return not any(ln.startswith(b"exit ") for ln in status.split(b"\n"))


def guest_ran(run_dir: Path) -> bool:
    """A VM was started for the job and its guest got far enough to write to its console or status."""
    for name in (rundir.CONSOLE, rundir.STATUS):
        try:
            st = os.lstat(Path(run_dir) / name)
        except OSError:
            continue
        if st.st_size > 0:
            return True
    return False


def guest_died(run_dir: Path) -> bool:
    """The job's VM was prepared, it ran, and the guest never reported an exit status: what the job's
    payload reports as exit 70. A job refused before boot (its `error` file) is not a dead guest."""
    run_dir = Path(run_dir)
    if not (run_dir / rundir.JOB).exists() or (run_dir / rundir.ERROR).exists() or (run_dir / limits.REASON).exists():
        return False  # refused before boot, or stopped by vmwrap/limits.py (the job reports that reason)
    return guest_ran(run_dir) and died_without_status(run_dir)


def console_tail(run_dir: Path, n: int = 4000) -> str:
    """The last `n` bytes of the guest's console, for the job's error output."""
    data = safeio.tail_capped(Path(run_dir) / rundir.CONSOLE, n)
    return data.decode("utf-8", "replace") if data else ""


def keep(state_dir: str | os.PathLike, job_id: str, run_dir: Path, reason: str) -> Path | None:
    """Copy the failed VM's console tail, the agent's timeline and the job facts; returns the copy's dir."""
    root = Path(state_dir) / "failed"
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        prune(root)
        dest = root / f"{job_id}.{int(time.time())}"
        dest.mkdir(mode=0o700)
        for name, data in ((rundir.CONSOLE, safeio.tail_capped(run_dir / rundir.CONSOLE, CONSOLE_TAIL)),
                           (rundir.STATUS, safeio.read_capped(run_dir / rundir.STATUS, STATUS_HEAD)),
                           (rundir.JOB, safeio.read_capped(run_dir / rundir.JOB, STATUS_HEAD)),
                           (share.LOG, safeio.tail_capped(run_dir / share.LOG, STATUS_HEAD))):
            if data is not None:
                fd = os.open(dest / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
        (dest / "reason").write_text(json.dumps({"job_id": job_id, "reason": reason, "at": time.time()}) + "\n")
        return dest
    except OSError:
        return None  # evidence is a courtesy: a full state disk must not turn it into a node fault


def prune(root: Path, keep_days: float = KEEP_DAYS, keep_bytes: int = KEEP_BYTES) -> list[Path]:
    """Remove copies older than `keep_days`, then the oldest until the rest fit in `keep_bytes`."""
    gone: list[Path] = []
    entries = []
    for d in root.iterdir() if root.is_dir() else ():
        try:
            st = d.lstat()
            size = sum(f.lstat().st_size for f in d.iterdir()) if d.is_dir() and not d.is_symlink() else st.st_size
        except OSError:
            continue
        entries.append((st.st_mtime, size, d))
    entries.sort()
    total = sum(e[1] for e in entries)
    cutoff = time.time() - keep_days * 86400
    for mtime, size, d in entries:
        if mtime >= cutoff and total <= keep_bytes:
            break
        shutil.rmtree(d, ignore_errors=True) if d.is_dir() and not d.is_symlink() else d.unlink(missing_ok=True)
        total -= size
        gone.append(d)
    return gone


def listing(state_dir: str | os.PathLike) -> list[dict]:
    """Kept copies, newest first: job, when, why, where (for `vmwrap ps --failed` and doctor)."""
    out = []
    root = Path(state_dir) / "failed"
    for d in root.iterdir() if root.is_dir() else ():
        raw = safeio.read_capped(d / "reason", 4096)
        try:
            info = json.loads(raw) if raw else {}
        except ValueError:
            info = {}
        out.append({"job_id": info.get("job_id", d.name), "at": info.get("at", 0.0),
                    "reason": info.get("reason", ""), "path": str(d)})
    return sorted(out, key=lambda e: -e["at"])
