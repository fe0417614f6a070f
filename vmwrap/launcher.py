"""`vmwrap run`: boot the job's VM, stream its output, exit with the job's exit code.

Exit codes: the job's own (a signal N inside the guest gives 128+N); before the job could run,
64 = the job's request is wrong, 65 = the image is unusable, 66 = the job's checkpoint is missing or
corrupt (and it asked to fail then), 69 = this node cannot run VMs (or no disk space for the job
now), 70 = the guest died without reporting an exit status, 153 (128 + SIGXFSZ) = the job's VM was
stopped for writing more than a per-job limit allows (job_output_max_bytes, console_max_bytes,
job_disk_max_bytes: vmwrap/limits.py).

Whatever root reads from the run dir is written by QEMU for the (hostile) guest, or by the job's user
in ctl/user: it goes through vmwrap/safeio.py (no links, no FIFOs, bounded).
"""

from __future__ import annotations

import errno
import functools
import json
import math
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import accel, evidence, directives, domain, limits, overlay, safeio, share
from .cache import Cache
from .catalog import Catalog, Image
from .config import Settings
from .errors import CacheFullError, GuestStalledError, ImageError, JobDiskError, NodeError, UserError, VmwrapError
from .job import Job
from .ledger import Ledger

EXIT_USER, EXIT_IMAGE, EXIT_CHECKPOINT, EXIT_NODE, EXIT_GUEST = 64, 65, 66, 69, 70
EXIT_FOR = {"user": EXIT_USER, "image": EXIT_IMAGE, "checkpoint": EXIT_CHECKPOINT, "node": EXIT_NODE}
POLL = 0.02
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
SMALL_FILE_MAX = 1 << 16     # error, notice, restored.json: root-written, capped anyway
STATUS_TIMELINE_MAX = 1 << 16  # the agent's booted/ready/started/exit lines come first
STATUS_READ_MAX = 1 << 16    # status bytes taken per poll
STATUS_LINE_MAX = 4096       # a longer unfinished status "line" is the guest's garbage: dropped
CONSOLE_TAIL = 2000
PANIC_WINDOW = 16 * 1024   # bytes read back to find a panic's first line
PANIC_CONTEXT_LINES = 15


@dataclass
class Plan:
    """The validated request: what will boot. Building it has no side effects."""

    image: Image
    cpus: int
    memory_mib: int


def host_memory_mib() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)


def plan(job: Job, settings: Settings, catalog: Catalog) -> Plan:
    """Merge directives, scheduler allocation, image and site defaults; refuse what cannot fit.

    The VM's memory is the request, else the image's default, else the site's; whichever it is, it
    may not exceed the scheduler's allocation (job.memory_mib, filled by the scheduler plugin from
    what the scheduler itself granted) nor the site's max_memory_mib: a VM never holds more memory
    than its job was given, whatever the job's own request says."""
    req = directives.parse(job.script)
    name = req.image or job.image
    if not name:
        raise UserError("no image requested: add '#VMWRAP --image=NAME' to the job script")
    image = catalog.resolve(name, job.user, job.gid)
    cpus = req.cpus or job.cpus or image.cpus or settings.default_cpus
    if req.memory_mib:
        mem, what = req.memory_mib, f"--memory={req.memory_mib}M"
    elif image.memory_mib:
        mem, what = image.memory_mib, f"image {image.name}'s default memory of {image.memory_mib}M"
    else:
        mem, what = settings.default_memory_mib, f"the site's default VM memory of {settings.default_memory_mib}M"
    if job.cpus and req.cpus and req.cpus > job.cpus:
        raise UserError(f"--cpus={req.cpus} is more than the job's allocation of {job.cpus} CPUs")
    if job.memory_mib is not None and mem > job.memory_mib:
        hint = "" if req.memory_mib else "; ask the scheduler for more memory or '#VMWRAP --memory=' less"
        raise UserError(f"{what} is more than the job's allocation of {job.memory_mib}M{hint}")
    if settings.max_memory_mib and mem > settings.max_memory_mib:
        raise UserError(f"{what} is more than this site's limit of {settings.max_memory_mib}M per VM")
    ncpu = os.cpu_count() or 1
    if cpus > ncpu:
        raise UserError(f"the job asks for {cpus} CPUs; this node has {ncpu}")
    total = host_memory_mib()
    if mem > total:
        raise UserError(f"the job asks for {mem}M of memory; this node has {total}M")
    if mem < 64:
        raise UserError(f"{mem}M of memory is too little to boot a guest (minimum 64M)")
    return Plan(image, cpus, mem)


def _disk_full_fails_the_job(method):
    """ENOSPC/EDQUOT while preparing or starting a job becomes JobDiskError: the job fails with the
    reason and the node stays up, instead of an uncaught OSError failing (and draining) the prolog."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except OSError as e:
            if e.errno not in DISK_FULL:
                raise
            raise JobDiskError(f"cannot prepare the job's VM: {e.strerror} writing {e.filename or 'its files'} "
                               f"(state_dir = {self.settings.state_dir})") from None
        except NodeError as e:  # libvirt/QEMU could not create a file (console.log, ...) for the same reason
            if isinstance(e, CacheFullError) or not any(os.strerror(n) in str(e) for n in DISK_FULL):
                raise
            raise JobDiskError(f"{e} (state_dir = {self.settings.state_dir})") from None
    return wrapper


class Launcher:
    """Root side: validate, fetch, make the overlay and control share, boot the VM (it then waits for GO)."""

    def __init__(self, job: Job, settings: Settings):
        self.job = job
        self.settings = settings
        self.run_dir = settings.jobs_dir / job.job_id
        self.ledger = Ledger(settings.ledger_path)
        self.cache = Cache(settings.cache_dir, settings.cache_max_bytes, settings.verify_on_use)
        self.conn = None
        self.timeline: dict[str, float] = {"launcher_start": time.monotonic()}
        self.qemu_ids = domain.qemu_identity(job.uid, job.gid)

    @_disk_full_fails_the_job
    def prepare(self) -> None:
        """Validate, fetch the image into the cache, make the overlay and control files."""
        self.ledger.record(self.job.job_id, self.job.domain_name, "prepare", scheduler=self.job.scheduler,
                           restart_count=self.job.restart_count)
        catalog = Catalog.load(self.settings.catalog)
        self.plan = p = plan(self.job, self.settings, catalog)
        self.on_lost_checkpoint = directives.parse(self.job.script).on_lost_checkpoint or self.job.on_lost_checkpoint
        check_work_dir(self.job)
        self.conn = domain.connect(self.settings.libvirt_uri)
        self.paths: dict[str, Path] = {}
        for key, art in p.image.artifacts().items():
            self.cache.pin(art.sha256, self.job.job_id, self.qemu_ids[0])  # QEMU's uid reads it
            got = self.cache.fetch(art)
            self.ledger.record(self.job.job_id, self.job.domain_name, "cache_hit" if got.hit else "cache_miss",
                               artifact=key, sha256=art.sha256, bytes=got.bytes_transferred)
            self.paths[key] = got.path
        self.timeline["cached"] = time.monotonic()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir.chmod(0o711)  # the job's user may reach its own files by name, not list others
        self.cache.grant(p.image)  # QEMU, as the job's user, reads them; a restricted image's only its users
        if p.image.disk:
            ov = self.run_dir / "overlay.qcow2"
            if not ov.exists():
                overlay.create(self.paths["disk"], ov, p.image.disk.format)
            # QEMU runs as the job's user: it owns its disk, nobody else may read it.
            os.chown(ov, *self.qemu_ids)
            ov.chmod(0o600)
        self._write_control()
        (self.run_dir / "job.json").write_text(json.dumps({
            "job_id": self.job.job_id, "scheduler": self.job.scheduler, "uid": self.job.uid, "gid": self.job.gid,
            "image": p.image.name, "run_dir": str(self.run_dir), "restarts": self.job.restart_count,
            "disk_format": p.image.disk.format if p.image.disk else None,
            "on_lost_checkpoint": self.on_lost_checkpoint}))
        self.timeline["prepared"] = time.monotonic()

    def _write_control(self) -> None:
        """Root-owned facts (uid, work dir) apart from what the job's user hands over (script, env, args)."""
        ctl = self.run_dir / "ctl"
        ctl.mkdir(exist_ok=True)
        ctl.chmod(0o755)
        (ctl / "workdir").write_text(self.job.work_dir)
        groups = ",".join(str(g) for g in self.job.groups) or "-"
        umask = os.umask(0o022)
        os.umask(umask)
        (ctl / "ids").write_text(f"{self.job.uid} {self.job.gid} {groups} {umask:o}\n")
        (ctl / "hostname").write_text(os.uname().nodename)
        user = ctl / "user"
        user.mkdir(exist_ok=True)
        os.chown(user, *self.qemu_ids)  # the job hands over its script here; QEMU shares it in
        user.chmod(0o700)
        for name in ("stdout", "stderr", "status", "console.log"):
            f = self.run_dir / name
            f.unlink(missing_ok=True)
            fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            os.fchown(fd, *self.qemu_ids)  # QEMU (the job's uid) writes these; others may not read them
            os.close(fd)

    @_disk_full_fails_the_job
    def boot(self) -> None:
        import libvirt

        p = self.plan
        virt_type = accel.choose(self.settings, str(self.paths["kernel"]), str(self.paths["initrd"]),
                                 p.image.kernel.sha256)
        if virt_type == "kvm" and not accel.kvm_usable_by(*self.qemu_ids, self.job.groups):
            virt_type = "qemu"  # QEMU runs as the job's user, who cannot open /dev/kvm here (doctor says so)
        spec = domain.Spec(
            name=self.job.domain_name, job_id=self.job.job_id, virt_type=virt_type,
            memory_mib=p.memory_mib, cpus=p.cpus,
            kernel=str(self.paths["kernel"]), initrd=str(self.paths["initrd"]),
            disk=str(self.run_dir / "overlay.qcow2") if p.image.disk else None,
            ctl_dir=str(self.run_dir / "ctl"), work_dir=self.job.work_dir,
            run_dir=str(self.run_dir), cmdline=p.image.cmdline, uid=self.qemu_ids[0], gid=self.qemu_ids[1],
            memory_limit_mib=p.memory_mib + self.settings.vm_memory_overhead_mib,
        )
        if domain.lookup(self.conn, self.job.domain_name) is not None:
            raise NodeError(f"a VM named {self.job.domain_name} already exists on this node "
                            f"(stale job? vmwrap teardown {self.job.job_id})")
        if self.settings.workdir_share == "serial":
            share.start(self.run_dir, self.job)
            spec.ninep_socket = str(self.run_dir / share.SOCKET)
            os.chown(spec.ninep_socket, *self.qemu_ids)  # QEMU connects to it
        from .checkpoint import record_spec

        record_spec(self.run_dir, spec)  # what a restore must render again (checkpoint.restore_xml)
        try:
            dom = domain.guarded(self.conn, spec.name, "start",
                                 lambda: self.conn.createXML(domain.render(spec), libvirt.VIR_DOMAIN_START_PAUSED))
        except libvirt.libvirtError as e:
            domain.destroy(self.conn, spec.name)
            ok, detail = domain.node_starts_vms(self.conn, spec)
            if not ok:
                raise NodeError(f"libvirt refused to start the job's VM: {e.get_error_message()} "
                                f"(and a probe VM: {detail})") from None
            raise GuestStalledError(f"the job's VM failed to start ({e.get_error_message()}); this node "
                                    "starts VMs, so its QEMU was probably killed by the job's user") from None
        domain.start_limited(dom, spec.memory_limit_mib)  # the hard limit holds from the first instruction
        # libvirtd creates the control socket as root: the job's own batch step talks to it. (The run
        # dir is root's: nothing in it can have been swapped for a link.)
        f = self.run_dir / "control.sock"
        if f.exists():
            os.chown(f, self.job.uid, self.job.gid)
            f.chmod(0o600)
        limits.start(self.run_dir, self.job.domain_name, self.settings)  # root watcher: per-job disk limits
        self.timeline["created"] = time.monotonic()
        self.ledger.record(self.job.job_id, self.job.domain_name, "created", virt_type=virt_type,
                           cpus=p.cpus, memory_mib=p.memory_mib, image=p.image.name)

    @_disk_full_fails_the_job
    def restore(self, store) -> dict:
        """Instead of boot(): bring back the job's saved VM (CheckpointError if it is missing/corrupt)."""
        from . import checkpoint

        if domain.lookup(self.conn, self.job.domain_name) is not None:
            raise NodeError(f"a VM named {self.job.domain_name} already exists on this node "
                            f"(stale job? vmwrap teardown {self.job.job_id})")
        info = checkpoint.restore(self.job.job_id, self.run_dir, store, self.conn, self.job, self.paths,
                                  image=self.plan.image.name,
                                  memory_overhead_mib=self.settings.vm_memory_overhead_mib)
        limits.start(self.run_dir, self.job.domain_name, self.settings)
        self.timeline["created"] = time.monotonic()
        self.ledger.record(self.job.job_id, self.job.domain_name, "restored", **info)
        return info

    def notice(self, text: str) -> None:
        """A message the job's payload prints on its stderr before the job's own output."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        f = self.run_dir / "notice"
        f.write_text(f"vmwrap: {text}\n")
        f.chmod(0o644)

    def fail(self, err: VmwrapError) -> None:
        """Leave the error where the job's payload will find and print it (prolog use)."""
        record_error(self.run_dir, err)
        self.ledger.record(self.job.job_id, self.job.domain_name, "failed", kind=err.kind, message=str(err))


class Attachment:
    """Either side: hand the job to the waiting guest, stream its output, forward signals.

    With a libvirt connection (root) SIGTSTP/SIGCONT pause/resume the whole VM; without one (the
    job's user under a scheduler) they stop/continue the job's processes inside the guest.
    """

    def __init__(self, run_dir: Path, job_id: str, out_fd: int = 1, err_fd: int = 2, grace: float = 30.0,
                 conn=None, ledger: Ledger | None = None, settings: Settings | None = None):
        self.run_dir = Path(run_dir)
        self.job_id = job_id
        self.name = f"vmwrap-{job_id}"
        self.out_fd, self.err_fd = out_fd, err_fd
        self.grace = grace
        self.conn = conn
        self.ledger = ledger
        self.control = domain.Control(self.run_dir)
        self.settings = settings
        self._stopped_inside = False
        self._signals: list[int] = []
        self.timeline: dict[str, float] = {}
        # The scheduler's answer to "is this SIGTERM a requeue/preemption?": then the step only
        # detaches and the VM is saved by the epilog instead of the job being terminated.
        self.requeued: Callable[[], bool] | None = None
        self.offsets = {"stdout": 0, "stderr": 0}  # bytes of each stream already delivered
        self.detached = False

    def _record(self, event: str, **kw) -> None:
        if self.ledger is not None:
            self.ledger.record(self.job_id, self.name, event, **kw)

    def install_signal_handlers(self) -> None:
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGTSTP, signal.SIGCONT):
            signal.signal(s, lambda signum, _f: self._signals.append(signum))

    def start(self, script: str, environment: dict[str, str], args: list[str] = ()) -> None:
        restored = safeio.read_capped(self.run_dir / "restored.json", SMALL_FILE_MAX)
        if restored is not None:  # the job already runs in a VM restored from its checkpoint
            self._resume_streams(json.loads(restored).get("delivered", {}))
            return
        user = self.run_dir / "ctl" / "user"
        try:
            _write_private(user / "script", script.encode("utf-8", "surrogateescape"), 0o700)
            _write_private(user / "env", b"".join(
                f"{k}={v}".encode("utf-8", "surrogateescape") + b"\0"
                for k, v in environment.items() if "\0" not in k + v and "=" not in k), 0o600)
            _write_private(user / "args", b"".join(a.encode("utf-8", "surrogateescape") + b"\0" for a in args), 0o600)
        except OSError as e:
            if e.errno not in DISK_FULL:
                raise
            raise JobDiskError(f"cannot hand the job to its VM: {e.strerror} writing {e.filename}") from None
        if not self.control.connect(timeout=5.0):
            if evidence.guest_ran(self.run_dir):
                return  # it booted and died before we attached: stream() reports it, console included
            raise NodeError(f"cannot reach the job's VM control socket in {self.run_dir} (VM not running?)")
        self.control.send("GO")
        self.timeline["go"] = time.monotonic()

    def _resume_streams(self, delivered: dict[str, int]) -> None:
        """Continue each stream where the previous run's step stopped delivering it. If the scheduler
        truncated the output file on restart (it is empty now), deliver everything again instead."""
        for name, fd in (("stdout", self.out_fd), ("stderr", self.err_fd)):
            off = int(delivered.get(name, 0))
            try:
                st = os.fstat(fd)
                if stat.S_ISREG(st.st_mode) and st.st_size == 0:
                    off = 0
            except OSError:
                pass
            self.offsets[name] = off

    def _save_offsets(self) -> None:
        try:
            _write_private(self.run_dir / "ctl" / "user" / "delivered.json",
                           json.dumps(self.offsets).encode(), 0o600)
        except OSError:
            pass

    def _gone(self) -> bool:
        if self.conn is not None:
            return domain.is_gone(self.conn, self.name)
        return self.control.eof()

    def stream(self) -> int:
        files: dict[str, object] = {}
        pending = {"stdout": self.out_fd, "stderr": self.err_fd}
        status_buf = b""
        exit_code: int | None = None
        exit_seen_at = None
        term_deadline = kill_deadline = None
        paused = False
        last_check = 0.0
        status_f = None

        def pump(name: str, fd: int) -> bool:
            f = files.get(name)
            if f is None:
                f = files[name] = _open_or_none(self.run_dir / name)
                if f is None:
                    return False
                f.seek(self.offsets[name])
            moved = False
            while buf := f.read(1 << 20):
                _write_all(fd, buf)
                self.offsets[name] += len(buf)
                moved = True
                self.timeline.setdefault("first_output", time.monotonic())
                if len(buf) < (1 << 20):
                    break
            return moved

        while True:
            moved = any([pump(n, fd) for n, fd in pending.items()])
            if status_f is None:
                status_f = _open_or_none(self.run_dir / "status")
            if status_f is not None:
                lines, status_buf = _status_lines(status_f, status_buf)
                for ln in lines:
                    word, _, arg = ln.decode(errors="replace").partition(" ")
                    if word in ("booted", "ready", "started"):
                        self.timeline.setdefault(word, time.monotonic())
                        if word != "ready":
                            self._record(word, guest_uptime=arg[:32])
                    elif word == "exit" and exit_code is None:
                        exit_code = _exit_status(arg)
                        if exit_code is not None:
                            exit_seen_at = time.monotonic()
                    elif word == "error":
                        _write_all(self.err_fd, f"vmwrap: guest error: {arg[:1000]}\n".encode())
            while self._signals:
                sig = self._signals.pop(0)
                if sig == signal.SIGTSTP and not paused:
                    paused = self._pause()
                elif sig == signal.SIGCONT and paused:
                    paused = not self._resume()
                elif sig == signal.SIGTERM and term_deadline is None and self.requeued and self.requeued():
                    # Preempted/requeued: leave the VM as it is for the epilog to save; record how much
                    # of each stream was delivered so that the restored job continues from there.
                    for name, fd in pending.items():
                        pump(name, fd)
                    self._save_offsets()
                    self.detached = True
                    self._record("detached")
                    break
                elif sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP) and term_deadline is None:
                    if paused:
                        paused = not self._resume()
                    self.control.send("TERM")
                    term_deadline = time.monotonic() + self.grace
            if self.detached:
                break
            now = time.monotonic()
            if term_deadline and now > term_deadline and kill_deadline is None:
                self.control.send("KILL")
                kill_deadline = now + 2.0
            if kill_deadline and now > kill_deadline and self.conn is not None:
                domain.destroy(self.conn, self.name)
            if now - last_check > 0.1 or exit_code is not None:
                last_check = now
                # Without libvirt, a guest that reported its exit but lingers is given 5 s to power off.
                lingering = exit_seen_at is not None and self.conn is None and now - exit_seen_at > 5.0
                if self._gone() or lingering:
                    for name, fd in pending.items():
                        pump(name, fd)
                        f = files.get(name)
                        while f is not None and (buf := f.read(1 << 20)):
                            _write_all(fd, buf)
                            self.offsets[name] += len(buf)
                    if status_f is None:
                        status_f = _open_or_none(self.run_dir / "status")
                    if exit_code is None and status_f is not None:
                        for ln in (status_buf + status_f.read(16 * STATUS_READ_MAX)).split(b"\n"):
                            if ln.startswith(b"exit ") and exit_code is None:
                                exit_code = _exit_status(ln[5:].decode(errors="replace"))
                    break
            if not moved:
                time.sleep(POLL)
        for f in files.values():
            f.close()
        self.control.close()
        if self.detached:
            return 0
        why = limits.reason(self.run_dir)  # the root watcher stopped the VM: that is the job's end
        if why is not None:
            _write_all(self.err_fd, why.encode())
            exit_code = limits.EXIT_LIMIT
        if exit_code is None:
            if term_deadline is not None:
                exit_code = 128 + signal.SIGTERM
            else:
                tail = _tail(self.run_dir / "console.log")
                _write_all(self.err_fd, f"vmwrap: the guest died without reporting an exit status\n{tail}".encode())
                exit_code = EXIT_GUEST
        self._record("exited", exit_code=exit_code)
        return exit_code

    def _pause_unprivileged(self) -> bool:
        """Ask the node agent to pause the whole VM; without one, stop the job's processes inside."""
        try:
            from . import agent

            if self.settings is None:
                raise NodeError("no settings")
            agent.request(self.settings, "pause", self.job_id)
            return True
        except NodeError as e:
            _write_all(self.err_fd, f"vmwrap: {e}; stopping the job's processes inside the VM instead\n".encode())
            self._stopped_inside = self.control.send("STOP")
            return self._stopped_inside

    def _pause(self) -> bool:
        if self.conn is None:
            return self._pause_unprivileged()
        dom = domain.lookup(self.conn, self.name)
        if dom is None:
            return False
        try:
            domain.guarded(self.conn, self.name, "pause", dom.suspend)
        except Exception:
            return False
        self._record("paused")
        return True

    def _resume(self) -> bool:
        if self.conn is None:
            if self._stopped_inside:
                self._stopped_inside = False
                return self.control.send("CONT")
            try:
                from . import agent

                agent.request(self.settings, "resume", self.job_id)
                return True
            except (NodeError, TypeError) as e:
                _write_all(self.err_fd, f"vmwrap: cannot resume the VM: {e}\n".encode())
                return False
        dom = domain.lookup(self.conn, self.name)
        if dom is None:
            return True
        try:
            domain.guarded(self.conn, self.name, "resume", dom.resume)
        except Exception:
            return False
        self._record("resumed")
        return True


def run(job: Job, settings: Settings, args: list[str] = (), out_fd: int = 1, err_fd: int = 2) -> int:
    """`vmwrap run`: everything in one process (needs root): prepare, boot, attach, tear down."""
    launcher = Launcher(job, settings)
    att = Attachment(launcher.run_dir, job.job_id, out_fd, err_fd, settings.grace_seconds, ledger=launcher.ledger)
    att.install_signal_handlers()
    try:
        launcher.prepare()
        launcher.boot()
        att.conn = launcher.conn
        att.start(job.script, job.environment, list(args))
        return att.stream()
    except VmwrapError as e:
        _write_all(err_fd, f"vmwrap: error: {e}\n".encode())
        launcher.ledger.record(job.job_id, job.domain_name, "failed", kind=e.kind, message=str(e))
        return EXIT_FOR[e.kind]
    finally:
        att.timeline.update(launcher.timeline)
        teardown(job.job_id, settings, conn=launcher.conn, ledger=launcher.ledger, cache=launcher.cache)


def attach(run_dir: Path, job_id: str, script: str, environment: dict[str, str], args: list[str] = (),
           grace: float = 30.0, settings: Settings | None = None,
           requeued: Callable[[], bool] | None = None) -> int:
    """The job's payload under a scheduler (runs as the job's user): the VM was booted by the prolog."""
    err = safeio.read_capped(Path(run_dir) / "error", SMALL_FILE_MAX)
    if err is not None:
        kind, _, msg = err.decode(errors="replace").partition("\n")
        _write_all(2, f"vmwrap: error: {msg.strip()}\n".encode())
        return EXIT_FOR.get(kind, EXIT_NODE)
    notice = safeio.read_capped(Path(run_dir) / "notice", SMALL_FILE_MAX)
    if notice:
        _write_all(2, notice)
    att = Attachment(Path(run_dir), job_id, grace=grace, settings=settings)
    att.requeued = requeued
    att.install_signal_handlers()
    try:
        att.start(script, environment, list(args))
        return att.stream()
    except VmwrapError as e:
        _write_all(2, f"vmwrap: error: {e}\n".encode())
        return EXIT_FOR[e.kind]


def check_work_dir(job: Job) -> None:
    """The work dir is shared into a VM run by the job's user: it must be a directory that user owns.

    Refusing others' dirs (`--chdir=/`, a group project dir) keeps the share within what the user
    could change on the host anyway."""
    try:
        st = os.stat(job.work_dir)
    except OSError:
        raise UserError(f"work dir {job.work_dir} does not exist on this node") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UserError(f"work dir {job.work_dir} is not a directory")
    if st.st_uid != job.uid:
        raise UserError(f"work dir {job.work_dir} belongs to uid {st.st_uid}, not to the job's user {job.user} "
                        f"(uid {job.uid}): a VM job's work dir must be the user's own directory")


def fail_job(settings: Settings, job_id: str, err: VmwrapError) -> bool:
    """A hook's way to fail just the job: its payload prints `err` and exits with its code. False when
    even that cannot be recorded (a job id the scheduler should never give, a state dir root cannot
    write): then it is the node's fault."""
    try:
        Job.check_id(job_id)
        record_error(settings.jobs_dir / job_id, err)
    except (UserError, OSError) as e:
        print(f"vmwrap prolog: cannot record the failure of job {job_id!r} ({err}): {e}", file=sys.stderr)
        return False
    return True


def record_error(run_dir: Path, err: VmwrapError) -> None:
    """The job's payload prints this and exits with its code (a hook's way to fail just the job)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    run_dir.chmod(0o711)
    f = run_dir / "error"
    try:
        f.write_text(f"{err.kind}\n{err}\n")
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        # The disk is full: the job's own files go first (it fails anyway), then the reason fits.
        _clear_run_dir(run_dir, keep="error")
        try:
            f.write_text(f"{err.kind}\n{err}\n")
        except OSError as e2:  # still full: the job fails without its reason; the node must stay up
            print(f"vmwrap: cannot record job error in {f}: {e2.strerror}: {err}", file=sys.stderr)
            return
    f.chmod(0o644)


def _remove_tree(p: Path) -> None:
    """rmtree that a user-made deep tree (ctl/user is the job's) cannot turn into a RecursionError:
    Python's rmtree recurses; rm(1) walks iteratively and never follows links."""
    try:
        shutil.rmtree(p, ignore_errors=True)
    except RecursionError:
        subprocess.run(["/bin/rm", "-rf", "--one-file-system", "--", str(p)], capture_output=True, timeout=600)


def _clear_run_dir(run_dir: Path, keep: str | None = None) -> None:
    """Remove everything in the run dir but `keep`, never following a link."""
    for p in run_dir.iterdir():
        if p.name != keep:
            _remove_tree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)


def _write_private(path: Path, data: bytes, mode: int) -> None:
    """Write a file the job's user owns (root writing on the user's behalf gives it to the dir's owner)."""
    # A fresh inode in the user's dir: a FIFO, link or hard link put there by the user is replaced,
    # never opened (opening a FIFO for writing would block root forever).
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        _write_all(fd, data)
        if os.geteuid() == 0:
            st = os.stat(path.parent)
            os.fchown(fd, st.st_uid, st.st_gid)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def guest_timeline(run_dir: Path) -> dict[str, float | int]:
    """What the guest agent reported (guest uptimes at booted/ready/started, exit status)."""
    out: dict[str, float | int] = {}
    try:  # the guest writes this file (through QEMU): only its head, and never through a link or FIFO
        data = safeio.read_capped(Path(run_dir) / "status", STATUS_TIMELINE_MAX)
    except OSError:
        return out
    for ln in (data or b"").decode(errors="replace").splitlines():
        word, _, arg = ln.partition(" ")
        if word in ("booted", "ready", "started"):
            try:
                v = float(arg[:32])
            except ValueError:
                continue
            if math.isfinite(v):
                out[word] = v
        elif word == "exit" and (code := _exit_status(arg)) is not None:
            out["exit"] = code
    return out


def _exit_status(arg: str) -> int | None:
    """The status of an `exit N` line: 0..255, anything else from the guest is ignored."""
    arg = arg.strip()
    return int(arg) if arg.isascii() and arg.isdigit() and len(arg) <= 3 and int(arg) <= 255 else None


def _status_lines(f, buf: bytes) -> tuple[list[bytes], bytes]:
    """Complete lines newly readable on the status port, and the unfinished rest (both bounded)."""
    *lines, rest = (buf + f.read(STATUS_READ_MAX)).split(b"\n")
    return lines, (rest if len(rest) <= STATUS_LINE_MAX else b"")


def teardown(job_id: str, settings: Settings, conn=None, ledger: Ledger | None = None,
             cache: Cache | None = None, keep_error: bool = False, keep_evidence: bool = True) -> bool:
    """Destroy the job's VM and remove every per-job file and pin. Idempotent; safe from an epilog.

    A guest that died without an exit status leaves its console tail and timeline in
    `<state_dir>/failed/<job>.<time>/` first (`keep_evidence=False` when the VM was saved on purpose)."""
    name = f"vmwrap-{job_id}"
    did = False
    own_conn = conn is None
    run_dir = settings.jobs_dir / job_id
    try:
        if conn is None:
            conn = domain.connect(settings.libvirt_uri)
        gone_by_itself = domain.is_gone(conn, name)
        did = domain.destroy(conn, name)
    except NodeError:
        gone_by_itself = False  # libvirtd down: nothing we can destroy now; files still go
    finally:
        if own_conn and conn is not None:
            conn.close()
    if keep_evidence and gone_by_itself and evidence.guest_died(run_dir):
        kept = evidence.keep(settings.state_dir, job_id, run_dir, "the guest died without reporting an exit status")
        if kept is not None:
            (ledger or Ledger(settings.ledger_path)).record(job_id, name, "failed", kind="guest",
                                                            message="the guest died without an exit status",
                                                            evidence=str(kept))
    limits.stop(run_dir)
    share.stop(run_dir)
    if run_dir.exists():
        if keep_error and (run_dir / "error").exists():  # the job's payload still has to report it
            _clear_run_dir(run_dir, keep="error")
        else:
            _remove_tree(run_dir)
        did = True
    (cache or Cache(settings.cache_dir, settings.cache_max_bytes)).unpin_job(job_id)
    if did:
        (ledger or Ledger(settings.ledger_path)).record(job_id, name, "destroyed")
    return did


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except InterruptedError:
            continue
        except BrokenPipeError:
            return
        view = view[n:]


def _open_or_none(p: Path):
    """A reader on a stream file QEMU writes; None unless it is a regular file (no link, FIFO)."""
    return safeio.open_stream(p)


def _tail(p: Path, n: int = CONSOLE_TAIL) -> str:
    """The console's last lines for the job's error output (seek, never the whole file: the guest
    decides its size). A kernel panic's backtrace would fill the tail and push out what the user
    needs (their init's last words), so for a panic the lines before it are shown and the trace
    is left to the kept evidence."""
    try:
        data = safeio.tail_capped(p, PANIC_WINDOW)
    except OSError:
        return ""
    if data is None:
        return ""
    return "--- guest console (last lines) ---\n" + summarise_console(data.decode(errors="replace"), n) + "\n"


def summarise_console(text: str, n: int = CONSOLE_TAIL) -> str:
    """The last `n` characters of a console, or for a kernel panic the lines leading up to it."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if "Kernel panic - not syncing" in line:
            head = "\n".join(lines[max(0, i - PANIC_CONTEXT_LINES):i + 1])[-n:]
            return head + "\n[kernel backtrace omitted; `vmwrap ps --failed` shows the kept console]"
    return text[-n:]
