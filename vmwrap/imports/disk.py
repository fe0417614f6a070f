"""Import a site's whole-disk Linux image (qcow2 or raw; GPT, MBR or a bare filesystem) with its own kernel.

The image is hostile. It is never mounted on the host and never probed blindly: its format is read from
its first bytes and then stated to every qemu-img call, backing/data files and encryption are refused, and
its filesystems are read with e2fsprogs' debugfs run as nobody (bounded time, file sizes and output). Its
symlinks are resolved here, inside the image, with bounded depth; nothing is ever dumped as a link.

What gets registered: the root filesystem as a standalone ext4 qcow2 (vmwrap's guest agent mounts /dev/vda),
the image's newest kernel (as a PVH ELF when possible: twice as fast to boot under TCG) and vmwrap's initramfs
agent built with that kernel's own modules.
"""

from __future__ import annotations

import json
import lzma
import os
import re
import resource
import stat
import struct
import subprocess
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .. import appliance
from ..catalog import Image
from ..directives import check_image_name
from ..errors import ImageError, NodeError, UserError
from .publish import install, scratch_dir

QEMU_IMG = "/usr/bin/qemu-img"
DEBUGFS = "/usr/sbin/debugfs"
BLKID = "/usr/sbin/blkid"
NOBODY = 65534
SECTOR = 512
QCOW2_MAGIC = b"QFI\xfb"
# Other image formats that must not be read as raw (their headers would be taken for a disk).
OTHER_MAGIC = {b"KDMV": "vmdk", b"QED\x00": "qed", b"vhdxfile": "vhdx", b"conectix": "vpc",
               b"LUKS\xba\xbe": "LUKS"}
ROOT_FS = ("ext2", "ext3", "ext4")
MAX_SMALL = 8 << 20  # os-release, modules.dep, modules.builtin
MAX_KERNEL = 128 << 20  # a vmlinuz
MAX_VMLINUX = 512 << 20  # its decompressed ELF
MAX_LISTING = 16 << 20  # one debugfs answer
MAX_LINKS = 16  # symlinks followed while resolving one path
MAX_PARTITIONS = 128
DEBUGFS_SECONDS = 120
_VERSION = re.compile(r"[0-9][A-Za-z0-9.+_~-]{0,63}")
_MODPATH = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9_.+/-]{0,255}\.ko(\.xz|\.zst|\.gz)?")
_LS_LINE = re.compile(rb"(?m)^/(\d+)/(\d+)/\d+/\d+/([^/\n]*)/(\d*)/")


def import_disk(source: Path, name: str, out_dir: Path, catalog_path: str, *, max_bytes: int | None,
                on_stage: Callable[[str], None]) -> Image:
    """Import `source` as image `name`: files under out_dir/name, registered in the catalog last.

    Any failure raises ImageError (one line naming the source) and leaves out_dir and the catalog as they were."""
    try:
        check_image_name(name)
    except UserError as e:
        raise ImageError(str(e)) from None
    src = Path(source)
    out = Path(out_dir)
    made = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        with scratch_dir(out, name) as t:
            return _import(src, name, out, t, catalog_path, max_bytes, on_stage)
    except ImageError:
        raise
    except (NodeError, OSError, subprocess.SubprocessError) as e:
        raise ImageError(f"{src}: {e}") from None
    finally:
        if made and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a failed import leaves no trace, not even the dir it would have used


def _import(src: Path, name: str, out: Path, tmp: Path, catalog_path: str, max_bytes: int | None,
            stage: Callable[[str], None]) -> Image:
    stage("check the image (format, backing files, size, consistency)")
    disk = Disk.open(src, max_bytes)
    stage("partition table and filesystems")
    regions = disk.regions()
    found: list[str] = []
    fs = None
    others: list[tuple[str, int, int]] = []  # other ext filesystems: where a separate /boot may be
    for label, offset, size in regions:
        kind = disk.fstype(offset, size, tmp)
        found.append(f"{label}: {kind}")
        if kind not in ROOT_FS:
            continue
        if fs is not None:
            others.append((label, offset, size))
            continue
        slice_ = tmp / f"{label.replace(' ', '')}.raw"
        disk.extract(offset, size, slice_)
        cand = ExtFS(slice_, tmp, f"{src} {label}")
        if cand.exists("/etc/os-release") and (cand.exists("/lib/modules") or cand.exists("/usr/lib/modules")):
            fs = cand
            continue
        cand.close()
        slice_.unlink()
        others.append((label, offset, size))
    if fs is None:
        raise ImageError(f"{src}: no Linux root filesystem (ext2/3/4 with /etc/os-release and /lib/modules) "
                         f"found: {'; '.join(found) or 'nothing'}")
    os_name = _os_release(fs.read("/etc/os-release", MAX_SMALL))
    stage("kernel")
    version, kfs, kpath = _newest_kernel(fs, disk, others, tmp)
    moddir = f"/lib/modules/{version}"
    km = appliance.KernelModules(version, fs.read(f"{moddir}/modules.dep", MAX_SMALL).decode("utf-8", "replace"),
                                 fs.read(f"{moddir}/modules.builtin", MAX_SMALL).decode("utf-8", "replace")
                                 if fs.exists(f"{moddir}/modules.builtin") else "",
                                 fs.module_reader(moddir))
    stage(f"initrd: vmwrap's agent with kernel {version}'s modules")
    new = tmp / "image"
    new.mkdir()
    appliance.build_initrd(km, new / "initrd.cpio", tmp)
    vmlinuz = tmp / "vmlinuz"
    vmlinuz.write_bytes(kfs.read(kpath, MAX_KERNEL))
    kernel = new / "vmlinux"
    if not pvh_vmlinux(vmlinuz, kernel):
        kernel = new / "vmlinuz"  # no PVH ELF inside: boot the bzImage itself (slower under TCG)
        os.replace(vmlinuz, kernel)
    stage("root disk: the root filesystem as a standalone qcow2")
    _qemu_img(["convert", "-f", "raw", "-O", "qcow2", str(fs.path), str(new / "root.qcow2")], src)
    fs.close()
    fs.path.unlink()
    stage("hash and register in the catalog")
    return install(new, out / name, tmp, lambda dest: Image(
        name=name, boot="kernel",
        kernel=appliance.artifact(dest / kernel.name), initrd=appliance.artifact(dest / "initrd.cpio"),
        disk=appliance.artifact(dest / "root.qcow2", "qcow2"), origin=f"disk {os_name} kernel {version}",
        description=f"whole-disk import of {src.name}: {os_name}, kernel {version}"), catalog_path)


def _os_release(data: bytes) -> str:
    fields = {}
    for line in data.decode("utf-8", "replace").splitlines():
        k, _, v = line.partition("=")
        fields[k.strip()] = v.strip().strip("\"'")
    name = fields.get("PRETTY_NAME") or fields.get("NAME") or "unknown Linux"
    return "".join(c for c in name if c.isprintable())[:80]


def _version_key(v: str) -> list:
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"[.+~_-]", v)]


def _kernels(fs: "ExtFS", boot: str) -> list[str]:
    return [n[len("vmlinuz-"):] for n, e in fs.listdir(boot).items() if n.startswith("vmlinuz-")]


def _newest_kernel(root: "ExtFS", disk: "Disk", others: list[tuple[str, int, int]],
                   tmp: Path) -> tuple[str, "ExtFS", str]:
    """(V, filesystem, path) of the newest vmlinuz-V that has a /lib/modules/V/modules.dep in the root:
    from the root's /boot, else from a separate /boot partition (another ext fs with vmlinuz-V on top)."""
    seen: list[str] = []

    def usable(versions: list[str]) -> list[str]:
        seen.extend(versions)
        return [v for v in versions if _VERSION.fullmatch(v) and root.exists(f"/lib/modules/{v}/modules.dep")]

    ok = usable(_kernels(root, "/boot"))
    if ok:
        v = max(ok, key=_version_key)
        return v, root, f"/boot/vmlinuz-{v}"
    for label, offset, size in others:
        slice_ = tmp / f"{label.replace(' ', '')}.raw"
        disk.extract(offset, size, slice_)
        boot = ExtFS(slice_, tmp, f"{disk.path} {label}")
        ok = usable(_kernels(boot, "/"))
        if ok:
            v = max(ok, key=_version_key)
            return v, boot, f"/vmlinuz-{v}"
        boot.close()
        slice_.unlink()
    shown = ", ".join(sorted(seen)[:5]) or "none"
    raise ImageError(f"{disk.path}: no kernel: needs /boot/vmlinuz-V (or vmlinuz-V on a /boot partition) with "
                     f"/lib/modules/V/modules.dep (vmlinuz versions found: {shown})")


# --- the disk: format, partitions, slices -----------------------------------------------------------

def _opts(fmt: str, path: Path, offset: int | None = None, size: int | None = None) -> str:
    """--image-opts text: the format and the file protocol are stated, never probed (commas doubled)."""
    f = str(path).replace(",", ",,")
    if offset is None:
        return f"driver={fmt},file.driver=file,file.filename={f}"
    return (f"driver=raw,offset={offset},size={size},file.driver={fmt},"
            f"file.file.driver=file,file.file.filename={f}")


def _qemu_img(argv: list[str], src: Path, timeout: float = 3600) -> str:
    try:
        r = subprocess.run([QEMU_IMG, *argv], capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise NodeError(f"{QEMU_IMG} is not installed (run scripts/install-host.sh)") from None
    if r.returncode != 0:
        msg = " ".join((r.stderr or r.stdout).split())[-300:]
        raise ImageError(f"{src}: qemu-img {argv[0]} failed: {msg}")
    return r.stdout


@dataclass
class Disk:
    path: Path
    fmt: str
    size: int  # virtual size, bytes

    @classmethod
    def open(cls, src: Path, max_bytes: int | None) -> "Disk":
        try:  # O_NONBLOCK: a FIFO must not hang the import; it is refused below
            with open(os.open(src, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
                st = os.fstat(f.fileno())
                head = f.read(8) if stat.S_ISREG(st.st_mode) else b""
        except OSError as e:
            raise ImageError(f"{src}: cannot read: {e.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise ImageError(f"{src}: not a regular file")
        for magic, kind in OTHER_MAGIC.items():
            if head.startswith(magic):
                raise ImageError(f"{src}: {kind} images are not supported (qcow2 or raw)")
        fmt = "qcow2" if head.startswith(QCOW2_MAGIC) else "raw"
        if max_bytes is not None and st.st_size > max_bytes:
            raise ImageError(f"{src}: file is {st.st_size} bytes, above the limit of {max_bytes}")
        info = json.loads(_qemu_img(["info", "--output=json", "--image-opts", _opts(fmt, src)], src, 120))
        backing = info.get("full-backing-filename") or info.get("backing-filename")
        if backing:
            raise ImageError(f"{src}: has a backing file ({backing[:100]!r}): import a standalone image")
        data = (info.get("format-specific") or {}).get("data") or {}
        if data.get("data-file"):
            raise ImageError(f"{src}: has an external data file ({str(data['data-file'])[:100]!r}): not supported")
        if info.get("encrypted") or data.get("encrypt"):
            raise ImageError(f"{src}: is encrypted: not supported")
        vsize = int(info.get("virtual-size") or 0)
        actual = int(info.get("actual-size") or 0)
        if max_bytes is not None and max(vsize, actual) > max_bytes:
            raise ImageError(f"{src}: {fmt} image of {vsize} bytes virtual, {actual} on disk: above the limit "
                             f"of {max_bytes}")
        if vsize < 4096:
            raise ImageError(f"{src}: {vsize} bytes: too small to hold a Linux root filesystem")
        if fmt == "qcow2":
            r = subprocess.run([QEMU_IMG, "check", "--output=json", "--image-opts", _opts(fmt, src)],
                               capture_output=True, text=True, timeout=600)
            if r.returncode not in (0, 3):  # 1: not checkable, 2: corruptions, 3: only leaks (harmless)
                try:
                    res = json.loads(r.stdout)
                    why = f"{res.get('corruptions', 0)} corruptions, {res.get('check-errors', 0)} check errors"
                except ValueError:
                    why = (r.stderr.strip().splitlines() or ["no detail"])[0][:200]
                raise ImageError(f"{src}: damaged or truncated qcow2 (qemu-img check: {why})")
        return cls(src, fmt, vsize)

    def read(self, offset: int, size: int) -> bytes:
        """Bytes of the virtual disk (zeros past its end)."""
        size = max(0, min(size, self.size - offset))
        if size == 0:
            return b""
        if self.fmt == "raw":
            with open(self.path, "rb") as f:
                f.seek(offset)
                return f.read(size).ljust(size, b"\0")
        with tempfile.NamedTemporaryFile(prefix="vmwrap-read-") as t:
            self.extract(offset, size, Path(t.name))
            return Path(t.name).read_bytes()[:size]

    def extract(self, offset: int, size: int, dest: Path) -> None:
        """A region as a sparse raw file, without ever mounting or probing it."""
        _qemu_img(["convert", "--image-opts", _opts(self.fmt, self.path, offset, size), "-O", "raw", str(dest)],
                  self.path)

    def regions(self) -> list[tuple[str, int, int]]:
        """(label, offset, size) of each partition; the whole disk when there is no partition table."""
        head = self.read(0, 2 * SECTOR)
        if head[SECTOR:SECTOR + 8] == b"EFI PART":
            return self._gpt(head[SECTOR:])
        if _ext_kind(self.read(1024, 1024)) or head[510:512] != b"\x55\xaa":
            return [("whole disk", 0, self.size)]
        parts = self._mbr(head)
        return parts or [("whole disk", 0, self.size)]

    def _bad(self, what: str) -> ImageError:
        return ImageError(f"{self.path}: {what}")

    def _region(self, label: str, first_lba: int, sectors: int) -> tuple[str, int, int]:
        off, size = first_lba * SECTOR, sectors * SECTOR
        if first_lba <= 0 or sectors <= 0 or off + size > self.size:
            raise self._bad(f"{label} lies outside the disk (sector {first_lba}, {sectors} sectors)")
        return (label, off, size)

    def _gpt(self, hdr: bytes) -> list[tuple[str, int, int]]:
        hsize, crc = struct.unpack_from("<II", hdr, 12)
        if not 92 <= hsize <= SECTOR or zlib.crc32(hdr[:16] + b"\0\0\0\0" + hdr[20:hsize]) != crc:
            raise self._bad("damaged GPT header (bad size or checksum)")
        entries_lba, count, esize, ecrc = struct.unpack_from("<QIII", hdr, 72)
        if not (128 <= esize <= 1024 and esize % 8 == 0) or count > 4096 or count * esize > 1 << 20:
            raise self._bad(f"GPT with implausible entries ({count} of {esize} bytes)")
        table = self.read(entries_lba * SECTOR, count * esize)
        if len(table) != count * esize or zlib.crc32(table) != ecrc:
            raise self._bad("damaged GPT partition entries (checksum)")
        out = []
        for i in range(count):
            e = table[i * esize:(i + 1) * esize]
            if e[:16] == b"\0" * 16:
                continue
            first, last = struct.unpack_from("<QQ", e, 32)
            if len(out) >= MAX_PARTITIONS:
                raise self._bad(f"more than {MAX_PARTITIONS} partitions")
            out.append(self._region(f"partition {i + 1}", first, last - first + 1))
        return out

    def _mbr(self, mbr: bytes) -> list[tuple[str, int, int]]:
        out = []
        for i in range(4):
            kind, first, count = struct.unpack_from("<4xB3xII", mbr, 446 + 16 * i)
            if kind == 0 or count == 0:
                continue
            if kind in (0x05, 0x0F, 0x85):
                out += self._logical(first)
                continue
            out.append(self._region(f"partition {i + 1}", first, count))
        return out

    def _logical(self, ext_first: int) -> list[tuple[str, int, int]]:
        """Logical partitions: a chain of EBRs inside the extended one (bounded, no loops)."""
        out, ebr, seen = [], ext_first, set()
        while ebr and len(out) < MAX_PARTITIONS and ebr not in seen:
            seen.add(ebr)
            rec = self.read(ebr * SECTOR, SECTOR)
            if rec[510:512] != b"\x55\xaa":
                break
            kind, first, count = struct.unpack_from("<4xB3xII", rec, 446)
            if kind and count:
                out.append(self._region(f"partition {len(out) + 5}", ebr + first, count))
            _k, nxt, _c = struct.unpack_from("<4xB3xII", rec, 462)
            ebr = ext_first + nxt if nxt else 0
        return out

    def fstype(self, offset: int, size: int, tmp: Path) -> str:
        """The filesystem in a region: ext2/3/4 from its superblock, else what blkid -p says of its head."""
        head = self.read(offset, min(size, 1 << 20))
        kind = _ext_kind(head[1024:2048])
        if kind:
            return kind
        fd = os.memfd_create("vmwrap-probe")
        try:
            os.write(fd, head)
            rc, out, _err = _as_nobody([BLKID, "-p", "-o", "value", "-s", "TYPE", f"/proc/self/fd/{fd}"], fd,
                                       f"{self.path}: blkid")
        finally:
            os.close(fd)
        found = re.sub(r"[^A-Za-z0-9_.-]", "", out.decode("ascii", "replace") if rc == 0 else "")[:32]
        return found or "unknown (no filesystem signature)"


def _ext_kind(sb: bytes) -> str | None:
    if len(sb) < 100 or sb[56:58] != b"\x53\xef":
        return None
    compat, incompat, _ro = struct.unpack_from("<III", sb, 92)
    if incompat & 0x2C0:  # extents, 64bit, flex_bg
        return "ext4"
    return "ext3" if compat & 0x4 else "ext2"  # has_journal


# --- reading the image's ext filesystem with debugfs, as nobody ---------------------------------------

@dataclass
class Entry:
    ino: int
    mode: int
    size: int

    @property
    def is_dir(self) -> bool:
        return self.mode & 0o170000 == 0o040000

    @property
    def is_link(self) -> bool:
        return self.mode & 0o170000 == 0o120000

    @property
    def is_file(self) -> bool:
        return self.mode & 0o170000 == 0o100000


class ExtFS:
    """Files of an ext2/3/4 filesystem image, read with debugfs (never mounted), paths resolved here."""

    def __init__(self, path: Path, tmp: Path, label: str):
        self.path, self.label = path, label
        # debugfs runs as nobody: it gets the image as an open fd (/proc/self/fd/N, no path to traverse)
        # and a dump dir of its own as its cwd; everything else under tmp stays root's (0700).
        self.work = Path(tempfile.mkdtemp(prefix="debugfs-", dir=tmp))
        os.chown(self.work, NOBODY, NOBODY)
        os.chown(path, NOBODY, NOBODY)
        path.chmod(0o400)
        self._fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        self._dirs: dict[int, dict[str, Entry]] = {}
        self._debugfs("stats")  # fails early and clearly on a damaged filesystem

    def close(self) -> None:
        os.close(self._fd)

    def _debugfs(self, cmd: str) -> bytes:
        rc, out, err = _as_nobody([DEBUGFS, "-c", "-R", cmd, f"/proc/self/fd/{self._fd}"], self._fd,
                                  f"{self.label}: debugfs", cwd=self.work)
        if rc != 0 or any(m in err for m in (b"Bad magic number", b"while opening", b"not open",
                                                       b"while reading", b"Corrupt")):
            lines = [ln for ln in err.decode("utf-8", "replace").splitlines() if ln and not ln.startswith("debugfs 1")]
            why = " ".join(" ".join(lines).split())[:200]
            raise ImageError(f"{self.label}: unreadable ext filesystem: {why}")
        return out

    def _list(self, ino: int) -> dict[str, Entry]:
        if ino not in self._dirs:
            out = {}
            for m in _LS_LINE.finditer(self._debugfs(f"ls -p <{ino}>")):
                name = m.group(3).decode("utf-8", "surrogateescape")
                if name not in (".", ".."):
                    out[name] = Entry(int(m.group(1)), int(m.group(2), 8), int(m.group(4) or 0))
            self._dirs[ino] = out
        return self._dirs[ino]

    def _link_target(self, e: Entry) -> str:
        if e.size > 4095:
            raise ImageError(f"{self.label}: symlink target of {e.size} bytes")
        out = self._debugfs(f"stat <{e.ino}>")
        m = re.search(rb'Fast link dest: "([^"\n]*)"', out)
        if m:
            target = m.group(1)
        else:
            target = self._dump(e, e.size or 4095)
        return target.decode("utf-8", "surrogateescape")

    def _dump(self, e: Entry, limit: int) -> bytes:
        if e.size > limit:
            raise ImageError(f"{self.label}: a file of {e.size} bytes where at most {limit} were expected")
        dest = self.work / "dump"
        self._debugfs(f"dump <{e.ino}> dump")
        try:  # debugfs ran as nobody in a dir nobody owns: never follow what it left there
            fd = os.open(dest, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            raise ImageError(f"{self.label}: debugfs could not read inode {e.ino}") from None
        with open(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise ImageError(f"{self.label}: debugfs left no regular file for inode {e.ino}")
            data = f.read(limit + 1)[:limit]
        dest.unlink(missing_ok=True)
        return data

    def lookup(self, path: str) -> Entry | None:
        """The entry at `path`, following symlinks inside this filesystem only (absolute targets start
        at its root; '..' stops at its root), at most MAX_LINKS of them."""
        parts = [p for p in path.split("/") if p]
        stack: list[Entry] = []
        root = Entry(2, 0o040000, 0)
        links = 0
        while parts:
            part = parts.pop(0)
            cur = stack[-1] if stack else root
            if part == ".":
                continue
            if part == "..":
                if stack:
                    stack.pop()
                continue
            if not cur.is_dir:
                return None
            e = self._list(cur.ino).get(part)
            if e is None:
                return None
            if e.is_link:
                links += 1
                if links > MAX_LINKS:
                    raise ImageError(f"{self.label}: more than {MAX_LINKS} symlinks resolving {path}")
                target = self._link_target(e)
                if target.startswith("/"):
                    stack = []
                parts = [p for p in target.split("/") if p] + parts
                continue
            stack.append(e)
        return stack[-1] if stack else root

    def exists(self, path: str) -> bool:
        return self.lookup(path) is not None

    def listdir(self, path: str) -> dict[str, Entry]:
        e = self.lookup(path)
        return self._list(e.ino) if e is not None and e.is_dir else {}

    def read(self, path: str, limit: int) -> bytes:
        e = self.lookup(path)
        if e is None or not e.is_file:
            raise ImageError(f"{self.label}: {path} is missing or not a regular file")
        return self._dump(e, limit)

    def module_reader(self, moddir: str) -> Callable[[str], bytes]:
        def read(rel: str) -> bytes:
            if not _MODPATH.fullmatch(rel) or ".." in rel.split("/"):
                raise ImageError(f"{self.label}: implausible module path {rel[:100]!r} in modules.dep")
            return self.read(f"{moddir}/{rel}", appliance.MAX_MODULE_BYTES)
        return read


def _as_nobody(argv: list[str], fd: int, what: str, cwd: Path | None = None) -> tuple[int, bytes, bytes]:
    """Run a parser of hostile bytes as nobody (no groups), the data as open fd `fd`, with bounded time,
    memory, file sizes and output: (returncode, stdout, stderr)."""
    def limits() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (MAX_VMLINUX, MAX_VMLINUX))
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    try:
        with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                              cwd=cwd or "/", pass_fds=(fd,), user=NOBODY, group=NOBODY, extra_groups=[],
                              preexec_fn=limits) as p:
            try:
                out, err = p.communicate(timeout=DEBUGFS_SECONDS)
            except subprocess.TimeoutExpired:
                p.kill()
                raise ImageError(f"{what} took over {DEBUGFS_SECONDS} s") from None
    except FileNotFoundError:
        raise NodeError(f"{argv[0]} is not installed (e2fsprogs, util-linux)") from None
    if len(out) > MAX_LISTING:
        raise ImageError(f"{what}: output above {MAX_LISTING} bytes")
    return p.returncode, out, err


# --- the kernel ----------------------------------------------------------------------------------------

def pvh_vmlinux(bzimage: Path, dest: Path) -> bool:
    """Write the bzImage's uncompressed ELF to dest if it has a PVH entry note (bootable by QEMU directly).

    Unlike appliance.extract_vmlinux (for Debian's own kernel package) this trusts nothing in the file:
    the payload is taken from the boot-protocol header, its decompression is bounded, the ELF is parsed."""
    data = bzimage.read_bytes()
    if len(data) < 0x260 or data[0x202:0x206] != b"HdrS" or struct.unpack_from("<H", data, 0x206)[0] < 0x208:
        return False
    setup = (data[0x1F1] or 4) + 1
    off, length = struct.unpack_from("<II", data, 0x248)
    payload = data[setup * SECTOR + off: setup * SECTOR + off + length]
    try:
        if payload.startswith(b"\xfd7zXZ\x00"):
            d = lzma.LZMADecompressor()
            elf = d.decompress(payload, max_length=MAX_VMLINUX + 1)
        elif payload.startswith(b"\x1f\x8b"):
            elf = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(payload, MAX_VMLINUX + 1)
        elif payload.startswith(b"\x28\xb5\x2f\xfd"):  # zstd (trixie): the kernel appends its 4-byte size
            elf = appliance.unzstd(payload[:-4], MAX_VMLINUX + 1)
        else:
            return False  # lz4, lzo, bzip2: boot the bzImage
    except (lzma.LZMAError, zlib.error, EOFError, OSError):
        return False
    if len(elf) > MAX_VMLINUX or not _has_pvh_note(elf):
        return False
    dest.write_bytes(elf)
    return True


def _has_pvh_note(elf: bytes) -> bool:
    if elf[:5] != b"\x7fELF\x02" or len(elf) < 64:
        return False
    phoff, = struct.unpack_from("<Q", elf, 32)
    phentsize, phnum = struct.unpack_from("<HH", elf, 54)
    for i in range(min(phnum, 64)):
        base = phoff + i * phentsize
        if base + 56 > len(elf):
            return False
        ptype, _flags, poff, _va, _pa, fsz = struct.unpack_from("<IIQQQQ", elf, base)
        if ptype != 4:  # PT_NOTE
            continue
        pos, end = poff, min(poff + fsz, len(elf))
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12:pos + 12 + namesz]
            if name.rstrip(b"\0") == b"Xen" and ntype == 18:  # XEN_ELFNOTE_PHYS32_ENTRY
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False
