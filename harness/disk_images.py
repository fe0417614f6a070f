"""Whole-disk test images made without vmwrap (debootstrap trees, mkfs.ext4 -d, a partition table written
here, qemu-img convert), cached under /var/cache/vmwrap/test-images and built once per machine.

- debian_disk(suite): a full Debian root with its own kernel and python3 (bookworm: GPT, trixie: MBR), the
  root ext4 as the second partition after a small empty first one;
- small variants of the bookworm disk for bad input (only the files an import reads: os-release, the kernel,
  the guest's modules): a good one, no kernel, a kernel without virtio_blk, an unknown filesystem, a truncated
  qcow2, a file that is no image, a qcow2 with a backing file on the host, a bare filesystem (no table).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import struct
import subprocess
import uuid
import zlib
from collections.abc import Callable
from pathlib import Path

from harness.test_images import CACHE, debian_root

PACKAGES = ("linux-image-amd64", "python3-minimal")
MIB = 1 << 20
FIRST_MIB = 8  # the small first partition
VERSION = "1"  # bump when the layout below changes


def _run(*argv: str) -> None:
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])} failed: {r.stderr[-1500:]}")


def _cached(name: str, make: Callable[[Path], None]) -> Path:
    """CACHE/disks/name, made once (under a lock) by make(tmp_path) and renamed into place."""
    d = CACHE / "disks"
    d.mkdir(parents=True, exist_ok=True)
    dest = d / name
    if dest.exists():
        return dest
    with open(d / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not dest.exists():
            work = d / f".{name}.work"
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir()
            try:
                make(work / name)
                os.rename(work / name, dest)
            finally:
                shutil.rmtree(work, ignore_errors=True)
    return dest


def _gpt(raw: Path, parts: list[tuple[int, int]]) -> None:
    """A protective MBR and a primary GPT (no backup: importers read the primary) for (first, last) LBAs."""
    total = raw.stat().st_size // 512
    entries = b""
    for first, last in parts:
        entries += (uuid.UUID("0fc63daf-8483-4772-8e79-3d69d8477de4").bytes_le + uuid.uuid4().bytes_le
                    + struct.pack("<QQQ", first, last, 0) + "linux".encode("utf-16-le").ljust(72, b"\0"))
    entries = entries.ljust(128 * 128, b"\0")
    hdr = bytearray(struct.pack("<8sIIIIQQQQ16sQIII", b"EFI PART", 0x10000, 92, 0, 0, 1, total - 1, 34,
                                total - 34, uuid.uuid4().bytes_le, 2, 128, 128, zlib.crc32(entries)))
    struct.pack_into("<I", hdr, 16, zlib.crc32(bytes(hdr)))
    mbr = bytearray(512)
    struct.pack_into("<4xB3xII", mbr, 446, 0xEE, 1, min(total - 1, 0xFFFFFFFF))
    mbr[510:512] = b"\x55\xaa"
    with open(raw, "r+b") as f:
        f.write(mbr)
        f.write(bytes(hdr).ljust(512, b"\0"))
        f.write(entries)


def _mbr(raw: Path, parts: list[tuple[int, int]]) -> None:
    mbr = bytearray(512)
    for i, (first, last) in enumerate(parts):
        struct.pack_into("<4xB3xII", mbr, 446 + 16 * i, 0x83, first, last - first + 1)
    mbr[510:512] = b"\x55\xaa"
    with open(raw, "r+b") as f:
        f.write(mbr)


def _mbr_logical(raw: Path, parts: list[tuple[int, int]]) -> None:
    """Partition 1 primary; the root a logical partition (5) in an extended one that starts 1 MiB before it."""
    (p1_first, _), (root_first, root_last) = parts
    ext_first = root_first - 2048
    mbr = bytearray(512)
    struct.pack_into("<4xB3xII", mbr, 446, 0x83, p1_first, ext_first - p1_first)
    struct.pack_into("<4xB3xII", mbr, 462, 0x05, ext_first, root_last - ext_first + 1)
    mbr[510:512] = b"\x55\xaa"
    ebr = bytearray(512)
    struct.pack_into("<4xB3xII", ebr, 446, 0x83, 2048, root_last - root_first + 1)
    ebr[510:512] = b"\x55\xaa"
    with open(raw, "r+b") as f:
        f.write(mbr)
        f.seek(ext_first * 512)
        f.write(ebr)


def make_disk(dest: Path, tree: Path | None, root_mib: int, table: str = "gpt",
              second: Callable[[Path, int, int], None] | None = None, first_mib: int = FIRST_MIB,
              boot: Path | None = None) -> None:
    """A qcow2 disk: a first_mib partition (empty, or `boot` as ext4), then `tree` as ext4 (or
    `second(raw, offset, size)`)."""
    raw = dest.with_suffix(".raw")
    start = first_mib + 1
    with open(raw, "wb") as f:
        f.truncate((start + root_mib + 1) * MIB)
    parts = [(2048, start * 2048 - 1), (start * 2048, (start + root_mib) * 2048 - 1)]
    {"gpt": _gpt, "mbr": _mbr, "logical": _mbr_logical}[table](raw, parts)
    if boot is not None:
        _run("mkfs.ext4", "-q", "-F", "-E", f"offset={MIB}", "-L", "boot", "-d", str(boot), str(raw),
             f"{first_mib}M")
    if second is None:
        _run("mkfs.ext4", "-q", "-F", "-E", f"offset={start * MIB}", "-L", "root", "-d", str(tree), str(raw),
             f"{root_mib}M")
    else:
        second(raw, start * MIB, root_mib * MIB)
    _run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(dest))
    raw.unlink()


def _size_mib(tree: Path) -> int:
    out = subprocess.run(["du", "-sm", str(tree)], capture_output=True, text=True, check=True).stdout
    return int(int(out.split()[0]) * 1.3) + 96


def debian_disk(suite: str = "bookworm", extra: tuple[str, ...] = ()) -> Path:
    """A partitioned Debian `suite` disk with its own kernel and python3 (bookworm GPT, others MBR)."""
    tree = debian_root(suite, PACKAGES + extra)
    name = f"{suite}{'-' + '-'.join(sorted(extra)) if extra else ''}-v{VERSION}.qcow2"
    return _cached(name, lambda dest: make_disk(dest, tree, _size_mib(tree), "gpt" if suite == "bookworm" else "mbr"))


def _kernel_version(tree: Path) -> str:
    return next((tree / "usr" / "lib" / "modules").iterdir()).name


# A host file the "hostlink" disk's /etc/os-release points at: an importer that follows the image's links on
# the host would read it and name the image after it.
HOST_BAIT = CACHE / "disks" / "host-bait-os-release"


def _small_tree(dest: Path, kernel: bool = True, drop_module: str | None = None, os_release: str | None = None,
                extra_links: dict[str, str] | None = None) -> None:
    """Only what an import reads, copied from the cached bookworm tree (symlinks kept as they are)."""
    from vmwrap.appliance import DISK_MODULES, GUEST_MODULES, module_closure

    src = debian_root("bookworm", PACKAGES)
    v = _kernel_version(src)
    for d in ("etc", "usr/lib", "boot", "tmp"):
        (dest / d).mkdir(parents=True)
    for link in ("lib", "bin", "sbin"):
        os.symlink(os.readlink(src / link), dest / link)
    os.symlink(os_release or os.readlink(src / "etc" / "os-release"), dest / "etc" / "os-release")
    if os_release is None:
        shutil.copy2(src / "usr" / "lib" / "os-release", dest / "usr" / "lib" / "os-release")
    for link, target in (extra_links or {}).items():
        os.symlink(target, dest / link)
    if kernel:
        shutil.copy2(src / "boot" / f"vmlinuz-{v}", dest / "boot" / f"vmlinuz-{v}")
        os.symlink(f"boot/vmlinuz-{v}", dest / "vmlinuz")
    mods = src / "usr" / "lib" / "modules" / v
    out = dest / "usr" / "lib" / "modules" / v
    out.mkdir(parents=True)
    dep = (mods / "modules.dep").read_text().splitlines()
    if drop_module:  # as if the module were removed and depmod run again
        dep = [ln for ln in dep if f"/{drop_module}.ko" not in ln.partition(":")[0]]
    (out / "modules.dep").write_text("\n".join(dep) + "\n")
    shutil.copy2(mods / "modules.builtin", out / "modules.builtin")
    for rel in module_closure(mods, GUEST_MODULES + DISK_MODULES):
        if drop_module and f"/{drop_module}.ko" in rel:
            continue
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(mods / rel, out / rel)


def small_disk(variant: str) -> Path:
    """A small bookworm-derived test disk (qcow2 unless said otherwise) for one import case:

    good, bare (ext4, no table, raw), mbr (good, MBR), logical (root in an MBR logical partition),
    bootpart (the kernel on a separate /boot partition 1), nokernel, novirtio, unknownfs, truncated,
    notimage (a text file), backing (qcow2 whose backing file is a host file), hostlink (/etc/os-release a
    link to a host file, through '..' past the image's root), linkloop (/etc/os-release a link loop)."""

    def tree_disk(table: str = "gpt", **kw) -> Callable[[Path], None]:
        def make(dest: Path) -> None:
            tree = dest.parent / "tree"
            _small_tree(tree, **kw)
            make_disk(dest, tree, 48, table)
        return make

    def bootpart(dest: Path) -> None:
        tree, boot = dest.parent / "tree", dest.parent / "boot"
        _small_tree(tree, kernel=False)
        src = debian_root("bookworm", PACKAGES)
        boot.mkdir()
        v = _kernel_version(src)
        shutil.copy2(src / "boot" / f"vmlinuz-{v}", boot / f"vmlinuz-{v}")
        make_disk(dest, tree, 48, "gpt", first_mib=24, boot=boot)

    def unknown(dest: Path) -> None:
        def minix(raw: Path, offset: int, size: int) -> None:
            part = raw.with_suffix(".part")
            with open(part, "wb") as f:
                f.truncate(size)
            _run("mkfs.minix", str(part))
            with open(part, "rb") as f, open(raw, "r+b") as out:
                out.seek(offset)
                out.write(f.read())
            part.unlink()
        make_disk(dest, None, 16, "gpt", minix)

    def bare(dest: Path) -> None:
        tree = dest.parent / "tree"
        _small_tree(tree)
        _run("mkfs.ext4", "-q", "-F", "-d", str(tree), str(dest), "48M")

    def truncated(dest: Path) -> None:
        good = small_disk("good")
        size = good.stat().st_size
        with open(good, "rb") as f, open(dest, "wb") as out:
            out.write(f.read(size // 2))

    def notimage(dest: Path) -> None:
        dest.write_text("#!/bin/sh\necho this is a shell script, not a disk image\n" * 200)

    def hostlink(dest: Path) -> None:
        HOST_BAIT.write_text('PRETTY_NAME="read from the host"\n')
        tree_disk(os_release="../../../../../../.." + str(HOST_BAIT))(dest)

    def backing(dest: Path) -> None:
        _run("qemu-img", "create", "-f", "qcow2", "-F", "raw", "-b", "/etc/passwd", str(dest), "1M")

    makers = {
        "good": tree_disk(), "mbr": tree_disk("mbr"), "logical": tree_disk("logical"), "bootpart": bootpart, "bare": bare, "nokernel": tree_disk(kernel=False),
        "novirtio": tree_disk(drop_module="virtio_blk"), "unknownfs": unknown, "truncated": truncated,
        "notimage": notimage, "backing": backing, "hostlink": hostlink,
        "linkloop": tree_disk(os_release="os-release.a", extra_links={"etc/os-release.a": "/etc/os-release"}),
    }
    suffix = {"bare": "raw", "notimage": "txt"}.get(variant, "qcow2")
    return _cached(f"small-{variant}-v{VERSION}.{suffix}", makers[variant])
