"""Prestaging and cache-aware placement on a real Slurm cluster with distinct per-node caches."""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path

import pytest

from harness.host_share import keep_logs
from harness.slurm_cluster import Cluster
from vmwrap.ledger import Ledger

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def images(appliance):
    from conftest import APPLIANCES
    from vmwrap import appliance as builder

    cat = APPLIANCES / "test-catalog-b.toml"
    b = builder.build("vmwrap-test-b", "busybox", str(APPLIANCES), str(cat))
    return appliance, dataclasses.replace(b, name="busybox2")


@pytest.fixture(scope="module")
def cluster(images, virt_type, test_user):
    a, b = images
    # c2's cache holds one image set at a time: the shared kernel plus A's or B's initrd and disk.
    room_for_one = a.kernel.size + a.initrd.size + a.disk.size + (b.initrd.size + b.disk.size) // 2
    corrupt = dataclasses.replace(a, name="corrupt", disk=dataclasses.replace(a.disk, sha256="0" * 64))
    unreachable = dataclasses.replace(a, name="unreachable",
                                      disk=dataclasses.replace(a.disk, source="http://127.0.0.1:9/gone.qcow2"))
    c = Cluster.for_site(Path(f"/var/tmp/vmwrap-prestage-{os.getpid()}"), images=[a, b, corrupt, unreachable],
                         site_config={"accel": virt_type, "grace_seconds": 5.0}, prestage=True,
                         node_config={"c2": {"cache_max_bytes": room_for_one}})
    c.start()
    try:
        yield c
    finally:
        c.stop()
        keep_logs(c.base, "slurm-prestage")
        shutil.rmtree(c.base, ignore_errors=True)   # 230 MB of caches a run (it was left behind)


@pytest.fixture
def jobdir(cluster, test_user):
    d = cluster.base / "work" / f"t{os.urandom(3).hex()}"
    d.mkdir(parents=True)
    os.chown(d, test_user.pw_uid, test_user.pw_gid)
    return d


def submit(cluster, jobdir, script, *args):
    r = cluster.sbatch(script, *args, user="vmwrapuser", cwd=jobdir)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def events(cluster, node, job):
    return Ledger(cluster.node_dir(node) / "state" / "ledger.sqlite").events(job)


def done(cluster, job, timeout=180):
    return cluster.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout)


def test_image_is_prestaged_where_slurm_plans_the_job(cluster, jobdir):
    blockers = [submit(cluster, jobdir, "#!/bin/sh\nsleep 20\n", "-w", "c1", "--exclusive", "-t", "1")]
    blockers += [submit(cluster, jobdir, "#!/bin/sh\nsleep 300\n", "-w", n, "--exclusive", "-t", "5") for n in ("c2", "c3")]
    time.sleep(1)
    job = submit(cluster, jobdir, "#!/bin/sh\n#VMWRAP --image=busybox\necho prestaged\n", "--exclusive", "-t", "1")
    info = done(cluster, job)
    for b in blockers[1:]:
        cluster.run("scancel", b)
    assert info["ExitCode"] == "0:0" and info["NodeList"] == "c1"
    ev = events(cluster, "c1", job)
    staged = [e for e in ev if e["event"] == "prestage"]
    assert staged and staged[0]["detail"]["action"] == "fetched" and "planned to start here" in staged[0]["detail"]["reason"]
    at_start = [e for e in ev if e["event"] in ("cache_hit", "cache_miss")]
    assert at_start and all(e["event"] == "cache_hit" and e["detail"]["bytes"] == 0 for e in at_start)
    assert staged[0]["ts"] < min(e["ts"] for e in at_start)


def test_jobs_prefer_nodes_that_hold_their_image(cluster, jobdir):
    import subprocess

    r = subprocess.run(["vmwrap", "--config", str(cluster.base / "vmwrap-c3.toml"), "cache", "fetch", "busybox2"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    active = cluster.base / "vmwrap-active.lua"
    end = time.time() + 30
    while time.time() < end and '["busybox2"]' not in (active.read_text() if active.exists() else ""):
        time.sleep(0.3)
    assert '["busybox2"]' in active.read_text()
    job = submit(cluster, jobdir, "#!/bin/sh\n#VMWRAP --image=busybox2\necho placed\n")
    info = done(cluster, job)
    assert info["ExitCode"] == "0:0"
    assert info["NodeList"] == "c3"
    control = submit(cluster, jobdir, "#!/bin/sh\necho bare\n")  # same idle cluster, no image
    assert done(cluster, control)["NodeList"] == "c1"
    ev = events(cluster, "c3", job)
    assert all(e["event"] == "cache_hit" for e in ev if e["event"] in ("cache_hit", "cache_miss"))


def test_prestage_never_evicts_an_image_a_running_job_uses(cluster, jobdir, images):
    a, b = images
    running = submit(cluster, jobdir, "#!/bin/sh\n#VMWRAP --image=busybox\nsleep 25; echo survived\n",
                     "-w", "c2", "-c", "2", "-t", "2")
    cluster.wait_state(running, {"RUNNING"}, 120)
    end = time.time() + 60  # RUNNING includes the prolog: wait for the VM itself
    while time.time() < end and not any(e["event"] == "created" for e in events(cluster, "c2", running)):
        time.sleep(0.3)
    waiting = submit(cluster, jobdir, "#!/bin/sh\n#VMWRAP --image=busybox2\necho second\n",
                     "-w", "c2", "-c", "2", "-t", "1")
    blobs = cluster.node_dir("c2") / "cache" / "blobs"
    deferred = []
    end = time.time() + 60
    while time.time() < end and cluster.job(running)["JobState"] == "RUNNING":
        assert (blobs / a.initrd.sha256).exists() and (blobs / a.disk.sha256).exists()
        deferred = [e for e in events(cluster, "c2", waiting.split("_")[0])
                    if e["event"] == "prestage" and e["detail"]["action"] == "deferred"]
        time.sleep(0.5)
    assert deferred, "the agent should have tried and deferred the second image"
    assert "image cache full" in deferred[0]["detail"]["reason"] and running in deferred[0]["detail"]["reason"]
    assert done(cluster, running)["ExitCode"] == "0:0"
    assert (jobdir / f"slurm-{running}.out").read_text() == "survived\n"
    assert done(cluster, waiting)["ExitCode"] == "0:0"


@pytest.mark.parametrize("image, reason", [("corrupt", "checksum mismatch"), ("unreachable", "cannot fetch image")])
def test_bad_image_fails_the_job_with_the_reason_not_the_node(cluster, jobdir, image, reason):
    job = submit(cluster, jobdir, f"#!/bin/sh\n#VMWRAP --image={image}\necho never\n", "-w", "c3")
    info = done(cluster, job)
    assert info["JobState"] == "FAILED"
    out = (jobdir / f"slurm-{job}.out").read_text()
    assert reason in out and "never" not in out
    assert "drain" not in cluster.run("sinfo", "-h", "-n", "c3", "-o", "%t").stdout
    cache = cluster.node_dir("c3") / "cache"
    assert os.listdir(cache / "tmp") == [] and not (cache / "blobs" / ("0" * 64)).exists()


def test_full_cache_fails_the_job_with_the_reason_and_keeps_the_node(cluster, jobdir):
    running = submit(cluster, jobdir, "#!/bin/sh\n#VMWRAP --image=busybox\nsleep 20\n", "-w", "c2", "-c", "1",
                     "--mem=500M")
    cluster.wait_state(running, {"RUNNING"}, 120)
    end = time.time() + 60
    while time.time() < end and not any(e["event"] == "created" for e in events(cluster, "c2", running)):
        time.sleep(0.3)
    other = submit(cluster, jobdir, "#!/bin/sh\n#VMWRAP --image=busybox2\necho never\n", "-w", "c2", "-c", "1",
                   "--mem=500M")
    info = done(cluster, other)
    assert info["JobState"] == "FAILED"
    out = (jobdir / f"slurm-{other}.out").read_text()
    assert "image cache full" in out and f"jobs {running}" in out
    assert "drain" not in cluster.run("sinfo", "-h", "-n", "c2", "-o", "%t").stdout
    assert done(cluster, running)["ExitCode"] == "0:0"
