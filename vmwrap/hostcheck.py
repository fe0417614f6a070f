"""Unsafe node setups `vmwrap doctor` can detect: each one would let a batch user or a guest reach
root, other users' data, or the whole node. Pure checks; nothing here changes the node."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from .config import Settings

QEMU_CONF = "/etc/libvirt/qemu.conf"


def _conf_value(text: str, key: str) -> str | None:
    m = None
    for m in re.finditer(rf'(?m)^\s*{key}\s*=\s*"?([^"\n#]*)"?', text):
        pass
    return m.group(1).strip() if m else None


def qemu_conf(text: str) -> list[tuple[str, str]]:
    """(level, message) for libvirt's QEMU driver settings; level is 'ok', 'WARN' or 'FAIL'."""
    out: list[tuple[str, str]] = []
    user = _conf_value(text, "user")
    if user in ("root", "+0", "0"):
        out.append(("FAIL", f'{QEMU_CONF}: user = "{user}": QEMU processes libvirt starts without a vmwrap '
                            "label run as root (a QEMU escape is host root); use an unprivileged user"))
    driver = _conf_value(text, "security_driver")
    if driver == "none":
        out.append(("FAIL", f'{QEMU_CONF}: security_driver = "none" turns off the DAC driver: every VM runs as '
                            "the global user instead of the job's user; remove the line"))
    if _conf_value(text, "dynamic_ownership") != "0":
        out.append(("FAIL", f"{QEMU_CONF}: set dynamic_ownership = 0 (libvirt would otherwise chown the shared, "
                            "read-only cached images to a job's user)"))
    if _conf_value(text, "stdio_handler") != "file":
        out.append(("FAIL", f'{QEMU_CONF}: set stdio_handler = "file" (virtlogd rolls job output over at 2 MB '
                            "and loses it)"))
    if not out:
        out.append(("ok", f"{QEMU_CONF}: QEMU unprivileged, no relabelling, job output written by QEMU"))
    return out


def qemu_processes_as_root(proc: str = "/proc") -> list[int]:
    """pids of running QEMU system emulators owned by root."""
    pids = []
    for d in Path(proc).iterdir():
        if not d.name.isdigit():
            continue
        try:
            exe = os.readlink(d / "exe")
            uid = int(next(ln for ln in (d / "status").read_text().splitlines() if ln.startswith("Uid:")).split()[2])
        except (OSError, StopIteration, ValueError, IndexError):
            continue
        if os.path.basename(exe).startswith("qemu-system") and uid == 0:
            pids.append(int(d.name))
    return sorted(pids)


def root_owned_private(path: str, what: str) -> tuple[str, str]:
    """A directory root alone may change (the checkpoint store: restores trust what is in it)."""
    try:
        st = os.lstat(path)
    except OSError as e:
        return "FAIL", f"{what} {path}: {e.strerror}"
    if stat.S_ISLNK(st.st_mode):
        return "FAIL", f"{what} {path} is a symbolic link"
    if st.st_uid != 0:
        return "FAIL", f"{what} {path} belongs to uid {st.st_uid}, not root (on NFS: export it with root_squash " \
                       "off for the nodes only, or give each node's root the same identity)"
    if st.st_mode & 0o022:
        return "FAIL", f"{what} {path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return "ok", f"{what} {path}: root-owned, not writable by others"


def shared_store(path: str, local: list[str]) -> tuple[str, str]:
    """The checkpoint store must be the storage every node shares. On the same file system as a
    node-local directory (the root, the state dir), it is most likely an unmounted mount point: a save
    there cannot be restored on another node, and a restart there finds no record that the job ran."""
    try:
        dev = os.stat(path).st_dev
    except OSError as e:
        return "WARN", f"checkpoint store {path}: {e.strerror} (is the shared storage mounted? vmwrap never " \
                       "creates it: jobs that checkpoint are refused on this node until it is there)"
    for other in local:
        try:
            if os.stat(other).st_dev == dev:
                return "WARN", f"checkpoint store {path} is on the same file system as {other}: not shared storage " \
                               "(is it mounted?). Fine on a one-node site; elsewhere a job saved here cannot be " \
                               "restored on another node"
        except OSError:
            continue
    return "ok", f"checkpoint store {path}: a file system of its own (not this node's {', '.join(local)})"


def store_identity(path: str, key_file: str) -> tuple[str, str]:
    """The store at `path` is this site's shared store (its stamp verifies with this node's key). A
    FAIL here is what every start of a checkpointing job on this node would refuse as a node fault."""
    from .checkpoint import Store
    from .errors import VmwrapError

    try:
        stamp = Store(path, key_file).check_identity()
    except VmwrapError as e:
        return "FAIL", str(e)
    return "ok", f"checkpoint store {path}: this site's store (id {stamp['store_id'][:12]}, stamped with this key)"


def memory_limits(cgroup_root: str = "/sys/fs/cgroup") -> tuple[str, str]:
    """Each VM's QEMU gets a hard memory limit through libvirt's cgroup: it needs the memory controller."""
    v1 = Path(cgroup_root) / "memory"
    v2 = Path(cgroup_root) / "cgroup.controllers"
    if v1.is_dir() and (v1 / "memory.limit_in_bytes").exists():
        return "ok", "memory cgroup (v1) present: each VM gets a hard memory limit"
    try:
        if "memory" in v2.read_text().split():
            return "ok", "memory cgroup (v2) present: each VM gets a hard memory limit"
    except OSError:
        pass
    return "FAIL", "no memory cgroup controller: VMs run without a hard memory limit (one job can exhaust the node)"


def kvm_for_jobs() -> tuple[str, str] | None:
    """QEMU runs as the job's user: with KVM in use, job users must be able to open /dev/kvm."""
    try:
        st = os.stat("/dev/kvm")
    except OSError:
        return None
    if st.st_mode & 0o006 == 0o006:
        return "ok", "/dev/kvm usable by job users' VMs"
    return "WARN", "/dev/kvm is not read-write for others: job VMs (run as the job's user) fall back to TCG; " \
                   "chmod 0666 /dev/kvm (the upstream udev default) to use KVM"


def job_networks() -> tuple[str, str]:
    """Multi-node jobs' private networks (vmwrap/jobnet.py) need iproute2 where the prolog calls it."""
    from .jobnet import BRIDGE, IP

    missing = [p for p in (IP, BRIDGE) if not os.access(p, os.X_OK)]
    if missing:
        return "WARN", f"{' and '.join(missing)} missing (Debian: iproute2): multi-node VM jobs fail on this node"
    return "ok", "iproute2 present: multi-node jobs get their private network (docs/multinode.md)"


def check(settings: Settings) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    try:
        text = open(QEMU_CONF).read()
    except OSError:
        text = ""
    out += qemu_conf(text)
    pids = qemu_processes_as_root()
    if pids:
        out.append(("FAIL", f"QEMU running as root now: pids {', '.join(map(str, pids[:10]))}"))
    if settings.workdir_share == "virtio-9p":
        out.append(("WARN", "workdir_share = virtio-9p: QEMU exports the work dir itself (as the job's user, "
                            "squash mode); VMs cannot be saved"))
    out.append(memory_limits())
    out.append(job_networks())
    kvm = kvm_for_jobs()
    if kvm:
        out.append(kvm)
    if settings.workdir_share == "serial" and os.path.isdir(settings.checkpoint_dir):
        out.append(root_owned_private(settings.checkpoint_dir, "checkpoint store"))
    for path, what in ((settings.state_dir, "state dir"), (settings.cache_dir, "image cache")):
        if os.path.isdir(path):
            out.append(root_owned_private(path, what))
    return out
