"""The last step every import shares: put the built image dir in place and register it, all or nothing."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from ..catalog import Image, register


def install(new: Path, dest: Path, work: Path, make_image: Callable[[Path], Image], catalog_path: str) -> Image:
    """Rename `new` to `dest` and register `make_image(dest)`; on any failure the image that was there
    before (moved aside into `work`) comes back, so a failed re-import changes nothing."""
    old = None
    if dest.exists() or dest.is_symlink():
        old = work / "replaced"
        os.rename(dest, old)
    os.rename(new, dest)
    try:
        img = make_image(dest)
        register(catalog_path, img)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        if old is not None:
            os.rename(old, dest)
        raise
    return img
