"""Root side of a job's VM: prepare its files, boot or restore it paused (it waits for the payload's
GO), record a job's failure for its payload to print, tear everything down. `vmwrap run` does all of
it in one process. What the job asked for is resolved in vmwrap/request.py; the payload (the job's
user's side: output, signals, exit codes) is vmwrap/payload.py.

Whatever root reads from the run dir is written by QEMU for the (hostile) guest, or by the job's user
in ctl/user: it goes through vmwrap/safeio.py (no links, no FIFOs, bounded).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

from . import accel, evidence, domain, jobnet, limits, overlay, rundir, share
from .cache import Cache
from .catalog import Catalog
from .config import Settings
from .errors import CacheFullError, GuestStalledError, JobDiskError, NodeError, UserError, VmwrapError
from .job import Job
from .ledger import Ledger
from .payload import DISK_FULL, EXIT_FOR, Attachment, write_all
from .request import VmRequest, on_lost_checkpoint, resolve


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


def provenance(image) -> dict[str, str]:
    """What the ledger records of the image a VM really booted: its content digest and its origin."""
    return {"digest": image.digest, "origin": image.origin}


class Launcher:
    """Root side: validate, fetch, make the overlay and control share, boot the VM (it then waits for GO)."""

    def __init__(self, job: Job, settings: Settings):
        self.job = job
        self.settings = settings
        self.run_dir = rundir.path(settings, job.job_id)
        self.request: VmRequest | None = None  # resolved by prepare()
        self.ledger = Ledger(settings.ledger_path)
        self.cache = Cache(settings.cache_dir, settings.cache_max_bytes, settings.verify_on_use)
        self.conn = None
        self.timeline: dict[str, float] = {"launcher_start": time.monotonic()}
        self.qemu_ids = domain.qemu_identity(job.uid, job.gid)
        self.run_token = os.urandom(8).hex()  # this start of the job (checkpoint.Store.check_current)

    @_disk_full_fails_the_job
    def prepare(self) -> None:
        """Validate, fetch the image into the cache, make the overlay and control files."""
        rundir.check_socket_room(self.run_dir)
        self.ledger.record(self.job.job_id, self.job.domain_name, "prepare", scheduler=self.job.scheduler,
                           restart_count=self.job.restart_count)
        catalog = Catalog.load(self.settings.catalog)
        self.request = p = resolve(self.job, self.settings, catalog)
        self.on_lost_checkpoint = on_lost_checkpoint(self.job)
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
            ov = self.run_dir / rundir.OVERLAY
            if not ov.exists():
                overlay.create(self.paths["disk"], ov, p.image.disk.format)
            # QEMU runs as the job's user: it owns its disk, nobody else may read it.
            os.chown(ov, *self.qemu_ids)
            ov.chmod(0o600)
        self._write_control()
        (self.run_dir / rundir.JOB).write_text(json.dumps(rundir.stamp({
            "job_id": self.job.job_id, "scheduler": self.job.scheduler, "uid": self.job.uid, "gid": self.job.gid,
            "image": p.image.name, "digest": p.image.digest, "checkpoint": p.image.checkpoint,
            "run_dir": str(self.run_dir), "restarts": self.job.restart_count,
            "disk_format": p.image.disk.format if p.image.disk else None,
            "disk_sha256": p.image.disk.sha256 if p.image.disk else None,
            "on_lost_checkpoint": self.on_lost_checkpoint,
            "node_index": self.job.index, "nodes": len(self.job.nodes.nodes) if self.job.nodes else 1,
            "network": self.job.nodes.job_id if self.job.nodes else None})))
        self.timeline["prepared"] = time.monotonic()

    def _write_control(self) -> None:
        """Root-owned facts (uid, work dir) apart from what the job's user hands over (script, env, args)."""
        ctl = rundir.ctl(self.run_dir)
        ctl.mkdir(exist_ok=True)
        ctl.chmod(0o755)
        (ctl / rundir.CTL_WORKDIR).write_text(self.job.work_dir)
        groups = ",".join(str(g) for g in self.job.groups) or "-"
        umask = os.umask(0o022)
        os.umask(umask)
        (ctl / rundir.CTL_IDS).write_text(f"{self.job.uid} {self.job.gid} {groups} {umask:o}\n")
        plan = self.job.nodes
        # A multi-node job's VMs are named as its nodes, which the job network's hosts file resolves.
        (ctl / rundir.CTL_HOSTNAME).write_text(plan.nodes[plan.index] if plan else os.uname().nodename)
        for name, text in ((rundir.CTL_JOBNET, plan.guest_config() if plan else None),
                           (rundir.CTL_PEER, "1\n" if plan and plan.index and not plan.peers_run_script else None)):
            if text is None:
                (ctl / name).unlink(missing_ok=True)
            else:
                (ctl / name).write_text(text)
        env = ctl / rundir.CTL_IMAGE_ENV  # the image's defaults under the job's own (payload.job_environment)
        env.write_bytes(b"".join(f"{k}={v}".encode() + b"\0" for k, v in self.request.image.env.items()))
        env.chmod(0o644)
        user = ctl / rundir.CTL_USER
        user.mkdir(exist_ok=True)
        os.chown(user, *self.qemu_ids)  # the job hands over its script here; QEMU shares it in
        user.chmod(0o700)
        for name in rundir.GUEST_FILES:
            f = self.run_dir / name
            f.unlink(missing_ok=True)
            fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            os.fchown(fd, *self.qemu_ids)  # QEMU (the job's uid) writes these; others may not read them
            os.close(fd)

    @_disk_full_fails_the_job
    def boot(self) -> None:
        p = self.request
        virt_type = accel.choose(self.settings, str(self.paths["kernel"]), str(self.paths["initrd"]),
                                 p.image.kernel.sha256)
        if virt_type == "kvm" and not accel.kvm_usable_by(*self.qemu_ids, self.job.groups):
            virt_type = "qemu"  # QEMU runs as the job's user, who cannot open /dev/kvm here (doctor says so)
        spec = domain.Spec(
            name=self.job.domain_name, job_id=self.job.job_id, virt_type=virt_type,
            memory_mib=p.memory_mib, cpus=p.cpus,
            kernel=str(self.paths["kernel"]), initrd=str(self.paths["initrd"]),
            disk=str(self.run_dir / rundir.OVERLAY) if p.image.disk else None,
            ctl_dir=str(rundir.ctl(self.run_dir)), work_dir=self.job.work_dir,
            run_dir=str(self.run_dir), cmdline=p.image.cmdline, uid=self.qemu_ids[0], gid=self.qemu_ids[1],
            memory_limit_mib=p.memory_mib + self.settings.vm_memory_overhead_mib, network=p.image.network,
        )
        if self.job.nodes:
            spec.job_bridge = jobnet.join(self.job.nodes, site=str(self.settings.jobs_dir))
            spec.job_mac = jobnet.mac(self.job.index)
        if domain.lookup(self.conn, self.job.domain_name) is not None:
            raise NodeError(f"a VM named {self.job.domain_name} already exists on this node "
                            f"(stale job? vmwrap teardown {self.job.job_id})")
        if self.settings.workdir_share == "serial":
            share.start(self.run_dir, self.job)
            spec.ninep_socket = str(self.run_dir / share.SOCKET)
            os.chown(spec.ninep_socket, *self.qemu_ids)  # QEMU connects to it
        from .checkpoint import record_spec

        started_from, fast = "boot", {}
        # restore a pre-booted template of this shape (any trouble: cold boot); templates have no job network
        if self.settings.fast_start and not spec.job_bridge:
            from . import snapshot

            restored, why = snapshot.start(self.conn, self.settings, p.image, spec)
            fast = {"started_from": "snapshot" if restored else "boot", **({"snapshot": why[:500]} if why else {})}
            if restored is not None:
                spec, started_from = restored, "snapshot"
            elif spec.ninep_socket:  # the attempt's QEMU may have connected to the work dir server: a fresh one
                share.start(self.run_dir, self.job)
                os.chown(spec.ninep_socket, *self.qemu_ids)
        record_spec(self.run_dir, spec)  # what a restore must render again (checkpoint.restore_xml)
        if started_from == "boot":
            self._create(spec)
        # libvirtd creates the control socket as root: the job's own batch step talks to it. (The run
        # dir is root's: nothing in it can have been swapped for a link.)
        rundir.own_ports(self.run_dir, self.job.uid, self.job.gid)
        limits.start(self.run_dir, self.job.domain_name, self.settings)  # root watcher: per-job disk limits
        self.timeline["created"] = time.monotonic()
        self.ledger.record(self.job.job_id, self.job.domain_name, "created", virt_type=virt_type,
                           cpus=p.cpus, memory_mib=p.memory_mib, image=p.image.name, **provenance(p.image),
                           **fast)

    def _create(self, spec: domain.Spec) -> None:
        """Cold boot: create the domain paused, give it its memory limit, let it run."""
        import libvirt

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

    @_disk_full_fails_the_job
    def restore(self, store) -> dict:
        """Instead of boot(): bring back the job's saved VM (CheckpointError if it is missing/corrupt)."""
        from . import checkpoint

        if domain.lookup(self.conn, self.job.domain_name) is not None:
            raise NodeError(f"a VM named {self.job.domain_name} already exists on this node "
                            f"(stale job? vmwrap teardown {self.job.job_id})")
        info = checkpoint.restore(self.job.job_id, self.run_dir, store, self.conn, self.job, self.paths,
                                  image=self.request.image.name, network=self.request.image.network,
                                  memory_overhead_mib=self.settings.vm_memory_overhead_mib)
        limits.start(self.run_dir, self.job.domain_name, self.settings)
        self.timeline["created"] = time.monotonic()
        self.ledger.record(self.job.job_id, self.job.domain_name, "restored", **info, **provenance(self.request.image))
        return info

    def notice(self, text: str) -> None:
        """A message the job's payload prints on its stderr before the job's own output."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        f = self.run_dir / rundir.NOTICE
        f.write_text(f"vmwrap: {text}\n")
        f.chmod(0o644)

    def fail(self, err: VmwrapError) -> None:
        """Leave the error where the job's payload will find and print it (prolog use)."""
        record_error(self.run_dir, err)
        self.ledger.record(self.job.job_id, self.job.domain_name, "failed", kind=err.kind, message=str(err))


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
        write_all(err_fd, f"vmwrap: error: {e}\n".encode())
        launcher.ledger.record(job.job_id, job.domain_name, "failed", kind=e.kind, message=str(e))
        return EXIT_FOR[e.kind]
    finally:
        att.timeline.update(launcher.timeline)
        teardown(job.job_id, settings, conn=launcher.conn, ledger=launcher.ledger, cache=launcher.cache)


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
        record_error(rundir.path(settings, job_id), err)
    except (UserError, OSError) as e:
        print(f"vmwrap prolog: cannot record the failure of job {job_id!r} ({err}): {e}", file=sys.stderr)
        return False
    return True


def record_error(run_dir: Path, err: VmwrapError) -> None:
    """The job's payload prints this and exits with its code (a hook's way to fail just the job)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    run_dir.chmod(0o711)
    f = run_dir / rundir.ERROR
    try:
        f.write_text(f"{err.kind}\n{err}\n")
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        # The disk is full: the job's own files go first (it fails anyway), then the reason fits.
        _clear_run_dir(run_dir, keep=rundir.ERROR)
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


def teardown(job_id: str, settings: Settings, conn=None, ledger: Ledger | None = None,
             cache: Cache | None = None, keep_error: bool = False, keep_evidence: bool = True,
             raise_unreachable: bool = False, index: int | None = None) -> bool:
    """Destroy the job's VM and remove every per-job file and pin. Idempotent; safe from an epilog.

    `index`: the node's place in a multi-node job, which names its VM (rundir.domain_name); None: as
    the run dir records it (0 without one). The job's network leaves this host with its last VM here.

    A guest that died without an exit status leaves its console tail and timeline in
    `<state_dir>/failed/<job>.<time>/` first (`keep_evidence=False` when the VM was saved on purpose).
    Libvirt unreachable: the files still go, but never silently (its VM may still run): a `failed`
    (kind node) ledger record, and a line on stderr or, with `raise_unreachable`, a NodeError at the end."""
    run_dir = rundir.path(settings, job_id)
    if index is None:
        index = rundir.placement(run_dir)[0]
    name = rundir.domain_name(job_id, index)
    did = False
    own_conn = conn is None
    unreachable = None
    try:
        if conn is None:
            conn = domain.connect(settings.libvirt_uri)
        gone_by_itself = domain.is_gone(conn, name)
        did = domain.destroy(conn, name)
    except NodeError as e:
        gone_by_itself = False  # libvirtd down: nothing we can destroy now; files still go
        unreachable = f"job {job_id}: its VM {name} was not destroyed (it may still run): {e}"
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
    net = rundir.network(run_dir) or job_id
    if unreachable is None and os.path.lexists(f"/sys/class/net/{jobnet.bridge_name(net)}"):
        jobnet.leave(net, index)
    if run_dir.exists():
        if keep_error and (run_dir / rundir.ERROR).exists():  # the job's payload still has to report it
            _clear_run_dir(run_dir, keep=rundir.ERROR)
        else:
            _remove_tree(run_dir)
        did = True
    (cache or Cache(settings.cache_dir, settings.cache_max_bytes)).unpin_job(job_id)
    if did:
        (ledger or Ledger(settings.ledger_path)).record(job_id, name, "destroyed")
    if unreachable is not None:
        try:
            (ledger or Ledger(settings.ledger_path)).record(job_id, name, "failed", kind="node", stage="teardown",
                                                            message=unreachable)
        except Exception as e:  # noqa: BLE001 (accounting only: the message below must still go out)
            unreachable += f" (not in the ledger: {e})"
        if raise_unreachable:
            raise NodeError(unreachable)
        print(f"vmwrap teardown: {unreachable}", file=sys.stderr)
    return did
