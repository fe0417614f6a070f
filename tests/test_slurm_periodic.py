"""Periodic checkpoints on real Slurm (issue 20): `#VMWRAP --checkpoint-every` saves the running VM into
the shared store while the job goes on; after its node crashes the requeued job continues from the last
checkpoint on another node, every value exactly once; a save into a full store leaves the job running
and the last good checkpoint intact; an interval below the site's minimum is refused at submit.

Real Slurm 22.05 (3 nodes), real libvirtd, QEMU guests and node agents; the crash is real SIGKILLs.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from harness.processes import crash, matching
from harness.slurm_cluster import NODES
from harness.slurm_jobs import FINAL, module_cluster, submit, values, wait_for
from harness.slurm_jobs import jobdir as new_jobdir
from vmwrap.ledger import Ledger

pytestmark = pytest.mark.vm
EVERY = 5    # s: the job's interval, the site's minimum
N = 24
# The guest counts in its shell's memory and appends each value to a work dir file: after a restore the
# count goes on (values before the checkpoint are not computed again, the file shows each once).
COUNTER = ("#!/bin/sh\n#VMWRAP --image=busybox --memory=128M\n{extra}"
           f"i=0; while [ $i -lt {N} ]; do i=$((i+1)); echo n=$i; echo $i >> progress; sleep 1; done\n")


@pytest.fixture(scope="module")
def cluster(appliance, virt_type, test_user):
    with module_cluster("periodic", appliance, virt_type, checkpoint_min_every_s=float(EVERY)) as c:
        yield c


@pytest.fixture
def jobdir(cluster, test_user):
    return new_jobdir(cluster, test_user)


def output(d: Path, job: str) -> str:
    p = d / f"slurm-{job}.out"
    return p.read_text(errors="replace") if p.exists() else ""


def events(cluster, job: str, node: str | None = None) -> list[dict]:
    return [e for n in ([node] if node else NODES) for e in Ledger(cluster.node_dir(n) / "state" / "ledger.sqlite").events(job)]


def named(evs: list[dict], name: str) -> list[dict]:
    return [e for e in evs if e["event"] == name]


def node_of(cluster, job: str) -> str:
    def where():
        info = cluster.job(job)
        return info.get("JobState") == "RUNNING" and info.get("NodeList") in NODES and info["NodeList"]
    return wait_for(where, f"job {job} to run on a node", timeout=300)


def drained(cluster) -> list[str]:
    r = cluster.run("sinfo", "-h", "-N", "-o", "%N %T %E")
    return [ln for ln in r.stdout.splitlines() if "drain" in ln.lower() or "down" in ln.lower()]


def qemu_pid(job: str) -> int | None:
    r = subprocess.run(["pgrep", "-f", f"guest=vmwrap-{job},"], capture_output=True, text=True)
    return int(r.stdout.split()[0]) if r.returncode == 0 and r.stdout.split() else None


def store(cluster) -> Path:
    return cluster.base / "checkpoints"


@pytest.mark.timeout(400)
def test_a_job_with_periodic_checkpoints_runs_through_with_the_same_output(cluster, jobdir):
    plain_dir = jobdir / "plain"
    plain_dir.mkdir()
    os.chown(plain_dir, jobdir.stat().st_uid, jobdir.stat().st_gid)
    ckpt = submit(cluster, jobdir, COUNTER.format(extra=f"#VMWRAP --checkpoint-every={EVERY}s\n"), "-w", "c1")
    plain = submit(cluster, plain_dir, COUNTER.format(extra=""), "-w", "c2")
    for job, d in ((ckpt, jobdir), (plain, plain_dir)):
        info = cluster.wait_state(job, FINAL, timeout=300)
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), (info, output(d, job))
    assert output(jobdir, ckpt) == output(plain_dir, plain) == "".join(f"n={i}\n" for i in range(1, N + 1))
    saves = named(events(cluster, ckpt, "c1"), "checkpointed")
    assert len(saves) >= 2, [e["detail"] for e in named(events(cluster, ckpt, "c1"), "checkpoint_failed")]
    assert all(0 < s["detail"]["pause_s"] < 5 for s in saves), saves
    assert not named(events(cluster, plain, "c2"), "checkpointed")
    wait_for(lambda: not (store(cluster) / ckpt).exists(), "the ended job's checkpoint to be deleted", timeout=60)
    assert not drained(cluster)


def checkpointed_values(cluster, job: str, out: str) -> int:
    """How many values the job's output file held when its last checkpoint was taken: the file's size
    the checkpoint recorded (what a restart after a crash cuts an appended file back to)."""
    meta = json.loads((store(cluster) / job / "job.json").read_text())
    return len(values(out.encode()[:meta["delivered"]["stdout_size"]].decode(errors="replace")))


@pytest.mark.timeout(600)
@pytest.mark.parametrize("open_mode", [(), ("--open-mode=append",)], ids=["truncate", "append"])
def test_after_its_node_crashes_the_job_continues_elsewhere_from_its_last_checkpoint(cluster, jobdir, test_user,
                                                                                    open_mode):
    """Slurm's default output mode truncates the file on restart (the step delivers it all again);
    with --open-mode=append it keeps what was delivered after the checkpoint: the step cuts it back."""
    job = submit(cluster, jobdir, COUNTER.format(extra=f"#VMWRAP --checkpoint-every={EVERY}s\n"), "--requeue",
                 *open_mode)
    node = node_of(cluster, job)
    # A checkpoint taken before the first value (the guest still starting) could not tell a resume
    # from a start again: wait for one that holds values.
    wait_for(lambda: named(events(cluster, job, node), "checkpointed")
             and checkpointed_values(cluster, job, output(jobdir, job)) > 0,
             "a periodic checkpoint holding values", timeout=300)
    # Crash at the first value delivered after this checkpoint, well before the next one (an interval
    # away; a crash right after a later checkpoint would leave nothing for the cut-back to remove).
    seen = len(values(output(jobdir, job)))
    wait_for(lambda: len(values(output(jobdir, job))) > seen, "the job to count on after it", timeout=60)
    slurmd = ["slurmd", "-D", "-N", node, "-f", str(cluster.conf)]
    crash(matching(" ".join(slurmd)) + matching(rf"slurmstepd: \[{job}\.") + matching(f"/state/jobs/{job}/")
                   + [qemu_pid(job)])
    wait_for(lambda: qemu_pid(job) is None, "QEMU to die", timeout=30)
    before = len(values(output(jobdir, job)))
    saved = checkpointed_values(cluster, job, output(jobdir, job))
    assert saved < before < N, (saved, before)    # values delivered after the checkpoint are in the file
    # What slurmctld does once the node stays silent for SlurmdTimeout: down, its jobs requeued.
    r = cluster.run("scontrol", "update", f"nodename={node}", "state=down", "reason=crashed")
    assert r.returncode == 0, r.stderr
    try:
        try:
            info = cluster.wait_state(job, FINAL, timeout=400)
        except AssertionError as e:
            raise AssertionError(f"{e}\noutput: {output(jobdir, job)!r}\nprogress: "
                                 f"{(jobdir / 'progress').read_text().split() if (jobdir / 'progress').exists() else None}"
                                 f"\nledger: {[(e['node'] if 'node' in e else '', e['event']) for e in events(cluster, job)]}") from None
        out = output(jobdir, job)
        assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), (info, out)
        assert values(out) == list(range(1, N + 1)), out          # every value exactly once
        new = info["NodeList"]
        assert new != node
        assert named(events(cluster, job, new), "restored"), events(cluster, job, new)
        done = [int(v) for v in (jobdir / "progress").read_text().split()]
        # Resumed, not started again: the values before the checkpoint were computed once; those
        # after it (at most an interval and the crash's moment) twice.
        assert all(done.count(v) == 1 for v in range(1, saved + 1)), (saved, done)
        assert sorted(set(done)) == list(range(1, N + 1)), done
        again = len(done) - N
        assert 0 <= again <= EVERY + 4 and again <= before, (done, before)
    finally:
        cluster.procs.append(subprocess.Popen(slurmd, env={k: v for k, v in cluster.env.items() if k != "VMWRAP_CONFIG"},
                                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                              start_new_session=True))
        time.sleep(2)
        cluster.run("scontrol", "update", f"nodename={node}", "state=resume")
    # The crashed node's leftovers go with its repair pass; the store keeps nothing of the ended job.
    env = dict(cluster.env, PATH=os.environ["PATH"])
    env.pop("VMWRAP_CONFIG", None)
    r = subprocess.run(["vmwrap", "--config", str(cluster.base / f"vmwrap-{node}.toml"), "reconcile", "slurm", "--once"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    wait_for(lambda: not (cluster.node_dir(node) / "state" / "jobs" / job).exists(), "the crashed run dir to go")
    wait_for(lambda: not any(p.name.startswith(job) for p in store(cluster).iterdir()), "the checkpoint to go", timeout=60)
    wait_for(lambda: not drained(cluster), f"{node} back in service", timeout=120)


@pytest.mark.timeout(400)
def test_a_periodic_save_into_a_full_store_keeps_the_job_and_the_last_checkpoint(cluster, jobdir):
    from vmwrap.checkpoint import Store, init_store

    # The shared store on a small file system of its own (filled up below, never the host's disk).
    store(cluster).mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m,mode=0700", "vmwrap-periodic-store", str(store(cluster))],
                   check=True)
    try:
        init_store(store(cluster), cluster.base / "checkpoint.key")  # new storage: `vmwrap checkpoints init`
        _full_store(cluster, jobdir, Store(store(cluster), cluster.base / "checkpoint.key"))
    finally:
        subprocess.run(["umount", str(store(cluster))], check=True)


def _full_store(cluster, jobdir, st) -> None:
    job = submit(cluster, jobdir, COUNTER.format(extra=f"#VMWRAP --checkpoint-every={EVERY}s\n"), "-w", "c2")
    first = wait_for(lambda: named(events(cluster, job, "c2"), "checkpointed"), "a first checkpoint", timeout=300)
    created = st.verify(job)["created"]
    # The shared storage fills up: the next saves fail.
    filler = store(cluster) / ".filler"
    subprocess.run(["fallocate", "-l", str(os.statvfs(store(cluster)).f_bavail * os.statvfs(store(cluster)).f_frsize
                                           - (1 << 20)), str(filler)], check=True)
    try:
        wait_for(lambda: named(events(cluster, job, "c2"), "checkpoint_failed"), "a failed periodic save", timeout=120)
        assert st.verify(job)["created"] == created     # the last good checkpoint, whole and authentic
        assert len(named(events(cluster, job, "c2"), "checkpointed")) == len(first)
    finally:
        filler.unlink()
    info = cluster.wait_state(job, FINAL, timeout=300)
    out = output(jobdir, job)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), (info, out)
    assert values(out) == list(range(1, N + 1)), out
    assert not drained(cluster)
    wait_for(lambda: not (store(cluster) / job).exists(), "the ended job's checkpoint to be deleted", timeout=60)


def test_an_interval_below_the_site_minimum_is_refused_at_submit(cluster, jobdir):
    r = cluster.sbatch(COUNTER.format(extra="#VMWRAP --checkpoint-every=2s\n"), user="vmwrapuser", cwd=jobdir)
    assert r.returncode != 0
    assert f"--checkpoint-every=2s is below this site's minimum of {EVERY}s (checkpoint_min_every_s)" in r.stderr, r.stderr
    r = cluster.sbatch(COUNTER.format(extra="#VMWRAP --checkpoint-every=soon\n"), user="vmwrapuser", cwd=jobdir)
    assert r.returncode != 0 and "--checkpoint-every=soon: not a duration" in r.stderr, r.stderr
