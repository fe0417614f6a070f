"""HTCondor glue: the adapter (vmwrap.adapter.Scheduler) and the job's payload side.

HTCondor runs nothing as root per job on the execute node: USER_JOB_WRAPPER and the starter's job
hooks run as the job's user, possibly in a chroot. So the root part of a job's life happens in the
node's bridge (bridge.py), which a wrapper asks over a Unix socket; this module translates HTCondor's
facts (the schedd's job ad) into the core's Job and runs the payload side as the job's user.
"""

from __future__ import annotations

import json
import os
import pwd
import sys
from pathlib import Path

from vmwrap import directives, payload, rundir
from vmwrap.config import Settings
from vmwrap.errors import UserError
from vmwrap.job import Job

from .facts import split_id

NAME = "condor"
PAYLOAD_MAX = 1 << 20   # bytes of argv + environment a wrapper hands over
HOLD_PREFIX = "vmwrap: "


def _whole(v, what: str, top: int) -> int | None:
    """A request number from the job ad (int or float), None when unset; UserError otherwise."""
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v < 1 or v > top:
        raise UserError(f"the job's {what} is not a number from 1 to {top}: {str(v)[:40]!r}")
    return int(v)


def _given(ad: dict, what: str):
    """What the slot gave the job (the shadow's CpusProvisioned/MemoryProvisioned), else what it
    asked for: request_memory's default is derived from the executable's size (1 MiB for a script)."""
    v = ad.get(f"{what}Provisioned")
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else ad.get(f"Request{what}")


def job_from_ad(ad: dict, uid: int, work_dir: str) -> Job | None:
    """The core's Job from the schedd's ad of a running job. None: it asked for no VM."""
    image = ad.get("VmwrapImage")
    if image is None:
        return None
    if not isinstance(image, str):
        raise UserError(f"VmwrapImage must be a string (+VmwrapImage = \"NAME\"), not {str(image)[:40]}")
    directives.check_image_name(image)
    cluster, proc = ad.get("ClusterId"), ad.get("ProcId")
    pw = pwd.getpwuid(uid)
    starts = ad.get("NumJobStarts")
    restarts = max(0, starts - 1) if isinstance(starts, int) and not isinstance(starts, bool) else 0
    return Job(job_id=f"{cluster}.{proc}", scheduler=NAME, user=pw.pw_name, uid=uid, gid=pw.pw_gid,
               work_dir=work_dir, script="", cpus=_whole(_given(ad, "Cpus"), "request_cpus", 4096),
               memory_mib=_whole(_given(ad, "Memory"), "request_memory (MiB)", 1 << 24),
               image=image, restart_count=restarts,
               groups=[g for g in os.getgrouplist(pw.pw_name, pw.pw_gid) if g != pw.pw_gid])


class HTCondor:
    """vmwrap.adapter.Scheduler for HTCondor. Node hooks get their facts from the bridge, which
    verified them with the schedd (`env` here is the bridge's {"VMWRAP_CONDOR_JOB": id} only)."""

    name = NAME
    root_env: tuple[str, ...] = ()

    def __init__(self, job: Job | None = None, error: Exception | None = None):
        self._job, self._error = job, error

    def job_id(self, env) -> str:
        return env["VMWRAP_CONDOR_JOB"]

    def job(self, env) -> Job | None:
        if self._error is not None:
            raise self._error
        return self._job

    def requeue_state(self, settings: Settings, env) -> tuple[bool, int]:
        from vmwrap import lifecycle

        return False, lifecycle.started_as(settings, self.job_id(env)) or 0

    def take_out(self, env, reason: str) -> None:
        print(f"vmwrap condor: {reason}", file=sys.stderr, flush=True)

    def still_queued(self):
        return lambda j: True

    def planned_starts(self) -> list[dict] | None:
        return None

    def publish_cached(self, node: str, images: list[str]) -> None:
        return None

    def reservations(self):
        return None

    def queue(self, settings: Settings, now: float):
        return []

    def plan_timing(self):
        raise NotImplementedError("HTCondor has no gap planner yet")

    def set_time_limit(self, job: str, seconds: float) -> None:
        raise RuntimeError("HTCondor has no gap planner yet")

    def vacate(self, job: str) -> None:
        raise RuntimeError("vacate through vmwrap is not implemented for HTCondor yet")

    def render_config(self, settings: Settings, **options) -> str:
        from .render import render_condor

        return render_condor(settings, **{k: v for k, v in options.items() if k in ("socket", "wrapper")})


def payload_argv(argv: list[str]) -> tuple[str, list[str]]:
    """A script executable runs as itself in the guest; a binary one runs its command line."""
    head = b""
    try:
        with open(argv[0], "rb") as f:
            head = f.read(1 << 20)
    except OSError:
        pass
    if not head or head.startswith(b"\x7fELF") or b"\0" in head[:4096]:
        return '#!/bin/sh\nexec "$@"\n', list(argv)
    return head.decode("utf-8", "surrogateescape"), list(argv[1:])


def attach(settings: Settings, job_id: str, payload_fd: int) -> int:
    """The job's payload, as the job's user (the bridge started this with the wrapper's stdin,
    stdout and stderr): hand argv and environment to the waiting VM, stream its output back."""
    split_id(job_id)
    with os.fdopen(payload_fd, "rb") as f:
        raw = f.read(PAYLOAD_MAX + 1)
    if len(raw) > PAYLOAD_MAX:
        print("vmwrap: the job's arguments and environment are too large", file=sys.stderr)
        return payload.EXIT_USER
    req = json.loads(raw)
    argv, env = req["argv"], req["env"]
    script, args = payload_argv(argv)
    return payload.attach(rundir.path(settings, job_id), job_id, script, env, args,
                          grace=settings.grace_seconds, settings=settings)


def hold_reason(text: str) -> str:
    """HoldReason for a vmwrap failure: one line, `vmwrap: ` first."""
    line = " ".join(str(text).split())[:900]
    return line if line.startswith(HOLD_PREFIX) else HOLD_PREFIX + line


def wrapper_path() -> Path:
    from vmwrap.resources import HOOKS

    return HOOKS / "condor-wrapper"
