"""Build bootable appliances from Debian packages: a Debian kernel, vmwrap's initramfs agent, a root disk.

Everything built lands in the appliance dir (outside the repository) and is registered in the catalog.
"""

from __future__ import annotations

import lzma
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .cache import sha256_file
from .catalog import Artifact, Image, register
from .errors import NodeError, VmwrapError
from .resources import TEMPLATES

GUEST_MODULES = ["virtio_pci", "virtio_console", "9p", "9pnet_virtio", "9pnet_fd"]
DISK_MODULES = ["virtio_blk", "crc32c_generic", "ext4"]  # loaded only when the VM has a root disk
NET_MODULES = ["virtio_net"]  # loaded only when the VM has a network card (an image with network = "nat")
BUSYBOX = "/bin/busybox"


def _run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, check=True, capture_output=True, text=True, **kw)
    except FileNotFoundError:
        raise NodeError(f"{argv[0]} is not installed (run scripts/install-host.sh)") from None
    except subprocess.CalledProcessError as e:
        raise NodeError(f"{' '.join(argv[:3])} failed: {e.stderr.strip()[-800:]}") from None


def debian_kernel(workdir: Path) -> tuple[Path, Path]:
    """Download and unpack the current Debian kernel package; return (vmlinuz, modules dir)."""
    out = _run(["apt-cache", "depends", "--no-recommends", "linux-image-amd64"]).stdout
    pkg = next((ln.split()[1] for ln in out.splitlines() if "Depends: linux-image-" in ln), None)
    if not pkg:
        raise NodeError("cannot find the Debian kernel package (apt-get update first?)")
    workdir.mkdir(parents=True, exist_ok=True)
    _run(["apt-get", "download", "-q", pkg], cwd=workdir)
    deb = next(workdir.glob(f"{pkg}_*.deb"))
    root = workdir / "root"
    _run(["dpkg", "-x", str(deb), str(root)])
    vmlinuz = next((root / "boot").glob("vmlinuz-*"))
    moddir = next((root / "lib" / "modules").iterdir())
    _run(["depmod", "-b", str(root), moddir.name])  # the .deb ships no modules.dep
    return vmlinuz, moddir


def extract_vmlinux(bzimage: Path, dest: Path) -> None:
    """The uncompressed ELF kernel boots via PVH, about twice as fast under TCG as the bzImage."""
    data = bzimage.read_bytes()
    for magic, opener in ((b"\xfd7zXZ\x00", lambda b: lzma.LZMADecompressor().decompress(b)),
                          (b"\x1f\x8b\x08", _gunzip)):
        i = data.find(magic)
        while i >= 0:
            try:
                out = opener(data[i:])
                if out[:4] == b"\x7fELF":
                    dest.write_bytes(out)
                    return
            except Exception:
                pass
            i = data.find(magic, i + 1)
    raise NodeError(f"no ELF kernel found inside {bzimage}")


def _gunzip(b: bytes, limit: int = 0) -> bytes:
    import zlib
    try:
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(b, limit)
    except zlib.error as e:
        raise OSError(str(e)) from None


# Older kernels have no separate module for these: the named module carries them (9pnet had trans_fd built in).
PROVIDED_BY = {"9pnet_fd": "9pnet"}
MAX_MODULE_BYTES = 64 << 20  # a decompressed module above this is not a virtio/9p/ext4 driver


@dataclass(frozen=True)
class KernelModules:
    """One kernel's module index and a reader for its module files: a host dir, or an imported image's."""

    version: str
    dep: str  # modules.dep
    builtin: str  # modules.builtin ('' if the kernel has none)
    read: Callable[[str], bytes]  # one module file's bytes by its modules.dep path (maybe compressed)

    @classmethod
    def from_dir(cls, moddir: Path) -> "KernelModules":
        builtin = moddir / "modules.builtin"
        return cls(moddir.name, (moddir / "modules.dep").read_text(),
                   builtin.read_text() if builtin.exists() else "", lambda rel: (moddir / rel).read_bytes())


def _mod_name(path: str) -> str:
    return Path(path).name.split(".ko")[0].replace("-", "_")


def module_closure(moddir: Path | KernelModules, wanted: list[str]) -> list[str]:
    """Relative paths of `wanted` modules and their dependencies, dependencies first.

    A wanted module built into the kernel needs nothing; one that is neither a module nor built in is an error."""
    km = moddir if isinstance(moddir, KernelModules) else KernelModules.from_dir(moddir)
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in km.dep.splitlines():
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
        by_name[_mod_name(mod)] = mod
    builtin = {_mod_name(ln) for ln in km.builtin.split()}
    order: list[str] = []

    def visit(m: str) -> None:
        if m in order:
            return
        for d in deps.get(m, []):
            visit(d)
        order.append(m)

    for want in wanted:
        name = want if want in by_name or want in builtin else PROVIDED_BY.get(want, want)
        if name in by_name:
            visit(by_name[name])
        elif name not in builtin:
            raise NodeError(f"kernel {km.version} has no {want}: neither a module (modules.dep) nor built in "
                            "(modules.builtin)")
    return order


def plain_module(rel: str, data: bytes) -> tuple[str, bytes]:
    """A module as busybox insmod loads it: decompressed (.ko.xz/.ko.zst/.ko.gz, as newer Debian kernels
    ship them), its path without the suffix. Output is bounded: the bytes may come from a hostile image."""
    if rel.endswith(".ko"):
        return rel, data
    base, _, ext = rel.rpartition(".")
    if not base.endswith(".ko") or ext not in ("xz", "zst", "gz"):
        raise NodeError(f"module {rel}: unknown compression")
    try:
        if ext == "xz":
            d = lzma.LZMADecompressor()
            out = d.decompress(data, max_length=MAX_MODULE_BYTES + 1)
        elif ext == "gz":
            out = _gunzip(data, MAX_MODULE_BYTES + 1)
        else:
            out = unzstd(data, MAX_MODULE_BYTES + 1)
    except (lzma.LZMAError, OSError, EOFError) as e:
        raise NodeError(f"module {rel} does not decompress: {e}") from None
    if len(out) > MAX_MODULE_BYTES or out[:4] != b"\x7fELF":
        raise NodeError(f"module {rel} is not a kernel module once decompressed")
    return base, out


def unzstd(data: bytes, limit: int) -> bytes:
    """zstd-decompress at most `limit` bytes (a longer output is cut there: callers refuse it)."""
    with tempfile.TemporaryFile() as f:
        f.write(data)
        f.seek(0)
        with subprocess.Popen(["/usr/bin/zstd", "-dcq"], stdin=f, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL) as p:
            out = p.stdout.read(limit)
            if len(out) >= limit:
                p.kill()
                return out  # too big: the caller refuses it
    if p.returncode != 0:
        raise OSError("zstd failed")
    return out


SIG_MAGIC = b"~Module signature appended~\n"


def strip_signature(ko: bytes) -> bytes:
    """Drop a module's appended signature: checking it costs ~1 s of boot under TCG for our ~17 modules.

    The guest kernel does not enforce signatures (no Secure Boot, no module.sig_enforce), and the
    modules come from a Debian package verified by apt.
    """
    if not ko.endswith(SIG_MAGIC):
        return ko
    sig_len = int.from_bytes(ko[-len(SIG_MAGIC) - 4:-len(SIG_MAGIC)], "big")
    return ko[: len(ko) - len(SIG_MAGIC) - 12 - sig_len]


def build_helper(dest: Path, source: str = "vmwrap-exec.c") -> None:
    _run(["gcc", "-static", "-Os", "-o", str(dest), str(TEMPLATES / "guest" / source)])


def build_initrd(moddir: Path | KernelModules, dest: Path, tmp: Path) -> None:
    """vmwrap's initramfs agent for one kernel: busybox, helpers, init.sh and that kernel's guest modules."""
    km = moddir if isinstance(moddir, KernelModules) else KernelModules.from_dir(moddir)
    root = tmp / "initrd"
    for d in ("bin", "proc", "sys", "dev", "etc", "ctl", "ctl.copy", "newroot", "run", "lib/modules"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    os.symlink("busybox", root / "bin" / "sh")
    build_helper(root / "bin" / "vmwrap-exec")
    build_helper(root / "bin" / "vmwrap-relay", "vmwrap-relay.c")
    build_helper(root / "bin" / "vmwrap-srun", "vmwrap-srun.c")
    build_helper(root / "bin" / "vmwrap-shell", "vmwrap-shell.c")
    closure = module_closure(km, GUEST_MODULES)
    disk_closure = [m for m in module_closure(km, GUEST_MODULES + DISK_MODULES) if m not in closure]
    names: dict[str, str] = {}

    def put(mods: list[str]) -> None:
        got = {m: plain_module(m, km.read(m)) for m in mods if m not in names}  # all read before any is written
        for m, (name, data) in got.items():
            names[m] = name
            target = root / "lib" / "modules" / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(strip_signature(data))

    put(closure + disk_closure)
    # Optional: a kernel (or an imported image's /lib/modules) without virtio-net or one of its
    # dependencies still boots jobs, only not those of images with a network.
    try:
        net_closure = [m for m in module_closure(km, GUEST_MODULES + NET_MODULES) if m not in closure]
        put(net_closure)
    except (VmwrapError, OSError):
        net_closure = []
    mods, disk_mods = [names[m] for m in closure], [names[m] for m in disk_closure]
    (root / "etc" / "vmwrap-modules").write_text("\n".join(mods) + "\n")
    (root / "etc" / "vmwrap-disk-modules").write_text("\n".join(disk_mods) + "\n")
    (root / "etc" / "vmwrap-net-modules").write_text("".join(names[m] + "\n" for m in net_closure))
    shutil.copy2(TEMPLATES / "guest" / "init.sh", root / "init")
    (root / "init").chmod(0o755)
    _cpio(root, dest)


def _cpio(root: Path, dest: Path) -> None:
    files = subprocess.run(["find", ".", "-print0"], cwd=root, check=True, capture_output=True).stdout
    with open(dest, "wb") as out:
        subprocess.run(["cpio", "--null", "-o", "-H", "newc", "--quiet", "--owner=0:0"],
                       cwd=root, input=files, stdout=out, check=True)


def build_busybox_root(dest: Path, tmp: Path, size_mib: int = 64) -> None:
    """A tiny userland: busybox + /bin/sh, enough for test jobs; the real thing is the debootstrap kind."""
    root = tmp / "rootfs"
    for d in ("bin", "sbin", "usr/bin", "etc", "tmp", "home", "root", "var", "proc", "sys", "dev"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True).stdout.split()
    for a in applets:
        if a != "busybox" and not (root / "bin" / a).exists():
            os.symlink("busybox", root / "bin" / a)
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\n")
    (root / "tmp").chmod(0o1777)
    _ext4(root, dest, tmp, size_mib)


# Debian Policy 5.6.7: lower case letters, digits, '+', '-', '.'; at least two characters, starting
# with a letter or digit. Anything else never reaches debootstrap's command line.
DEBIAN_PACKAGE = re.compile(r"[a-z0-9][a-z0-9+.-]{1,99}")


def check_packages(packages: list[str]) -> list[str]:
    """The package names, each checked against Debian's grammar (UserError naming the first bad one)."""
    from .errors import UserError

    for p in packages:
        if not DEBIAN_PACKAGE.fullmatch(p):
            raise UserError(f"--packages: {p[:60]!r} is not a Debian package name (lower-case letters, digits, "
                            "'+', '-', '.'; at least 2 characters, starting with a letter or digit)")
    if len(packages) > 200:
        raise UserError(f"--packages: {len(packages)} packages; at most 200")
    return packages


def build_debootstrap_root(dest: Path, tmp: Path, suite: str = "bookworm", size_mib: int = 1024,
                           packages: list[str] | None = None, debs: Path | None = None) -> None:
    """A Debian minbase root with `packages` (and their dependencies); the disk is sized from the tree."""
    root = tmp / "rootfs"
    argv = ["debootstrap", "--variant=minbase"]
    if packages:
        argv.append("--include=" + ",".join(check_packages(packages)))
    if debs is not None:  # downloaded .debs kept for the next build (debootstrap checks them again)
        debs.mkdir(parents=True, exist_ok=True)
        argv.append(f"--cache-dir={debs}")
    _run([*argv, suite, str(root)])
    shutil.rmtree(root / "var" / "cache" / "apt" / "archives", ignore_errors=True)
    (root / "var" / "cache" / "apt" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    _ext4(root, dest, tmp, max(size_mib, tree_mib(root) * 5 // 4 + 256))


def tree_mib(root: Path) -> int:
    """MiB the tree takes on disk (allocated blocks, plus one 4 KiB block per inode), links not followed."""
    total = 0
    for d, dirs, files in os.walk(root):
        for n in dirs + files:
            try:
                total += os.lstat(os.path.join(d, n)).st_blocks * 512 + 4096
            except OSError:
                pass
    return total >> 20


def _ext4(root: Path, dest: Path, tmp: Path, size_mib: int) -> None:
    raw = tmp / "root.raw"
    _run(["mkfs.ext4", "-q", "-F", "-O", "^has_journal", "-L", "vmwrap-root", "-d", str(root), str(raw), f"{size_mib}M"])
    _run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(dest)])


def sha256(path: Path, on_bytes: Callable[[int], None] | None = None) -> str:
    return sha256_file(path, on_bytes)


def artifact(path: Path, fmt: str = "raw", on_bytes: Callable[[int], None] | None = None) -> Artifact:
    """`path` as a catalog artifact (hashed now; `on_bytes` hears the progress)."""
    return Artifact(str(path), sha256(path, on_bytes), path.stat().st_size, fmt)


def cached_kernel(out_dir: Path, tmp: Path, stage: Callable[[str], None]) -> Path:
    """The appliance dir's Debian kernel (vmlinux, modules/, version), downloaded once: every build and
    tar-based import (vmwrap/imports/) boots it with vmwrap's initramfs agent."""
    kernel_cache = out_dir / ".kernel"
    if not (kernel_cache / "version").exists():
        stage("Debian kernel: download and extract")
        vmlinuz, moddir = debian_kernel(tmp / "kernel")
        kernel_cache.mkdir(parents=True, exist_ok=True)
        extract_vmlinux(vmlinuz, kernel_cache / "vmlinux.tmp")
        os.replace(kernel_cache / "vmlinux.tmp", kernel_cache / "vmlinux")
        shutil.rmtree(kernel_cache / "modules", ignore_errors=True)
        shutil.copytree(moddir, kernel_cache / "modules", symlinks=True)
        (kernel_cache / "version").write_text(moddir.name + "\n")
    return kernel_cache


def build(name: str, kind: str, out_dir: str, catalog_path: str, memory_mib: int = 256,
          users: list[str] | None = None, groups: list[str] | None = None,
          on_stage: Callable[[str], None] | None = None, packages: list[str] | None = None,
          policy: dict | None = None) -> Image:
    """Build appliance `name` of `kind` ('busybox' or 'debootstrap') and register it in the catalog.

    `on_stage` hears each step's name before it starts (an admin's stage lines). `packages`: Debian
    packages a debootstrap root gets besides minbase. `policy`: catalog policy fields of the Image
    (max_memory_mib, max_cpus, checkpoint). A failed build of a new image leaves no directory."""
    from .errors import UserError

    if packages and kind != "debootstrap":
        raise UserError(f"--packages needs --kind debootstrap (not {kind})")
    check_packages(packages or [])
    stage = on_stage or (lambda _s: None)
    dest = Path(out_dir) / name
    fresh = not dest.exists()
    dest.mkdir(parents=True, exist_ok=True)
    try:
        return _build(name, kind, out_dir, catalog_path, memory_mib, users, groups, stage, packages or [],
                      policy or {}, dest)
    except BaseException:
        if fresh:
            shutil.rmtree(dest, ignore_errors=True)
        raise


def _build(name, kind, out_dir, catalog_path, memory_mib, users, groups, stage, packages, policy, dest) -> Image:
    with tempfile.TemporaryDirectory(prefix="vmwrap-build-") as t:
        tmp = Path(t)
        kernel_cache = cached_kernel(Path(out_dir), tmp, stage)
        shutil.copy2(kernel_cache / "vmlinux", dest / "vmlinux")
        stage("initrd: kernel modules and guest agent")
        build_initrd(kernel_cache / "modules", dest / "initrd.cpio", tmp)
        (dest / "root.qcow2").unlink(missing_ok=True)
        if kind in ("busybox", "debootstrap"):
            stage(f"root disk: {kind}")
        if kind == "busybox":
            build_busybox_root(dest / "root.qcow2", tmp)
        elif kind == "debootstrap":
            build_debootstrap_root(dest / "root.qcow2", tmp, packages=packages, debs=Path(out_dir) / ".debs")
        elif kind != "initramfs":  # initramfs: no root disk, the job runs in the initramfs' busybox
            raise NodeError(f"unknown appliance kind {kind!r} (busybox, debootstrap or initramfs)")
    stage("hash and register in the catalog")
    img = Image(
        name=name, boot="kernel",
        kernel=artifact(dest / "vmlinux"), initrd=artifact(dest / "initrd.cpio"),
        disk=artifact(dest / "root.qcow2", "qcow2") if (dest / "root.qcow2").exists() else None,
        memory_mib=memory_mib, cpus=1, users=users or [], groups=groups or [],
        description=f"{kind} appliance, kernel {(Path(out_dir) / '.kernel' / 'version').read_text().strip()}"
                    + (f", packages {','.join(packages)}" if packages else ""),
        origin=f"appliance {kind}" + (" bookworm" if kind == "debootstrap" else "")
               + (f" +{','.join(packages)}" if packages else ""),
        **policy,
    )
    register(catalog_path, img)
    return img
