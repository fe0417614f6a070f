"""The daemon loops (checkpoint GC, node repair, prestager, gap planner) as any scheduler plugin's CLI runs them.

Each loop is core code driven only through the scheduler's adapter (vmwrap.adapter.Scheduler); a
plugin's command only picks the adapter and its options. A pass that fails (the scheduler is
restarting, a catalog edit is broken) is logged and the loop goes on; with `once` it is exit 1.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from .config import Settings


def repeat(step: Callable[[], None], interval: float, once: bool, log: logging.Logger) -> int:
    """Run `step` every `interval` seconds (or once). Returns the exit code for `once`."""
    while True:
        try:
            step()
        except Exception as e:  # keep the loop alive through a scheduler restart or a bad catalog edit
            log.error("pass failed: %s", e)
            if once:
                return 1
        if once:
            return 0
        time.sleep(interval)


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")


def gc(sched, settings: Settings, interval: float, once: bool, say: Callable[[str], None] = print) -> int:
    """Delete checkpoints of jobs that ended while saved (no epilog ran for them: cancelled while
    waiting), as the scheduler's `still_queued` says."""
    from .lifecycle import gc_checkpoints

    _logging()

    def step() -> None:
        for job in gc_checkpoints(settings, sched.still_queued()):
            say(f"job {job}: ended while saved, checkpoint deleted")

    return repeat(step, interval, once, logging.getLogger(f"vmwrap.gc.{sched.name}"))


def reconcile(sched, settings: Settings, interval: float, once: bool, dry_run: bool = False,
              say: Callable[[str], None] = print) -> int:
    """Repair this node (vmwrap.reconcile): what belongs to jobs the scheduler no longer has goes."""
    from .reconcile import reconcile as one_pass

    _logging()
    return repeat(lambda: one_pass(settings, sched.still_queued, dry_run=dry_run, say=say), interval, once,
                  logging.getLogger(f"vmwrap.reconcile.{sched.name}"))


def prestage(sched, settings: Settings, node: str, interval: float, once: bool,
             bandwidth_mb_s: float | None = None, horizon: float = 3600.0) -> int:
    """This node's prestager (root): fetch the images of the jobs the scheduler will start here
    next, publish what the node holds (vmwrap.prestage.node_pass)."""
    from .cache import Cache
    from .catalog import Catalog
    from .ledger import Ledger
    from .prestage import Prestager, node_pass

    _logging()

    def step() -> None:
        p = Prestager(Catalog.load(settings.catalog),   # re-read: an admin may have edited it
                      Cache(settings.cache_dir, settings.cache_max_bytes, settings.verify_on_use),
                      Ledger(settings.ledger_path), rate=bandwidth_mb_s * 1e6 if bandwidth_mb_s else None,
                      horizon=horizon)
        node_pass(sched, p, node)

    return repeat(step, interval, once, logging.getLogger("vmwrap.prestage"))


def plan(sched, settings: Settings, interval: float, once: bool, dry_run: bool = False) -> int:
    """The gap planner next to the scheduler's controller (vmwrap.planner)."""
    from .planner import Planner

    _logging()
    log = logging.getLogger("vmwrap.plan")
    if not settings.plan_enabled:
        log.info("plan_enabled is false: no new job is put into a gap (jobs already in one are still saved in time)")
    p = Planner(sched, settings, dry_run=dry_run)
    return repeat(lambda: p.pass_once(), interval, once, log)
