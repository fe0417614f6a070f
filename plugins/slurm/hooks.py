"""Slurm glue: translate slurmd's prolog/epilog environment and the batch step into core calls."""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import subprocess
import sys
from pathlib import Path

from vmwrap import checkpoint, launcher
from vmwrap.config import Settings
from vmwrap.errors import CacheFullError, CheckpointError, NodeError, UserError, VmwrapError
from vmwrap.job import Job

MARKER = "#VMWRAP-ORIGINAL-SCRIPT"
REQUEST = re.compile(r"^vmwrap:image=([^,]*),memory=(\d*),cpus=(\d*),lost=(\w*)")


def parse_request(comment: str) -> dict | None:
    m = REQUEST.match(comment or "")
    if not m:
        return None
    return {"image": m.group(1), "memory_mib": int(m.group(2)) if m.group(2) else None,
            "cpus": int(m.group(3)) if m.group(3) else None, "lost": m.group(4) or None}


def allocated_cpus(value: str) -> int | None:
    """SLURM_JOB_CPUS_PER_NODE looks like '2', '2(x3)' or '4,2(x2)': this node's count is the first."""
    m = re.match(r"^(\d+)", value or "")
    return int(m.group(1)) if m else None


def job_from_env(env: dict[str, str]) -> tuple[Job, dict] | None:
    req = parse_request(env.get("SLURM_JOB_COMMENT", ""))
    if req is None:
        return None
    user = env["SLURM_JOB_USER"]
    uid, gid = int(env["SLURM_JOB_UID"]), int(env["SLURM_JOB_GID"])
    alloc = allocated_cpus(env.get("SLURM_JOB_CPUS_PER_NODE", ""))
    cpus = req["cpus"] or alloc
    if req["cpus"] and alloc and req["cpus"] > alloc:
        raise UserError(f"--cpus={req['cpus']} is more than the {alloc} CPUs Slurm allocated on this node")
    work_dir = env.get("SLURM_JOB_WORK_DIR") or pwd.getpwuid(uid).pw_dir
    job = Job(job_id=env["SLURM_JOB_ID"], scheduler="slurm", user=user, uid=uid, gid=gid,
              work_dir=work_dir, script="", cpus=cpus, memory_mib=req["memory_mib"], image=req["image"],
              restart_count=int(env.get("SLURM_JOB_RESTART_COUNT") or 0), on_lost_checkpoint=req["lost"],
              groups=[g for g in os.getgrouplist(user, gid) if g != gid])
    return job, req


def prolog(settings: Settings, env: dict[str, str]) -> int:
    """Boot the job's VM. A user or image mistake is handed to the job (exit 0: the node stays up);
    only a node fault fails the prolog, which drains the node with our reason."""
    try:
        parsed = job_from_env(env)
    except UserError as e:
        return _user_failure(settings, env["SLURM_JOB_ID"], e)
    if parsed is None:
        return 0
    job, _ = parsed
    launcher.teardown(job.job_id, settings)  # leftovers of an earlier run of the same job id
    lx = launcher.Launcher(job, settings)
    saving = settings.workdir_share == "serial"
    store = checkpoint.Store(settings.checkpoint_dir)
    try:
        lx.prepare()
        if saving and job.restart_count > 0 and store.ran(job.job_id):
            try:
                lx.restore(store)  # preempted or requeued: continue where the VM was saved
                return 0
            except CheckpointError as e:
                if (lx.on_lost_checkpoint or "fail") == "fail":
                    raise CheckpointError(f"{e}; not starting the job again from the beginning "
                                          "(add '#VMWRAP --on-lost-checkpoint=restart' to allow that)") from None
                lx.notice(f"{e}; starting the job again from the beginning (--on-lost-checkpoint=restart)")
                store.delete(job.job_id)
        lx.boot()
        if saving:
            store.mark_ran(job.job_id)
        return 0
    except CacheFullError as e:
        lx.fail(e)  # the node is healthy, only busy: the job fails with the reason, the node stays up
        launcher.teardown(job.job_id, settings, keep_error=True)
        return 0
    except NodeError as e:
        # Slurm requeues the job and drains the node: leave nothing that would make the epilog
        # believe a VM may still be running here (its drain reason would replace ours).
        launcher.teardown(job.job_id, settings)
        lx.ledger.record(job.job_id, job.domain_name, "failed", kind=e.kind, message=str(e))
        _drain(env, f"vmwrap: {e}")
        print(f"vmwrap prolog: node fault: {e}", file=sys.stderr)
        return 1
    except VmwrapError as e:
        lx.fail(e)
        return 0


def _user_failure(settings: Settings, job_id: str, err: VmwrapError) -> int:
    launcher.record_error(settings.jobs_dir / job_id, err)
    return 0


def _drain(env: dict[str, str], reason: str) -> None:
    node = env.get("SLURMD_NODENAME")
    scontrol = shutil.which("scontrol") or "/usr/bin/scontrol"
    if node and os.path.exists(scontrol):
        subprocess.run([scontrol, "update", f"nodename={node}", "state=drain", f"reason={reason[:200]}"],
                       capture_output=True, timeout=30)


def epilog(settings: Settings, env: dict[str, str]) -> int:
    """Destroy the VM and every per-job file. Idempotent. Fails (drains) only if libvirt is unreachable
    while a VM of this job may still run."""
    job_id = env["SLURM_JOB_ID"]
    from vmwrap import domain

    try:
        conn = domain.connect(settings.libvirt_uri)
    except NodeError as e:
        if (settings.jobs_dir / job_id).exists():
            _drain(env, f"vmwrap: cannot destroy VM of job {job_id}: {e}")
            print(f"vmwrap epilog: {e}", file=sys.stderr)
            return 1
        return 0
    from vmwrap.ledger import Ledger

    store = checkpoint.Store(settings.checkpoint_dir)
    try:
        run_dir = settings.jobs_dir / job_id
        restarts = int(env.get("SLURM_JOB_RESTART_COUNT") or 0)
        try:
            started_as = json.loads((run_dir / "job.json").read_text())["restarts"]
        except (OSError, ValueError, KeyError):
            started_as = None
        requeued = started_as is not None and restarts > started_as
        ledger = Ledger(settings.ledger_path)
        if requeued and settings.workdir_share == "serial" and not domain.is_gone(conn, f"vmwrap-{job_id}"):
            # Preempted (PreemptMode=REQUEUE) or `scontrol requeue`: save the VM, the restart restores it.
            deadline = store.deadline(job_id)   # set by the gap planner: a reservation needs the node
            try:
                info = checkpoint.save(job_id, run_dir, store, conn, restarts, deadline=deadline)
                ledger.record(job_id, f"vmwrap-{job_id}", "saved", scheduler="slurm", **info)
                store.record_rate(info["memory_bytes"], info["total_s"])
            except Exception as e:  # the restart then follows the job's --on-lost-checkpoint
                reason = f"saving its VM on {env.get('SLURMD_NODENAME', os.uname().nodename)} failed: {e}"
                store.mark_lost(job_id, reason)
                ledger.record(job_id, f"vmwrap-{job_id}", "save_failed", message=str(e))
                print(f"vmwrap epilog: job {job_id}: {reason}", file=sys.stderr)
            finally:
                store.clear_deadline(job_id)
        elif run_dir.exists():
            timeline = launcher.guest_timeline(run_dir)
            ledger.record(job_id, f"vmwrap-{job_id}", "exited", scheduler="slurm",
                          slurm_exit=env.get("SLURM_JOB_EXIT_CODE2", ""), **timeline)
        launcher.teardown(job_id, settings, conn=conn)
        if not requeued:
            store.delete(job_id)  # the job ended for good: its checkpoint can never be used again
    finally:
        conn.close()
    return 0


def attach(settings: Settings, script_path: str, args: list[str]) -> int:
    """The batch step: runs as the job's user; the VM is already booting."""
    text = Path(script_path).read_text(encoding="utf-8", errors="surrogateescape")
    _, sep, original = text.partition(MARKER + "\n")
    if not sep:
        print("vmwrap: error: this batch script was not wrapped by vmwrap's job_submit.lua", file=sys.stderr)
        return launcher.EXIT_NODE
    job_id = os.environ["SLURM_JOB_ID"]
    env = {k: v for k, v in os.environ.items() if k != "VMWRAP_CONFIG"}
    started_as = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    requeued = (lambda: restarts(job_id) > started_as) if settings.workdir_share == "serial" else None
    return launcher.attach(settings.jobs_dir / job_id, job_id, original, env, args, grace=settings.grace_seconds,
                           settings=settings, requeued=requeued)


def restarts(job_id: str) -> int:
    """Slurm's restart count of the job now (it grows the moment the job is requeued or preempted)."""
    scontrol = shutil.which("scontrol") or "/usr/bin/scontrol"
    try:
        r = subprocess.run([scontrol, "show", "job", "-o", job_id], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return -1
    m = re.search(r"\bRestarts=(\d+)", r.stdout)
    return int(m.group(1)) if m else -1


FINAL = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def checkpoint_gc(settings: Settings) -> list[str]:
    """Delete checkpoints of jobs that ended while they were not running (no epilog ran for them)."""
    squeue = shutil.which("squeue") or "/usr/bin/squeue"
    r = subprocess.run([squeue, "-h", "-a", "-t", "all", "-o", "%i %T"], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        return []  # slurmctld unreachable: keep everything
    states = dict(line.split(None, 1) for line in r.stdout.splitlines() if " " in line)
    return checkpoint.Store(settings.checkpoint_dir).gc(lambda j: states.get(j, "").strip() not in FINAL | {""})
