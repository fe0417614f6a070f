"""Prestage decisions: earliest deadline first, pins respected, no thrashing, bandwidth cap."""

import hashlib
import os
import time

import pytest

from vmwrap.cache import Cache
from vmwrap.catalog import Artifact, Catalog, Image
from vmwrap.ledger import Ledger
from vmwrap.prestage import Need, Prestager


def image(tmp_path, name, size):
    p = tmp_path / f"{name}.bin"
    data = os.urandom(size)
    p.write_bytes(data)
    art = Artifact(str(p), hashlib.sha256(data).hexdigest(), size)
    small = tmp_path / f"{name}.k"
    small.write_bytes(name.encode())
    k = Artifact(str(small), hashlib.sha256(name.encode()).hexdigest(), len(name))
    return Image(name, "kernel", k, art)


@pytest.fixture
def world(tmp_path):
    imgs = {n: image(tmp_path, n, 400_000) for n in ("a", "b", "c")}
    cache = Cache(tmp_path / "cache", 1_000_000)  # room for two images
    ledger = Ledger(tmp_path / "ledger.sqlite")
    return Prestager(Catalog(imgs), cache, ledger), cache, imgs, ledger


def test_earliest_deadline_first_within_horizon(world):
    p, cache, imgs, _ = world
    now = 1000.0
    ds = p.step([Need("2", "b", now + 200), Need("1", "a", now + 100), Need("9", "c", now + 99999)], now=now)
    assert [(d.job_id, d.action) for d in ds] == [("1", "fetched"), ("2", "fetched")]  # job 9 is beyond the horizon
    assert ds[0].bytes == 400_001 and "planned to start here" in ds[0].reason
    assert p.cached_images() == ["a", "b"]


def test_never_evicts_an_image_a_running_job_uses(world):
    p, cache, imgs, ledger = world
    for a in imgs["a"].artifacts().values():
        cache.fetch(a)
        cache.pin(a.sha256, "job-running")
    for a in imgs["b"].artifacts().values():
        cache.fetch(a)
        cache.pin(a.sha256, "job-suspended")
    (d,) = p.step([Need("3", "c", 1100.0)], now=1000.0)
    assert d.action == "deferred" and "image cache full" in d.reason and "job-running" in d.reason
    assert p.cached_images() == ["a", "b"]
    assert [e["detail"]["action"] for e in ledger.events("3")] == ["deferred"]


def test_sooner_job_may_displace_an_image_planned_for_later(world):
    p, cache, imgs, _ = world
    p.step([Need("late1", "b", 4000.0), Need("late2", "c", 4001.0)], now=1000.0)
    assert p.cached_images() == ["b", "c"]
    ds = p.step([Need("soon", "a", 1010.0), Need("late1", "b", 4000.0), Need("late2", "c", 4001.0)], now=1000.0)
    assert [(d.job_id, d.action) for d in ds][0] == ("soon", "fetched")
    assert "a" in p.cached_images()


def test_cancelled_or_moved_plan_leaves_the_image_cached(world):
    p, cache, imgs, _ = world
    (d,) = p.step([Need("1", "a", 1100.0)], now=1000.0)
    assert d.action == "fetched"
    assert p.step([], now=1001.0) == []  # job 1 cancelled: its pin goes, the image stays
    assert p.cached_images() == ["a"] and all(not e.pins for e in cache.entries())
    (d,) = p.step([Need("1", "a", 1200.0)], now=1002.0)  # planned again, later
    assert (d.action, d.bytes) == ("cached", 0)


def test_unknown_image_and_broken_source(world, tmp_path):
    p, cache, imgs, _ = world
    os.truncate(imgs["c"].initrd.source, 10)
    ds = p.step([Need("1", "nope", 1100.0), Need("2", "c", 1200.0)], now=1000.0)
    assert [(d.action) for d in ds] == ["unknown", "failed"]
    assert "truncated" in ds[1].reason
    assert os.listdir(tmp_path / "cache" / "tmp") == []


def test_bandwidth_cap(world):
    p, cache, imgs, _ = world
    p.rate = 1_000_000  # 1 MB/s
    t0 = time.monotonic()
    p.step([Need("1", "a", 1100.0)], now=1000.0)
    assert time.monotonic() - t0 >= 0.35  # 400 kB at 1 MB/s


# --- `vmwrap slurm prestage` on what users write into their jobs (issue 14) -----------------------------

REQ = "vmwrap:image={},memory=,cpus=,lost="


class _Squeue:
    """squeue/scontrol/sinfo as prestage calls them, from crafted jobs: (id, start, nodes, prefer, comment)."""

    def __init__(self, jobs):
        self.jobs, self.calls = jobs, []

    def __call__(self, *argv):
        self.calls.append(argv)
        if argv[0] == "squeue":
            fields = argv[-1].replace(":|", "").replace(":", "").split(",")
            col = {"JobID": 0, "StartTime": 1, "SchedNodes": 2, "Prefer": 3, "Comment": 4}
            return "".join("|".join(j[col[f]] for f in fields) + "\n" for j in self.jobs)
        if argv[:3] == ("scontrol", "show", "hostnames"):
            return argv[3].replace(",", "\n") + "\n"
        if argv[:3] == ("scontrol", "-o", "show"):
            return f"NodeName={argv[4]} AvailableFeatures=(null) ActiveFeatures=(null)\n"
        if argv[0] == "sinfo":
            return "c1|debug*|vmw_busybox,vmw_secret|2|3000\n"
        return ""


class _Prestager:
    def __init__(self):
        self.needs = None

    def step(self, needs):
        self.needs = needs
        return []

    def cached_images(self):
        return []


def test_prestage_passes_survive_what_users_put_in_their_jobs(monkeypatch, tmp_path):
    from vmwrap_plugins.slurm import prestage

    start = "2030-01-01T00:00:00"
    sq = _Squeue([
        ("11", start, "c1", "(null)", REQ.format("busybox").replace("memory=", "memory=" + "9" * 5000)),
        ("12", start, "c1", "(null)", "vmwrap:image=busybox,memory=,cpus=,lost=never"),
        ("13", start, "c1", "x|" + REQ.format("secret"), "plain comment"),   # '|' in the user's --prefer
        ("14", start, "c1", "(null)", "ok\n15|" + start + "|c1|(null)|" + REQ.format("secret")),
        ("15", start, "c1", "(null)", REQ.format("busybox")),
        ("16", start, "c1", "(null)", REQ.format("busybox")),
    ])
    monkeypatch.setattr(prestage, "_run", sq)
    p = _Prestager()
    prestage.node_pass(p, "c1")
    assert [(n.job_id, n.image) for n in p.needs] == [("16", "busybox")]  # 15 was printed twice: left out
    assert prestage.controller_pass(["busybox", "secret"], tmp_path) == ["16"]
    assert [c for c in sq.calls if c[:2] == ("scontrol", "update") and "jobid=" in c[2]] == \
        [("scontrol", "update", "jobid=16", "Prefer=vmw_busybox")]
