"""The last step every import shares: put the built image dir in place and register it, all or nothing."""

from __future__ import annotations

import fcntl
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..catalog import Image, register

PREFIX = ".import-"   # an import's scratch dirs in the appliance dir: .import-NAME-XXXXXXXX
STALE_AFTER = 60.0    # s: a scratch dir younger than this may not be locked by its importer yet
REPLACED = "replaced" # install() moves the image being replaced here until the new one is registered


@contextmanager
def scratch_dir(out: Path, name: str) -> Iterator[Path]:
    """A private `.import-NAME-*` dir in `out`, flock-ed for as long as this import lives.

    A SIGKILLed import cannot remove its scratch dir; the lock (not a pid, which gets reused) tells
    such a leftover from a live import's, so each import first removes what killed ones left."""
    remove_stale(out)
    d = Path(tempfile.mkdtemp(dir=out, prefix=f"{PREFIX}{name}-"))
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield d
    finally:
        try:
            shutil.rmtree(d, ignore_errors=True)
        finally:
            os.close(fd)


def remove_stale(out: Path, now: float | None = None) -> list[str]:
    """Remove the `.import-*` dirs in `out` whose importer is gone (their lock can be taken); names removed.

    An image a killed import had moved aside (install's `replaced`) goes back to its place first when
    nothing took that place, so an interrupted re-import loses nothing."""
    now = time.time() if now is None else now
    removed = []
    try:
        names = sorted(os.listdir(out))
    except FileNotFoundError:
        return removed
    for n in names:
        if not n.startswith(PREFIX):
            continue
        p = Path(out) / n
        try:
            st = os.lstat(p)
            if not stat.S_ISDIR(st.st_mode) or now - st.st_mtime < STALE_AFTER:
                continue
            fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue  # vanished, or replaced by a link meanwhile: not ours to follow
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live import holds it
            image = n[len(PREFIX):].rpartition("-")[0]  # mkdtemp's suffix has no "-"
            old, dest = p / REPLACED, Path(out) / image
            if (image and os.path.isdir(old) and not os.path.islink(old)
                    and not os.path.lexists(dest)):
                os.rename(old, dest)
            shutil.rmtree(p, ignore_errors=True)
            removed.append(n)
        finally:
            os.close(fd)
    return removed


def install(new: Path, dest: Path, work: Path, make_image: Callable[[Path], Image], catalog_path: str) -> Image:
    """Rename `new` to `dest` and register `make_image(dest)`; on any failure the image that was there
    before (moved aside into `work`) comes back, so a failed re-import changes nothing."""
    old = None
    if dest.exists() or dest.is_symlink():
        old = work / REPLACED
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
