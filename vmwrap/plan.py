"""Whether a job may use the gap before an advance reservation, and when it must be saved.

One decision shared by the live planner (vmwrap/planner.py, any scheduler's adapter) and the simulator
(`vmwrap simulate`), so what the simulator predicts is what the cluster does. Scheduler-neutral: it
sees times in seconds and sizes in MiB, never a scheduler.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class SaveModel:
    """How long saving (and restoring) a VM takes, with a safety margin.

    `rate_mb_s` is the measured save throughput (benchmarks/checkpoint.py: 495-917 MB/s on this
    host's disk; the HPDC'08 model uses 50 MB/s); `fixed_s` covers drain, pause and commit.
    The margin is relative plus absolute because the rate varies with the page cache and the
    absolute part covers a scheduler's polling delay.
    """

    rate_mb_s: float
    fixed_s: float = 0.0
    margin: float = 0.0
    margin_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.rate_mb_s > 0:
            raise ValueError(f"save rate must be > 0 MB/s, got {self.rate_mb_s}")
        if self.fixed_s < 0 or self.margin < 0 or self.margin_s < 0:
            raise ValueError("save model times and margins must be >= 0")

    def save_seconds(self, mem_mb: float) -> float:
        """Predicted time to write `mem_mb` of guest memory (no margin)."""
        return self.fixed_s + mem_mb / self.rate_mb_s

    def budget(self, mem_mb: float) -> float:
        """Time to set aside before the reservation for a save of `mem_mb` (with margin)."""
        return self.save_seconds(mem_mb) * (1.0 + self.margin) + self.margin_s


@dataclass(frozen=True)
class GapDecision:
    start: bool
    reason: str
    save_at: float | None = None   # when the save must begin (None: it ends before the gap closes)
    run_s: float = 0.0             # work done before the save


def min_gap(remaining_s: float, mem_mb: float, model: SaveModel, *, setup_s: float = 0.0,
            factor: float = 1.0, min_run_s: float = 0.0, can_save: bool = True) -> float:
    """The shortest gap `gap_decision` accepts: lets a scheduler test many nodes with one number."""
    whole = setup_s + remaining_s
    if not can_save:
        return whole
    need = max(min_run_s, factor * (model.budget(mem_mb) + model.save_seconds(mem_mb)))
    return min(whole, setup_s + need + model.budget(mem_mb))


def gap_decision(now: float, gap_end: float, remaining_s: float, mem_mb: float, model: SaveModel,
                 *, setup_s: float = 0.0, factor: float = 1.0, min_run_s: float = 0.0) -> GapDecision:
    """May a job needing `remaining_s` (after `setup_s` of boot/restore) start at `now` on nodes that
    must be free at `gap_end`?

    Yes if it ends in time; yes with a save if the work done before the save is worth at least
    `factor` x (save + restore) time (Haizea's suspend-threshold-factor) and `min_run_s`; no
    otherwise. The reason is written for an admin's log.
    """
    gap = gap_end - now
    if now + setup_s + remaining_s <= gap_end:
        return GapDecision(True, f"ends {gap_end - now - setup_s - remaining_s:.0f}s before the gap closes",
                           None, remaining_s)
    save = model.budget(mem_mb)
    save_at = gap_end - save
    run = save_at - now - setup_s
    need = max(min_run_s, factor * (save + model.save_seconds(mem_mb)))
    if run < need:
        return GapDecision(False, f"gap of {gap:.0f}s leaves {max(run, 0):.0f}s of work before a "
                                  f"{save:.0f}s save; needs {need:.0f}s")
    return GapDecision(True, f"runs {run:.0f}s, then a save starting {save:.0f}s before the gap closes", save_at, run)


# -- the live planner's pass: scheduler-neutral state machine ---------------------------------------
#
# A job the planner puts into a gap goes through: offered (its time limit lowered so the scheduler's
# own backfilling starts it before the reservation) -> running -> saving (requeued at `save_at`; the
# epilog saves its VM) -> done (its time limit set back to what it has left). The lowered limit is
# also the fallback: if the planner is down, the scheduler itself stops the job early enough that
# the reservation's nodes are free on time.

@dataclass(frozen=True)
class Reservation:
    name: str
    start: float
    end: float
    nodes: frozenset[str]
    users: frozenset[str] = frozenset()   # who may run inside it (their jobs are not blocked by it)


@dataclass(frozen=True)
class QueuedJob:
    """A job as the scheduler shows it. `limit_s` is its time limit now; `saveable`: it runs in a VM
    that can be saved (anything else could not be resumed and is never put into a gap)."""
    job: str
    user: str
    partition: str
    nodes: int
    limit_s: float
    mem_mb: float
    saveable: bool
    state: str                    # pending | running | other
    start: float | None = None    # when it started (running)
    idle: frozenset[str] = frozenset()   # idle nodes it may use (pending)
    eligible: bool = True         # not held, no unmet dependency, begin time passed
    reservation: str = ""         # the reservation it asked to run in, if any


@dataclass(frozen=True)
class Policy:
    model: SaveModel
    enabled: bool = True
    partitions: frozenset[str] = frozenset()   # empty: every partition
    users: frozenset[str] = frozenset()        # empty: every user
    max_nodes: int = 0                         # nodes in gaps at once (0: no cap)
    max_gap_s: float = 0.0                     # longer gaps are left to plain backfilling (0: no cap)
    setup_s: float = 10.0                      # boot or restore before work starts
    stop_s: float = 20.0                       # the scheduler's kill (KillWait) + epilog teardown
    slack_s: float = 10.0                      # an offer stands this long (>= the scheduler's pass)
    factor: float = 1.0
    min_run_s: float = 60.0
    granularity_s: float = 60.0                # the scheduler's time limit unit (Slurm: minutes)


@dataclass(frozen=True)
class Timing:
    """What the planner must know of a scheduler's clock (vmwrap.adapter.Scheduler.plan_timing)."""
    kill_s: float          # from a job's time limit until the scheduler sees its nodes free (Slurm:
                           # KillWait; Grid Engine plans h_rt + duration_offset)
    pass_s: float          # how often the scheduler looks for jobs to start (Slurm: bf_interval)
    limit_unit_s: float    # the unit of its time limits (Slurm: a minute, Grid Engine: a second)
    vacate_s: float = 0.0  # from a requeue until the node's epilog starts (Grid Engine: up to a
                           # load_report_time; Slurm: at once): saves are started that much earlier


@dataclass(frozen=True)
class Action:
    kind: str          # limit (set time limit to `seconds`) | requeue | note (log only)
    job: str
    reason: str
    seconds: float = 0.0


def _clock(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t))


def _limit(seconds: float, unit: float) -> float:
    return math.floor(seconds / unit) * unit


def plan_pass(now: float, reservations: list[Reservation], jobs: list[QueuedJob], policy: Policy,
              state: dict[str, dict]) -> list[Action]:
    """One pass: advance the jobs already in gaps, then maybe offer the queue head a gap.

    `jobs` in the scheduler's priority order; `state` (job -> dict, JSON-able) is updated in place
    and must be kept between passes. Returns what the adapter must do, each with its reason.
    """
    acts: list[Action] = []
    by_id = {j.job: j for j in jobs}
    in_gaps = 0
    for jid, st in list(state.items()):
        j = by_id.get(jid)
        phase = st["phase"]
        if phase in ("offered", "withdrawn"):
            if j is not None and j.state == "running" and (j.start or now) < st["ar_start"]:
                # taken (a withdrawn offer the scheduler took at the last moment too): save it in time
                st.update(phase="running", started=j.start or now)
                st["save_at"] = min(st["save_at"], st["started"] + st["limit_s"] - policy.stop_s / 2)
                acts.append(Action("note", jid, f"started in the gap before {st['reservation']}; "
                                   f"save at {_clock(st['save_at'])}"))
                phase = "running"
            elif j is None or j.state != "pending" or (phase == "withdrawn" and now > st["ar_start"]):
                del state[jid]
                continue
            elif phase == "offered" and now - st["offered"] > policy.slack_s:
                # not taken while a start could still end in time: the limit goes back, but keep
                # watching until the reservation starts in case the scheduler started it meanwhile
                acts.append(Action("limit", jid, f"not started in the gap before {st['reservation']}: "
                                   "time limit set back", st["orig_limit_s"]))
                st["phase"] = "withdrawn"
        if phase == "running":
            if j is None or j.state not in ("running",):
                acts.append(Action("note", jid, "ended before its save"))
                del state[jid]
            elif now >= st["save_at"]:
                st.update(phase="saving", requeued=now)
                acts.append(Action("requeue", jid, f"reservation {st['reservation']} starts at "
                                   f"{_clock(st['ar_start'])}: saving its VM now ({st['ar_start'] - now:.0f}s before)"))
        if phase == "saving" and j is None:
            del state[jid]
            continue
        if phase == "saving" and j.state == "pending":
            ran = st["requeued"] - st["started"]
            left = max(policy.granularity_s, st["orig_limit_s"] - _limit(ran, policy.granularity_s))
            acts.append(Action("limit", jid, f"saved after {ran:.0f}s; time limit back to what it has left",
                               left))
            st.update(phase="done", left_s=left)
        if phase == "saving" and now > st["ar_start"] and not st.get("late_noted") and j.state == "running":
            st["late_noted"] = True
            acts.append(Action("note", jid, f"LATE: still on its nodes {now - st['ar_start']:.0f}s after "
                               f"{st['reservation']} started"))
        if jid in state and state[jid]["phase"] in ("offered", "running", "saving"):
            in_gaps += state[jid].get("nodes", 1)
        if jid in state and state[jid]["phase"] == "done" and (j is None or j.state != "pending"):
            del state[jid]
    if not policy.enabled or any(s["phase"] == "offered" for s in state.values()):
        return acts
    for j in jobs:
        if j.state != "pending" or j.job in state:
            continue
        why = _not_a_candidate(j, policy, in_gaps)
        if why:
            acts.append(Action("note", j.job, why))
            continue
        d = _gap_for(now, j, reservations, policy)
        if isinstance(d, str):
            acts.append(Action("note", j.job, d))
            continue
        r, limit, save_at, reason = d
        state[j.job] = {"phase": "offered", "offered": now, "reservation": r.name, "ar_start": r.start,
                        "orig_limit_s": j.limit_s, "limit_s": limit, "save_at": save_at, "nodes": j.nodes}
        acts.append(Action("limit", j.job, f"gap before {r.name}: {reason}", limit))
        break   # one offer at a time: the next pass sees what the scheduler made of it
    return acts


def _not_a_candidate(j: QueuedJob, p: Policy, in_gaps: int) -> str:
    if not j.saveable:
        return "not in a saveable VM: never put into a gap"
    if j.nodes > 1:
        return "its VMs span several nodes and are not saved: never put into a gap"
    if p.partitions and j.partition not in p.partitions:
        return f"partition {j.partition} is not planned"
    if p.users and j.user not in p.users:
        return f"user {j.user} is not planned"
    if not j.eligible or j.reservation:
        return "not eligible to start now"
    if p.max_nodes and in_gaps + j.nodes > p.max_nodes:
        return f"gap use is at its cap of {p.max_nodes} nodes"
    if len(j.idle) < j.nodes:
        return f"needs {j.nodes} nodes, {len(j.idle)} idle"
    return ""


def _gap_for(now: float, j: QueuedJob, reservations: list[Reservation], p: Policy):
    """The reservation that keeps `j` waiting, and the limit and save time that let it use the gap."""
    blocking = sorted((r for r in reservations if r.start > now and j.user not in r.users and r.nodes & j.idle),
                      key=lambda r: r.start)
    # the gap closes at the first reservation start that leaves fewer than `nodes` idle nodes
    usable = set(j.idle)
    for r in blocking:
        usable -= r.nodes
        if len(usable) < j.nodes:
            break
    else:
        return "enough idle nodes outside every reservation: the scheduler starts it as it is"
    if now + j.limit_s + p.stop_s <= r.start:
        return f"ends before {r.name} as it is: the scheduler backfills it"
    if p.max_gap_s and r.start - now > p.max_gap_s:
        return (f"gap before {r.name} is {r.start - now:.0f}s, over the {p.max_gap_s:.0f}s cap: "
                "left to the scheduler's own backfilling")
    # when it must be off its nodes: the scheduler's own kill at the lowered limit must end in time
    gap_end = r.start - p.stop_s
    d = gap_decision(now + p.slack_s, gap_end, j.limit_s, j.mem_mb, p.model, setup_s=p.setup_s,
                     factor=p.factor, min_run_s=p.min_run_s)
    if not d.start:
        return f"gap before {r.name}: {d.reason}"
    limit = _limit(gap_end - now - p.slack_s, p.granularity_s)
    save_at = min(r.start - p.model.budget(j.mem_mb), now + limit - p.stop_s / 2)
    if limit < p.granularity_s or save_at - now - p.slack_s - p.setup_s < p.min_run_s:
        return f"gap before {r.name}: too short once rounded to the scheduler's time limit unit"
    return r, limit, save_at, d.reason
