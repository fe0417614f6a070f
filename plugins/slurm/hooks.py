"""Slurm glue: translate slurmd's prolog/epilog environment and the batch step into core calls."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import sys
from pathlib import Path

from vmwrap import launcher
from vmwrap.config import Settings
from vmwrap.errors import CacheFullError, NodeError, UserError, VmwrapError
from vmwrap.job import Job

MARKER = "#VMWRAP-ORIGINAL-SCRIPT"
REQUEST = re.compile(r"^vmwrap:image=([^,]*),memory=(\d*),cpus=(\d*),lost=(\w*)")


def parse_request(comment: str) -> dict | None:
    m = REQUEST.match(comment or "")
    if not m:
        return None
    return {"image": m.group(1), "memory_mib": int(m.group(2)) if m.group(2) else None,
            "cpus": int(m.group(3)) if m.group(3) else None}


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
              restart_count=int(env.get("SLURM_JOB_RESTART_COUNT") or 0),
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
    try:
        lx.prepare()
        lx.boot()
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
    run_dir = settings.jobs_dir / job_id
    run_dir.mkdir(parents=True, exist_ok=True)
    run_dir.chmod(0o711)
    (run_dir / "error").write_text(f"{err.kind}\n{err}\n")
    (run_dir / "error").chmod(0o644)
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
    try:
        run_dir = settings.jobs_dir / job_id
        if run_dir.exists():
            from vmwrap.ledger import Ledger

            timeline = launcher.guest_timeline(run_dir)
            Ledger(settings.ledger_path).record(job_id, f"vmwrap-{job_id}", "exited", scheduler="slurm",
                                                slurm_exit=env.get("SLURM_JOB_EXIT_CODE2", ""), **timeline)
        launcher.teardown(job_id, settings, conn=conn)
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
    return launcher.attach(settings.jobs_dir / job_id, job_id, original, env, args, grace=settings.grace_seconds,
                           settings=settings)
