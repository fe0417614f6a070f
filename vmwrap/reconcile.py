"""Repair a node: remove what belongs to no live job of the scheduler.

An epilog cleans up after its own job, but a node that crashed, a slurmd killed mid-job or an epilog
that timed out leaves a VM, its run dir (overlay, ports, 9P server, limit watcher), cache pins and a
multi-node job's network (vmwrap/jobnet.py) behind, and an idle job cancelled while saved leaves its
checkpoint. Each belongs to a job id; a job id the scheduler no longer has (the adapter's
`still_queued`, which answers True for every job when the scheduler cannot be reached) is torn down
here exactly as its epilog would have done, and each removal is a `reconciled` record in the ledger.

Only this site's own leftovers are touched: a VM counts when its console is in this site's jobs dir
(several sites may share a libvirtd: test clusters, or nodes of one host), a network when its record
names this site's jobs dir, and names that are not valid job ids are never acted on. A job the
scheduler still has is left alone even if it now runs elsewhere: its epilog may be saving the VM at
this moment.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import domain, jobnet, rundir
from .cache import Cache
from .config import Settings
from .errors import NodeError
from .job import _JOB_ID
from .launcher import teardown
from .ledger import Ledger


@dataclass
class Leftover:
    job_id: str
    what: list[str] = field(default_factory=list)   # "vm", "run dir", "pin <sha>", "checkpoint", "network"
    index: int | None = None   # a multi-node job's VM found here: its node's place (its name)


def _our_domains(settings: Settings, conn) -> dict[str, tuple[str, int]]:
    """job id -> (domain name, node index) of every VM (running or not) whose run dir is this site's."""
    out = {}
    jobs_dir = str(settings.jobs_dir)
    for dom in conn.listAllDomains():
        name = dom.name()
        parsed = rundir.split_domain_name(name)
        if parsed is None or not _JOB_ID.match(parsed[0]):
            continue
        job_id, index = parsed
        try:
            xml = ET.fromstring(dom.XMLDesc(0))
        except Exception:  # noqa: BLE001 (it vanished meanwhile, or libvirt's own error kinds)
            continue
        console = str(Path(jobs_dir) / job_id / rundir.CONSOLE)
        if any(s.get("path") == console for s in xml.iter("source")):
            out[job_id] = name, index
    return out


Live = Callable[[], Callable[[str], bool]]   # the adapter's still_queued: asked once per pass


def find(settings: Settings, live: Live, conn=None) -> list[Leftover]:
    """What belongs to jobs the scheduler no longer has: VMs, run dirs, cache pins, checkpoints.

    The scheduler is asked after everything is listed: a job whose prolog made its run dir after
    the scheduler's answer would otherwise look like a leftover."""
    found: dict[str, Leftover] = {}

    def add(job_id: str, what: str) -> None:
        if _JOB_ID.match(job_id):
            found.setdefault(job_id, Leftover(job_id)).what.append(what)

    if conn is not None:
        for job_id, (_, index) in _our_domains(settings, conn).items():
            add(job_id, "vm")
            found[job_id].index = index
    jobs_dir = Path(settings.jobs_dir)
    if jobs_dir.is_dir():
        for p in sorted(jobs_dir.iterdir()):
            if p.is_dir() and not p.is_symlink():
                add(p.name, "run dir")
    pins = Path(settings.cache_dir) / "pins"
    if pins.is_dir():
        for d in sorted(pins.iterdir()):
            for p in sorted(d.iterdir()) if d.is_dir() and not d.is_symlink() else ():
                add(p.name, f"pin {d.name[:12]}")
    for job_id in jobnet.networks(str(settings.jobs_dir)):  # a multi-node job's network, its VMs and files gone
        add(job_id, "network")
    from .checkpoint import Store

    try:
        for job_id in sorted(Store(settings.checkpoint_dir).jobs()):
            add(job_id, "checkpoint")
    except OSError:
        pass  # the shared store is unreachable now: its checkpoints wait for the next pass
    still_queued = live()
    return sorted((x for x in found.values() if not still_queued(x.job_id)), key=lambda x: x.job_id)


def reconcile(settings: Settings, live: Live, dry_run: bool = False,
              say: Callable[[str], None] = print) -> list[Leftover]:
    """Find and (unless `dry_run`) remove the leftovers of ended jobs; returns what was found."""
    try:
        conn = domain.connect(settings.libvirt_uri)
    except NodeError as e:
        say(f"libvirt unreachable ({e}): VMs are not checked this pass")
        conn = None
    try:
        found = find(settings, live, conn)
        if dry_run:
            for x in found:
                say(f"job {x.job_id}: would remove {', '.join(x.what)}")
            return found
        ledger = Ledger(settings.ledger_path)
        cache = Cache(settings.cache_dir, settings.cache_max_bytes)
        store = None
        for x in found:
            teardown(x.job_id, settings, conn=conn, ledger=ledger, cache=cache, index=x.index)
            if "network" in x.what:
                jobnet.clear(x.job_id)
            if "checkpoint" in x.what:
                from .checkpoint import Store

                store = store or Store(settings.checkpoint_dir)
                store.delete(x.job_id)
            ledger.record(x.job_id, rundir.domain_name(x.job_id, x.index or 0), "reconciled", removed=x.what)
            say(f"job {x.job_id}: removed {', '.join(x.what)}")
        for p in cache.clear_crashed_fetches():  # a prolog killed mid-fetch, a crash: no job id to them
            say(f"cache: removed {p}, left by a fetch that died")
        return found
    finally:
        if conn is not None:
            conn.close()
