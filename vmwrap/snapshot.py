"""Fast job start: restore each job's VM from a saved, pre-booted "template" guest of its shape.

A template is booted once per shape (image digest, CPUs, memory, accelerator, work dir transport)
per node. Its guest agent stops before anything job-specific (kernel up, modules loaded, virtio ports
found; no disk or share mounted: a mounted virtio-9p share blocks saving) and waits for RESUME; the
template is then saved into `<cache_dir>/snapshots/<key>.save` (root's 0600, dir 0711, written once under a
lock, renamed into place). A job's VM is restored from a private copy of that file whose libvirt
header names the job's domain (libvirt refuses a restore under another name/UUID), with the job's own
domain XML: its overlay, run-dir ports and shares, so QEMU (the job's uid) sees only the job's files.
The host then sends RESUME with fresh random bytes and the time; the agent seeds /dev/urandom, sets
the clock and a fresh machine id, and goes on as a cold boot does (mount disk, shares, wait for GO).

Whatever goes wrong here is never the job's failure: `start` returns None with the reason, the
launcher cold-boots. The key covers everything that makes a saved guest unusable (image, shape,
vmwrap, the domain template, QEMU and libvirt versions): a stale snapshot is simply not found, and
its recorded inputs are checked again before use. Restricted images always cold-boot.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import socket
import stat
import struct
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from . import __version__, domain, overlay, rundir, safeio
from .errors import NodeError, UserError, VmwrapError
from .resources import TEMPLATES

FORMAT = 1
TOKEN = "vmwrap.template"    # on the kernel command line: the agent stops and waits for RESUME
READY_TIMEOUT = 120.0        # template boot to its "template" line
RESUME_TIMEOUT = 15.0        # restored guest's answer to RESUME
RESUME_RESEND = 2.0          # RESUME again after this long without an answer
COPY = "snapshot.save"       # the job's private copy in its run dir (root's, 0600, removed at once)
# libvirt's QEMU save image (src/qemu/qemu_saveimage.h, version 2): magic, then 19 uint32 (version,
# data_len, was_running, compressed, cookieOffset, 14 unused), then data_len bytes holding the domain
# XML (NUL-terminated), the migration cookie at cookieOffset and zero padding, then QEMU's stream.
MAGIC = b"LibvirtQemudSave"
HEADER = len(MAGIC) + 19 * 4
DATA_MAX = 1 << 20


@dataclass(frozen=True)
class Shape:
    """What a saved template must match for a job's VM to be restored from it."""

    digest: str          # the image's content digest (kernel, initrd, disk)
    cpus: int
    memory_mib: int
    virt_type: str       # libvirt domain type: kvm or qemu (TCG)
    workdir_share: str   # serial or virtio-9p: a different device set
    disk: bool
    cmdline: str         # the image's kernel arguments


def directory(settings) -> Path:
    return Path(settings.cache_dir) / "snapshots"


def inputs(shape: Shape, conn) -> dict:
    """Everything the key covers; recorded beside the snapshot and compared again before a restore."""
    t = hashlib.sha256((TEMPLATES / "domain.xml.j2").read_bytes() + domain.BASE_CMDLINE.encode()).hexdigest()
    return {"format": FORMAT, **shape.__dict__, "vmwrap": __version__, "domain_template": t,
            "shell_ports": rundir.SHELL_PORTS, "steps_ports": rundir.STEPS_PORTS,
            "qemu": int(conn.getVersion()), "libvirt": int(conn.getLibVersion())}


def key(ins: dict) -> str:
    return hashlib.sha256(json.dumps(ins, sort_keys=True).encode()).hexdigest()[:32]


def template_cmdline(cmdline: str) -> str:
    return " ".join(x for x in (cmdline, TOKEN) if x)


def _ensure_dir(settings) -> Path:
    d = directory(settings)
    d.mkdir(parents=True, exist_ok=True)
    st = os.lstat(d)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0:
        raise NodeError(f"snapshot dir {d} is not a directory of root's")
    # 0711: the template's QEMU (libvirt-qemu) reaches its run dir in here; the snapshots themselves are
    # root's 0600 (libvirtd reads them for QEMU), nobody else reads template memory or lists the dir.
    os.chmod(d, 0o711)
    return d


def _usable(d: Path, ins: dict) -> tuple[Path | None, str]:
    """The snapshot file for `ins`, or None and why not."""
    k = key(ins)
    save, meta_p = d / f"{k}.save", d / f"{k}.json"
    raw = safeio.read_capped(meta_p, 1 << 16)
    if raw is None:
        return None, "no snapshot of this shape (vmwrap snapshot prepare)"
    try:
        meta = json.loads(raw)
    except ValueError:
        return None, "its snapshot record is unreadable"
    if not isinstance(meta, dict) or meta.get("inputs") != ins:
        return None, "its snapshot is stale (made for other inputs)"
    try:
        st = os.lstat(save)
    except OSError:
        return None, "its snapshot file is missing"
    if not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022 or st.st_size != meta.get("bytes"):
        return None, "its snapshot file is not root's own regular file of the recorded size"
    return save, ""


def job_copy(src: Path, dst: Path, name: str, dom_uuid: str) -> None:
    """Copy the template's save image for one job with its libvirt header naming the job's domain.

    Raises ValueError on anything that is not a version-2 save image with room for the new names."""
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,200}", name) or str(uuid.UUID(dom_uuid)) != dom_uuid:
        raise ValueError("bad domain name or uuid")
    sfd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        head = os.pread(sfd, HEADER, 0)
        if len(head) != HEADER or head[:len(MAGIC)] != MAGIC:
            raise ValueError("not a libvirt save image")
        version, data_len, running, compressed, cookie_off = struct.unpack("<5I", head[16:36])
        if version != 2 or compressed != 0 or not 0 < cookie_off < data_len <= DATA_MAX:
            raise ValueError(f"unexpected save image header (version {version}, compressed {compressed})")
        data = os.pread(sfd, data_len, HEADER)
        xml = data[:cookie_off].rstrip(b"\0").decode()
        cookie = data[cookie_off:].rstrip(b"\0")
        xml, n1 = re.subn(r"<name>[^<]*</name>", f"<name>{name}</name>", xml, count=1)
        xml, n2 = re.subn(r"<uuid>[^<]*</uuid>", f"<uuid>{dom_uuid}</uuid>", xml, count=1)
        new_xml = xml.encode() + b"\0"
        body = new_xml + cookie + b"\0"
        if n1 != 1 or n2 != 1 or len(body) > data_len:
            raise ValueError("save image header has no room for the job's names")
        body += b"\0" * (data_len - len(body))
        dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.write(dfd, head[:16] + struct.pack("<5I", version, data_len, running, compressed, len(new_xml))
                     + head[36:] + body)
            off = HEADER + data_len
            left = os.fstat(sfd).st_size - off
            while left > 0:
                n = os.copy_file_range(sfd, dfd, left, off, off)
                if n <= 0:
                    raise OSError("short copy of the snapshot")
                off, left = off + n, left - n
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)


def _status_has(run_dir: Path, word: bytes) -> bool:
    data = safeio.read_capped(Path(run_dir) / rundir.STATUS, 1 << 16) or b""
    return any(ln.startswith(word) for ln in data.split(b"\n"))


def _wait_status(run_dir: Path, word: bytes, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if _status_has(run_dir, word):
            return True
        time.sleep(0.01)
    return _status_has(run_dir, word)


def resume_line() -> str:
    """What the restored agent needs from the host: 64 random bytes (hex) and the time."""
    return f"RESUME {os.urandom(64).hex()} {int(time.time())}"


def resume(ctl, run_dir: Path, timeout: float, every: float = RESUME_RESEND) -> bool:
    """Send RESUME until the guest says it resumed. A line can still be lost when the guest's agent
    closes the port at that instant (see start); the agent takes the first that arrives and its later
    readers ignore the rest."""
    end = time.monotonic() + timeout
    while True:
        if not ctl.send(resume_line()):
            return False
        left = end - time.monotonic()
        if _wait_status(run_dir, b"resumed", max(0.0, min(every, left))):
            return True
        if left <= every:
            return False


def start(conn, settings, image, spec: domain.Spec) -> tuple[domain.Spec | None, str]:
    """Restore the job's VM (spec: its cold-boot spec) from its shape's snapshot, running and resumed.

    Returns (the spec it now runs with, "") or (None, why not); on None nothing of the attempt is
    left (no domain, the run dir's guest files emptied) and the caller cold-boots."""
    import libvirt

    if image.restricted:
        return None, "restricted images always cold-boot"
    if image.network != "none":  # templates have no network card (and a NAT stack's state is per VM)
        return None, f"images with network = {image.network!r} always cold-boot"
    shape = Shape(image.digest, spec.cpus, spec.memory_mib, spec.virt_type, settings.workdir_share,
                  spec.disk is not None, spec.cmdline)
    try:
        ins = inputs(shape, conn)
        src, why = _usable(directory(settings), ins)
    except (OSError, libvirt.libvirtError) as e:
        return None, f"cannot look up the snapshot: {e}"
    if src is None:
        return None, why
    run_dir = Path(spec.run_dir)
    tspec = domain.Spec(**{**spec.__dict__, "cmdline": template_cmdline(spec.cmdline)})
    dom_uuid = str(uuid.uuid4())
    copy = run_dir / COPY
    copy.unlink(missing_ok=True)
    ctl = None
    try:
        job_copy(src, copy, spec.name, dom_uuid)
        xml = domain.render(tspec).replace(f"<name>{spec.name}</name>",
                                           f"<name>{spec.name}</name>\n  <uuid>{dom_uuid}</uuid>", 1)
        domain.guarded(conn, spec.name, "restore",
                       lambda: conn.restoreFlags(str(copy), xml, libvirt.VIR_DOMAIN_SAVE_PAUSED))
        copy.unlink(missing_ok=True)
        dom = conn.lookupByName(spec.name)
        # Attach while the guest is paused: the template was saved attached, its agent asleep in read().
        # Attached only once it runs, QEMU's post-load check first tells the guest the host left; its
        # read() returns EOF and the agent closes the port to poll, and a RESUME arriving as it closes
        # is dropped with the port's buffered data (a CI run waited the whole 15 s for its answer).
        ctl = domain.Control(run_dir)
        if not ctl.connect(timeout=5.0):
            raise NodeError("cannot reach the restored guest's control port")
        domain.start_limited(dom, spec.memory_limit_mib)
        if not resume(ctl, run_dir, RESUME_TIMEOUT):
            raise NodeError(f"the restored guest did not resume within {RESUME_TIMEOUT:.0f} s")
        return tspec, ""
    except (OSError, ValueError, VmwrapError, libvirt.libvirtError) as e:
        msg = e.get_error_message() if isinstance(e, libvirt.libvirtError) else str(e)
        discard(conn, spec)
        return None, f"restore failed: {msg}"
    finally:
        if ctl is not None:
            ctl.close()
        copy.unlink(missing_ok=True)


def discard(conn, spec: domain.Spec) -> None:
    """Undo a restore attempt: no domain, the guest's files empty again, no stale control socket."""
    domain.destroy(conn, spec.name)
    run_dir = Path(spec.run_dir)
    (run_dir / rundir.CONTROL_SOCKET).unlink(missing_ok=True)
    for name in rundir.GUEST_FILES:
        f = run_dir / name
        st = os.lstat(f) if os.path.lexists(f) else None
        f.unlink(missing_ok=True)
        fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        if st is not None:
            os.fchown(fd, st.st_uid, st.st_gid)
        os.close(fd)


def _qemu_user() -> tuple[int, int]:
    import pwd

    try:
        pw = pwd.getpwnam("libvirt-qemu")
    except KeyError:
        raise NodeError("user libvirt-qemu does not exist: a template VM has no unprivileged identity") from None
    return pw.pw_uid, pw.pw_gid


def prepare(settings, catalog, image_name: str, cpus: int | None = None, memory_mib: int | None = None,
            force: bool = False) -> dict:
    """Boot the template of one shape, save it, and record it (once per node, under a lock).

    Returns {path, bytes, seconds, made}: made False when a usable snapshot existed already."""
    import libvirt

    from . import accel
    from .cache import Cache
    from .sizing import MIN_MEMORY_MIB, host_memory_mib

    image = catalog.images.get(image_name)
    if image is None:
        raise UserError(f"no image {image_name!r} in the catalog")
    if image.restricted:
        raise UserError(f"image {image_name} is restricted: its jobs always cold-boot (no shared snapshot)")
    if image.network != "none":
        raise UserError(f"image {image_name} has network = {image.network!r}: its jobs always cold-boot (no snapshot)")
    cpus = cpus or image.cpus or settings.default_cpus
    memory_mib = memory_mib or image.memory_mib or settings.default_memory_mib
    if not 1 <= cpus <= (os.cpu_count() or 1):
        raise UserError(f"--cpus={cpus}: this node has {os.cpu_count()} CPUs")
    if not MIN_MEMORY_MIB <= memory_mib <= host_memory_mib():
        raise UserError(f"--memory={memory_mib}M: a guest needs {MIN_MEMORY_MIB}M to {host_memory_mib()}M here")
    image.check_size(memory_mib, cpus)
    d = _ensure_dir(settings)
    conn = domain.connect(settings.libvirt_uri)
    cache = Cache(settings.cache_dir, settings.cache_max_bytes, settings.verify_on_use)
    ids = _qemu_user()
    pin = "snapshot-" + os.urandom(4).hex()
    tmp = None
    try:
        paths = {}
        for k, art in image.artifacts().items():
            cache.pin(art.sha256, pin, ids[0])
            paths[k] = cache.fetch(art).path
        cache.grant(image)
        virt_type = accel.choose(settings, str(paths["kernel"]), str(paths["initrd"]), image.kernel.sha256)
        shape = Shape(image.digest, cpus, memory_mib, virt_type, settings.workdir_share,
                      image.disk is not None, image.cmdline)
        ins = inputs(shape, conn)
        k = key(ins)
        with open(d / f"{k}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            save, _ = _usable(d, ins)
            if save is not None and not force:
                return {"path": str(save), "bytes": save.stat().st_size, "seconds": 0.0, "made": False}
            t0 = time.monotonic()
            tmp = d / f"t{k[:8]}.{os.getpid()}"  # short: socket paths max 107 bytes
            _remove(tmp)
            tmp.mkdir(mode=0o711)
            os.chmod(tmp, 0o711)
            for name in rundir.GUEST_FILES:
                fd = os.open(tmp / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                os.fchown(fd, *ids)
                os.close(fd)
            (tmp / "ctl").mkdir(mode=0o755)
            (tmp / "work").mkdir(mode=0o755)
            disk = None
            if image.disk:
                disk = tmp / rundir.OVERLAY
                overlay.create(paths["disk"], disk, image.disk.format)
                os.chown(disk, *ids)
                disk.chmod(0o600)
            listener = None
            if settings.workdir_share == "serial":  # QEMU connects at start: something must listen
                listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                listener.bind(str(tmp / "9p.sock"))
                os.chown(tmp / "9p.sock", *ids)
                listener.listen(1)
            spec = domain.Spec(
                name=f"vmwrap-template-{k[:12]}", job_id="template", virt_type=virt_type, memory_mib=memory_mib,
                cpus=cpus, kernel=str(paths["kernel"]), initrd=str(paths["initrd"]), run_dir=str(tmp),
                disk=str(disk) if disk else None, ctl_dir=str(tmp / "ctl"), work_dir=str(tmp / "work"),
                cmdline=template_cmdline(image.cmdline), ninep_socket=str(tmp / "9p.sock") if listener else None,
                uid=ids[0], gid=ids[1], memory_limit_mib=memory_mib + settings.vm_memory_overhead_mib)
            domain.destroy(conn, spec.name)
            ctl = domain.Control(tmp)
            try:
                dom = conn.createXML(domain.render(spec), libvirt.VIR_DOMAIN_START_PAUSED)
                # Hold the control port open: the waiting agent then blocks in read instead of polling
                # (a fork per poll would use, and so reseed, the kernel's random generator).
                ctl.connect(timeout=5.0)
                domain.start_limited(dom, spec.memory_limit_mib)
                if not _wait_status(tmp, b"template", READY_TIMEOUT):
                    tail = (safeio.tail_capped(tmp / rundir.CONSOLE, 2000) or b"").decode(errors="replace")
                    raise NodeError(f"the template guest did not get ready within {READY_TIMEOUT:.0f} s: {tail}")
                up = _uptime(tmp, b"template")
                # Idle past the kernel's reseed interval (early boot: max(1 s, uptime/2)): the restored
                # guest's first random use after the host's seed is written then reseeds from it.
                time.sleep(max(1.0, up / 2) + 0.5)
                part = d / f".{k}.save.tmp"
                for attempt in range(3):
                    part.unlink(missing_ok=True)
                    try:
                        domain.guarded(conn, spec.name, "save", lambda: dom.save(str(part)))
                        break
                    except libvirt.libvirtError:
                        # Seen under load (QEMU 7.2): "bdrv_inactivate_all() failed", the VM running on.
                        if attempt == 2 or not dom.isActive():
                            raise
                        time.sleep(1.0)
            except libvirt.libvirtError as e:
                raise NodeError(f"cannot make the template VM: {e.get_error_message()}") from None
            finally:
                ctl.close()
                domain.destroy(conn, spec.name)
                if listener is not None:
                    listener.close()
            os.chown(part, 0, 0)
            os.chmod(part, 0o600)
            fd = os.open(part, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
            size = part.stat().st_size
            meta = {"inputs": ins, "bytes": size, "created": time.time(), "image": image.name,
                    "boot_s": round(time.monotonic() - t0, 3)}
            mtmp = d / f".{k}.json.tmp"
            mtmp.write_text(json.dumps(meta))
            os.chmod(mtmp, 0o600)
            os.replace(part, d / f"{k}.save")
            os.replace(mtmp, d / f"{k}.json")
            return {"path": str(d / f"{k}.save"), "bytes": size, "seconds": time.monotonic() - t0, "made": True}
    finally:
        if tmp is not None:
            _remove(tmp)
        cache.unpin_job(pin)
        conn.close()


def _uptime(run_dir: Path, word: bytes) -> float:
    data = safeio.read_capped(Path(run_dir) / rundir.STATUS, 1 << 16) or b""
    for ln in data.split(b"\n"):
        if ln.startswith(word + b" "):
            try:
                return min(float(ln.split()[1]), 600.0)
            except (ValueError, IndexError):
                break
    return 2.0


def _remove(p: Path) -> None:
    import shutil

    shutil.rmtree(p, ignore_errors=True)


def listing(settings) -> list[dict]:
    """The node's snapshots: image, shape, size."""
    d = directory(settings)
    out = []
    for m in sorted(d.glob("*.json")) if d.is_dir() else []:
        raw = safeio.read_capped(m, 1 << 16)
        try:
            meta = json.loads(raw or b"")
            ins = meta["inputs"]
            out.append({"key": m.stem, "image": meta.get("image"), "cpus": ins["cpus"],
                        "memory_mib": ins["memory_mib"], "virt_type": ins["virt_type"], "bytes": meta["bytes"],
                        "created": meta.get("created")})
        except (ValueError, KeyError, TypeError):
            continue
    return out


def remove_all(settings) -> int:
    """Delete every snapshot of this node (after an upgrade they are stale anyway)."""
    d = directory(settings)
    n = 0
    for p in list(d.iterdir()) if d.is_dir() else []:
        if p.suffix in (".save", ".json", ".lock") or p.name.startswith((".", "t")) and p.is_dir() or p.name.startswith("."):
            _remove(p) if p.is_dir() else p.unlink(missing_ok=True)
            n += p.suffix == ".save"
    return n
