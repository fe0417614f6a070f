"""The gap planner's daemon loop: the queue head runs before an advance reservation, is saved before
it starts and resumes after it (Sotomayor's model), on any scheduler with an adapter.

Decisions are `vmwrap.plan.plan_pass`'s, the same code the simulator evaluates. This module only
asks the adapter (vmwrap.adapter.Scheduler) for reservations, the queue and its timing, applies the
actions through it (`set_time_limit`, `vacate`), writes the save deadline into the shared checkpoint
store before a vacate (the node's epilog stops the save by then), keeps the pass state across
restarts and logs every decision when it changes. One planner per cluster, next to its controller.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

from . import checkpoint, rundir
from .config import Settings
from .ledger import Ledger
from .plan import Action, Policy, SaveModel, Timing, plan_pass

log = logging.getLogger("vmwrap.plan")


def split(s: str) -> frozenset[str]:
    return frozenset(x.strip() for x in s.split(",") if x.strip())


def policy(settings: Settings, store: checkpoint.Store, timing: Timing) -> Policy:
    """The site's policy; the save model uses the slowest of the store's recent measured saves and
    sets aside the scheduler's delay in reaching the node. An offer stands two scheduler passes (and
    at least 10 s) so the scheduler can take it."""
    measured = store.measured_save_rate()
    rate = min(measured, settings.plan_save_rate_mb_s) if measured else settings.plan_save_rate_mb_s
    return Policy(
        model=SaveModel(rate, settings.plan_save_fixed_s, settings.plan_save_margin,
                        settings.plan_save_margin_s + timing.vacate_s),
        enabled=settings.plan_enabled, partitions=split(settings.plan_partitions), users=split(settings.plan_users),
        max_nodes=settings.plan_max_nodes, max_gap_s=settings.plan_max_gap_s, setup_s=settings.plan_setup_s,
        stop_s=timing.kill_s + settings.plan_teardown_s, slack_s=max(10.0, 2 * timing.pass_s + 2),
        min_run_s=settings.plan_min_run_s, granularity_s=timing.limit_unit_s)


def _say_limit(seconds: float) -> str:
    return "none" if math.isinf(seconds) else f"{seconds:.0f}s"


class Planner:
    """State survives restarts in state_dir/planner-<scheduler>.json (planner.json for Slurm, as before)."""

    def __init__(self, sched, settings: Settings, dry_run: bool = False):
        self.sched = sched
        self.settings = settings
        self.dry_run = dry_run
        self.store = checkpoint.Store(settings.checkpoint_dir)
        name = "planner.json" if sched.name == "slurm" else f"planner-{sched.name}.json"
        self.path = Path(settings.state_dir) / name
        self.state: dict[str, dict] = {}
        if not dry_run:
            try:
                self.state = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self.state = {}
        self._said: dict[str, str] = {}

    def pass_once(self, now: float | None = None) -> list[Action]:
        now = time.time() if now is None else now
        ars = self.sched.reservations()
        if ars is None:   # a scheduler without advance reservations: no gap to plan
            return []
        pol = policy(self.settings, self.store, self.sched.plan_timing())
        acts = plan_pass(now, ars, self.sched.queue(self.settings, now), pol, self.state)
        for a in acts:
            self._apply(a, now)
        if not self.dry_run:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.state, indent=1))
            os.replace(tmp, self.path)
        return acts

    def _apply(self, a: Action, now: float) -> None:
        if a.kind == "note":
            if self._said.get(a.job) != a.reason:   # a decision is logged when it changes
                self._said[a.job] = a.reason
                log.info("job %s: %s", a.job, a.reason)
            return
        what = f"time limit {_say_limit(a.seconds)}" if a.kind == "limit" else "requeue"
        self._said.pop(a.job, None)
        log.info("job %s: %s -> %s%s", a.job, a.reason, what, " (dry run: not done)" if self.dry_run else "")
        if self.dry_run:
            return
        try:
            Ledger(self.settings.ledger_path).record(a.job, rundir.domain_name(a.job), "plan", action=what, reason=a.reason,
                                                     scheduler=self.sched.name)
        except Exception as e:  # the ledger is accounting: never let it stop a save
            log.error("ledger: %s", e)
        try:
            if a.kind == "limit":
                self.sched.set_time_limit(a.job, a.seconds)
            elif a.kind == "requeue":
                st = self.state.get(a.job, {})
                # the epilog must not run past the reservation's start: it stops the save by then
                try:
                    self.store.set_deadline(a.job, st.get("ar_start", now) - self.settings.plan_teardown_s)
                except OSError as e:  # never created here: a store missing on this host is not mounted
                    log.error("job %s: cannot record its save's deadline in the checkpoint store %s (is it "
                              "mounted on this host?): %s; requeued without one", a.job, self.store.root, e)
                self.sched.vacate(a.job)
        except RuntimeError as e:
            log.error("job %s: %s failed: %s", a.job, what, e)


def dry_run_decisions(sched, settings: Settings) -> dict:
    """One dry pass's decisions as a JSON-able document (`vmwrap ... plan --dry-run --json`).

    NodeError, one line, when the scheduler cannot be asked (its commands missing or its
    controller unreachable)."""
    from .errors import NodeError

    try:
        acts = Planner(sched, settings, dry_run=True).pass_once()
    except (RuntimeError, OSError) as e:
        last = (str(e).strip().splitlines() or ["?"])[-1]
        raise NodeError(f"cannot ask {getattr(sched, 'title', sched.name)} ({str(e).split(':')[0]}): {last}") from None
    return {"enabled": settings.plan_enabled,
            "actions": [{"job": a.job, "action": a.kind, "seconds": a.seconds if a.kind == "limit" else None,
                         "reason": a.reason} for a in acts]}
