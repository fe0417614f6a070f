"""The scheduler-adapter contract: everything the core asks of a batch scheduler.

The core never imports a scheduler. A plugin declares one object implementing `Scheduler` under the
entry point group `vmwrap.schedulers` (and its click command group under `vmwrap.cli`); the core
finds it with `schedulers()` / `scheduler(name)`. Node-side hooks then only translate: the hook
environment into a Job (`job`), requeue facts (`requeue_state`), and the lifecycle's Outcome into
the scheduler's exit codes and drain/offline mechanism (`take_out`). Capabilities a scheduler does
not have (no planned starts to prestage for, no reservations) answer None and the core skips them.

The daemon loops are core code driven only through these methods: the checkpoint GC
(vmwrap.daemons.gc: `still_queued`), the prestager (vmwrap.prestage.node_pass: `planned_starts`,
`publish_cached`) and the gap planner (vmwrap.planner.Planner: `reservations`, `queue`,
`plan_timing`, `set_time_limit`, `vacate`). The planner's save deadline does not go through the
scheduler: the core writes it into the shared checkpoint store before `vacate`, and the node's
epilog (vmwrap.lifecycle.end) stops the save by then.
"""

from __future__ import annotations

import os
import pkgutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from .config import Settings
from .errors import NodeError
from .job import Job
from .plan import QueuedJob, Reservation, Timing

GROUP = "vmwrap.schedulers"
CLI_GROUP = "vmwrap.cli"


@runtime_checkable
class Scheduler(Protocol):
    name: str
    # Variables a root hook keeps from its environment (vmwrap.rootenv drops every other one).
    root_env: tuple[str, ...]

    def job_id(self, env: Mapping[str, str]) -> str:
        """The job's id as a plain name (array tasks included), from the hook environment."""

    def job(self, env: Mapping[str, str]) -> Job | None:
        """The job as the core sees it, ceilings (CPUs, memory) from the scheduler's allocation;
        None for a job that asked for no VM. Raises UserError for a request that must fail the job."""

    def requeue_state(self, settings: Settings, env: Mapping[str, str]) -> tuple[bool, int]:
        """In an epilog: (requeued/vacated/checkpointed since its VM started here, restart count)."""

    def take_out(self, env: Mapping[str, str], reason: str) -> None:
        """Drain/offline this node with `reason` (a no-op where the hook's exit code does it)."""

    def still_queued(self) -> Callable[[str], bool]:
        """For checkpoint GC: whether a job id may still run again. Unreachable scheduler: always True."""

    def planned_starts(self) -> list[dict] | None:
        """Jobs the scheduler will start next (prestage): dicts with `job` (id), `image`, `start`
        (planned start, epoch seconds, or None) and `nodes` (the nodes planned for it). None: the
        scheduler makes no such plan."""

    def publish_cached(self, node: str, images: list[str]) -> None:
        """Tell the scheduler which images this node holds (cache-aware placement)."""

    # -- the gap planner (vmwrap.planner), run next to the scheduler's controller ------------------

    def reservations(self) -> list[Reservation] | None:
        """Advance reservations not yet over: start, end, nodes, and the users whose jobs run inside
        it (their other jobs are not kept waiting by it). None: the scheduler has none."""

    def queue(self, settings: Settings, now: float) -> list[QueuedJob]:
        """Pending and running jobs in the scheduler's priority order (the queue head first): each
        one's time limit, nodes, the VM's memory (as the launcher sizes it), whether it runs in a
        saveable VM, and for a pending job the idle nodes it may use. A job whose record does not
        read as expected is left out with a logged reason: users' data never fails a pass."""

    def plan_timing(self) -> Timing:
        """How the scheduler stops a job at its time limit (until its nodes are free), how often it
        schedules (an offer must stand that long) and the unit of its time limits."""

    def set_time_limit(self, job: str, seconds: float) -> None:
        """Set a pending job's run-time limit (math.inf: none). A limit that ends before a
        reservation lets the scheduler's own backfilling start the queue head in the gap, and makes
        the scheduler stop it in time should the planner be gone. RuntimeError if refused."""

    def vacate(self, job: str) -> None:
        """Requeue a running job so that its epilog saves the VM (the adapter's `requeue_state`
        then says requeued) and it waits again. RuntimeError if refused."""

    def render_config(self, settings: Settings, **options) -> str:
        """The scheduler's configuration lines that enable vmwrap."""


@runtime_checkable
class Drainable(Protocol):
    """What `vmwrap drain` (vmwrap.drain) asks of a scheduler beyond `Scheduler`, a separate contract
    so adapters without it still satisfy `Scheduler` (drain then says it is not supported)."""

    def node_jobs(self, node: str) -> dict[str, bool]:
        """Every job running (or still completing) on `node`: id -> whether it runs in a vmwrap VM.
        VmwrapError naming the node when the scheduler has no such node."""

    def drain_node(self, node: str, reason: str) -> None:
        """Start no new job on `node` (running jobs go on), with `reason` where the scheduler keeps
        one. VmwrapError if refused."""

    # Optional: `pinned_jobs(node) -> set[str]`, the jobs on `node` that asked for it by name. Requeued,
    # they wait for the node to come back: drain says so (an adapter without it warns of nothing).


@dataclass(frozen=True)
class PeerRun:
    """What `peer_job` found: the job as this node's VM of it must be booted, which run of the job the
    caller is of (a restart on this node is another: its VM is not this one's), and a look the agent
    repeats every few seconds while the VM runs, False once the scheduler no longer runs that run on
    this node (no epilog runs here either: the agent then tears the VM down). The look may raise when
    unsure: the VM then stays, until a later look or `vmwrap reconcile`."""
    job: Job
    run: str
    running: Callable[[], bool]


@runtime_checkable
class PeerStarting(Protocol):
    """For schedulers that run no hook on a job's other nodes (Grid Engine's slave hosts of a tightly
    integrated parallel job): the node agent's `peer` request boots this node's VM of the job for the
    job's first task here (vmwrap.agent)."""

    def peer_job(self, settings: Settings, pid: int, uid: int, job_id: str) -> PeerRun:
        """UserError unless process `pid` (the caller, from the kernel) is a task of `job_id` (the
        job's canonical id) on this node by the scheduler's own records, runs as `uid`, and `uid` owns
        the job; the VM's CPUs, memory and node list from the scheduler, never from the task."""


def _own_entry_point(group: str, name: str) -> str | None:
    """vmwrap's own entry point `name` of `group` ("module:attr"), read from the first vmwrap dist-info
    on sys.path, as importlib.metadata would find it, without importing importlib.metadata: that costs
    tens of milliseconds on every hook call, twice on every job's start path. None if not there."""
    for entry in sys.path:
        try:
            dist = next((n for n in os.listdir(entry or ".") if n.startswith("vmwrap-") and n.endswith(".dist-info")),
                        None)
        except OSError:
            continue
        if dist is None:
            continue
        try:
            with open(os.path.join(entry or ".", dist, "entry_points.txt"), encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError:
            return None
        section = None
        for line in lines:
            line = line.strip()
            if line.startswith("[") and line.endswith("]"):
                section = line[1:-1].strip()
            elif section == group and "=" in line:
                key, _, value = line.partition("=")
                if key.strip() == name:
                    return value.strip()
        return None
    return None


def _load(group: str, name: str):
    """The object entry point `name` of `group` names: vmwrap's own first, then any distribution's."""
    value = _own_entry_point(group, name)
    if value is not None:
        return pkgutil.resolve_name(value.split("[")[0].strip())
    from importlib.metadata import entry_points
    for ep in entry_points(group=group, name=name):
        return ep.load()
    return None


def _instance(obj):
    return obj() if isinstance(obj, type) else obj


def schedulers() -> dict[str, Scheduler]:
    """Every installed scheduler adapter by name."""
    from importlib.metadata import entry_points
    found = {}
    for ep in entry_points(group=GROUP):
        inst = _instance(ep.load())
        found[inst.name] = inst
    return found


def scheduler(name: str) -> Scheduler:
    inst = _instance(_load(GROUP, name))
    if inst is not None and getattr(inst, "name", None) == name:
        return inst
    found = schedulers()
    if name not in found:
        raise NodeError(f"no scheduler adapter {name!r} installed (have: {', '.join(sorted(found)) or 'none'})")
    return found[name]


def cli_names() -> list[str]:
    """The names of the commands plugins add to `vmwrap` (e.g. `vmwrap slurm ...`), none loaded."""
    from importlib.metadata import entry_points
    return [ep.name for ep in entry_points(group=CLI_GROUP)]


def cli_group(name: str):
    """The plugin command `vmwrap NAME` (a click command or group), None if no plugin adds one."""
    return _load(CLI_GROUP, name)
