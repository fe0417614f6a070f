"""Drain a node for maintenance without killing or losing a job (`vmwrap drain`, issue 20).

Order matters: the node is drained in the scheduler first, so the jobs requeued next start again on
other nodes; then every vmwrap VM job on it is requeued (the adapter's `vacate`, the same path as
preemption: its epilog saves the VM into the shared checkpoint store, the next run restores it).
Whether a job was saved is read from that store, not from the scheduler: a checkpoint newer than the
requeue means saved, a `.lost` marker newer than it means the epilog's save failed (with its reason).

Jobs without a VM are left running: requeueing them would throw their work away; the node becomes
fully drained once they end, which is what an admin's own drain does. VM jobs are left running too
where VMs cannot be saved (`workdir_share` other than "serial"), for the same reason.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from . import rundir
from .adapter import Drainable
from .checkpoint import Store
from .config import Settings
from .errors import VmwrapError
from .ledger import Ledger
from .progress import Report

_NODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
REASON_MAX = 200
# A job that left the node gets this long for its checkpoint (or lost marker) to appear: the store
# is shared storage, and a scheduler may list a job as gone before its epilog ended.
SETTLE_S = 30.0


@dataclass
class Result:
    job: str
    status: str          # "saved", "failed", "ended", "left running", "would requeue"
    detail: str = ""


def check_node(node: str) -> str:
    """Node names go to scheduler commands as arguments and into the ledger: plain host names only."""
    if not _NODE.fullmatch(node or ""):
        raise VmwrapError(f"invalid node name {node[:80]!r}: use letters, digits, '.', '_', '-' (max 64, "
                          "starting with a letter or digit)")
    return node


def check_reason(reason: str) -> str:
    """The reason is shown by the scheduler (`sinfo -R`): one printable line, bounded."""
    if not reason or not reason.strip():
        raise VmwrapError("the drain reason is empty")
    if len(reason) > REASON_MAX:
        raise VmwrapError(f"the drain reason is {len(reason)} characters long, more than {REASON_MAX}")
    if not reason.isprintable():
        raise VmwrapError("the drain reason must be one line of printable characters")
    return reason.strip()


def _newer(path, since: float) -> bool:
    try:
        return os.lstat(path).st_mtime >= since
    except OSError:
        return False


def _outcome(store: Store, job: str, since: float) -> Result | None:
    """Saved or failed since `since`, as the shared store says; None while neither."""
    if _newer(store.dir(job) / "manifest.json", since):
        return Result(job, "saved", "checkpoint in the store; it runs again on another node")
    if _newer(store.root / f"{store.dir(job).name}.lost", since):
        return Result(job, "failed", store.lost_reason(job) or "its save failed")
    return None


_PINNED = ("it asked for node {node} by name (--nodelist), so it waits in the queue until {node} is "
           "resumed")


def _pinned(sched, node: str) -> set[str]:
    """Jobs that asked for `node` by name, where the adapter can tell (Drainable's optional part)."""
    ask = getattr(sched, "pinned_jobs", None)
    if ask is None:
        return set()
    try:
        return set(ask(node))
    except (RuntimeError, VmwrapError, OSError):
        return set()                 # only a warning is lost: draining goes on


def drain(sched, settings: Settings, node: str, reason: str, timeout: float = 600.0, dry_run: bool = False,
          say: Callable[[str], None] = print, poll: float = 1.0, report: Report | None = None) -> list[Result]:
    """Drain `node` in `sched`, then requeue (save) each of its VM jobs and wait up to `timeout`
    seconds until each is saved or failed. One ledger event `drained` per VM job; `report` hears
    how many saves are awaited (total) and each one that ended (an admin's progress bar)."""
    report = report or (lambda done=0, **_kw: None)
    check_node(node)
    reason = check_reason(reason)
    if not isinstance(sched, Drainable):
        raise VmwrapError(f"vmwrap drain is not supported by {sched.name}")
    if not timeout > 0:
        raise VmwrapError(f"--timeout must be more than 0 seconds (got {timeout})")
    saving = settings.workdir_share == "serial"
    jobs = sched.node_jobs(node)     # an unknown node fails here, before anything is changed
    pinned = _pinned(sched, node)
    if dry_run:
        out = []
        for job, vm in sorted(jobs.items()):
            status = "would requeue" if vm and saving else "left running"
            detail = ("" if saving else f"VMs cannot be saved with workdir_share = {settings.workdir_share!r}") \
                if vm else "no VM: it runs to its end here"
            if vm and saving and job in pinned:
                detail = _PINNED.format(node=node)
            out.append(Result(job, status, detail))
            say(f"job {job}: {status}{f' ({out[-1].detail})' if out[-1].detail else ''}")
        say(f"node {node}: would be drained ({reason})")
        return out
    sched.drain_node(node, reason)
    say(f"node {node}: drained ({reason}); no new job starts there")
    jobs = sched.node_jobs(node)     # again: a job may have started between the first listing and the drain
    results: dict[str, Result] = {}
    for job, vm in sorted(jobs.items()):
        if not vm:
            say(f"job {job}: left running (no VM: it runs to its end here)")
        elif not saving:
            results[job] = Result(job, "left running", f"VMs cannot be saved with workdir_share = "
                                                       f"{settings.workdir_share!r}: it runs to its end here")
    store = Store(settings.checkpoint_dir, settings.checkpoint_key_file)
    asked: dict[str, float] = {}
    for job in sorted(j for j, vm in jobs.items() if vm and j not in results):
        since = time.time() - 1.0   # mtimes on shared storage have coarse clocks
        try:
            sched.vacate(job)
            asked[job] = since
        except (RuntimeError, VmwrapError, OSError) as e:
            results[job] = Result(job, "failed", f"the scheduler refused to requeue it: {str(e)[:300]}")
    end = time.monotonic() + timeout
    gone_at: dict[str, float] = {}
    report(total=len(asked))
    while asked:
        for job in list(asked):
            r = _outcome(store, job, asked[job])
            if r is not None and r.status == "saved" and job in pinned:
                r = Result(job, "saved", "checkpoint in the store; " + _PINNED.format(node=node))
            if r is not None:
                results[job] = r
                del asked[job]
                report(1)
        if not asked:
            break
        now = time.monotonic()
        try:
            still_here = sched.node_jobs(node)
        except (RuntimeError, VmwrapError, OSError):
            still_here = None            # the scheduler did not answer: ask again next round
        for job in list(asked):
            if still_here is None or job in still_here:
                gone_at.pop(job, None)
                continue
            if now - gone_at.setdefault(job, now) >= min(SETTLE_S, timeout):
                del asked[job]
                report(1)
                if not sched.still_queued()(job):
                    results[job] = Result(job, "ended", "it ended before it could be saved")
                else:
                    results[job] = Result(job, "failed", "it left the node without a checkpoint; its "
                                                         "--on-lost-checkpoint decides what happens next")
        if now >= end:
            for job in asked:
                results[job] = Result(job, "failed", f"not saved within {timeout:g} s; it stays requeued and "
                                                     "its epilog may still save it")
            break
        time.sleep(poll)
    ledger = Ledger(settings.ledger_path)
    try:
        for job, r in sorted(results.items()):
            ledger.record(job, rundir.domain_name(job), "drained", node=node, status=r.status, detail=r.detail,
                          reason=reason)
            say(f"job {job}: {r.status}{f' ({r.detail})' if r.detail else ''}")
    finally:
        ledger.close()
    return [results[j] for j in sorted(results)]
