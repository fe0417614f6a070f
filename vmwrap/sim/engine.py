"""Discrete-event simulation of a cluster running batch jobs and advance reservations (ARs).

Model (HPDC'08, Sotomayor et al., unless a setting says otherwise):
- nodes are whole units: a job or AR takes `nodes` nodes exclusively;
- batch jobs: FCFS with backfilling, EASY (one reservation, for the queue head), conservative
  (one for every queued job) or Haizea's aggressive backfilling (one future lease, booked like a
  reservation); the scheduler knows requested times only;
- ARs are accepted when requested (on nodes free of other ARs and, without suspension, of running
  jobs that would still run at the AR's start) and start exactly on time or are rejected;
- with suspension a job may run into an AR's window: it is saved so the save ends at the AR's start
  (`vmwrap.plan`, the same decision the live planner uses), re-queued in its original position, and
  restored later on any nodes (a memory copy over the network when the nodes differ);
- VMs add boot+shutdown time and a runtime slowdown; images come from one repository over one link
  (transfers serialized, multicast to several nodes counts once; AR transfers are booked backwards
  from the AR's start, earliest deadline first; batch transfers forward, first come first served);
  node caches hold `cache_mb` of images, least recently used out, never an image in use.
"""

from __future__ import annotations

import bisect
import heapq
import math
import operator
from collections import OrderedDict, defaultdict
from itertools import compress, count, islice
from dataclasses import dataclass, field

from ..plan import SaveModel, min_gap
from .workload import Job, Reservation

INF = math.inf
_END_OF = operator.itemgetter(1)
EPS = 1e-6   # a job ending this close after a reservation's start ended in time (float sums)


@dataclass(frozen=True)
class Cluster:
    nodes: int = 144
    mem_mb: float = 1024.0          # a job's memory per node: what a save writes
    cache_mb: float = 20480.0
    bandwidth_mb_s: float = 10.0    # image repository link, and node-to-node memory copies
    suspend_mb_s: float = 50.0
    restore_mb_s: float | None = None   # None: as fast as a save (the paper's one rate)
    boot_s: float = 20.0            # VM boot + shutdown
    overhead: float = 0.05          # runtime slowdown inside a VM
    image_mb: float = 4096.0
    # A job resumed on other nodes first gets its memory copied (mem_mb at bandwidth_mb_s).
    # nodes: the copy holds the destination nodes (our model). delay: it holds no node, the job
    # just cannot start again before the copy's time after its save, as in Haizea's code of the
    # commit that added the HPDC'08 profile file (af1dfa1c, 5 June 2008; the runs themselves are
    # not dated): slottable.py fitBestEffort sets the earliest start of a resumption to now +
    # estimateMigrationTime, and scheduler.py schedules no migration ("TODO: Migrating")
    migration: str = "nodes"

    def __post_init__(self) -> None:
        if self.migration not in ("nodes", "delay"):
            raise ValueError(f"migration must be nodes or delay, not {self.migration!r}")


@dataclass(frozen=True)
class Config:
    """One way to run the cluster. `transfer`: none (images predeployed), fresh (every start
    transfers, no reuse), cache (node caches). `placement`: any, or cache (prefer nodes holding the
    image). `prestage`: fetch the queue head's image onto its planned nodes before it starts.
    `backfill`: easy, conservative, none, or haizea: Haizea's aggressive backfilling (its
    HPDC'08 setting), where the first job that cannot start is booked at its earliest start like
    a reservation (one such future lease at a time: lease_scheduler.py __process_queue,
    vm_scheduler.py __schedule_asap, can_schedule_in_future), later jobs may run into that
    booking and be saved before it as before a reservation, and the booking is redone whenever
    a job ends before its requested time (lease_scheduler.py reevaluate_schedule)."""
    name: str
    vm: bool = False
    suspend: bool = False
    transfer: str = "none"
    images: str = "uniform"
    backfill: str = "easy"
    placement: str = "any"
    prestage: bool = False
    threshold: float = 1.0          # suspend-threshold-factor
    reservations: bool = True       # False: drop the ARs (the baseline)
    # hold: a job takes its nodes when its transfer is booked and holds them while the image
    # arrives (vmwrap's prolog fetch on Slurm). overlap: Haizea's way, the transfer uses only the
    # link and the job's nodes are booked from the image's arrival, free for earlier work till then
    # (haizea imagetransfer.py find_earliest_starting_times; vm_scheduler.py __schedule_asap).
    staging: str = "hold"
    # Without suspension, a reservation that does not fit on idle nodes may take nodes running
    # batch jobs: they are cancelled when the reservation is accepted, back in line at their
    # original place, their work lost (Haizea, June 2008, af1dfa1c: scheduler.py
    # scheduleExactLease -> slottable.py fitExact(canpreempt=True) -> scheduler.py preempt, "The
    # lease has to be cancelled and resubmitted", queue.enqueueInOrder by lease id). Off: a
    # reservation only takes nodes whose jobs end in time (our model).
    cancel: bool = False
    # Which of the nodes a job fits on it takes. fit: those whose next commitment comes soonest
    # (best fit; our model). haizea: Haizea's mapping of June 2008 (af1dfa1c, slottable.py
    # fitBestEffort step 4 and AvailabilityWindow.findPhysNodesForVMs): the lease runs to the
    # latest end k nodes allow (its whole request if it can), on the lowest-numbered nodes free
    # until then; a resumed lease takes its last nodes first.
    mapping: str = "fit"
    # backfill=haizea: when the one future lease's place is free again. start: when the booked
    # lease starts (Haizea since 2009: vm_scheduler.py _handle_start_vm removes it from
    # future_leases). end: when its VM stops (ends, is saved or cancelled), as in Haizea's code of
    # spring 2008 (1da0e66 of 19 May and af1dfa1c: scheduler.py handleEndVM decrements
    # numbesteffortres for a VM reservation made in the future, handleStartVM does not); until
    # then later jobs can only start now.
    future_until: str = "start"

    def __post_init__(self) -> None:
        if self.future_until not in ("start", "end"):
            raise ValueError(f"future_until must be start or end, not {self.future_until!r}")
        if self.mapping not in ("fit", "haizea"):
            raise ValueError(f"mapping must be fit or haizea, not {self.mapping!r}")
        if self.transfer not in ("none", "fresh", "cache"):
            raise ValueError(f"transfer must be none, fresh or cache, not {self.transfer!r}")
        if self.backfill not in ("easy", "conservative", "none", "haizea"):
            raise ValueError(f"backfill must be easy, conservative, none or haizea, not {self.backfill!r}")
        if self.backfill == "haizea" and self.staging != "hold":
            raise ValueError("backfill=haizea is for configurations without image staging")
        if self.placement not in ("any", "cache"):
            raise ValueError(f"placement must be any or cache, not {self.placement!r}")
        if not self.vm and self.transfer != "none":
            raise ValueError("image transfers need vm=True")
        if self.staging not in ("hold", "overlap"):
            raise ValueError(f"staging must be hold or overlap, not {self.staging!r}")
        if self.cancel and self.suspend:
            raise ValueError("cancel is for configurations without suspension (with it jobs are saved)")


class Run:
    """A batch job's changing state."""
    __slots__ = ("job", "work_left", "req_left", "nodes", "start", "work_start", "end", "req_end",
                 "token", "first_start", "last_nodes", "suspensions", "done", "ready", "worked", "claim")

    def __init__(self, job: Job):
        self.job = job
        self.work_left = float(job.run)
        self.req_left = float(job.req)
        self.nodes: tuple[int, ...] = ()
        self.start = self.work_start = self.end = self.req_end = INF
        self.token = 0
        self.first_start = None
        self.last_nodes: tuple[int, ...] = ()
        self.suspensions = 0
        self.done = None
        self.ready = 0.0
        self.worked = 0.0      # bare seconds of work actually executed, from time spent running
        self.claim = None      # a booked start on nodes, waiting for its image (staging=overlap)

    @property
    def key(self):
        return (self.job.submit, self.job.id)


@dataclass
class Result:
    config: str
    end: float = 0.0                      # when the last batch job finished
    jobs: int = 0
    mean_wait: float = 0.0
    mean_bsld: float = 0.0
    utilization: float = 0.0              # useful node-seconds / (nodes x end)
    ars_accepted: int = 0
    ars_rejected: int = 0
    ars_on_time: int = 0                  # ARs started; never late (a busy node raises InvariantError)
    suspensions: int = 0
    cancelled: int = 0                    # jobs whose users gave up before they started (trace)
    killed: int = 0                       # runs cancelled for a reservation (Config.cancel)
    killed_work: float = 0.0              # node-seconds of work those runs lost
    transfers: int = 0
    link_mb: float = 0.0                  # bytes over the repository link
    node_mb: float = 0.0                  # bytes landing on nodes (multicast counted per node)
    events: int = 0
    timeline: list = field(default_factory=list)   # (time, busy nodes) steps
    rejected: list = field(default_factory=list)   # (ar id, reason)
    records: dict = field(default_factory=dict)    # job id -> (first start, end, suspensions)

    def row(self) -> dict:
        return {k: getattr(self, k) for k in (
            "config", "end", "jobs", "mean_wait", "mean_bsld", "utilization", "ars_accepted",
            "ars_rejected", "ars_on_time", "suspensions", "cancelled", "transfers", "link_mb",
            "node_mb", "events")}


class InvariantError(AssertionError):
    pass


class _Claim:
    """A job's start booked on nodes for when its image arrives (staging=overlap). It sits in the
    nodes' commitment lists like a reservation, so earlier work fits around it (and with
    suspension is saved before it), as Haizea's slot table does with a future lease."""
    __slots__ = ("id", "start", "dur", "run", "nodes", "cancelled")

    def __init__(self, cid: int, start: float, dur: float, run: Run, nodes: tuple[int, ...]):
        self.id, self.start, self.dur, self.run, self.nodes = cid, start, dur, run, nodes
        self.cancelled = False


class _Blocks(dict):
    """Per-node intervals promised to queued jobs (conservative; EASY's only for staging=overlap's
    _free_at); `easy` = (time, nodes, end) of EASY's one promise. Computed eagerly: a later pass
    whose queue is empty keeps it for later arrivals, so a deferred one would be computed on
    another cluster."""
    easy = None


class _Link:
    """The repository link: booked intervals, sorted and disjoint, each carrying one image to any
    number of nodes (multicast): a transfer that has not started yet can take more destinations."""

    def __init__(self):
        self.iv: list[tuple[float, float]] = []
        self.img: dict[float, int] = {}       # booking start -> image
        self._memo = None                     # (t, length, earliest): asked once per queued job

    def joinable(self, now: float, img: int) -> float | None:
        """End of a booked, not yet started transfer of `img`, if any."""
        for s, e in self.iv:
            if s >= now and self.img.get(s) == img:
                return e
        return None

    def prune(self, now: float) -> None:
        i = 0
        while i < len(self.iv) and self.iv[i][1] <= now:
            i += 1
        if i:
            self._memo = None
            for s, _ in self.iv[:i]:
                self.img.pop(s, None)
            del self.iv[:i]

    def earliest(self, t: float, length: float) -> float:
        m = self._memo
        if m is not None and m[0] == t and m[1] == length:
            return m[2]
        t0 = t
        for s, e in self.iv:
            if e <= t:
                continue
            if s >= t + length:
                break
            t = max(t, e)
        self._memo = (t0, length, t)
        return t

    def latest(self, deadline: float, length: float, not_before: float) -> float | None:
        t = deadline - length
        for s, e in reversed(self.iv):
            if s >= t + length:
                continue
            if e <= t:
                break
            t = s - length
        return t if t >= not_before else None

    def book(self, s: float, length: float, img: int) -> None:
        self._memo = None
        bisect.insort(self.iv, (s, s + length))
        self.img[s] = img


# event kinds, in the order they are handled at one instant: things that free nodes first
_END, _SUSPENDED, _AR_END, _CACHED, _PREEMPT, _AR_START, _CLAIM, _AR_SUBMIT, _SUBMIT, _CANCEL = range(10)


def _windows(later, need: float, horizon: float):
    """Each node in `later` (node, release, commitments) has windows [open, close] in which a
    start needing `need` fits before its next commitment: those opening by `horizon`, as
    (opens, closes, (open, close, node))."""
    opens: list[float] = []
    closes: list[float] = []
    wins: list[tuple[float, float, int]] = []
    for n, cur, iv in later:
        for bs, be in iv:
            if cur > horizon:
                break
            if be <= cur:
                continue
            if bs - cur >= need:
                opens.append(cur)
                closes.append(bs - need)
                wins.append((cur, bs - need, n))
            cur = be
        if cur <= horizon:
            opens.append(cur)
            wins.append((cur, INF, n))
    return opens, closes, wins


def _lower_from(table: list[float], k: int, q: float) -> int:
    """Lower a non-decreasing table of negated requests to q from index k on (a failed request of k
    nodes); returns where it was already as low."""
    m = bisect.bisect_left(table, q, k)
    table[k:m] = [q] * (m - k)
    return m


def _first_overlap(opens, closes, wins, srel, snode, k: int, horizon: float):
    """First time at most `horizon` in k nodes' windows (`_windows`; a node in `srel`/`snode` is
    free from its release on), and those nodes; (None, None) if none. Counting over two sorted
    float lists finds it without sorting tuples."""
    opens += [r for r in srel if r <= horizon]
    opens.sort()
    closes.sort()
    j, nc, no = 0, len(closes), len(opens)
    i = 0
    while i < no:
        t = opens[i]
        while i + 1 < no and opens[i + 1] == t:
            i += 1
        while j < nc and closes[j] < t:
            j += 1
        if i + 1 - j >= k:
            have = [m for r, m in zip(srel, snode) if r <= t]
            have += [m for o, c, m in wins if o <= t <= c]
            return t, have
        i += 1
    return None, None


class Simulator:
    def __init__(self, cluster: Cluster, config: Config, jobs: list[Job], ars: list[Reservation],
                 save: SaveModel | None = None, timeline: bool = True, check: bool = False):
        self.c, self.cfg = cluster, config
        self.check = check
        for j in jobs:
            if j.nodes > cluster.nodes:
                raise ValueError(f"job {j.id} asks for {j.nodes} nodes; the cluster has {cluster.nodes}")
        self.jobs = jobs
        self.ars = ars if config.reservations else []
        self.save = save or SaveModel(cluster.suspend_mb_s)
        self.susp_s = self.save.budget(cluster.mem_mb)
        # plan.min_gap's constants (min_run_s 0): the work a save must buy, and the save's budget
        self._gap_n = (max(0.0, config.threshold * (self.susp_s + self.save.save_seconds(cluster.mem_mb)))
                       if config.suspend else None)
        self._gap_b = self.susp_s
        self.resume_s = (cluster.mem_mb / cluster.restore_mb_s if cluster.restore_mb_s
                         else self.save.save_seconds(cluster.mem_mb))
        self.slow = 1.0 + cluster.overhead if config.vm else 1.0
        self.boot = cluster.boot_s if config.vm else 0.0
        self.xfer_s = cluster.image_mb / cluster.bandwidth_mb_s
        self.migrate_s = cluster.mem_mb / cluster.bandwidth_mb_s
        # migration=delay: the copy costs no node time, the job waits for it out of line
        # (Haizea's migrate = mem+vm copies the VM's image too: datastruct.py estimateMigrationTime)
        self.requeue_s = ((cluster.mem_mb + (cluster.image_mb if config.vm else 0.0)) / cluster.bandwidth_mb_s
                          if cluster.migration == "delay" else 0.0)
        if self.requeue_s:
            self.migrate_s = 0.0
        self.slots = int(cluster.cache_mb // cluster.image_mb)
        n = cluster.nodes
        self.busy: list = [None] * n
        self.free: set[int] = set(range(n))
        self.node_ars: list[list[Reservation]] = [[] for _ in range(n)]
        self.node_iv: list[list[tuple[float, float]]] = [[] for _ in range(n)]   # same, as (start, end)
        self.cache: list[OrderedDict] = [OrderedDict() for _ in range(n)]
        self.holders: dict[int, set] = defaultdict(set)       # image -> nodes caching it
        self.incoming: list[dict] = [{} for _ in range(n)]   # image -> arrival (prestage / AR)
        self.ar_nodes: dict[int, tuple[int, ...]] = {}
        self.queue: list[Run] = []
        self.keys: list = []
        self.qnodes: list[int] = []     # the queue's node counts (_schedule skips the large ones in C)
        self.qreq: list[float] = []     # and requests left (-inf: a saved job, never dominated)
        self.link = _Link()
        self.ev: list = []
        self.seq = 0
        self.res = Result(config.name)
        self.track = timeline
        self.busy_count = 0
        self.prestaged: dict[int, tuple] = {}
        self.useful = 0.0
        self._gap_cache = None
        self._done = 0
        self._dirty = True
        self._fresh: list[Run] = []
        self._blocks = None
        self._ahead = 3600.0        # _reserve's first horizon, from its last answer
        self._ver = 0               # bumped whenever a node's occupant or commitments change
        self._last_promise = None   # (head, its request left, suspensions, _ver, t, nodes)
        self._future: _Claim | None = None   # backfill=haizea: the one future lease
        self._future_run: Run | None = None  # its lease once started, with future_until=end
        self._reeval = False        # a job ended before its requested time (backfill=haizea)
        self._claims = 0            # booked starts (_Claim) in the nodes' commitment lists
        # EASY's promise is read only through `_Blocks.easy` (per-node intervals: _free_at's)
        self._easy_only = config.backfill == "easy" and config.staging != "overlap"
        self._overlap = config.staging == "overlap"
        # within one pass of _schedule, per image: the shortest request (negated) that failed on the
        # image's holders among jobs of at most k nodes; reset when a job starts
        self._held_fail: dict[int, list[float]] | None = None

    # -- events ---------------------------------------------------------------------------------
    def _push(self, t: float, kind: int, obj) -> None:
        self.seq += 1
        heapq.heappush(self.ev, (t, kind, self.seq, obj))

    def run(self) -> Result:
        for j in self.jobs:
            run = Run(j)
            self._push(j.submit, _SUBMIT, run)
            if j.cancel_at is not None:
                self._push(j.cancel_at, _CANCEL, run)
        for r in self.ars:
            self._push(r.submit, _AR_SUBMIT, r)
        remaining = len(self.jobs)
        now = 0.0
        while self.ev and self._done < remaining:
            now = self.ev[0][0]
            while self.ev and self.ev[0][0] == now:
                _, kind, _, obj = heapq.heappop(self.ev)
                self.res.events += 1
                if kind != _SUBMIT:
                    self._dirty = True
                if kind == _END:
                    run, token = obj
                    if token == run.token:
                        self._finish(run, now)
                elif kind == _SUSPENDED:
                    self._suspended(obj, now)
                elif kind == _CACHED:
                    nodes, img, arrival = obj
                    for n in nodes:
                        if self.incoming[n].get(img) == arrival:
                            del self.incoming[n][img]
                            self._cache_add(n, img)
                elif kind == _PREEMPT:
                    self._preempt(obj, now)
                elif kind == _AR_START:
                    self._ar_start(obj, now)
                elif kind == _CLAIM:
                    self._claim_start(obj, now)
                elif kind == _AR_END:
                    self._ar_end(obj, now)
                elif kind == _AR_SUBMIT:
                    self._ar_submit(obj, now)
                elif kind == _CANCEL:
                    self._cancel(obj, now)
                else:
                    self._enqueue(obj)
                    self._fresh.append(obj)
            self._schedule(now)
            if self.check:
                self._check(now)
        if self._done < remaining:
            raise InvariantError(f"{remaining - self._done} batch jobs never finished")
        return self._result()

    # -- batch jobs -----------------------------------------------------------------------------
    def _enqueue(self, run: Run) -> None:
        i = bisect.bisect(self.keys, run.key)
        self.keys.insert(i, run.key)
        self.queue.insert(i, run)
        self.qnodes.insert(i, run.job.nodes)
        self.qreq.insert(i, -INF if run.suspensions else run.req_left)

    def _dequeue(self, i: int) -> None:
        del self.queue[i]
        del self.keys[i]
        del self.qnodes[i]
        del self.qreq[i]

    def _cancel(self, run: Run, now: float) -> None:
        """Its user gave up waiting (as in the trace): gone if it never started, else it runs on."""
        if run.first_start is not None or run.done is not None or run.claim is not None:
            return
        i = bisect.bisect_left(self.keys, run.key)
        if i < len(self.queue) and self.queue[i] is run:
            self._dequeue(i)
        if run in self._fresh:
            self._fresh.remove(run)
        run.done = now
        self._done += 1
        self.res.cancelled += 1

    def _finish(self, run: Run, now: float) -> None:
        run.worked += (now - run.work_start) / self.slow
        if abs(run.worked - run.job.run) > 1e-6 * max(1.0, run.job.run):
            raise InvariantError(f"job {run.job.id} ran {run.worked:.3f}s of work, needs {run.job.run}s")
        self._release(run.nodes, now, run.job.image)
        self._vm_stopped(run)
        if run.end < run.req_end:
            self._reeval = True
        run.done = now
        run.token += 1
        self._done += 1
        self.useful += run.job.run * run.job.nodes
        self.res.records[run.job.id] = (run.first_start, now, run.suspensions)

    def _release(self, nodes, now: float, img: int | None) -> None:
        self._gap_cache = None
        self._ver += 1
        for n in nodes:
            self.busy[n] = None
            self.free.add(n)
        self._busy(now, -len(nodes))

    def _busy(self, now: float, delta: int) -> None:
        self.busy_count += delta
        if self.track:
            tl = self.res.timeline
            if tl and tl[-1][0] == now:
                tl[-1] = (now, self.busy_count)
            else:
                tl.append((now, self.busy_count))

    def _next_ar(self, n: int, t: float) -> Reservation | None:
        """The first AR on node n that has not ended by t."""
        lst = self.node_ars[n]
        while lst and lst[0].start + lst[0].dur <= t:
            lst.pop(0)
            self.node_iv[n].pop(0)
        return lst[0] if lst else None

    def _until(self, n: int, now: float) -> float:
        r = self._next_ar(n, now)
        return r.start if r else INF

    def _has(self, n: int, img: int) -> bool:
        return self.cfg.transfer == "none" or (self.cfg.transfer == "cache" and img in self.cache[n])

    def _setup(self, run: Run, nodes) -> float:
        s = self.boot
        if run.suspensions:
            s = self.resume_s + (self.migrate_s if set(nodes) != set(run.last_nodes) else 0.0)
        return s

    def _need(self, run: Run, setup: float) -> float:
        """Shortest gap this job may start in (vmwrap.plan decides, as the live planner does):
        `plan.min_gap` with its constants taken once, the same float operations in the same order
        (a million calls a workload; `--check` compares the two on every call)."""
        whole = setup + run.req_left * self.slow
        if self._gap_n is None:
            need = whole
        else:
            need = min(whole, setup + self._gap_n + self._gap_b)
        if self.check:
            ref = min_gap(run.req_left * self.slow, self.c.mem_mb, self.save, setup_s=setup,
                          factor=self.cfg.threshold, can_save=self.cfg.suspend)
            if ref != need:
                raise InvariantError(f"gap for job {run.job.id}: {need} != plan.min_gap's {ref}")
        return need

    def _gaps(self, now: float) -> list:
        """Free nodes by how long they stay free (longest first); cached until the free set changes.
        The third item counts, per prefix, the nodes reserved for the queue head (EASY)."""
        if self._gap_cache is None:
            node_ars = self.node_ars
            pairs = []
            for n in self.free:     # self._until(n, now) - now, inlined: once per free node and pass
                lst = node_ars[n]
                if not lst:
                    pairs.append((INF, n))
                    continue
                r = lst[0]
                if r.start + r.dur <= now:
                    r = self._next_ar(n, now)
                pairs.append((r.start - now if r else INF, n))
            pairs.sort(reverse=True)
            self._gap_cache = [[-g for g, _ in pairs], [n for _, n in pairs], None,
                               {n: g for g, n in pairs}]
        return self._gap_cache

    def _fits(self, run: Run, now: float, blocks: dict, ready: float, among=None) -> list[int]:
        """Free nodes this job could start on now, given when its image is ready (only nodes in
        `among`, when given)."""
        setup = (ready - now) + (self.resume_s + self.migrate_s if run.suspensions else self.boot)
        need = self._need(run, setup)
        cache = self._gaps(now)
        k = run.job.nodes
        if among is not None:
            occ_end = now + setup + run.req_left * self.slow
            gap = cache[3]
            out = [n for n in among if gap[n] >= need]
            if len(out) < k:
                return []
            easy = blocks.easy
            if easy is not None or not blocks:   # no blocks, or EASY's one interval (t, e)
                if easy is not None and easy[0] < occ_end and now < easy[2]:
                    reserved = easy[1]
                    out = [n for n in out if n not in reserved]
                return out if len(out) >= k else []
            out = []
            for n in among:
                if gap[n] >= need:
                    b = blocks.get(n)
                    if not (b and any(s < occ_end and now < e for s, e in b)):
                        out.append(n)
            return out if len(out) >= k else []
        neg, nodes = cache[0], cache[1]
        m = bisect.bisect_right(neg, -need)     # nodes free for at least `need`
        if m < k:
            return []
        if blocks.easy is None and not blocks:
            return nodes[:m]
        occ_end = now + setup + run.req_left * self.slow
        if blocks.easy is not None:   # O(1) count before building the list
            t, reserved, e = blocks.easy
            if occ_end <= t:
                return nodes[:m]
            if cache[2] is None:
                pre = [0]
                for n in nodes:
                    pre.append(pre[-1] + (n in reserved))
                cache[2] = pre
            if m - cache[2][m] < k:
                return []
            # EASY's blocks are the head's one interval (t, e) on each reserved node
            if now < e:
                return [n for n in nodes[:m] if n not in reserved]
            return nodes[:m]
        out = []
        for n in nodes[:m]:
            b = blocks.get(n)
            if b and any(s < occ_end and now < e for s, e in b):
                continue
            out.append(n)
        return out

    def _pick(self, run: Run, cands: list[int], now: float) -> list[int]:
        img = run.job.image
        prefer_cache = self.cfg.placement == "cache" and self.cfg.transfer == "cache"
        last = set(run.last_nodes)
        if self.cfg.mapping == "haizea":
            return self._pick_haizea(run, cands, now, last)

        def key(n):
            return (n not in last, (img not in self.cache[n]) if prefer_cache else False,
                    self.busy[n] is None, self._until(n, now), n)
        return sorted(cands, key=key)[:run.job.nodes]

    def _pick_haizea(self, run: Run, cands: list[int], now: float, last: set) -> list[int]:
        """Haizea's mapping (Config.mapping): the end is the k-th longest free time among the
        candidates, capped at the whole request; the nodes free until then, the last ones first,
        then by number."""
        k = run.job.nodes
        gap = self._gaps(now)[3]
        setup = self.resume_s + self.migrate_s if run.suspensions else self.boot
        whole = setup + run.req_left * self.slow
        end = min(whole, sorted((gap[n] for n in cands), reverse=True)[k - 1])
        canfit = sorted(n for n in cands if gap[n] >= end)
        return sorted(canfit, key=lambda n: n not in last)[:k]

    def _try_start(self, run: Run, now: float, blocks: dict, general: bool = True) -> bool:
        """Start `run` now if it fits. `general=False` skips the image-independent path (any free
        node, with a transfer if needed): the caller knows a smaller, shorter job just failed it."""
        k = run.job.nodes
        if len(self.free) < k and not self._overlap:
            return False
        img = run.job.image
        transfer = self.cfg.transfer
        if transfer == "none":
            if not general:
                return False
            cands = self._fits(run, now, blocks, now, None)
            if len(cands) < k:
                return False
            return self._start(run, self._pick(run, cands, now), now, now)
        held = ()
        failed = self._held_fail if not run.suspensions else None
        if transfer == "cache" and len(self.free) >= k:
            f = failed.get(img) if failed is not None else None
            if f is None or f[k] < -run.req_left:
                held = self.holders[img]
                held = held & self.free if len(held) >= k else ()
                if len(held) >= k:
                    # nodes that already hold the image, then any node with a transfer (or prestage) first
                    cands = self._fits(run, now, blocks, now, held)
                    if len(cands) >= k:
                        return self._start(run, self._pick(run, cands, now), now, now)
                if failed is not None:
                    # a job of the image needing as many nodes or more, and a request as long or
                    # longer, fails on its holders too (its need and its end only grow): as fail_q
                    if f is None:
                        f = failed[img] = [-INF] * (self.c.nodes + 1)
                    _lower_from(f, k, -run.req_left)
        if not general:
            return False
        t_net = self.link.earliest(now, self.xfer_s) + self.xfer_s
        overlap = self._overlap
        cands = self._free_at(run, now, t_net, blocks) if overlap else self._fits(run, now, blocks, t_net, None)
        if len(cands) < k:
            return False
        chosen = self._pick(run, cands, now)
        ready = now
        lacking = []
        for n in chosen:
            if self._has(n, img):
                continue
            arr = self.incoming[n].get(img)
            if arr is not None and arr <= t_net:
                ready = max(ready, arr)
            else:
                lacking.append(n)
        if lacking:
            joined = self.link.joinable(now, img)
            if joined is not None and joined <= t_net:
                ready = max(ready, joined)
                self._transferred(len(lacking), link=False)
            else:
                s = self.link.earliest(now, self.xfer_s)
                self.link.book(s, self.xfer_s, img)
                ready = max(ready, s + self.xfer_s)
                self._transferred(len(lacking))
            if self.cfg.transfer == "cache":
                for n in lacking:
                    self.incoming[n][img] = ready
                self._push(ready, _CACHED, (tuple(lacking), img, ready))
        if overlap:   # the nodes were chosen free at t_net, not now
            self._book_claim(run, chosen, now, t_net)
            return True
        return self._start(run, chosen, now, ready)

    def _free_at(self, run: Run, now: float, t: float, blocks: dict) -> list[int]:
        """Nodes `run` could start on at t, whatever runs on them now: Haizea maps a lease at
        its image's arrival (vm_scheduler.py __schedule_asap, changepoints from `earliest`)."""
        setup = self.resume_s + self.migrate_s if run.suspensions else self.boot
        need = self._need(run, setup)
        out = []
        for n in range(self.c.nodes):
            occ = self.busy[n]
            if isinstance(occ, Run):
                rel = occ.req_end
            elif isinstance(occ, tuple):
                rel = occ[2]
            elif occ is not None:
                rel = occ.start + occ.dur
            else:
                rel = now
            if rel > t:
                continue
            iv = self.node_iv[n]
            b = blocks.get(n) if blocks else None
            if b:
                iv = iv + b
            if all(be <= t or bs - t >= need for bs, be in iv):
                out.append(n)
        return out

    def _book_claim(self, run: Run, nodes: list[int], now: float, ready: float,
                    staged: bool = True) -> _Claim:
        """Book `run` on `nodes` from `ready`; `staged`: its image transfer starts now (it counts
        as started), else a future lease (backfill=haizea)."""
        self._gap_cache = None
        self._ver += 1
        self.seq += 1
        dur = self._setup(run, nodes) + run.req_left * self.slow
        c = _Claim(-self.seq, ready, dur, run, tuple(nodes))
        run.claim = c
        self._claims += 1
        if staged and run.first_start is None:
            run.first_start = now
        for n in nodes:
            bisect.insort(self.node_ars[n], c, key=lambda a: a.start)
            bisect.insort(self.node_iv[n], (c.start, c.start + c.dur))
        self.ar_nodes[c.id] = c.nodes
        if self.cfg.suspend:
            self._push(max(now, ready - self.susp_s), _PREEMPT, c)
        self._push(ready, _CLAIM, c)
        return c

    def _unclaim(self, c: _Claim) -> None:
        for n in c.nodes:
            i = self.node_ars[n].index(c)
            del self.node_ars[n][i]
            self.node_iv[n].remove((c.start, c.start + c.dur))
        self.ar_nodes.pop(c.id, None)
        self._claims -= 1
        c.run.claim = None
        self._gap_cache = None
        self._ver += 1

    def _claim_start(self, c: _Claim, now: float) -> None:
        if c.cancelled:
            return
        if c is self._future:
            self._future = None
            if self.cfg.future_until == "end":
                self._future_run = c.run
        self._unclaim(c)
        for n in c.nodes:
            occ = self.busy[n]
            if isinstance(occ, Run) and occ.end - now <= EPS * max(1.0, now):
                self._finish(occ, occ.end)
            if self.busy[n] is not None:
                raise InvariantError(f"job {c.run.job.id}'s booked start at {now}: node {n} is busy")
        self._start(c.run, list(c.nodes), now, now)

    def _drop_claim(self, c: _Claim) -> None:
        """A reservation took its nodes (Haizea's ARs preempt best-effort leases): back in line."""
        c.cancelled = True
        if c is self._future:
            self._future = None
        self._unclaim(c)
        if not c.run.suspensions:
            c.run.first_start = None
        self._enqueue(c.run)

    def _transferred(self, nodes: int, link: bool = True) -> None:
        if link:
            self.res.transfers += 1
            self.res.link_mb += self.c.image_mb
        self.res.node_mb += self.c.image_mb * nodes

    def _start(self, run: Run, nodes: list[int], now: float, ready: float) -> bool:
        self._gap_cache = None
        self._ver += 1
        for n in nodes:
            if self.busy[n] is not None:
                raise InvariantError(f"node {n} over-committed at {now}")
            self.busy[n] = run
            self.free.discard(n)
            if self.cfg.transfer == "cache" and run.job.image in self.cache[n]:
                self.cache[n].move_to_end(run.job.image)
        self._busy(now, len(nodes))
        setup = self._setup(run, nodes)
        run.nodes = tuple(nodes)
        run.start = now
        run.work_start = ready + setup
        run.end = run.work_start + run.work_left * self.slow
        run.req_end = run.work_start + run.req_left * self.slow
        if run.first_start is None:
            run.first_start = now
        run.token += 1
        self._push(run.end, _END, (run, run.token))
        return True

    # -- scheduling pass ------------------------------------------------------------------------
    def _schedule(self, now: float) -> None:
        self._gap_cache = None      # node gaps are relative to now
        haizea = self.cfg.backfill == "haizea"
        if haizea and self._reeval:
            self._reevaluate(now)
        # with staging=overlap a job may be booked on busy nodes, so a pass is worth it anyway;
        # so may Haizea's future lease
        anyfree = self.cfg.staging == "overlap" or (haizea and self._future is None
                                                    and self._future_run is None)
        if not self.queue or not (self.free or anyfree):
            self._dirty = False
            self._fresh.clear()
            return
        self.link.prune(now)
        if not self._dirty and self.cfg.backfill in ("easy", "haizea") and self._blocks is not None:
            # only arrivals since the last pass: the jobs before them would fail again (nothing
            # freed, gaps only shrank), so try the newcomers against the same promise
            blocks = self._blocks
            for run in self._fresh:
                i = bisect.bisect_left(self.keys, run.key)
                if (self.free or anyfree) and self._try_start(run, now, blocks):
                    self._dequeue(i)
            self._fresh.clear()
            return
        self._dirty = False
        self._fresh.clear()
        blocks = _Blocks()
        self._blocks = None
        head_done = haizea and (self._future is not None or self._future_run is not None)
        # Jobs that failed since the last start: a larger, longer job fails the same
        # image-independent test (with caches its own image may still let it start).
        # fail_q[k] = shortest request that failed among jobs of at most k nodes, negated (so the
        # table is non-decreasing and a failure's update is one bisect and one slice).
        fail_q = None
        held_only = self.cfg.transfer == "cache"
        holders = self.holders
        # after the head, EASY skips a job larger than the free nodes without a call: it fails
        # _try_start's first test, and fail_q needs no entry for it (whatever it would dominate
        # is as large, so fails that test too, until a start resets fail_q)
        skip_big = self.cfg.backfill in ("easy", "haizea") and self.cfg.staging != "overlap"
        free, queue = self.free, self.queue
        conservative = self.cfg.backfill == "conservative"
        nfree = len(free)      # changes in this loop only when a job starts
        qnodes, qreq = self.qnodes, self.qreq
        # after the head (skip_big): the indices from i of jobs of <= nfree nodes; without image
        # caches (a dominated job is skipped) only those fail_q does not dominate: request < thr[k],
        # the shortest failed one of as few nodes (-inf above nfree). The scan is lazy, so a failure
        # updating thr in place moves the bar for the jobs after it.
        fits = thr = None
        c_skip = skip_big and not held_only and not conservative
        nodes_n = self.c.nodes
        self._held_fail = {} if head_done else None
        i = 0
        while i < len(queue) and (nfree or anyfree):
            if head_done and skip_big:
                if fits is None:
                    if c_skip:
                        thr = ([INF] * (nfree + 1) if fail_q is None else [-x for x in fail_q[:nfree + 1]]) \
                            + [-INF] * (nodes_n - nfree)
                        fits = compress(count(i), map(operator.lt, islice(qreq, i, None),
                                                      map(thr.__getitem__, islice(qnodes, i, None))))
                    else:
                        fits = compress(count(i), map(nfree.__ge__, islice(qnodes, i, None)))
                i = next(fits, -1)
                if i < 0:
                    break
            run = queue[i]
            k = run.job.nodes
            dominated = fail_q is not None and not run.suspensions and fail_q[k] >= -run.req_left
            skip = dominated and (not held_only or len(holders[run.job.image]) < k)
            if dominated and not skip and self._held_fail:   # its image's holders failed it too
                f = self._held_fail.get(run.job.image)
                skip = f is not None and f[k] >= -run.req_left
            if skip and not conservative:
                i += 1
                continue
            if not skip and self._try_start(run, now, blocks, general=not dominated):
                self._dequeue(i)
                fail_q = None
                nfree = len(free)
                fits = None
                self._held_fail = {} if head_done else None
                continue
            if head_done and not run.suspensions and not dominated:
                if fail_q is None:
                    fail_q = [-INF] * (self.c.nodes + 1)
                m = _lower_from(fail_q, k, -run.req_left)
                if thr is not None:
                    hi = min(m, nfree + 1)
                    thr[k:hi] = [run.req_left] * (hi - k)
            if self.cfg.backfill == "none":
                break
            if self.cfg.backfill == "conservative" or not head_done:
                if not head_done:
                    self._held_fail = {}
                head_done = True
                if haizea:
                    t, nodes = self._reserve(run, now, blocks)
                    if t < INF:
                        self._dequeue(i)
                        self._future = self._book_claim(run, nodes, now, t, staged=False)
                        anyfree = False
                        fits = None
                        self._held_fail = {}
                        continue
                else:
                    self._promise(run, now, blocks)
            i += 1
        self._held_fail = None
        if haizea and (self._future is not None or self._future_run is not None):
            self._blocks = blocks   # arrivals alone can only start now: the clean path above

    def _reevaluate(self, now: float) -> None:
        """A job ended before its requested time: the future lease is booked again, first (it may
        start now), as Haizea's reevaluate_schedule does before the queue is walked."""
        self._reeval = False
        c = self._future
        if c is None:
            return
        self._future = None
        c.cancelled = True
        self._unclaim(c)
        run = c.run
        blocks = _Blocks()
        if self.free and self._try_start(run, now, blocks):
            return
        t, nodes = self._reserve(run, now, blocks)
        if t < INF:
            self._future = self._book_claim(run, nodes, now, t, staged=False)
        else:
            self._enqueue(run)

    def _promise(self, run: Run, now: float, blocks: _Blocks) -> None:
        """Book `run`'s earliest start in `blocks` (EASY's one promise or conservative's every)."""
        t, nodes = self._reserve(run, now, blocks)
        dur = run.req_left * self.slow + self._setup(run, ())
        if not self._easy_only:
            for n in nodes:
                blocks.setdefault(n, []).append((t, t + dur))
        if self.cfg.backfill == "easy":
            blocks.easy = (t, frozenset(nodes), t + dur)
            self._blocks = blocks
        if self.cfg.prestage and not run.suspensions and self.cfg.transfer != "none":
            self._prestage(run, t, nodes, now)

    def _reserve(self, run: Run, now: float, blocks: dict) -> tuple[float, list[int]]:
        """Earliest time `run` could start, and on which nodes (EASY's shadow time).

        Each node contributes windows [open, close] in which a start fits before its next
        commitment; the answer is the first open at which k windows overlap. Counting over two
        sorted float lists finds it without sorting tuples, the hot spot of a whole sweep.
        """
        # The same head on the same nodes after events that changed no node (an image cached, a
        # job cancelled, a reservation rejected): the answer t still holds if not yet past (only
        # free nodes' windows moved, to open at now, and those holding t still do; no earlier
        # time gained a node), so it is reused. Not with other promises in `blocks`.
        key = (run, run.req_left, run.suspensions, self._ver)
        last = self._last_promise
        if not blocks and last is not None and last[:4] == key and last[4] >= now:
            return last[4], list(last[5])
        t, nodes = self._shadow(run, now, blocks)
        if not blocks:
            self._last_promise = key + (t, tuple(nodes))
        return t, nodes

    def _shadow(self, run: Run, now: float, blocks: dict) -> tuple[float, list[int]]:
        """`_reserve` computed."""
        setup = self.boot + (self.resume_s + self.migrate_s if run.suspensions else 0.0)
        need = self._need(run, setup)
        # A node without commitments after its release has one window [rel, inf) (most nodes:
        # only rel is kept); the others' windows are collected up to a horizon. Windows opening
        # after it change no count before it, so an answer found there is the answer; else the
        # horizon grows, up to the k-th smallest last open (every node's last window opens at
        # its last commitment's end and never closes), where an answer exists. Reservations are
        # booked days ahead and walking all their windows was most of a sweep's time.
        srel: list[float] = []
        snode: list[int] = []
        later: list[tuple[int, float, list]] = []
        opens: list[float] = []
        closes: list[float] = []
        wins: list[tuple[float, float, int]] = []
        horizon = now + self._ahead
        busy, node_iv, node_ars = self.busy, self.node_iv, self.node_ars
        for n in range(self.c.nodes):
            occ = busy[n]
            iv = node_iv[n]
            if occ is None:
                rel = now
            elif isinstance(occ, Run):
                rel = occ.req_end
                if iv:   # self._until(n, now), inlined: one call per node and pass
                    ars = node_ars[n]
                    if ars[0].start + ars[0].dur <= now:
                        self._next_ar(n, now)
                    if ars and ars[0].start < rel:
                        rel = ars[0].start
                if rel < now:
                    rel = now
            elif isinstance(occ, tuple):   # ("suspending", run, until)
                rel = occ[2]
            else:                          # an AR
                rel = occ.start + occ.dur
            b = blocks.get(n) if blocks else None
            if b:
                iv = sorted(iv + b)
            elif not iv:
                srel.append(rel)
                snode.append(n)
                continue
            later.append((n, rel, iv))
            cur = rel    # _windows' loop, inlined for the first horizon
            for bs, be in iv:
                if cur > horizon:
                    break
                if be <= cur:
                    continue
                if bs - cur >= need:
                    opens.append(cur)
                    closes.append(bs - need)
                    wins.append((cur, bs - need, n))
                cur = be
            if cur <= horizon:
                opens.append(cur)
                wins.append((cur, INF, n))
        k = run.job.nodes
        t, have = _first_overlap(opens, closes, wins, srel, snode, k, horizon)
        if t is None:
            finals = [max(rel, max(map(_END_OF, iv))) for _, rel, iv in later] + srel
            bound = sorted(finals)[k - 1]
            ahead = self._ahead
            while t is None and horizon < bound:
                ahead *= 4
                horizon = min(now + ahead, bound) if ahead < 1e9 else bound
                opens, closes, wins = _windows(later, need, horizon)
                t, have = _first_overlap(opens, closes, wins, srel, snode, k, horizon)
        if t is None:
            return INF, []
        self._ahead = max(3600.0, 2 * (t - now))
        # promise the nodes busy now: the free ones stay open to backfilling
        have.sort()
        pick = [m for m in have if busy[m] is not None]
        if len(pick) < k:
            pick += [m for m in have if busy[m] is None]
        return t, pick[:k]

    def _prestage(self, run: Run, t: float, nodes: list[int], now: float) -> None:
        """Fetch the head's image onto the nodes it is planned to start on (vmwrap's prestage)."""
        img = run.job.image
        if t == INF or self.prestaged.get(run.job.id) == (t, tuple(nodes)):
            return
        lacking = [n for n in nodes if img not in self.cache[n] and img not in self.incoming[n]]
        if not lacking:
            return
        s = self.link.earliest(now, self.xfer_s)
        if s + 2 * self.xfer_s < t or s + self.xfer_s > t + 3600:
            return   # too early (the plan will change; ask again later) or too late to matter
        self.link.book(s, self.xfer_s, img)
        arrival = s + self.xfer_s
        for n in lacking:
            self.incoming[n][img] = arrival
        self._transferred(len(lacking))
        self._push(arrival, _CACHED, (tuple(lacking), img, arrival))
        self.prestaged[run.job.id] = (t, tuple(nodes))

    def _cache_add(self, n: int, img: int) -> None:
        c = self.cache[n]
        if img in c:
            c.move_to_end(img)
            return
        in_use = set()
        occ = self.busy[n]
        if isinstance(occ, Run):
            in_use.add(occ.job.image)
        elif isinstance(occ, Reservation):
            in_use.add(occ.image)
        while len(c) >= self.slots:
            victim = next((i for i in c if i not in in_use), None)
            if victim is None:
                return
            del c[victim]
            self.holders[victim].discard(n)
        c[img] = True
        self.holders[img].add(n)

    # -- reservations ---------------------------------------------------------------------------
    def _ar_submit(self, r: Reservation, now: float) -> None:
        end = r.start + r.dur
        lead = self.susp_s if self.cfg.suspend else 0.0
        cands = []
        node_iv, after = self.node_iv, r.start - lead
        for n in range(self.c.nodes):
            if self._claims:
                if any(a.start < end and after < a.start + a.dur for a in self.node_ars[n]
                       if not isinstance(a, _Claim)):
                    continue
            else:   # only reservations: disjoint, so the last one starting before `end` decides
                iv = node_iv[n]
                i = bisect.bisect_left(iv, (end,))
                if i and iv[i - 1][1] > after:
                    continue
            occ = self.busy[n]
            running_past = isinstance(occ, Run) and occ.req_end > r.start - lead
            if running_past and not self.cfg.suspend:
                if not self.cfg.cancel:
                    continue
                # Haizea's fitExact: nodes needing no preemption first, then the others in
                # node order (prioritizenodes: fewest preemptions, one per single-CPU node)
                cands.append((True, False, 0.0, n))
                continue
            if self.cfg.cancel and self._claims and any(
                    isinstance(a, _Claim) and a.start < end and r.start < a.start + a.dur for a in self.node_ars[n]):
                cands.append((True, False, 0.0, n))   # a future lease there is preempted too
                continue
            cands.append((running_past, self._has(n, r.image) is False, self._until(n, now), n))
        if len(cands) < r.nodes:
            return self._reject(r, f"only {len(cands)} of {r.nodes} nodes free of other commitments")
        nodes = tuple(n for *_, n in sorted(cands)[:r.nodes])
        if self.cfg.cancel:
            for n in nodes:
                occ = self.busy[n]
                if isinstance(occ, Run) and occ.req_end > r.start:
                    self._kill(occ, now)
        if self.cfg.transfer != "none":
            lacking = [n for n in nodes if not self._has(n, r.image)]
            if lacking:
                s = self.link.latest(r.start, self.xfer_s, now)
                if s is None and self.cfg.staging == "overlap":
                    # Haizea's EDF books the last free slot before the deadline without checking
                    # it is not in the past (imagetransfer.py __get_last_transfer_slot)
                    s = self.link.earliest(now, self.xfer_s)
                if s is None:
                    return self._reject(r, "its image cannot arrive before the start")
                self.link.book(s, self.xfer_s, r.image)
                self._transferred(len(lacking))
                if self.cfg.transfer == "cache":
                    for n in lacking:
                        self.incoming[n][r.image] = s + self.xfer_s
                    self._push(s + self.xfer_s, _CACHED, (tuple(lacking), r.image, s + self.xfer_s))
        clash = {a for n in nodes for a in self.node_ars[n]
                 if isinstance(a, _Claim) and a.start < end and r.start - lead < a.start + a.dur}
        if self.cfg.backfill == "haizea":
            # Haizea cancels a future lease only if it would start inside the reservation (or too
            # close before it to run its threshold and be saved); else it is saved before it
            # (lease_scheduler.py __preempt_lease, vm_scheduler.py can_suspend_at)
            clash = {c for c in clash
                     if r.start - c.start < self._need(c.run, self._setup(c.run, c.nodes))}
        for c in sorted(clash, key=lambda c: c.id):
            self._drop_claim(c)
        self._ver += 1
        for n in nodes:
            bisect.insort(self.node_ars[n], r, key=lambda a: a.start)
            bisect.insort(self.node_iv[n], (r.start, r.start + r.dur))
        self.ar_nodes[r.id] = nodes
        self.res.ars_accepted += 1
        if self.cfg.suspend:
            self._push(max(now, r.start - self.susp_s), _PREEMPT, r)
        self._push(r.start, _AR_START, r)

    def _reject(self, r: Reservation, why: str) -> None:
        self.res.ars_rejected += 1
        self.res.rejected.append((r.id, why))

    def _preempt(self, r: Reservation, now: float) -> None:
        """Save every job on the AR's nodes so the save ends when the AR starts."""
        if isinstance(r, _Claim) and r.cancelled:
            return
        for n in self.ar_nodes[r.id]:
            occ = self.busy[n]
            if isinstance(occ, Run) and occ.end > r.start:   # ending in time: leave it be
                self._suspend(occ, now, r.start)

    def _kill(self, run: Run, now: float) -> None:
        """Cancel a running job for a reservation (Config.cancel): its nodes are free now, it is
        back in line at its original place and will run again from the start (Haizea's preempt
        removes the lease's VM reservation and keeps its remaining duration as it was)."""
        run.token += 1
        self._vm_stopped(run)
        self.res.killed += 1
        self.res.killed_work += max(0.0, now - run.work_start) / self.slow * run.job.nodes
        self._release(run.nodes, now, None)
        run.nodes = ()
        run.start = run.work_start = run.end = run.req_end = INF
        run.work_left = float(run.job.run)
        run.req_left = float(run.job.req)
        run.first_start = None
        self._enqueue(run)

    def _vm_stopped(self, run: Run) -> None:
        if run is self._future_run:
            self._future_run = None
            self._dirty = True

    def _suspend(self, run: Run, now: float, until: float) -> None:
        run.token += 1
        self._vm_stopped(run)
        if now >= run.work_start:
            done = (now - run.work_start) / self.slow
            run.worked += done
            run.work_left -= done
            run.req_left -= done
            run.suspensions += 1
            self.res.suspensions += 1
            mark = ("suspending", run, until)
        else:   # still staging or booting: nothing to save, just give the nodes back
            mark = ("suspending", run, now)
        self._ver += 1
        for n in run.nodes:
            self.busy[n] = mark
        self._push(mark[2], _SUSPENDED, mark)

    def _suspended(self, mark, now: float) -> None:
        _, run, _ = mark
        if run.suspensions:
            run.last_nodes = run.nodes
        self._release(run.nodes, now, None)
        run.nodes = ()
        run.start = run.work_start = run.end = run.req_end = INF
        if self.requeue_s and run.suspensions:
            self._push(now + self.requeue_s, _SUBMIT, run)   # back in line when the copy is done
            return
        self._enqueue(run)

    def _ar_start(self, r: Reservation, now: float) -> None:
        self._ver += 1
        for n in self.ar_nodes[r.id]:
            occ = self.busy[n]
            if isinstance(occ, Run) and occ.end - now <= EPS * max(1.0, now):
                self._finish(occ, occ.end)   # ends at the same instant, give or take float rounding
            if self.busy[n] is not None:
                raise InvariantError(f"reservation {r.id} cannot start at {now}: node {n} is busy")
            self.busy[n] = r
            self.free.discard(n)
            self._gap_cache = None
        self._busy(now, len(self.ar_nodes[r.id]))
        if self.cfg.transfer == "cache":
            for n in self.ar_nodes[r.id]:
                self.incoming[n].pop(r.image, None)
                self._cache_add(n, r.image)
        self.res.ars_on_time += 1
        self._push(now + r.dur, _AR_END, r)

    def _ar_end(self, r: Reservation, now: float) -> None:
        self._release(self.ar_nodes[r.id], now, r.image)
        self.useful += r.dur * r.nodes

    # -- checks and results ---------------------------------------------------------------------
    def _check(self, now: float) -> None:
        busy = sum(1 for b in self.busy if b is not None)
        if busy + len(self.free) != self.c.nodes or busy != self.busy_count:
            raise InvariantError(f"node accounting broken at {now}: {busy} busy, {len(self.free)} free")
        for b in self.busy:
            if isinstance(b, Run) and b.nodes and len(b.nodes) != b.job.nodes:
                raise InvariantError(f"job {b.job.id} holds {len(b.nodes)} nodes, asked {b.job.nodes}")

    def _result(self) -> Result:
        r = self.res
        recs = r.records
        r.jobs = len(recs)
        r.end = max((e for _, e, _ in recs.values()), default=0.0)
        by_id = {j.id: j for j in self.jobs}
        waits, bslds = [], []
        for jid, (s, e, _) in recs.items():
            j = by_id[jid]
            waits.append(s - j.submit)
            bslds.append(max(1.0, (e - j.submit) / max(j.run, 10.0)))
        r.mean_wait = sum(waits) / len(waits) if waits else 0.0
        r.mean_bsld = sum(bslds) / len(bslds) if bslds else 0.0
        r.utilization = self.useful / (self.c.nodes * r.end) if r.end else 0.0
        return r


def simulate(jobs: list[Job], ars: list[Reservation], config: Config, cluster: Cluster = Cluster(),
             save: SaveModel | None = None, **kw) -> Result:
    return Simulator(cluster, config, jobs, ars, save, **kw).run()
