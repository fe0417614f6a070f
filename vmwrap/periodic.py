"""Periodic checkpoints (`#VMWRAP --checkpoint-every=DURATION`): the running VM is saved into the
checkpoint store every interval and goes on running, so a node crash loses at most one interval.

Who does what:
- the job's payload (as the job's user) keeps the time (`interval`: the job's directive, else the
  site's default, never below the site's minimum): when an interval is up it delivers what the
  guest wrote so far, records those offsets (and its output files' sizes) in ctl/user, and asks the
  root node agent for a checkpoint;
- the agent (`handle`) saves the VM live (`save`): the guest is paused only while libvirt writes its
  memory (an external memory snapshot, the same format as a libvirt save) and the streams and disk
  are copied; sealing (fsync, hashes, MAC) runs after the guest resumed. The new checkpoint is built
  aside and renamed over the last good one, so a failed save (store full, unreachable) leaves that
  one as it was; the failure is the ledger's, never the job's or the node's.

A restart after a crash restores the last checkpoint like a requeue-save (vmwrap/lifecycle.py) and
the payload cuts its output files back to their size at that checkpoint (payload._resume_streams).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from xml.sax.saxutils import quoteattr

from . import checkpoint, domain, rundir, share
from .checkpoint import JSON_MAX, STREAMS, _copy_out, _read_capped, _write_sealed
from .config import Settings
from .errors import NodeError, UserError

SLACK = 0.8                         # the agent obeys a request this early in the interval, no earlier
SAVE_TIMEOUT = 300.0                # s the payload waits for the agent's answer


def interval(script: str, settings: Settings) -> int | None:
    """The job's interval in seconds (its script's directive, else the site's default), None when off.
    Never below the site's minimum (job_submit refuses such a job; the agent would refuse it too)."""
    from . import directives

    if settings.workdir_share != "serial":
        return None  # such VMs cannot be saved
    try:
        every = directives.parse(script).checkpoint_every_s
    except UserError:
        return None  # the prolog already refused what the submit filter let through
    every = every if every is not None else int(settings.checkpoint_every_s)
    if not every:
        return None
    return int(max(every, math.ceil(settings.checkpoint_min_every_s)))


def check(every: int | None, settings: Settings) -> None:
    """UserError when a job's --checkpoint-every is below the site's minimum (job_submit.lua says the same)."""
    if every is not None and every < settings.checkpoint_min_every_s:
        raise UserError(f"--checkpoint-every={every}s is below this site's minimum of "
                        f"{math.ceil(settings.checkpoint_min_every_s)}s (checkpoint_min_every_s)")


def save(job_id: str, run_dir: Path, store: checkpoint.Store, conn, restarts: int) -> dict:
    """Checkpoint the running VM into the store and let it run on; returns timings (`pause_s`: how long
    the guest was stopped). NodeError/CheckpointError if it failed: the last good checkpoint stays."""
    import libvirt

    checkpoint.refuse_by_policy(run_dir)
    store.check_identity()  # fail before pausing: no key, or the store is not this site's (not mounted?)
    run = checkpoint.run_token(run_dir)
    store.check_current(job_id, run)  # the job runs again elsewhere: this run's work is not its latest
    t0 = time.monotonic()
    name = rundir.domain_name(job_id)
    dom, meta = checkpoint.running_vm(job_id, run_dir, conn, "checkpoint")
    tmp = store.staging(job_id)
    known: dict[str, tuple[int, str]] = {}  # size and sha256 of what this save wrote itself
    serial = (run_dir / share.CONTROL).exists()
    was_running = dom.info()[0] != libvirt.VIR_DOMAIN_PAUSED
    paused_at = resumed_at = None
    try:
        try:
            if serial:
                share.drain(run_dir)
            if was_running:
                domain.guarded(conn, name, "pause for a checkpoint", dom.suspend)
            paused_at = time.monotonic()
            state = share.state(run_dir) if serial else None
            # A memory-only external snapshot of the paused VM: libvirt's save format (what a restore
            # reads), written by libvirtd as root, and the domain stays as it was (paused) afterwards.
            # Its disks are not snapshotted (libvirt's default would put a new overlay over each):
            # the overlay is copied below while the VM is paused.
            disks = "".join(f"<disk name={quoteattr(t)} snapshot='no'/>" for t in _disk_targets(dom))
            xml = (f"<domainsnapshot><name>periodic</name><memory snapshot='external' "
                   f"file={quoteattr(str(tmp / 'memory.save'))}/><disks>{disks}</disks></domainsnapshot>")
            try:
                domain.guarded(conn, name, "checkpoint", lambda: dom.snapshotCreateXML(
                    xml, libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA))
            except libvirt.libvirtError as e:
                raise NodeError(f"libvirt could not save the memory of job {job_id}'s VM: "
                                f"{e.get_error_message()}") from None
            t_memory = time.monotonic()
            # hashed as copied: the seal reads back only the memory image (libvirt wrote it)
            if (run_dir / rundir.OVERLAY).exists():
                known["overlay.qcow2"] = _copy_out(run_dir / rundir.OVERLAY, tmp / "overlay.qcow2")
            else:
                known["overlay.qcow2"] = _write_sealed(tmp / "overlay.qcow2", b"")
            for s in STREAMS:
                src = run_dir / s
                known[s] = _copy_out(src, tmp / s) if src.exists() else _write_sealed(tmp / s, b"")
            delivered = checkpoint._delivered(run_dir)
        finally:
            if paused_at is not None and was_running:
                domain.guarded(conn, name, "resume after a checkpoint", dom.resume)
            resumed_at = time.monotonic()
            if serial:
                try:
                    share.resume(run_dir)
                except NodeError:
                    pass
        known["share.json"] = _write_sealed(tmp / "share.json", json.dumps(state).encode())
        meta.update(restarts=restarts, delivered=delivered)
        known["job.json"] = _write_sealed(tmp / "job.json", json.dumps(meta).encode())
        manifest = store.commit(tmp, job_id, known, run=run)  # replaced only by a sealed new one of the current run
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    t_done = time.monotonic()
    return {"pause_s": resumed_at - paused_at, "memory_s": t_memory - paused_at,
            "seal_s": t_done - resumed_at, "total_s": t_done - t0, **store.last_commit,
            "memory_bytes": manifest["files"]["memory.save"]["bytes"]}


def _disk_targets(dom) -> list[str]:
    """The target names (vda, ...) of the VM's disks, from libvirt's own view of the domain."""
    import xml.etree.ElementTree as ET

    root = ET.fromstring(dom.XMLDesc(0))
    return [t.get("dev") for t in root.findall("./devices/disk/target") if t.get("dev")]


_last: dict[str, float] = {}   # the agent's last periodic save per job (monotonic)


def handle(settings: Settings, conn, job_id: str, peer_uid: int) -> dict:
    """The agent's `checkpoint` op for the job's owner: refused until the site's minimum interval is
    nearly up since the job's last one, so a user cannot make the node write checkpoints back to back.
    A failed save is recorded in the ledger and answered, never raised to the node."""
    from .ledger import Ledger

    run_dir = rundir.path(settings, job_id)
    if settings.workdir_share != "serial":
        raise UserError("this site's VMs cannot be saved (workdir_share is not serial)")
    if rundir.placement(run_dir)[1] > 1:
        raise UserError(f"job {job_id} runs on several nodes: its VMs are not saved")
    gap = settings.checkpoint_min_every_s * SLACK
    now = time.monotonic()
    if now - _last.get(job_id, -1e18) < gap:
        raise UserError(f"job {job_id} was checkpointed {now - _last[job_id]:.0f} s ago; "
                        f"the next is due after {gap:.0f} s")
    for old in [j for j, t in _last.items() if now - t > 2 * gap]:
        del _last[old]   # the agent outlives many jobs: keep only recent ones
    _last[job_id] = now
    ledger = Ledger(settings.ledger_path)
    name = rundir.domain_name(job_id)
    store = checkpoint.Store(settings.checkpoint_dir, settings.checkpoint_key_file)
    try:
        meta = json.loads(_read_capped(run_dir / rundir.JOB, JSON_MAX))
        restarts = int(meta.get("restarts", 0))
        info = save(job_id, run_dir, store, conn, restarts)
    except checkpoint.StaleRunError as e:
        # Cut off while the scheduler restarted the job elsewhere: this copy's work is not the job's, and
        # running on it would write into the work dir the new run writes. Its VM stops now, not when the
        # node is back and the scheduler ends the old step (its epilog then finds nothing to save).
        stopped = domain.destroy(conn, name)
        ledger.record(job_id, name, "stale_run", by_uid=peer_uid, stopped=stopped, message=str(e)[:2000])
        return {"saved": False, "stale": True, "error": str(e)}
    except Exception as e:  # noqa: BLE001 (the job runs on with its last good checkpoint)
        ledger.record(job_id, name, "checkpoint_failed", by_uid=peer_uid, message=str(e)[:2000])
        return {"saved": False, "error": str(e)}
    ledger.record(job_id, name, "checkpointed", by_uid=peer_uid, **info)
    return {"saved": True, "pause_s": info["pause_s"]}
