"""Root's record beside a saved job's checkpoint, for schedulers whose restart script is given only
names (Torque's `$restart_script`, PBS's `$action restart`): who the job is, which image, which work
dir. A dot name in the root-only store, so the store's listing and GC never take it for a job."""

from __future__ import annotations

import json
import os
import pwd
from pathlib import Path

from . import safeio
from .config import Settings
from .errors import CheckpointError, UserError
from .job import Job

RECORD_MAX = 1 << 16


def path(settings: Settings, jid: str, scheduler: str) -> Path:
    Job.check_id(jid)
    return Path(settings.checkpoint_dir) / f".{jid}.{scheduler}.json"


def write(p: Path, record: dict) -> None:
    """A fresh 0600 file (whatever was there, link included, is replaced, never followed)."""
    p.unlink(missing_ok=True)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(record, f)


def restart_job(p: Path, sched_id: str, jid: str, scheduler: str, pw: pwd.struct_passwd, gid: int) -> Job:
    """The Job a restart script restores: its record must name this scheduler job, user and group."""
    raw = safeio.read_capped(p, RECORD_MAX)
    if raw is None:
        raise CheckpointError(f"no vmwrap checkpoint of job {sched_id} in {p.parent}")
    rec = json.loads(raw)
    if rec.get("uid") != pw.pw_uid or rec.get("gid") != gid or rec.get("job") != sched_id:
        raise UserError(f"the checkpoint of job {sched_id} was made for another job or user")
    return Job(job_id=jid, scheduler=scheduler, user=pw.pw_name, uid=pw.pw_uid, gid=gid,
               work_dir=str(rec.get("work_dir") or pw.pw_dir), script="", image=rec.get("image"),
               restart_count=1, groups=[g for g in os.getgrouplist(pw.pw_name, gid) if g != gid])
