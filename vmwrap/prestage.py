"""Prestaging: fetch the images this node will need before the scheduler starts the jobs that need them.

Scheduler-neutral: the adapter says which jobs its scheduler will start next and where
(vmwrap.adapter.Scheduler.planned_starts); `node_pass` turns that into this node's `Need`s (job, image,
planned start), `Prestager.step` decides, earliest deadline first, what to fetch now, and the
adapter publishes what the node then holds (`publish_cached`, for cache-aware placement). Images needed by planned
jobs are pinned as `plan-<job>` so LRU eviction leaves them alone; when a job's plan goes away
(started, cancelled, moved to another node) only its pin goes, never the image: a plan that moves
back and forth does not make the cache thrash.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass

from . import rundir
from .cache import Cache
from .catalog import Catalog, Image
from .errors import VmwrapError
from .ledger import Ledger

log = logging.getLogger("vmwrap.prestage")
PLAN_PIN = "plan-"


@dataclass(frozen=True)
class Need:
    job_id: str
    image: str
    start: float  # planned start, seconds since the epoch


@dataclass
class Decision:
    job_id: str
    image: str
    action: str  # fetched | cached | deferred | failed | unknown
    reason: str
    bytes: int = 0


class Prestager:
    def __init__(self, catalog: Catalog, cache: Cache, ledger: Ledger | None = None,
                 rate: float | None = None, horizon: float = 3600.0):
        self.catalog = catalog
        self.cache = cache
        self.ledger = ledger
        self.rate = rate
        self.horizon = horizon

    def step(self, needs: list[Need], now: float | None = None) -> list[Decision]:
        now = time.time() if now is None else now
        wanted = sorted((n for n in needs if n.start - now <= self.horizon), key=lambda n: (n.start, n.job_id))
        self._sync_plan_pins(wanted)
        decisions = []
        for need in wanted:
            img = self.catalog.images.get(need.image)
            if img is None:
                decisions.append(self._decide(need, "unknown", "image not in this node's catalog"))
                continue
            decisions.append(self._stage(need, img, wanted))
        return decisions

    def cached_images(self) -> list[str]:
        """Images whose every artifact is in the cache (for the scheduler's placement)."""
        return sorted(name for name, img in self.catalog.images.items()
                      if all(self.cache.has(a) for a in img.artifacts().values()))

    def _sync_plan_pins(self, wanted: list[Need]) -> None:
        keep: dict[str, set[str]] = {}
        for n in wanted:
            img = self.catalog.images.get(n.image)
            for a in (img.artifacts().values() if img else ()):
                keep.setdefault(a.sha256, set()).add(PLAN_PIN + n.job_id)
        for e in self.cache.entries():
            for pin in e.pins:
                if pin.startswith(PLAN_PIN) and pin not in keep.get(e.sha256, set()):
                    self.cache.unpin(e.sha256, pin)

    def _stage(self, need: Need, img: Image, wanted: list[Need]) -> Decision:
        arts = img.artifacts().values()
        if all(self.cache.has(a) for a in arts):
            for a in arts:
                self.cache.pin(a.sha256, PLAN_PIN + need.job_id)
            return self._decide(need, "cached", f"already cached for job {need.job_id}")
        # Images planned for later jobs may make room for this sooner one: lift their plan pins now.
        later = {PLAN_PIN + n.job_id for n in wanted if n.start > need.start}
        lifted = []
        for e in self.cache.entries():
            for pin in e.pins:
                if pin in later:
                    self.cache.unpin(e.sha256, pin)
                    lifted.append((e.sha256, pin))
        total = 0
        try:
            for a in arts:
                self.cache.pin(a.sha256, PLAN_PIN + need.job_id)
                total += self.cache.fetch(a, rate=self.rate).bytes_transferred
            when = time.strftime("%H:%M:%S", time.localtime(need.start))
            return self._decide(need, "fetched", f"job {need.job_id} planned to start here at {when}", total)
        except VmwrapError as e:
            for a in arts:
                self.cache.unpin(a.sha256, PLAN_PIN + need.job_id)
            action = "deferred" if e.kind == "node" else "failed"
            return self._decide(need, action, str(e), total)
        finally:
            for sha, pin in lifted:
                if self.cache.blob(sha).exists():
                    self.cache.pin(sha, pin)

    def _decide(self, need: Need, action: str, reason: str, nbytes: int = 0) -> Decision:
        d = Decision(need.job_id, need.image, action, reason, nbytes)
        log.info("prestage %s for job %s: %s (%s)", need.image, need.job_id, action, reason)
        if self.ledger is not None and action != "cached":
            self.ledger.record(need.job_id, rundir.domain_name(need.job_id), "prestage", image=need.image, action=action,
                               reason=reason, bytes=nbytes)
        return d


def needs_for(node: str, planned: list[dict]) -> list[Need]:
    """This node's needs from the adapter's planned starts (jobs without a planned start or planned
    elsewhere are not). Job ids become pin-safe names (a Slurm array id looks like 12_[1-3])."""
    safe = lambda j: re.sub(r"[^A-Za-z0-9_.-]", "_", j)  # noqa: E731
    return [Need(safe(str(j["job"])), j["image"], j["start"]) for j in planned
            if j.get("start") and node in (j.get("nodes") or ())]


def node_pass(sched, prestager: Prestager, node: str) -> list[Decision]:
    """One prestage pass on `node` through the adapter `sched` (vmwrap.adapter.Scheduler)."""
    planned = sched.planned_starts()
    decisions = prestager.step(needs_for(node, planned)) if planned is not None else []
    sched.publish_cached(node, prestager.cached_images())
    return decisions
