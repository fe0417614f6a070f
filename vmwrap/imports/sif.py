"""Apptainer/Singularity SIF files as vmwrap images.

The SIF global header and descriptor table are parsed here, as github.com/apptainer/sif (pkg/sif:
sif.go, descriptor.go, load.go) writes them: little-endian, packed; header 128 bytes, each descriptor
585 bytes, a partition's fstype/parttype/arch at the start of the descriptor's extra bytes. The primary
system partition (squashfs) is copied out and turned into a tar stream by squashfs-tools-ng's `sqfs2tar`,
run as nobody (the squashfs is hostile and its parser is C), and that stream is applied like one layer
(vmwrap/imports/layers.py). Nothing is ever mounted on the host.

Not applied: the image's /.singularity.d (runscript, env scripts): a vmwrap job runs its batch script
as the submitting user in its own work dir, with its own environment.
"""

from __future__ import annotations

import hashlib
import os
import resource
import struct
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from ..catalog import Image
from ..errors import ImageError
from .layers import Extractor
from .rootfs import Filled, open_regular, run_import

SQFS2TAR = "/usr/bin/sqfs2tar"
NOBODY = 65534
HEADER = struct.Struct("<32s10s3s3s16s8q")          # launch, magic, version, arch, uuid, ctime, mtime,
                                                     # descr free/total/offset/size, data offset/size
DESCRIPTOR = struct.Struct("<iBIII7q128s384s")      # datatype, used, id, groupid, link, offset, size,
                                                     # size with padding, ctime, mtime, uid, gid, name, extra
PARTITION = struct.Struct("<ii3s")                   # fstype, parttype, arch
MAGIC, VERSION = b"SIF_MAGIC\0", b"01\0"
DATA_PARTITION = 0x4004
FS_SQUASH = 1
FS_NAMES = {1: "squashfs", 2: "ext3", 3: "archive", 4: "raw", 5: "encrypted squashfs", 6: "gocryptfs squashfs"}
PART_SYSTEM, PART_PRIMSYS = 1, 2
ARCH_AMD64, ARCH_UNKNOWN = b"02\0", b"00\0"
DESCRIPTORS_MAX = 4096
SQUASHFS_MAGIC = b"hsqs"
SQFS2TAR_MEMORY = 2 << 30


def _text(b: bytes) -> str:
    return b.rstrip(b"\0").decode("ascii", "replace")


class Partition:
    def __init__(self, fstype: int, parttype: int, arch: bytes, offset: int, size: int):
        self.fstype, self.parttype, self.arch, self.offset, self.size = fstype, parttype, arch, offset, size


def read_header(f, src: str) -> tuple[str, list[Partition]]:
    """The SIF's id and its partitions, every offset checked against the file's size."""
    fsize = os.fstat(f.fileno()).st_size
    head = os.pread(f.fileno(), HEADER.size, 0)
    if head[32:42] != MAGIC:
        raise ImageError(f"{src}: not a SIF file (no SIF_MAGIC at byte 32)")
    if len(head) < HEADER.size:
        raise ImageError(f"{src}: truncated SIF ({fsize} bytes; its header alone is {HEADER.size})")
    _launch, _magic, version, _arch, ident, _c, _m, _free, total, doff, dsize, _dataoff, _datalen = HEADER.unpack(head)
    if version != VERSION:
        raise ImageError(f"{src}: SIF version {_text(version)!r} is not supported (01)")
    if not 0 < total <= DESCRIPTORS_MAX or dsize < total * DESCRIPTOR.size or doff < HEADER.size:
        raise ImageError(f"{src}: damaged SIF header ({total} descriptors in {dsize} bytes at {doff})")
    if doff + total * DESCRIPTOR.size > fsize:
        raise ImageError(f"{src}: truncated SIF (descriptor table ends at byte {doff + total * DESCRIPTOR.size}, "
                         f"the file has {fsize})")
    table = os.pread(f.fileno(), total * DESCRIPTOR.size, doff)
    parts = []
    for i in range(total):
        (dtype, used, _id, _gid, _link, offset, size, _pad, _c, _m, _u, _g, _name,
         extra) = DESCRIPTOR.unpack_from(table, i * DESCRIPTOR.size)
        if not used or dtype != DATA_PARTITION:
            continue
        fstype, parttype, arch = PARTITION.unpack_from(extra)
        if offset < 0 or size <= 0:
            raise ImageError(f"{src}: damaged SIF descriptor {i} (partition at {offset}, {size} bytes)")
        parts.append(Partition(fstype, parttype, arch, offset, size))
    return str(uuid.UUID(bytes=ident)), parts


def primary(parts: list[Partition], src: str, fsize: int) -> Partition:
    """The primary system partition (else the only system partition), squashfs, amd64, inside the file."""
    system = [p for p in parts if p.parttype == PART_PRIMSYS] or [p for p in parts if p.parttype == PART_SYSTEM]
    squash = [p for p in system if p.fstype == FS_SQUASH]
    if not squash:
        have = ", ".join(FS_NAMES.get(p.fstype, f"fstype {p.fstype}") for p in (system or parts)) or "no partitions"
        raise ImageError(f"{src}: no squashfs system partition in the SIF (it has: {have})")
    p = squash[0]
    if p.arch not in (ARCH_AMD64, ARCH_UNKNOWN):
        raise ImageError(f"{src}: the SIF's system partition is for architecture "
                         f"{_text(p.arch)!r}, not amd64 (02)")
    if p.offset + p.size > fsize:
        raise ImageError(f"{src}: truncated SIF (its squashfs partition ends at byte {p.offset + p.size}, "
                         f"the file has {fsize})")
    return p


def _copy_partition(f, p: Partition, dest: Path) -> str:
    """Copy the partition out (sqfs2tar reads a whole file); its sha256 for the image's origin."""
    h = hashlib.sha256()
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        off, left = p.offset, p.size
        while left:
            buf = os.pread(f.fileno(), min(left, 1 << 20), off)
            if not buf:
                raise ImageError(f"{dest}: the SIF ended while its partition was copied")
            h.update(buf)
            view = memoryview(buf)
            while view:
                view = view[os.write(fd, view):]
            off += len(buf)
            left -= len(buf)
    finally:
        os.close(fd)
    return "sha256:" + h.hexdigest()


def _unprivileged() -> None:
    """sqfs2tar parses hostile bytes: as nobody, no groups, bounded memory, its own session."""
    resource.setrlimit(resource.RLIMIT_AS, (SQFS2TAR_MEMORY, SQFS2TAR_MEMORY))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def squashfs_to_layer(part: Path, ex: Extractor, label: str, src: str) -> None:
    """Apply the squashfs file `part` to the extractor's root through sqfs2tar's tar stream."""
    with open(part, "rb") as sqfs, tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.Popen([SQFS2TAR, "--no-xattr", "/dev/stdin"], stdin=sqfs, stdout=subprocess.PIPE,
                                    stderr=err, cwd="/", env={"PATH": "/usr/bin:/bin"}, user=NOBODY, group=NOBODY,
                                    extra_groups=[], start_new_session=True, preexec_fn=_unprivileged)
        except FileNotFoundError:
            raise ImageError(f"{src}: {SQFS2TAR} is missing (Debian package squashfs-tools-ng; "
                             "scripts/install-host.sh installs it)") from None
        def failed(rc: int) -> ImageError:
            err.seek(0)
            tail = " ".join(err.read()[-300:].decode("utf-8", "replace").split())
            return ImageError(f"{src}: its squashfs partition cannot be read (sqfs2tar exit {rc}): {tail}")

        try:
            ex.apply(label, proc.stdout)
            while proc.stdout.read(1 << 20):
                pass
            rc = proc.wait(timeout=600)
        except BaseException:
            time.sleep(0.05)
            early = proc.poll()  # sqfs2tar gave up first: its reason is the better message
            proc.kill()
            proc.wait()
            if early not in (0, None):
                raise failed(early) from None
            raise
        finally:
            proc.stdout.close()
        if rc != 0:
            raise failed(rc)


def import_sif(source: Path, name: str, out_dir: Path, catalog_path: str, *, max_bytes: int | None,
               on_stage: Callable[[str], None]) -> Image:
    """An Apptainer/Singularity SIF's primary squashfs partition as image `name`."""
    src = Path(source)

    def fill(root: Path, work: Path, stage: Callable[[str], None]) -> Filled:
        with open_regular(src, "SIF file") as f:
            fsize = os.fstat(f.fileno()).st_size
            ident, parts = read_header(f, str(src))
            p = primary(parts, str(src), fsize)
            if max_bytes is not None and p.size > max_bytes:
                raise ImageError(f"{src}: its squashfs partition is larger than the import size limit "
                                 f"(image_import_max_size = {max_bytes} bytes)")
            if os.pread(f.fileno(), 4, p.offset) != SQUASHFS_MAGIC:
                raise ImageError(f"{src}: its system partition does not start like a squashfs (no 'hsqs')")
            stage("copy the squashfs partition")
            part = work / "partition.sqfs"
            digest = _copy_partition(f, p, part)
        stage("squashfs to tar (sqfs2tar, as nobody) and extract")
        with Extractor(root, str(src), max_bytes, on_note=stage) as ex:
            squashfs_to_layer(part, ex, "squashfs partition", str(src))
        part.unlink()
        return Filled(origin=f"sif {ident} partition {digest}",
                      description=f"sif import {src.name[:80]} ({digest[:19]})")

    return run_import("sif", src, name, Path(out_dir), catalog_path, max_bytes, on_stage, fill)
