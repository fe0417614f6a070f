"""Bounded, link-safe reads for root code reading files a user or a guest (via QEMU) can write.

A hostile job controls the content, and in user-writable dirs also the type, of such files: a symlink
to /etc/shadow or /dev/zero, a FIFO nobody writes (open() blocks forever), a sparse 64 GiB file.
Every root read of such a file goes through here: never follow a link, never block on open, regular
files only, never more than `limit` bytes in memory.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import BinaryIO

FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
CHUNK = 1 << 16


def open_regular(path: str | os.PathLike, dir_fd: int | None = None) -> int | None:
    """An fd for reading `path` if it is a regular file (not a link, FIFO, device, dir); else None.

    The last path component is never followed; the fd is blocking again once the type is checked.
    Raises nothing for the hostile cases; OSError only for unexpected faults (EIO, EMFILE, ...).
    """
    try:
        fd = os.open(path, FLAGS, dir_fd=dir_fd)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError):
        return None
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENXIO, errno.EWOULDBLOCK):  # symlink, socket, ...
            return None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return None
        os.set_blocking(fd, True)
        return fd
    except BaseException:
        os.close(fd)
        raise


def _read_fd(fd: int, limit: int) -> bytes:
    parts, left = [], limit
    while left > 0:
        b = os.read(fd, min(CHUNK, left))
        if not b:
            break
        parts.append(b)
        left -= len(b)
    return b"".join(parts)


def read_capped(path: str | os.PathLike, limit: int, dir_fd: int | None = None) -> bytes | None:
    """The first `limit` bytes at most of the regular file `path`; None if it is absent or not a
    regular file (symlink, FIFO, device, dir)."""
    fd = open_regular(path, dir_fd)
    if fd is None:
        return None
    try:
        return _read_fd(fd, limit)
    finally:
        os.close(fd)


def read_proc(path: str, limit: int) -> bytes | None:
    """read_capped of a /proc/PID file; None once the process is gone. A process that exits between
    the open and the read fails the read with ESRCH (seen when libvirtd reaps a saved VM's QEMU)."""
    try:
        return read_capped(path, limit)
    except (ProcessLookupError, FileNotFoundError):
        return None


def tail_capped(path: str | os.PathLike, n: int, dir_fd: int | None = None) -> bytes | None:
    """The last `n` bytes at most of the regular file `path` (seeks: the file's size costs nothing)."""
    fd = open_regular(path, dir_fd)
    if fd is None:
        return None
    try:
        size = os.fstat(fd).st_size
        os.lseek(fd, max(0, size - n), os.SEEK_SET)
        return _read_fd(fd, n)
    finally:
        os.close(fd)


def open_stream(path: str | os.PathLike) -> BinaryIO | None:
    """A buffered reader on the regular file `path` for tailing (the caller bounds each read)."""
    fd = open_regular(path)
    return None if fd is None else os.fdopen(fd, "rb")
