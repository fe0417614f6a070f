"""Preemption that requeues a job saves its VM; the restart restores it — same node or another.

Real Slurm 22.05 (3 nodes, partition `requeue` with PreemptMode=REQUEUE, `high` preempts it), real
VMs. The guest's counter lives only in the shell's memory: after a restore it must continue, and the
job's output must hold every value exactly once.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from harness.polling import values, wait_for
from harness.slurm_cluster import Cluster
from vmwrap.catalog import register

pytestmark = pytest.mark.vm
N = 24
COUNTER = ("#!/bin/sh\n#VMWRAP --image=busybox\n{extra}"
           f"i=0; while [ $i -lt {N} ]; do i=$((i+1)); echo n=$i; sleep 1; done\n")
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}


@pytest.fixture(scope="module")
def cluster(appliance, virt_type, test_user):
    base = Path(f"/var/tmp/vmwrap-ckpt-{os.getpid()}")
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    base.chmod(0o755)
    register(str(base / "images.toml"), appliance)
    c = Cluster(base, {"catalog": str(base / "images.toml"), "accel": virt_type, "grace_seconds": 5.0})
    c.start()
    yield c
    c.stop()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def jobdir(cluster, test_user):
    d = cluster.base / "work" / f"t{os.urandom(3).hex()}"
    d.mkdir(parents=True)
    os.chown(d, test_user.pw_uid, test_user.pw_gid)
    return d


def submit(cluster, jobdir, script, *args):
    r = cluster.sbatch(script, *args, user="vmwrapuser", cwd=jobdir)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]


def qemu_running(job: str) -> bool:
    return subprocess.run(["pgrep", "-f", f"guest=vmwrap-{job},"], capture_output=True).returncode == 0


def checkpoint_dir(cluster, job: str) -> Path:
    return cluster.base / "checkpoints" / job


def preempt(cluster, jobdir, job, node, hold: float = 6):
    """Wait until the job counted a few values on `node`, then take the node with a `high` job."""
    out = jobdir / f"slurm-{job}.out"
    wait_for(lambda: out.exists() and len(values(out.read_text())) >= 5, "the job to count to 5")
    before = values(out.read_text())
    pre = submit(cluster, jobdir, f"#!/bin/sh\nsleep {hold}\n", "-p", "high", "-w", node, "--exclusive")
    return pre, before


def test_preempted_job_is_saved_and_restored_on_the_same_node(cluster, jobdir):
    job = submit(cluster, jobdir, COUNTER.format(extra=""), "-p", "requeue", "-w", "c1", "-n", "2")
    pre, before = preempt(cluster, jobdir, job, "c1")
    # The preemptor runs on the freed node while the job is saved: no QEMU left for it, memory freed.
    wait_for(lambda: cluster.job(pre)["JobState"] == "RUNNING", "the preemptor to run")
    assert (checkpoint_dir(cluster, job) / "manifest.json").exists()
    assert not qemu_running(job)
    info = cluster.job(job)
    assert info["JobState"] == "PENDING" and info["Restarts"] == "1"
    listing = subprocess.run(["vmwrap", "--config", str(cluster.base / "vmwrap-c1.toml"), "checkpoints"],
                             capture_output=True, text=True)
    assert re.search(rf"^{job}\s", listing.stdout, re.M), listing.stdout
    info = cluster.wait_state(job, FINAL, timeout=180)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", info
    assert info["NodeList"] == "c1"
    out = (jobdir / f"slurm-{job}.out").read_text()
    assert values(out) == list(range(1, N + 1)), out
    assert len(before) >= 5
    # The job ended for good: its checkpoint is gone.
    assert not checkpoint_dir(cluster, job).exists()
    ledger = subprocess.run(["sqlite3", str(cluster.node_dir("c1") / "state" / "ledger.sqlite"),
                             f"select event from events where job_id='{job}'"], capture_output=True, text=True).stdout
    assert "saved" in ledger and "restored" in ledger


def test_preempted_job_continues_on_another_node(cluster, jobdir):
    job = submit(cluster, jobdir, COUNTER.format(extra=""), "-p", "requeue", "-n", "2", "--open-mode=append")
    node = wait_for(lambda: cluster.job(job).get("BatchHost") if cluster.job(job)["JobState"] == "RUNNING" else None,
                    "the job to start")
    pre, _ = preempt(cluster, jobdir, job, node, hold=90)  # the first node stays busy: restart elsewhere
    info = cluster.wait_state(job, FINAL, timeout=180)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", info
    assert info["NodeList"] != node and info["Restarts"] == "1", info
    out = (jobdir / f"slurm-{job}.out").read_text()
    assert values(out) == list(range(1, N + 1)), out
    cluster.run("scancel", pre)


def test_scontrol_requeue_saves_and_restores(cluster, jobdir):
    job = submit(cluster, jobdir, COUNTER.format(extra="echo $$ > pid.txt\n"), "-p", "requeue")
    out = jobdir / f"slurm-{job}.out"
    wait_for(lambda: out.exists() and len(values(out.read_text())) >= 4, "the job to count to 4")
    assert cluster.run("scontrol", "requeue", job).returncode == 0
    info = cluster.wait_state(job, FINAL, timeout=180)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", info
    assert values(out.read_text()) == list(range(1, N + 1)), out.read_text()


def test_cancelled_while_saved_deletes_the_checkpoint(cluster, jobdir):
    job = submit(cluster, jobdir, COUNTER.format(extra=""), "-p", "requeue", "-w", "c3", "-n", "2")
    pre, _ = preempt(cluster, jobdir, job, "c3", hold=30)
    wait_for(lambda: (checkpoint_dir(cluster, job) / "manifest.json").exists(), "the checkpoint")
    cluster.run("scancel", job, check=True)
    cluster.wait_state(job, FINAL, timeout=60)
    r = subprocess.run(["vmwrap", "--config", str(cluster.base / "vmwrap-c1.toml"), "slurm", "gc", "--once"],
                       capture_output=True, text=True, env=cluster.env)
    assert r.returncode == 0, r.stderr
    assert f"job {job}: ended while saved" in r.stdout
    assert not checkpoint_dir(cluster, job).exists()
    assert not any(p.name.startswith(job + ".") for p in (cluster.base / "checkpoints").iterdir())
    cluster.run("scancel", pre)


def forge_uid(d: Path) -> None:
    """What a compromised node can do to the shared store without the site key: job.json says root,
    its checksum in the manifest matches."""
    import hashlib
    import json

    meta = json.loads((d / "job.json").read_text())
    data = json.dumps({**meta, "uid": 0, "gid": 0}).encode()
    (d / "job.json").write_bytes(data)
    m = json.loads((d / "manifest.json").read_text())
    m["files"]["job.json"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (d / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("policy,damage", [("fail", "flip"), ("restart", "flip"), ("fail", "forge")])
def test_corrupt_checkpoint_follows_the_jobs_policy(cluster, jobdir, policy, damage):
    extra = "" if policy == "fail" else "#VMWRAP --on-lost-checkpoint=restart\n"
    job = submit(cluster, jobdir, COUNTER.format(extra=extra), "-p", "requeue", "-w", "c3", "-n", "2")
    pre, _ = preempt(cluster, jobdir, job, "c3", hold=4)
    saved = checkpoint_dir(cluster, job) / "memory.save"
    wait_for(lambda: (checkpoint_dir(cluster, job) / "manifest.json").exists(), "the checkpoint")
    if damage == "forge":
        forge_uid(checkpoint_dir(cluster, job))
    else:
        with open(saved, "r+b") as f:  # flip a byte in the middle of the guest's memory image
            f.seek(saved.stat().st_size // 2)
            b = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([b[0] ^ 0xFF]))
    try:
        info = cluster.wait_state(job, FINAL, timeout=180)
    except AssertionError as e:  # say where it stands: the job's own words and what c3's ledger saw
        said = (jobdir / f"slurm-{job}.out").read_text(errors="replace")[-3000:]
        ledger = subprocess.run(["sqlite3", str(cluster.node_dir("c3") / "state" / "ledger.sqlite"),
                                 f"select event, detail from events where job_id='{job}'"],
                                capture_output=True, text=True).stdout[-3000:]
        raise AssertionError(f"{e}\n-- output:\n{said}\n-- ledger on c3:\n{ledger}") from None
    out = (jobdir / f"slurm-{job}.out").read_text()
    assert ("memory.save is corrupt" if damage == "flip" else "is not authenticated") in out, out
    if policy == "fail":
        assert info["JobState"] == "FAILED" and info["ExitCode"] == "66:0", info
        assert "not starting the job again from the beginning" in out
    else:
        assert info["JobState"] == "COMPLETED", info
        assert "starting the job again from the beginning" in out
        assert values(out)[-N:] == list(range(1, N + 1))
    assert not checkpoint_dir(cluster, job).exists()


def qemu_pid(job: str) -> int | None:
    r = subprocess.run(["pgrep", "-f", f"guest=vmwrap-{job},"], capture_output=True, text=True)
    return int(r.stdout.split()[0]) if r.returncode == 0 and r.stdout.split() else None


def test_a_user_who_stops_their_qemu_cannot_hang_the_epilog_or_drain_the_node(cluster, jobdir):
    """QEMU runs as the job's user, who can SIGSTOP it: root's save would wait on its monitor until
    slurmd gave up on the epilog and drained the node. The VM is destroyed instead; the job's own
    --on-lost-checkpoint (default fail) decides what happens to it."""
    job = submit(cluster, jobdir, COUNTER.format(extra=""), "-p", "requeue")
    out = jobdir / f"slurm-{job}.out"
    wait_for(lambda: out.exists() and len(values(out.read_text())) >= 3, "the job to count to 3")
    node = cluster.job(job)["BatchHost"]
    pid = qemu_pid(job)
    assert pid
    assert cluster.run("kill", "-STOP", str(pid), user="vmwrapuser").returncode == 0  # the user can
    t0 = time.monotonic()
    assert cluster.run("scontrol", "requeue", job).returncode == 0
    wait_for(lambda: not qemu_running(job), "the stopped VM to be destroyed", timeout=60)
    info = cluster.wait_state(job, FINAL, timeout=180)
    assert time.monotonic() - t0 < 100          # PrologEpilogTimeout is 120 s: it never came close
    assert info["JobState"] == "FAILED" and info["Restarts"] == "1", info
    text = out.read_text()
    assert "QEMU was stopped" in text and "--on-lost-checkpoint" in text, text
    assert "DRAIN" not in cluster.run("scontrol", "show", "node", node).stdout.upper()
