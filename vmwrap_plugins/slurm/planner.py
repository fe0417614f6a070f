"""Slurm's facts and actions for the core gap planner (vmwrap.planner; `vmwrap plan`).

Mechanism (no patch to Slurm): a pending vmwrap job that only waits because a reservation starts
before its time limit would end gets its `TimeLimit` lowered so that Slurm's own scheduler starts it
in the gap; at `save_at` the planner `scontrol requeue`s it, which makes the epilog save its VM
(vmwrap's preemption path, docs/checkpoint.md); once pending again its `TimeLimit` is set to what it
has left, and after the reservation Slurm restarts it and the prolog restores the VM, on any node.
If the planner is not there to requeue it, the lowered limit makes Slurm stop the job early enough
that the reservation's nodes are still free on time (its work is then lost, as for any time limit).

Decisions and the loop are the core's (vmwrap.planner over vmwrap.plan.plan_pass, the same code the
simulator evaluates); this module only reads Slurm's state (squeue --json, scontrol -o, sinfo) and
applies the actions with scontrol, for the Slurm adapter's planner methods.
"""

from __future__ import annotations

import json
import logging
import math
import re

from vmwrap import planner as core
from vmwrap import sizing, wire
from vmwrap.catalog import Catalog
from vmwrap.config import Settings
from vmwrap.errors import UserError
from vmwrap.plan import QueuedJob, Reservation, Timing

from .commands import epoch as _epoch
from .commands import run as _run

log = logging.getLogger("vmwrap.plan")
UNLIMITED = 0xFFFFFFFE   # Slurm's INFINITE (and NO_VAL above it) as squeue --json prints time limits


def _hostnames(expr: str, cache: dict) -> frozenset[str]:
    if not expr or expr == "(null)":
        return frozenset()
    if expr not in cache:
        cache[expr] = frozenset(_run("scontrol", "show", "hostnames", expr).split())
    return cache[expr]


def _fields(line: str) -> dict[str, str]:
    out = {}
    for tok in line.split():
        k, sep, v = tok.partition("=")
        if sep:
            out.setdefault(k, v)
    return out


def reservations(hosts: dict) -> list[Reservation]:
    """Reservations not yet over (scontrol has no --json for them in 22.05)."""
    out = []
    for line in _run("scontrol", "show", "reservation", "-o").splitlines():
        f = _fields(line)
        start, end = _epoch(f.get("StartTime", "")), _epoch(f.get("EndTime", ""))
        if "ReservationName" not in f or start is None or end is None:
            continue
        users = f.get("Users", "(null)")
        out.append(Reservation(f["ReservationName"], start, end, _hostnames(f.get("Nodes", ""), hosts),
                               frozenset() if users == "(null)" else frozenset(users.split(","))))
    return out


def idle_nodes() -> dict[str, set[str]]:
    """Partition -> its idle nodes."""
    out: dict[str, set[str]] = {}
    for line in _run("sinfo", "-h", "-N", "-t", "idle", "-o", "%N %P").splitlines():
        node, _, part = line.partition(" ")
        out.setdefault(part.strip().rstrip("*"), set()).add(node.strip())
    return out


def _limit_s(minutes) -> float:
    if not isinstance(minutes, int) or minutes >= UNLIMITED:
        return math.inf
    return minutes * 60.0


def _num(v, default: float = 0.0) -> float:
    """A number squeue --json gives; anything else (a string, a dict, a bool) is `default`."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else default


_warned: dict[str, str] = {}


def _warn_once(job: str, what: str) -> None:
    """Log a job skipped or taken as plain once per reason (a pass runs every few seconds)."""
    if _warned.get(job) != what:
        _warned[job] = what
        log.warning("job %s: %s", job, what)


def request(job: str, comment) -> wire.Accepted | None:
    """The job's VM request, or None (not a vmwrap job). Users write comments: a malformed request
    makes the job a plain one for the planner (its prolog fails it), never fails the pass."""
    try:
        return wire.decode(comment if isinstance(comment, str) else "")
    except UserError as e:
        _warn_once(job, f"taken as a job without a VM: {e}")
        return None


def jobs(settings: Settings, idle: dict[str, set[str]], now: float) -> list[QueuedJob]:
    """Pending and running jobs in Slurm's priority order. A job whose record does not read as
    expected is left out with a logged reason; no job's data can fail the pass."""
    try:
        data = json.loads(_run("squeue", "--json"))
    except ValueError as e:
        raise RuntimeError(f"squeue --json: not JSON: {e}") from None
    try:   # a VM's memory, as the launcher picks it: the request, else the image's, else the site's
        images = Catalog.load(settings.catalog).images
    except Exception:
        images = {}
    out = []
    for j in data.get("jobs", []) if isinstance(data, dict) else []:
        jid = j.get("job_id") if isinstance(j, dict) else None
        if not isinstance(jid, int) or isinstance(jid, bool) or not 0 < jid < 2**32:
            _warn_once(str(jid)[:20], "left out of the plan: no job id squeue --json should give")
            continue
        try:
            out.append(_queued(settings, images, idle, now, j, jid))
        except (TypeError, ValueError, AttributeError, KeyError) as e:
            _warn_once(str(jid), f"left out of the plan: its squeue record does not read as expected ({e})")
    return [q for *_, q in sorted(out, key=lambda t: (t[0], t[1]))]


def _queued(settings: Settings, images: dict, idle: dict[str, set[str]], now: float, j: dict, jid: int):
    state = {"PENDING": "pending", "RUNNING": "running"}.get(j.get("job_state"), "other")
    req = request(str(jid), j.get("comment"))
    mem, _ = sizing.memory_mib(req and req.memory_mib, images.get(req.image) if req else None, settings)
    reason = j.get("state_reason") or ""
    priority = _num(j.get("priority"))
    eligible = (state == "pending" and not j.get("dependency")
                and reason not in ("BeginTime", "JobHeldUser", "JobHeldAdmin", "Dependency",
                                   "DependencyNeverSatisfied", "PartitionDown", "PartitionInactive")
                and _num(j.get("eligible_time")) <= now and priority > 0)
    part = j.get("partition") or ""
    if not isinstance(part, str):
        raise TypeError(f"partition {part!r}")
    return (-priority, jid, QueuedJob(
        job=str(jid), user=str(j.get("user_name") or ""), partition=part,
        nodes=max(1, int(_num(j.get("node_count"), 1))), limit_s=_limit_s(j.get("time_limit")), mem_mb=float(mem),
        saveable=req is not None and settings.workdir_share == "serial" and bool(j.get("batch_flag", True)),
        state=state, start=_num(j.get("start_time")) if state == "running" else None,
        idle=frozenset(idle.get(part, ())) if state == "pending" else frozenset(),
        eligible=eligible, reservation=str(j.get("resv_name") or "")))


def slurm_config() -> dict[str, str]:
    out = {}
    for line in _run("scontrol", "show", "config").splitlines():
        k, sep, v = line.partition("=")
        if sep:
            out[k.strip()] = v.strip()
    return out


def timing(conf: dict[str, str] | None = None) -> Timing:
    """KillWait (Slurm's kill at a time limit), bf_interval (its backfill pass), whole minutes."""
    conf = conf if conf is not None else slurm_config()
    m = re.match(r"(\d{1,6})\b", conf.get("KillWait", "30"))
    kill_wait = float(m.group(1)) if m else 30.0
    m = re.search(r"\bbf_interval=(\d{1,6})\b", conf.get("SchedulerParameters", ""))
    bf = float(m.group(1)) if m else 30.0
    return Timing(kill_s=kill_wait, pass_s=bf, limit_unit_s=60.0)


def _slurm_limit(seconds: float) -> str:
    return "UNLIMITED" if math.isinf(seconds) else str(max(1, int(seconds // 60)))


_hosts: dict = {}


def queue(settings: Settings, now: float) -> list[QueuedJob]:
    return jobs(settings, idle_nodes(), now)


def set_time_limit(job: str, seconds: float) -> None:
    _run("scontrol", "update", f"jobid={job}", f"TimeLimit={_slurm_limit(seconds)}")


def requeue(job: str) -> None:
    _run("scontrol", "requeue", job)


def current_reservations() -> list[Reservation]:
    return reservations(_hosts)


def Planner(settings: Settings, dry_run: bool = False) -> core.Planner:  # noqa: N802 (was a class here)
    """The core planner driving Slurm (one per cluster, next to slurmctld)."""
    from .hooks import SLURM

    return core.Planner(SLURM, settings, dry_run=dry_run)
