"""Workloads for the simulator: SWF batch traces, LWF reservation lists, image mixes, synthetic mixes.

Parse errors name the file and line, because admins feed us their own exports.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path


class WorkloadError(ValueError):
    pass


@dataclass(frozen=True)
class Job:
    """A batch job: `run` is what it really takes, `req` what it asked for (both bare seconds)."""
    id: int
    submit: float
    run: float
    req: float
    nodes: int
    image: int = 0
    cancel_at: float | None = None   # leaves the queue then if it has not started (cancelled in the trace)


@dataclass(frozen=True)
class Reservation:
    """An advance reservation: must hold `nodes` nodes over [start, start + dur)."""
    id: int
    submit: float
    start: float
    dur: float
    nodes: int
    image: int = 0


@dataclass(frozen=True)
class ImageMix:
    """Which images jobs use: `weights[i]` is image i's popularity, every image `size_mb`."""
    name: str
    weights: tuple[float, ...]
    size_mb: float = 4096.0

    def draw(self, n: int, rng: random.Random) -> list[int]:
        return rng.choices(range(len(self.weights)), weights=self.weights, k=n)


UNIFORM = ImageMix("uniform", (1.0,) * 37)
SKEWED = ImageMix("skewed", (10.0,) * 7 + (1.0,) * 30)   # 7 x 10 % + 30 x 1 % (HPDC'08)


def _lines(path: Path):
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise WorkloadError(f"{path}: cannot read: {e.strerror}") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if s and not s.startswith((";", "#")):
            yield lineno, s


def _num(path, lineno, field, text, kind=float):
    try:
        return kind(text)
    except ValueError:
        raise WorkloadError(f"{path}:{lineno}: {field} is not a number: {text!r}") from None


def read_swf(path: str | Path, max_nodes: int | None = None, cancelled: str = "queue") -> list[Job]:
    """Standard Workload Format: 18 fields; field 2 submit, 3 wait, 4 run time, 8 requested
    processors (here: nodes), 9 requested time, 11 status. A missing requested time is taken as the
    run time; a run beyond the request is cut at the request, as the scheduler would kill it there;
    a run time of 0 (under half a second) counts as 1 s.

    Jobs cancelled while they waited (run time -1, status 5) are, with `cancelled="queue"`, kept the
    way HPDC'08's simulator (Haizea) kept them: they ask for their requested time and leave the
    queue if they have not started when their user gave up in the trace (submit + wait). With
    `cancelled="skip"` they are dropped.
    """
    if cancelled not in ("queue", "skip"):
        raise ValueError(f"cancelled must be queue or skip, not {cancelled!r}")
    jobs = []
    for lineno, s in _lines(Path(path)):
        f = s.split()
        if len(f) != 18:
            raise WorkloadError(f"{path}:{lineno}: expected 18 SWF fields, got {len(f)}")
        jid = _num(path, lineno, "job number", f[0], int)
        submit = _num(path, lineno, "submit time", f[1])
        wait = _num(path, lineno, "wait time", f[2])
        run = _num(path, lineno, "run time", f[3])
        nodes = _num(path, lineno, "requested processors", f[7], int)
        if nodes <= 0:
            nodes = _num(path, lineno, "allocated processors", f[4], int)
        req = _num(path, lineno, "requested time", f[8])
        status = _num(path, lineno, "status", f[10], int)
        if submit < 0:
            raise WorkloadError(f"{path}:{lineno}: negative submit time {submit}")
        cancel_at = None
        if run < 0 and status == 5 and cancelled == "queue" and req > 0 and wait >= 0:
            run, cancel_at = req, submit + wait
        elif run == 0:
            run = 1
        if run <= 0 or nodes <= 0:
            continue
        if max_nodes is not None and nodes > max_nodes:
            raise WorkloadError(f"{path}:{lineno}: job {jid} asks for {nodes} nodes; the cluster has {max_nodes}")
        req = run if req <= 0 else req
        jobs.append(Job(jid, submit, min(run, req), req, nodes, cancel_at=cancel_at))
    jobs.sort(key=lambda j: (j.submit, j.id))
    return jobs


def read_lwf(path: str | Path, max_nodes: int | None = None, first_id: int = 1_000_000) -> list[Reservation]:
    """Haizea's LWF lines: submit start requested_duration actual_duration nodes cpu mem disk
    'image' image_MB (times in seconds from trace start). A reservation submitted at 0 that
    started before 0 is clipped to what remains of it at 0."""
    out = []
    for i, (lineno, s) in enumerate(_lines(Path(path))):
        f = s.split()
        if len(f) != 10:
            raise WorkloadError(f"{path}:{lineno}: expected 10 LWF fields, got {len(f)}")
        submit = _num(path, lineno, "submit time", f[0])
        start = _num(path, lineno, "start time", f[1])
        dur = _num(path, lineno, "requested duration", f[2])
        nodes = _num(path, lineno, "nodes", f[4], int)
        if dur <= 0 or nodes <= 0:
            raise WorkloadError(f"{path}:{lineno}: duration and nodes must be > 0")
        if start < submit and submit == 0:
            # already under way when the trace begins (the HPDC'08 files have a few on day one):
            # keep what is left of it from time 0, drop it if nothing is
            dur -= submit - start
            start = submit
            if dur <= 0:
                continue
        if start < submit:
            raise WorkloadError(f"{path}:{lineno}: starts at {start:g}, before it is requested at {submit:g}")
        if max_nodes is not None and nodes > max_nodes:
            raise WorkloadError(f"{path}:{lineno}: reservation asks for {nodes} nodes; the cluster has {max_nodes}")
        out.append(Reservation(first_id + i, submit, start, dur, nodes))
    out.sort(key=lambda r: (r.submit, r.start, r.id))
    return out


def read_images(path: str | Path) -> ImageMix:
    """An image-popularity file: one `NAME SIZE_MB WEIGHT` per line."""
    weights, sizes = [], set()
    for lineno, s in _lines(Path(path)):
        f = s.split()
        if len(f) != 3:
            raise WorkloadError(f"{path}:{lineno}: expected NAME SIZE_MB WEIGHT")
        size, w = _num(path, lineno, "size", f[1]), _num(path, lineno, "weight", f[2])
        if size <= 0 or w < 0:
            raise WorkloadError(f"{path}:{lineno}: size must be > 0 and weight >= 0")
        sizes.add(size)
        weights.append(w)
    if not weights or sum(weights) <= 0:
        raise WorkloadError(f"{path}: no image with a positive weight")
    if len(sizes) > 1:
        raise WorkloadError(f"{path}: images of different sizes are not modelled; got {sorted(sizes)}")
    return ImageMix(Path(path).stem, tuple(weights), sizes.pop())


def image_mix(spec: str) -> ImageMix:
    if spec == "uniform":
        return UNIFORM
    if spec == "skewed":
        return SKEWED
    return read_images(spec)


def assign_images(jobs: list[Job], ars: list[Reservation], mix: ImageMix, seed: int = 0):
    """Same seed -> same images, so configurations of one workload are compared on equal terms."""
    rng = random.Random(seed)
    imgs = mix.draw(len(jobs) + len(ars), rng)
    return ([replace(j, image=i) for j, i in zip(jobs, imgs)],
            [replace(r, image=i) for r, i in zip(ars, imgs[len(jobs):])])


def synthetic(*, jobs: int = 500, nodes: int = 32, load: float = 0.8, ar_share: float = 0.1,
              ar_nodes: tuple[int, int] = (4, 16), ar_hours: float = 2.0, ar_lead_s: float = 86400,
              max_job_nodes: int | None = None, mean_run_s: float = 3600, seed: int = 0
              ) -> tuple[list[Job], list[Reservation]]:
    """A mix of batch jobs and reservations: `load` is the batch work's share of the cluster over
    the arrival period, `ar_share` the reservations' share of all work, AR durations uniform in
    `ar_hours` +- 30 min, requested `ar_lead_s` ahead. Requested times overestimate run times
    (x1-3), as on real systems."""
    if not 0 < load <= 2 or not 0 <= ar_share < 1 or jobs < 1 or nodes < 1:
        raise WorkloadError("synthetic: need jobs >= 1, nodes >= 1, 0 < load <= 2, 0 <= ar_share < 1")
    rng = random.Random(seed)
    cap = max_job_nodes or max(1, nodes // 2)
    out, t = [], 0.0
    sizes = [min(cap, 2 ** rng.randrange(0, max(1, cap.bit_length()))) for _ in range(jobs)]
    runs = [max(30.0, rng.expovariate(1 / mean_run_s)) for _ in range(jobs)]
    work = sum(s * r for s, r in zip(sizes, runs))
    span = work / (nodes * load)
    gap = span / jobs
    for i in range(jobs):
        t += rng.expovariate(1 / gap)
        out.append(Job(i + 1, round(t), round(runs[i]), round(runs[i] * rng.uniform(1, 3)), sizes[i]))
    ars, ar_work, i = [], 0.0, 0
    target = work * ar_share / (1 - ar_share) if ar_share else 0
    lo, hi = ar_nodes
    while ar_work < target:
        n = rng.randint(max(1, lo), min(hi, nodes))
        d = max(600.0, ar_hours * 3600 + rng.uniform(-1800, 1800))
        start = rng.uniform(ar_lead_s, ar_lead_s + span)
        ars.append(Reservation(1_000_000 + i, max(0.0, start - ar_lead_s), round(start), round(d), n))
        ar_work += n * d
        i += 1
    ars.sort(key=lambda r: (r.submit, r.start, r.id))
    return out, ars
