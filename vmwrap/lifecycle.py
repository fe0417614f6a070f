"""A VM job's life on a node, once for every scheduler.

A scheduler's prolog asks `start`, its epilog `end`; each answers with an Outcome the adapter maps
onto its own conventions (Slurm: prolog exit 0/1 and `scontrol update state=drain`; Grid Engine:
exit 0/1 and the queue's error state; ...). What is decided here and nowhere else: tear down a
leftover VM of the same job id, restore or boot, the job's --on-lost-checkpoint, save when the
scheduler requeues the job (with the gap planner's deadline), delete the checkpoint when the job
ended for good, and which error fails the job and which one is the node's.

Users write much of what a prolog reads (comments, scripts, sizes): any error but a node fault, even
an exception nobody foresaw, fails only the job: a node is never drained for what a user did."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum

from . import checkpoint, launcher, payload, rundir
from .config import Settings
from .errors import CacheFullError, CheckpointError, NodeError, VmwrapError
from .job import Job
from .ledger import Ledger


class Verdict(Enum):
    RUN = "run"              # the job goes on (its VM runs, or it is no VM job, or the epilog is done)
    JOB_FAILED = "job"       # the job fails with `reason` (its payload prints it); the node is fine
    NODE_FAULT = "node"      # this node cannot run VMs now: the adapter takes it out with `reason`


@dataclass
class Outcome:
    verdict: Verdict
    reason: str = ""
    vm: bool = False                       # the job has (had) a VM on this node
    facts: dict = field(default_factory=dict)
    image: str = ""                        # the image the job's VM runs (booted or restored), and
    digest: str = ""                       # its content digest: what the scheduler's accounting records

    @property
    def ok(self) -> bool:
        return self.verdict is not Verdict.NODE_FAULT


def _say(hook: str, text: str) -> None:
    print(f"vmwrap {hook}: {text}", file=sys.stderr)


class PrologTimeout(CacheFullError):
    """The start would overrun the scheduler's prolog timeout (a slow image source, a long restore).

    Like a busy cache, a passing condition of a healthy node: the job fails with the reason and
    nothing of it stays; the scheduler never kills the prolog mid-way, which would leave a fetch's
    pieces behind and drain the node (Slurm: "Prolog error") for what a slow server did."""


def prolog_budget(timeout_s: float) -> float:
    """Seconds the prolog's own work may take within the scheduler's `timeout_s` (0: no limit): the
    rest (15 s, or a fifth of a short timeout) is kept for failing the job and cleaning up."""
    return max(timeout_s - min(15.0, timeout_s / 5), 0.5) if timeout_s > 0 else 0.0


@contextmanager
def _deadline(seconds: float, job_id: str, timeout_s: float):
    """Raise PrologTimeout in the prolog's (main) thread once `seconds` have passed; 0: never."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def ring(_signum, _frame):
        raise PrologTimeout(f"starting job {job_id}'s VM did not finish within {seconds:g} s of the scheduler's "
                            f"{timeout_s:g} s prolog timeout (a slow image source or checkpoint store?); "
                            "the job is failed instead of the node")

    old = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def start(settings: Settings, job_id: str, read_job: Callable[[], Job | None], scheduler: str,
          settle: float = 0.0) -> Outcome:
    """The prolog: boot the job's VM, or restore it when the scheduler restarts a saved job.

    `read_job()` is the adapter's translation of its hook environment (None: not a VM job); what it
    raises counts like any other error here. `settle`: how long the scheduler may start a restarted
    job before the epilog of its previous run has saved the VM (Grid Engine's `qmod -rj` does not
    wait for the old run); a restart waits up to that long for a checkpoint newer than its last start.
    With `prolog_timeout_s` set, the work stops in time (PrologTimeout) and just the job fails."""
    try:
        with _deadline(prolog_budget(settings.prolog_timeout_s), job_id, settings.prolog_timeout_s):
            return _start(settings, job_id, read_job, scheduler, settle)
    except PrologTimeout as e:  # it rang outside _start's own handling (reading the job, a teardown)
        _say("prolog", f"job {job_id}: {e}")
        try:
            launcher.teardown(job_id, settings)
        except Exception as te:  # noqa: BLE001 (the epilog tears down again; the job must learn why)
            _say("prolog", f"job {job_id}: cleaning up: {te!r}")
        return _fail(settings, job_id, e)
    except NodeError as e:
        _say("prolog", f"node fault: {e}")
        return Outcome(Verdict.NODE_FAULT, str(e), vm=True)
    except Exception as e:  # noqa: BLE001 (a bug, or data nobody foresaw: the job's failure)
        trace = traceback.format_exc()
        _say("prolog", f"job {job_id}: internal error:\n{trace}")
        try:
            Ledger(settings.ledger_path).record(job_id, rundir.domain_name(job_id), "failed", kind="internal",
                                                scheduler=scheduler, message=trace[-2000:])
        except Exception as le:  # noqa: BLE001 (accounting only: the job must still learn why)
            _say("prolog", f"ledger: {le}")
        return _fail(settings, job_id, VmwrapError(
            f"internal error in vmwrap's prolog ({type(e).__name__}: {str(e)[:200]}); "
            "the node stays up, the traceback is in its ledger and the scheduler's log"))


def _fail(settings: Settings, job_id: str, err: VmwrapError) -> Outcome:
    """Fail just the job; if even that cannot be recorded it is the node's fault."""
    if launcher.fail_job(settings, job_id, err):
        return Outcome(Verdict.JOB_FAILED, str(err), vm=True)
    return Outcome(Verdict.NODE_FAULT, f"cannot record the failure of job {job_id}: {err}", vm=True)


def _await_checkpoint(store: checkpoint.Store, job_id: str, seconds: float) -> None:
    """Until the job's last run (boot or restore, `.ran`'s time) has a newer checkpoint, a recorded
    failure to save, or no marker at all (it ended for good), for at most `seconds`."""
    ran = store.root / f"{store.dir(job_id).name}.ran"
    end = time.monotonic() + seconds
    while time.monotonic() < end and store.lost_reason(job_id) is None:
        try:
            since = ran.stat().st_mtime
        except OSError:
            return
        try:
            if (store.dir(job_id) / "manifest.json").stat().st_mtime >= since:
                return
        except OSError:
            pass
        time.sleep(0.5)


def _start(settings: Settings, job_id: str, read_job: Callable[[], Job | None], scheduler: str,
           settle: float = 0.0) -> Outcome:
    try:
        job = read_job()
    except NodeError:
        raise
    except VmwrapError as e:
        return _fail(settings, job_id, e)
    if job is None:
        return Outcome(Verdict.RUN)
    launcher.teardown(job.job_id, settings, index=job.index)  # leftovers of an earlier run of the same job id
    lx = launcher.Launcher(job, settings)
    # whether this start keeps the store's record of the job's runs: a multi-node job's VMs are never
    # saved, and its restart is decided just below instead
    saving = settings.workdir_share == "serial" and not job.nodes
    store = checkpoint.Store(settings.checkpoint_dir, settings.checkpoint_key_file)
    try:
        if job.restart_count == 0:  # a first start: what the store holds under this id is an older job's
            store.delete(job.job_id)  # (schedulers reuse job ids, e.g. after a controller reset)
        lx.prepare()
        if job.nodes and job.restart_count > 0:   # its VMs were not saved (end): they cannot continue
            why = f"its VMs span {len(job.nodes.nodes)} nodes, which vmwrap does not save"
            if (lx.on_lost_checkpoint or "fail") == "fail":
                raise CheckpointError(f"job {job.job_id} was requeued, but {why}; not starting it again from the "
                                      "beginning (add '#VMWRAP --on-lost-checkpoint=restart' to allow that)")
            lx.notice(f"{why}; starting the job again from the beginning (--on-lost-checkpoint=restart)")
        checkpoints = saving and lx.request.image.checkpoint
        if checkpoints:
            # Where the shared store is not mounted its path is a local directory: a save there is
            # lost to every other node, and a restart finds no record that the job ran and would
            # silently start it again from the beginning. The node's fault (StoreUnverified): the
            # scheduler takes it out and runs the job where the store is.
            store.check_identity()
        if saving and job.restart_count > 0 and store.ran(job.job_id):
            _await_checkpoint(store, job.job_id, settle)
            # From here this run is the job's current one: a save by an earlier run still going on a
            # node cut off from the scheduler is refused (and a next checkpoint must be newer than this).
            checkpoint.mark_current(store, job.job_id, lx.run_dir, lx.run_token)
            try:
                info = lx.restore(store)  # preempted or requeued: continue where the VM was saved
                return Outcome(Verdict.RUN, vm=True, facts={"restored": True, **info}, **_booted(lx))
            except CheckpointError as e:
                if (lx.on_lost_checkpoint or "fail") == "fail":
                    raise CheckpointError(f"{e}; not starting the job again from the beginning "
                                          "(add '#VMWRAP --on-lost-checkpoint=restart' to allow that)") from None
                lx.notice(f"{e}; starting the job again from the beginning (--on-lost-checkpoint=restart)")
                store.delete(job.job_id)
        lx.boot()
        if checkpoints:
            checkpoint.mark_current(store, job.job_id, lx.run_dir, lx.run_token)
        elif saving:  # an image that may not be saved: its restart follows the job's policy where the
            try:      # store is there to tell (it is not required for jobs that never checkpoint)
                checkpoint.mark_current(store, job.job_id, lx.run_dir, lx.run_token)
            except NodeError:
                pass
        return Outcome(Verdict.RUN, vm=True, facts={"restored": False}, **_booted(lx))
    except CacheFullError as e:
        lx.fail(e)  # the node is healthy, only busy: the job fails with the reason, the node stays up
        launcher.teardown(job.job_id, settings, keep_error=True, index=job.index)
        return Outcome(Verdict.JOB_FAILED, str(e), vm=True)
    except NodeError as e:
        # The scheduler requeues the job and takes the node out: leave nothing that would make the
        # epilog believe a VM may still be running here.
        launcher.teardown(job.job_id, settings, index=job.index)
        lx.ledger.record(job.job_id, job.domain_name, "failed", kind=e.kind, scheduler=scheduler, message=str(e))
        _say("prolog", f"node fault: {e}")
        return Outcome(Verdict.NODE_FAULT, str(e), vm=True)
    except VmwrapError as e:
        lx.fail(e)
        lx.ledger.record(job.job_id, job.domain_name, "failed", kind=e.kind, scheduler=scheduler, message=str(e))
        return Outcome(Verdict.JOB_FAILED, str(e), vm=True)


def _booted(lx: launcher.Launcher) -> dict[str, str]:
    """The image the job's VM really runs (name, content digest), for the scheduler's accounting."""
    return {"image": lx.request.image.name, "digest": lx.request.image.digest}


def started_as(settings: Settings, job_id: str) -> int | None:
    """The scheduler's restart count when this node started the job's VM (None: no VM here)."""
    from . import safeio

    try:
        return int(json.loads(safeio.read_capped(rundir.path(settings, job_id) / rundir.JOB, 1 << 20) or b"")["restarts"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def requeued(settings: Settings, job_id: str, restarts_now: int) -> bool:
    """For schedulers that count restarts (Slurm): the job was requeued since its VM started here."""
    before = started_as(settings, job_id)
    return before is not None and restarts_now > before


def end(settings: Settings, job_id: str, *, requeued: bool, restarts: int, scheduler: str, node: str = "",
        index: int | None = None, **facts) -> Outcome:
    """The epilog: save the VM when the scheduler requeued (or vacated) the job, then tear everything
    down; delete the job's checkpoint when it ended for good. Idempotent. A node fault only when
    libvirt is unreachable while a VM of this job may still run (it cannot be destroyed)."""
    from . import domain
    from .errors import UserError

    try:
        Job.check_id(job_id)
    except UserError as e:  # nothing of vmwrap's can be under such a name
        return Outcome(Verdict.RUN, str(e))
    node = node or os.uname().nodename
    run_dir = rundir.path(settings, job_id)
    try:
        conn = domain.connect(settings.libvirt_uri)
    except NodeError as e:
        if run_dir.exists():
            _say("epilog", str(e))
            return Outcome(Verdict.NODE_FAULT, f"cannot destroy the VM of job {job_id}: {e}", vm=True)
        return Outcome(Verdict.RUN)
    store = checkpoint.Store(settings.checkpoint_dir, settings.checkpoint_key_file)
    ledger = Ledger(settings.ledger_path)
    recorded, spans = rundir.placement(run_dir)
    if index is None:   # the node's place in a multi-node job (the adapter knows it even without a run dir)
        index = recorded
    name = rundir.domain_name(job_id, index)
    out = Outcome(Verdict.RUN, vm=run_dir.exists())
    try:
        try:
            store.check_current(job_id, checkpoint.run_token(run_dir))
            stale = None
        except checkpoint.StaleRunError as e:
            stale = str(e)
        if stale is not None:
            # Cut off while the job was restarted elsewhere: its VM goes, the new run's checkpoint stays.
            ledger.record(job_id, name, "stale_run", scheduler=scheduler, message=stale)
            _say("epilog", f"job {job_id}: {stale}; this run's VM is destroyed, nothing saved or deleted")
            try:
                launcher.teardown(job_id, settings, conn=conn, index=index)
            except Exception as e:  # noqa: BLE001 (as below: leftover files are no node fault)
                _say("epilog", f"job {job_id}: cleaning up: {e!r}")
            return out
        if requeued and spans > 1:   # never half-saved: the restart follows --on-lost-checkpoint (_start)
            if index == 0:
                ledger.record(job_id, name, "save_failed", scheduler=scheduler,
                              message=f"a job on {spans} nodes is not saved")
                _say("epilog", f"job {job_id}: requeued; its VMs span {spans} nodes and are not saved")
            out.facts["saved"] = False
        elif requeued and settings.workdir_share == "serial" and not domain.is_gone(conn, name):
            deadline = store.deadline(job_id)   # set by the gap planner: a reservation needs the node
            try:
                rundir.read_job(run_dir, job_id)  # a newer vmwrap's run dir is not saved on its guesses
                info = checkpoint.save(job_id, run_dir, store, conn, restarts, deadline=deadline)
                ledger.record(job_id, name, "saved", scheduler=scheduler, **info)
                store.record_rate(info["memory_bytes"], info["total_s"])
                out.facts["saved"] = True
            except Exception as e:  # noqa: BLE001 (the restart then follows the job's --on-lost-checkpoint)
                reason = str(e) if isinstance(e, (checkpoint.NotSaveable, rundir.FormatError)) \
                    else f"saving its VM on {node} failed: {e}"
                store.mark_lost(job_id, reason)
                ledger.record(job_id, name, "save_failed", scheduler=scheduler, message=str(e))
                _say("epilog", f"job {job_id}: {reason}")
                out.facts["saved"] = False
            finally:
                store.clear_deadline(job_id)
        elif run_dir.exists():
            ledger.record(job_id, name, "exited", scheduler=scheduler, **facts, **payload.guest_timeline(run_dir))
        try:
            launcher.teardown(job_id, settings, conn=conn, keep_evidence=not requeued, index=index)  # a saved VM did not die
        except Exception as e:  # noqa: BLE001 (the VM is destroyed first; leftover files are no node fault)
            _say("epilog", f"job {job_id}: cleaning up after the VM failed: {e!r}")
        if not requeued and out.vm:
            store.delete(job_id)  # the job ended for good: its checkpoint can never be used again
        # No run dir: the job's start failed here as a node fault (its restore never began), and the
        # scheduler starts it elsewhere, where its checkpoint is all it has. Whether it ended is not this
        # node's to say: gc_checkpoints removes the checkpoint once the scheduler no longer has the job.
        try:  # a prolog killed mid-fetch by the scheduler's timeout left its partial download here
            from .cache import Cache

            Cache(settings.cache_dir, settings.cache_max_bytes).clear_crashed_fetches()
        except OSError as e:
            _say("epilog", f"cache: {e}")
    finally:
        conn.close()
    return out


def gc_checkpoints(settings: Settings, still_queued: Callable[[str], bool]) -> list[str]:
    """Delete checkpoints of jobs that ended while saved (no epilog ran for them). `still_queued`
    is the adapter's word; a scheduler it cannot reach must answer True (keep everything)."""
    return checkpoint.Store(settings.checkpoint_dir).gc(still_queued)


def prolog(adapter, settings: Settings, env) -> Outcome:
    """A root prolog through an adapter (vmwrap.adapter.Scheduler): start, take the node out on a
    node fault. The adapter maps the outcome onto its exit code."""
    out = start(settings, adapter.job_id(env), lambda: adapter.job(env), adapter.name,
                settle=getattr(adapter, "restart_settle", 0.0))
    if out.verdict is Verdict.NODE_FAULT:
        adapter.take_out(env, f"vmwrap: {out.reason}")
    record = getattr(adapter, "record_provenance", None)  # optional: schedulers with an accounting field
    if out.verdict is Verdict.RUN and out.digest and record is not None:
        try:
            record(env, out.image, out.digest)
        except Exception as e:  # noqa: BLE001 (accounting only: the job runs regardless)
            _say("prolog", f"job {adapter.job_id(env)}: could not record the image in the scheduler: {e!r}")
    return out


def epilog(adapter, settings: Settings, env, **facts) -> Outcome:
    """A root epilog through an adapter: end (save if requeued), take the node out on a node fault."""
    job_id = adapter.job_id(env)
    requeued_, restarts = adapter.requeue_state(settings, env)
    place = getattr(adapter, "node_index", None)   # optional: schedulers that run multi-node VM jobs
    out = end(settings, job_id, requeued=requeued_, restarts=restarts, scheduler=adapter.name,
              index=place(env) if place is not None else None, **facts)
    if out.verdict is Verdict.NODE_FAULT:
        adapter.take_out(env, f"vmwrap: {out.reason}")
    return out
