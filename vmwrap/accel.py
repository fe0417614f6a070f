"""Use KVM only after a real guest booted under it; otherwise TCG. Never assume: nested KVM can hang guests."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from . import domain, rundir

PROBE_TIMEOUT = 20.0


def choose(settings, kernel: str, initrd: str, kernel_sha: str) -> str:
    """libvirt domain type for this node: 'kvm' or 'qemu'. The probe's verdict is kept in state_dir."""
    if settings.accel == "tcg":
        return "qemu"
    if settings.accel == "kvm":
        return "kvm"
    if not os.path.exists("/dev/kvm"):
        return "qemu"
    verdict = Path(settings.state_dir) / "accel.json"
    try:
        data = json.loads(verdict.read_text())
        if data.get("kernel") == kernel_sha:
            return data["virt_type"]
    except (OSError, ValueError, KeyError):
        pass
    ok, detail = probe_kvm(settings, kernel, initrd)
    virt_type = "kvm" if ok else "qemu"
    verdict.parent.mkdir(parents=True, exist_ok=True)
    verdict.write_text(json.dumps({"virt_type": virt_type, "kernel": kernel_sha,
                                   "detail": detail, "at": time.time()}))
    return virt_type


def kvm_usable_by(uid: int, gid: int, groups: list[int] = ()) -> bool:
    """Whether a QEMU running as this uid can open /dev/kvm (read and write)."""
    try:
        st = os.stat("/dev/kvm")
    except OSError:
        return False
    if uid == 0 or uid == st.st_uid:
        bits = (st.st_mode >> 6) & 0o6
    elif st.st_gid == gid or st.st_gid in groups:
        bits = (st.st_mode >> 3) & 0o6
    else:
        bits = st.st_mode & 0o6
    return bits == 0o6


def probe_kvm(settings, kernel: str, initrd: str, timeout: float = PROBE_TIMEOUT) -> tuple[bool, str]:
    """Boot the appliance kernel under KVM in probe mode; it must report 'booted' within `timeout`."""
    import libvirt

    conn = domain.connect(settings.libvirt_uri)
    name = f"vmwrap-kvmprobe-{os.getpid()}"
    with tempfile.TemporaryDirectory(prefix="vmwrap-probe-") as run_dir:
        # The probe's QEMU runs as libvirt's unprivileged user: it may write only its chardev files.
        os.chmod(run_dir, 0o711)
        try:
            import pwd

            qemu = pwd.getpwnam("libvirt-qemu")
            ids = (qemu.pw_uid, qemu.pw_gid)
        except KeyError:
            ids = (os.getuid(), os.getgid())
        for f in rundir.GUEST_FILES:
            fd = os.open(os.path.join(run_dir, f), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.fchown(fd, *ids)
            os.close(fd)
        # Its own copies: a restricted image's cached kernel and initrd are readable only by the uids
        # of the jobs using it (Cache.grant), and the probe's QEMU is none of them.
        boot = {}
        for key, src in (("kernel", kernel), ("initrd", initrd)):
            boot[key] = os.path.join(run_dir, key)
            shutil.copyfile(src, boot[key])
            os.chown(boot[key], *ids)
            os.chmod(boot[key], 0o400)
        spec = domain.Spec(name=name, job_id="kvm-probe", virt_type="kvm", memory_mib=128, cpus=1,
                           kernel=boot["kernel"], initrd=boot["initrd"], run_dir=run_dir,
                           cmdline="vmwrap.probe=1", uid=ids[0], gid=ids[1])
        t0 = time.monotonic()
        try:
            conn.createXML(domain.render(spec), 0)
        except libvirt.libvirtError as e:
            conn.close()
            return False, f"KVM domain refused: {e.get_error_message()}"
        status = Path(run_dir) / rundir.STATUS
        try:
            while time.monotonic() - t0 < timeout:
                if status.exists() and "booted" in status.read_text(errors="replace"):
                    return True, f"guest booted under KVM in {time.monotonic() - t0:.1f}s"
                if domain.is_gone(conn, name):
                    return False, "KVM guest died before reporting boot"
                time.sleep(0.1)
            return False, f"KVM guest did not boot within {timeout:.0f}s (nested KVM?)"
        finally:
            domain.destroy(conn, name)
            conn.close()
