"""Per-job copy-on-write disks: a qcow2 overlay on the read-only cached base, O(1) in the base's size."""

from __future__ import annotations

import subprocess
from pathlib import Path

from .errors import JobDiskError, NodeError

QEMU_IMG = "/usr/bin/qemu-img"  # by absolute path: root runs it (prolog), never found through PATH


def create(base: Path, overlay: Path, base_format: str = "qcow2") -> Path:
    """Create `overlay` backed by `base`; writes go to the overlay, the cached base is never touched."""
    try:
        subprocess.run(
            [QEMU_IMG, "create", "-q", "-f", "qcow2", "-F", base_format, "-b", str(base), str(overlay)],
            check=True, capture_output=True, text=True,
        )
    except FileNotFoundError:
        raise NodeError("qemu-img is not installed (package qemu-utils)") from None
    except subprocess.CalledProcessError as e:
        overlay.unlink(missing_ok=True)
        msg = e.stderr.strip()
        if "No space left" in msg or "Disk quota exceeded" in msg:
            raise JobDiskError(f"no space left on the node's state disk for the job's overlay {overlay}") from None
        raise NodeError(f"qemu-img could not create overlay {overlay}: {msg}") from None
    return overlay


def remove(overlay: Path) -> None:
    overlay.unlink(missing_ok=True)
