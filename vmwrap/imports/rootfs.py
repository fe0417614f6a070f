"""Root filesystem tarballs, and the tail every tar-based import shares (OCI, docker/podman saves, SIF).

The tail: the layers are applied to a root-owned staging tree (vmwrap/imports/layers.py), which becomes an
ext4 disk sized from its content plus room for the job, then a qcow2; the appliance dir's Debian kernel
and vmwrap's initramfs agent make it bootable (vmwrap/appliance.py). Everything is built in a temp dir
inside the appliance dir, moved to `<appliance_dir>/<name>` by one rename, and registered in the catalog
last: a failure at any step leaves the appliance dir and the catalog as they were.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .. import appliance
from ..catalog import Image
from ..directives import check_image_name
from ..errors import ImageError, NodeError, UserError
from .layers import Digested, apply_layers
from .publish import install, scratch_dir

MKFS = "/sbin/mkfs.ext4"
QEMU_IMG = "/usr/bin/qemu-img"
SLACK_MIB = 512          # free room on the root disk for what the job writes outside its work dir
INODE_SLACK = 16384      # free inodes on top of the tree's, for the same
MIN_DISK_MIB = 64


@dataclass
class Filled:
    """What an import read about its image besides the tree: catalog provenance, default environment."""

    origin: str
    description: str
    env: dict[str, str] = field(default_factory=dict)


def open_regular(path: Path, what: str) -> "os.FileIO":
    """`path` opened for reading: a regular file, not through a symlink at its last component."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except OSError as e:
        raise ImageError(f"{path}: cannot open the {what}: {e.strerror}") from None
    f = os.fdopen(fd, "rb", buffering=0)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        f.close()
        raise ImageError(f"{path}: not a regular file (a {what} must be a file)")
    return f


def run_import(kind: str, source: Path, name: str, out_dir: Path, catalog_path: str, max_bytes: int | None,
               on_stage: Callable[[str], None] | None, fill: Callable[[Path, Path, Callable[[str], None]], Filled]
               ) -> Image:
    """Stage `fill(root, work, stage)`'s tree, then build and register image `name` (ImageError on any failure)."""
    stage = on_stage or (lambda _s: None)
    src = Path(source)
    try:
        check_image_name(name)
    except UserError as e:
        raise ImageError(str(e)) from None
    if os.geteuid() != 0:
        raise ImageError(f"{src}: importing an image needs root (the files inside keep their owners)")
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with scratch_dir(out, name) as work:
            work.chmod(0o700)
            root = work / "rootfs"
            root.mkdir(mode=0o755)
            stage(f"{kind}: read and apply the layers")
            filled = fill(root, work, stage)
            return _publish(kind, src, name, out, work, root, catalog_path, filled, stage)
    except ImageError:
        raise
    except (NodeError, OSError, subprocess.SubprocessError) as e:
        raise ImageError(f"{src}: {e}") from None


def _measure(root: Path) -> tuple[int, int]:
    """(bytes allocated, inodes) of the staged tree, links not followed."""
    total, inodes = 0, 1
    for d, dirs, files in os.walk(root):
        for n in dirs + files:
            st = os.lstat(os.path.join(d, n))
            total += st.st_blocks * 512
            inodes += 1
    return total, inodes


def _run(argv: list[str], src: Path, timeout: float = 3600) -> None:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise NodeError(f"{argv[0]} is not installed (run scripts/install-host.sh)") from None
    if r.returncode != 0:
        msg = " ".join((r.stderr or r.stdout).split())[-300:]
        raise ImageError(f"{src}: {Path(argv[0]).name} failed: {msg}")


def _publish(kind: str, src: Path, name: str, out: Path, work: Path, root: Path, catalog_path: str,
             filled: Filled, stage: Callable[[str], None]) -> Image:
    used, inodes = _measure(root)
    size_mib = max(MIN_DISK_MIB, (used * 5 // 4 >> 20) + inodes * 256 // 2**20 + SLACK_MIB)
    stage(f"root disk: ext4 of {used >> 20} MiB content ({size_mib} MiB), then qcow2")
    new = work / "image"
    new.mkdir()
    raw = work / "root.raw"
    _run([MKFS, "-q", "-F", "-O", "^has_journal", "-L", "vmwrap-root", "-N", str(inodes + INODE_SLACK),
          "-d", str(root), str(raw), f"{size_mib}M"], src)
    shutil.rmtree(root)
    _run([QEMU_IMG, "convert", "-f", "raw", "-O", "qcow2", str(raw), str(new / "root.qcow2")], src)
    raw.unlink()
    kernel = appliance.cached_kernel(out, work, stage)
    stage("initrd: kernel modules and guest agent")
    shutil.copy2(kernel / "vmlinux", new / "vmlinux")
    appliance.build_initrd(kernel / "modules", new / "initrd.cpio", work)
    for f in new.iterdir():
        f.chmod(0o644)
    new.chmod(0o755)
    stage("hash and register in the catalog")
    return install(new, out / name, work, lambda dest: Image(
        name=name, boot="kernel", kernel=appliance.artifact(dest / "vmlinux"),
        initrd=appliance.artifact(dest / "initrd.cpio"), disk=appliance.artifact(dest / "root.qcow2", "qcow2"),
        description=filled.description, origin=filled.origin, env=dict(filled.env)), catalog_path)


def import_tarball(source: Path, name: str, out_dir: Path, catalog_path: str, *, max_bytes: int | None,
                   on_stage: Callable[[str], None]) -> Image:
    """A root filesystem tarball (.tar, .tar.gz; `tar -C ROOT -c .`) as image `name`."""
    src = Path(source)

    def fill(root: Path, work: Path, stage: Callable[[str], None]) -> Filled:
        with open_regular(src, "tarball") as f:
            if max_bytes is not None and os.fstat(f.fileno()).st_size > max_bytes:
                raise ImageError(f"{src}: larger than the import size limit "
                                 f"(image_import_max_size = {max_bytes} bytes)")
            hashed = Digested(f, None, None, "tarball")
            apply_layers([("tarball", hashed)], root, str(src), max_bytes, on_note=stage)
            digest = "sha256:" + hashed.h.hexdigest()
        return Filled(origin=f"tarball {digest}", description=f"root filesystem tarball {src.name[:80]}")

    return run_import("tarball", src, name, Path(out_dir), catalog_path, max_bytes, on_stage, fill)
