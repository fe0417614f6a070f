"""A second test image that boots like the appliance but is a different, larger blob in a node's cache:
the appliance's initrd followed by NUL bytes (the kernel skips NUL padding between cpio archives)."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from pathlib import Path


def padded(appliance, where: Path, name: str, pad: int):
    """The appliance as image `name`, its initrd `pad` bytes longer, written under `where` (root's)."""
    d = where / name
    d.mkdir(parents=True, exist_ok=True)
    dst = d / "initrd.cpio"
    with open(appliance.initrd.source, "rb") as src, open(dst, "wb") as out:
        shutil.copyfileobj(src, out)
        out.write(b"\0" * pad)
    initrd = dataclasses.replace(appliance.initrd, source=str(dst), size=dst.stat().st_size,
                                 sha256=hashlib.sha256(dst.read_bytes()).hexdigest())
    return dataclasses.replace(appliance, name=name, initrd=initrd)
