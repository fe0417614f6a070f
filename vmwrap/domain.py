"""The VM backend on libvirt: render the domain XML (Jinja2, autoescaped), pick KVM only when it works."""

from __future__ import annotations

import functools
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import rundir, safeio
from .rundir import SHELL_PORTS, STEPS_PORTS
from .errors import GuestStalledError, NodeError
from .resources import TEMPLATES


@functools.cache
def _templates():
    """jinja2 on first render only: the job's payload (on every job's start path) renders no XML."""
    import jinja2
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        autoescape=jinja2.select_autoescape(enabled_extensions=("xml", "j2"), default=True),
        undefined=jinja2.StrictUndefined,
    )


# no_timer_check: the kernel's boot-time IO-APIC timer check busy-waits for a few timer ticks and
# panics ("IO-APIC + timer doesn't work!") when a starved QEMU delivers too few: on a saturated host
# that killed guests 2-4 s into boot (reproduced: 10 of 12 guests at nice 19 under 4 CPU hogs).
BASE_CMDLINE = "console=ttyS0 quiet loglevel=1 panic=-1 mitigations=off acpi=noirq no_timer_check"


@dataclass
class Spec:
    """Everything the domain XML needs; paths are host paths already validated by the caller."""

    name: str
    job_id: str
    virt_type: str
    memory_mib: int
    cpus: int
    kernel: str
    initrd: str
    run_dir: str
    disk: str | None = None
    ctl_dir: str | None = None
    work_dir: str | None = None
    cmdline: str = ""
    ninep_socket: str | None = None  # work dir over vmwrap's 9P server (saveable) instead of virtio-9p
    # QEMU's identity: the job's own uid/gid (libvirt static DAC label, relabel='no'), never root.
    uid: int | None = None
    gid: int | None = None
    memory_limit_mib: int | None = None  # hard limit on QEMU's whole memory (guest RAM + QEMU itself)
    # The step port (org.vmwrap.steps, vmwrap/steps.py). A VM saved by a vmwrap without it must be restored
    # without it: libvirt refuses a restore whose channel count differs from the saved VM's.
    steps: bool = True
    steps_ports: int = STEPS_PORTS  # steps at once, a port each; a VM saved with fewer is restored with as many
    # The shell ports (org.vmwrap.shell, .1, .2...: vmwrap/shell.py, `vmwrap shell JOBID` and a multi-node
    # step's tasks), a session each at a time; as for steps, a VM saved with fewer is restored with as many.
    shell: bool = True
    shell_ports: int = SHELL_PORTS
    # The image's network (catalog.NETWORKS). "nat" is QEMU's user-mode stack (slirp) inside the job's own
    # QEMU: the guest's connections leave the node as the job's user, under the site's rules for that user,
    # and nothing listens on the host for it. The MAC comes from the domain name so a restore keeps it.
    network: str = "none"
    # A multi-node job's private network (vmwrap/jobnet.py): the bridge this host has for it, and the
    # card's MAC there (jobnet.mac of the node's index). None: a one-node job, no such card.
    job_bridge: str | None = None
    job_mac: str | None = None

    @property
    def mac(self) -> str:
        import hashlib

        h = hashlib.sha256(self.name.encode()).digest()
        return "52:54:00:" + ":".join(f"{b:02x}" for b in h[:3])  # QEMU's locally administered prefix


def qemu_identity(uid: int, gid: int) -> tuple[int, int]:
    """Whom the job's QEMU runs as: the job's own user, so an escape from QEMU gains nothing the user
    did not have; a root job's QEMU runs as libvirt's unprivileged user instead (never as root)."""
    if uid != 0:
        return uid, gid
    import pwd

    try:
        pw = pwd.getpwnam("libvirt-qemu")
    except KeyError:
        raise NodeError("user libvirt-qemu does not exist: a root job's VM has no unprivileged identity "
                        "to run as (scripts/start-libvirtd.sh creates it)") from None
    return pw.pw_uid, pw.pw_gid


def render(spec: Spec) -> str:
    cmdline = " ".join(x for x in (BASE_CMDLINE, spec.cmdline) if x)
    from .catalog import NETWORKS

    if spec.network not in NETWORKS:
        raise NodeError(f"unknown VM network {spec.network[:40]!r}")
    return _templates().get_template("domain.xml.j2").render(**{
        **spec.__dict__, "cmdline": cmdline, "mac": spec.mac,
        "steps_sockets": [rundir.steps_socket(i) for i in range(spec.steps_ports)],
        "shell_sockets": [rundir.shell_socket(i) for i in range(spec.shell_ports)]})


def start_limited(dom, memory_limit_mib: int | None) -> None:
    """Run a domain created (or restored) paused once its QEMU has a hard memory limit.

    The limit is set on the live domain (its memory cgroup): `<memtune>` in the XML would also make
    libvirt raise QEMU's RLIMIT_MEMLOCK, which unprivileged containers refuse. No limit, no VM: the
    domain is destroyed and the node reported (a node without a memory cgroup cannot bound a job).
    A resume that fails or hangs is the job's: its user can kill or stop their own QEMU."""
    import libvirt

    try:
        if memory_limit_mib:
            dom.setMemoryParameters({"hard_limit": int(memory_limit_mib) * 1024}, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    except libvirt.libvirtError as e:
        try:
            dom.destroy()
        except libvirt.libvirtError:
            pass
        raise NodeError(f"cannot give the job's VM its hard memory limit of {memory_limit_mib} MiB "
                        f"(memory cgroup missing?): {e.get_error_message()}") from None
    try:
        guarded(dom.connect(), dom.name(), "start running", dom.resume)
    except libvirt.libvirtError as e:
        try:
            dom.destroy()
        except libvirt.libvirtError:
            pass
        raise GuestStalledError(f"the job's VM died before it could run: {e.get_error_message()}") from None


def node_starts_vms(conn, spec: Spec) -> tuple[bool, str]:
    """Whether this node can start a VM like `spec` at all, as libvirt's own user (whom no batch user
    can signal). Asked after a job's VM failed to start: its QEMU ran as the job's user, who may have
    killed it; only a probe that fails too makes the failure the node's."""
    import pwd
    import tempfile

    import libvirt

    try:
        pw = pwd.getpwnam("libvirt-qemu")
        ids = (pw.pw_uid, pw.pw_gid)
    except KeyError:
        return False, "user libvirt-qemu does not exist"
    name = f"vmwrap-probe-{os.getpid()}"
    with tempfile.TemporaryDirectory(prefix="vmwrap-probe-") as run_dir:
        os.chmod(run_dir, 0o711)
        for f in rundir.GUEST_FILES:
            fd = os.open(os.path.join(run_dir, f), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.fchown(fd, *ids)
            os.close(fd)
        probe = Spec(name=name, job_id="probe", virt_type=spec.virt_type, memory_mib=64, cpus=1,
                     kernel=spec.kernel, initrd=spec.initrd, run_dir=run_dir, uid=ids[0], gid=ids[1])
        try:
            conn.createXML(render(probe), libvirt.VIR_DOMAIN_START_PAUSED)
            return True, "a probe VM started"
        except libvirt.libvirtError as e:
            return False, e.get_error_message()
        finally:
            destroy(conn, name)


# Where libvirtd (qemu:///system) records each running domain's QEMU pid; root-owned.
QEMU_PIDFILE_DIR = Path("/run/libvirt/qemu")
STOPPED_GRACE = 3.0     # seconds a QEMU may sit stopped (SIGSTOP, ptrace) during a root call
CALL_TIMEOUT = 600.0    # any root call that needs QEMU to answer: ends by then whatever happens


def qemu_state(name: str) -> str | None:
    """The state letter of domain `name`'s QEMU in /proc (R, S, D, T stopped, t traced); None if unknown."""
    pid = _qemu_pid(name)
    if pid is None:
        return None
    stat = safeio.read_proc(f"/proc/{pid}/stat", 4096) or b""
    rest = stat[stat.rfind(b")") + 1:].split()
    return rest[0].decode(errors="replace") if rest else None


def guarded(conn, name: str, what: str, call: Callable[[], object], timeout: float = CALL_TIMEOUT,
            on_timeout: Callable[[], None] | None = None):
    """Run a root libvirt call that needs the job's QEMU to answer, and make sure it returns.

    QEMU runs as the job's user, who can stop it with a signal: libvirt then waits on its monitor
    forever and the prolog or epilog hangs until the scheduler gives up on the node. A QEMU stopped
    for STOPPED_GRACE seconds, or a call still running after `timeout`, gets its VM destroyed (which
    kills even a stopped QEMU) and raises GuestStalledError: the job fails, the node stays up.
    `on_timeout` replaces the destroy when time runs out (e.g. abort a save that a deadline cut)."""
    box: dict = {}

    def work():
        try:
            box["value"] = call()
        except BaseException as e:  # noqa: BLE001 (re-raised in the caller's thread)
            box["error"] = e
    t = threading.Thread(target=work, daemon=True, name=f"libvirt {what} {name}")
    t.start()
    end = time.monotonic() + timeout
    stopped_since = None
    while True:
        t.join(max(0.0, min(0.25, end - time.monotonic())))   # a deadline is kept to the instant
        if not t.is_alive():
            break
        now = time.monotonic()
        if qemu_state(name) in ("T", "t"):
            stopped_since = stopped_since or now
            if now - stopped_since >= STOPPED_GRACE:
                _destroy_for(conn, name, t)
                raise GuestStalledError(
                    f"the VM's QEMU was stopped (a signal or a debugger from the job's user) while vmwrap "
                    f"waited for it to {what}: the VM was destroyed")
        else:
            stopped_since = None
        if now >= end:
            if on_timeout is not None:
                on_timeout()
                t.join(30)
                if not t.is_alive():
                    break
            _destroy_for(conn, name, t)
            raise GuestStalledError(f"the VM did not {what} within {timeout:.0f} s: the VM was destroyed")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def set_paused(conn, name: str, dom, paused: bool) -> bool:
    """Pause or resume the VM (guarded); False when it already was so. A request may be repeated
    after its answer was lost (the node agent killed between doing it and saying so): that is no error."""
    import libvirt

    if (dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED) == paused:
        return False
    guarded(conn, name, "pause" if paused else "resume", dom.suspend if paused else dom.resume)
    return True


def _qemu_pid(name: str) -> int | None:
    """The pid libvirtd recorded for domain `name`'s QEMU, if that process is still that QEMU."""
    try:
        pid = int(safeio.read_capped(QEMU_PIDFILE_DIR / f"{name}.pid", 32) or b"")
    except ValueError:
        return None
    cmd = safeio.read_proc(f"/proc/{pid}/cmdline", 1 << 16) or b""
    return pid if f"guest={name},".encode() in cmd else None


def _destroy_for(conn, name: str, t: threading.Thread) -> None:
    """Destroy a domain whose call hangs, on a connection of its own (the stuck one is busy). A
    stopped QEMU would sit on libvirt's SIGTERM for its 10 s grace: it gets SIGKILL at once."""
    import signal

    pid = _qemu_pid(name)
    if pid is not None and qemu_state(name) in ("T", "t"):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    try:
        other = connect(conn.getURI())
    except Exception:  # noqa: BLE001
        other = conn
    try:
        destroy(other, name)
    finally:
        if other is not conn:
            other.close()
    t.join(30)


def channel_states(dom) -> dict[str, bool]:
    """Which of the guest's named virtio ports it has open (libvirt tracks what QEMU reports); a port
    libvirt says nothing of (a VM started by an older vmwrap, a port without a name) is left out."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(dom.XMLDesc(0))
    except Exception:  # noqa: BLE001 (libvirtError: the domain went away; a parse error)
        return {}
    return {t.get("name"): t.get("state") == "connected" for t in root.iterfind("./devices/channel/target")
            if t.get("name") and t.get("state") in ("connected", "disconnected")}


def channel_open(dom, name: str) -> bool | None:
    """Whether the guest has its virtio port `name` open; None when libvirt does not say."""
    return channel_states(dom).get(name)


def memory_limit_mib(dom) -> int | None:
    """The live domain's hard memory limit, None if unlimited."""
    v = dom.memoryParameters().get("hard_limit")
    return None if v is None or v >= 2**53 - 1 else v // 1024


def connect(uri: str):
    import libvirt

    libvirt.registerErrorHandler(lambda *_: None, None)  # errors arrive as exceptions; keep stderr clean
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as e:
        raise NodeError(f"cannot connect to libvirt at {uri} (is libvirtd running?): {e.get_error_message()}") from None


def lookup(conn, name: str):
    import libvirt

    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise


def is_gone(conn, name: str) -> bool:
    import libvirt

    dom = lookup(conn, name)
    if dom is None:
        return True
    try:
        return not dom.isActive()
    except libvirt.libvirtError:
        return True


def destroy(conn, name: str) -> bool:
    """Force the domain off and forget it; True if there was something to destroy. Idempotent."""
    import libvirt

    dom = lookup(conn, name)
    if dom is None:
        return False
    try:
        if dom.isActive():
            dom.destroy()
    except libvirt.libvirtError:
        pass
    try:
        if dom.isPersistent():
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)
    except libvirt.libvirtError:
        pass
    return True


class Control:
    """The host end of the guest agent's control port (TERM, KILL), held open for the VM's life.

    QEMU accepts one client on the socket; holding it open keeps the guest's reads blocking instead of
    seeing EOF, and lets any process reconnect after the holder died.
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.path = str(Path(run_dir) / rundir.CONTROL_SOCKET)
        self.sock: socket.socket | None = None

    def connect(self, timeout: float = 2.0) -> bool:
        if self.sock is not None:
            return True
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(self.path)
        except OSError:
            s.close()
            return False
        self.sock = s
        return True

    def send(self, command: str) -> bool:
        if not self.connect():
            return False
        try:
            self.sock.sendall(command.encode() + b"\n")
            return True
        except OSError:
            self.close()
            return False

    def eof(self) -> bool:
        """True once QEMU has gone (it closes the socket when it exits). The guest never writes here."""
        if self.sock is None and not self.connect(timeout=0.5):
            return True
        try:
            self.sock.setblocking(False)
            data = self.sock.recv(4096)
            return data == b""
        except BlockingIOError:
            return False
        except OSError:
            return True
        finally:
            if self.sock is not None:
                self.sock.settimeout(2.0)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def wait_gone(conn, name: str, timeout: float, interval: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if is_gone(conn, name):
            return True
        time.sleep(interval)
    return is_gone(conn, name)
