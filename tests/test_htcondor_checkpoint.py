"""HTCondor eviction loses nothing: condor_vacate_job, condor_vacate and the startd's PREEMPT save the
job's VM into the shared checkpoint store, and the job, matched again on the other execute node,
restores it and continues; a missing or corrupt checkpoint follows the job's --on-lost-checkpoint.

A real HTCondor 23.9 pool (harness.condor_pool: two startds on this host, one bridge, one libvirtd),
real VMs. The guest's counter lives only in the shell's memory: after the move it must continue, and
the job's output and count.log (appended to in the shared work dir, which HTCondor does not truncate
when it starts the job again) must hold every value exactly once.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path

import pytest

from harness import polling
from harness.condor_pool import ROOT, VmwrapSite
from harness.polling import values

pytestmark = pytest.mark.vm
N = 24
COUNTER = (f"#!/bin/sh\n{{extra}}i=0; while [ $i -lt {N} ]; do i=$((i+1)); echo n=$i; echo n=$i >> count.log; "
           "sleep 1; done\n")
LIFE = ("created", "saved", "save_failed", "restored", "exited", "failed")

if not (ROOT / ".vmwrap-condor-root").exists():
    pytest.skip(f"no HTCondor root at {ROOT} (scripts/build-condor-root.sh)", allow_module_level=True)


@pytest.fixture(scope="module")
def condor(appliance, virt_type, test_user, libvirtd):
    with VmwrapSite(Path(f"/var/tmp/vmwrap-condorckpt-{os.getpid()}"), appliance, virt_type) as site:
        yield site


def wait_for(cond, what: str, timeout: float, condor):
    return polling.wait_for(cond, what, timeout, condor.logs)


def submit_counter(condor, extra: str = "") -> tuple[Path, int]:
    """The counter as a vanilla job in a shared directory (no file transfer: a restored VM needs its
    work dir at the same path); it avoids the startd named in VmwrapAvoid and runs only while
    VmwrapGo is not false (the test steers the rematch with condor_qedit)."""
    d = condor.jobdir()
    (d / "count.sh").write_text(COUNTER.format(extra=extra))
    (d / "count.sh").chmod(0o755)
    os.chown(d / "count.sh", 1234, 1234)
    cluster, r = condor.submit(d, "\n".join([
        "executable = count.sh", "should_transfer_files = NO",
        "output = out.txt", "error = err.txt", "log = log.txt", "request_memory = 512",
        '+VmwrapImage = "busybox"', '+VmwrapAvoid = "none"',
        "requirements = (TARGET.VmwrapStartd =!= MY.VmwrapAvoid) && (MY.VmwrapGo =!= false)", "queue", ""]))
    assert cluster > 0, r.stderr
    return d, cluster


def counting_on(condor, d: Path, cluster: int, n: int = 5) -> str:
    """Wait until the job counted to n; the startd it runs on."""
    def counted():
        out = d / "out.txt"
        if not out.exists() or len(values(out.read_text(errors="replace"))) < n:
            return None
        host = (condor.pool.job(cluster, 0, ["RemoteHost"]) or {}).get("RemoteHost") or ""
        return host.split("@")[1] if host.count("@") == 2 else None

    return wait_for(counted, f"job {cluster} to count to {n}", 180, condor)


@contextlib.contextmanager
def startd_policy(condor, *lines: str):
    """Startd policy lines appended to the pool's config for the block (condor_reconfig), then taken
    out again: the module's one pool stays as the other tests expect it."""
    before = condor.pool.config.read_text()
    condor.pool.set_config(before + "\n".join(lines) + "\n")
    try:
        assert condor.pool.run("/usr/sbin/condor_reconfig").returncode == 0
        yield
    finally:
        condor.pool.set_config(before)
        condor.pool.run("/usr/sbin/condor_reconfig")


@contextlib.contextmanager
def vacate_slot(condor, slot: str):
    """condor_vacate (the admin's, startd-side), with HTCondor's default WANT_VACATE (the pool sets
    False). `-all`: the job is the pool's only one. 23.9's `-name node1@HOST` sends VACATE_CLAIM
    for a slot of that name (there is none), and neither `-name` nor `-constraint` locates a slot."""
    with startd_policy(condor, "WANT_VACATE = True"):
        r = condor.pool.run("/usr/bin/condor_vacate", "-graceful", "-all")
        assert r.returncode == 0, r.stdout + r.stderr
        yield


def evict(condor, how: str, cluster: int, first: str):
    """The job's eviction from startd `first`: schedd-side (condor_vacate_job, the job's owner) or
    startd-side (condor_vacate of that startd, or its PREEMPT expression turning true for the job)."""
    if how == "condor_vacate_job":
        assert condor.pool.run("/usr/bin/condor_vacate_job", str(cluster), user=condor.user).returncode == 0
        return contextlib.nullcontext()
    slot = condor.pool.job(cluster, 0, ["RemoteHost"])["RemoteHost"]  # slot1_1@node1@HOST
    assert slot.split("@")[1] == first, slot
    if how == "condor_vacate":
        return vacate_slot(condor, slot)
    # PREEMPT: a soft kill (WANT_VACATE) of just this job on just that startd.
    return startd_policy(condor, "WANT_VACATE = True",
                         f'PREEMPT = (MY.VmwrapStartd =?= "{first}") && (TARGET.ClusterId =?= {cluster})')


@pytest.mark.parametrize("how", ["condor_vacate_job", "PREEMPT", "condor_vacate"])
def test_vacate_saves_the_vm_and_the_other_startd_restores_it(condor, how):
    d, cluster = submit_counter(condor)
    job = f"{cluster}.0"
    first = counting_on(condor, d, cluster)
    other = next(s for s in condor.pool.startds if s != first)
    assert condor.pool.run("/usr/bin/condor_qedit", str(cluster), "VmwrapAvoid", f'"{first}"', user=condor.user).returncode == 0
    with evict(condor, how, cluster, first):
        wait_for(lambda: (condor.pool.job(cluster, 0, ["JobRunCount"]) or {}).get("JobRunCount") == 2
                 or (condor.pool.job(cluster, 0, ["JobStatus"]) or {}).get("JobStatus") in (4, 5),
                 "the job's second match", 240, condor)
    ad = condor.pool.wait_job(cluster, 0, (4, 5), 240, ["ExitCode", "ExitBySignal", "HoldReason", "LastRemoteHost",
                                                        "JobRunCount"])
    out, err = (d / "out.txt").read_text(), (d / "err.txt").read_text()
    assert (ad["JobStatus"], ad["ExitCode"]) == (4, 0), (ad, out, err, condor.logs())
    assert f"@{other}@" in ad["LastRemoteHost"] and ad["JobRunCount"] == 2, (
        [e for e, _ in condor.ledger(job)], ad["LastRemoteHost"], ad["JobRunCount"], (d / "err.txt").read_text())
    assert values(out) == list(range(1, N + 1)), (out, err)
    assert values((d / "count.log").read_text()) == list(range(1, N + 1)), (d / "count.log").read_text()
    events = condor.ledger(job)
    assert [e for e, _ in events if e in LIFE] == ["created", "saved", "restored", "exited"], events
    saved = dict(events)["saved"]
    assert saved["scheduler"] == "condor" and saved["memory_bytes"] > 0, saved
    assert not (condor.checkpoints / job).exists()
    assert not any(p.name.startswith(job + ".") for p in condor.checkpoints.iterdir())


def test_condor_rm_of_a_saved_job_lets_gc_delete_its_checkpoint(condor):
    """Vacated and saved, the job waits (it matches nowhere); the GC keeps its checkpoint while the
    schedd has it, and deletes it once condor_rm took the waiting job away (no epilog runs then)."""
    d, cluster = submit_counter(condor)
    job = f"{cluster}.0"
    counting_on(condor, d, cluster, 3)
    assert condor.pool.run("/usr/bin/condor_qedit", str(cluster), "VmwrapGo", "false", user=condor.user).returncode == 0
    assert condor.pool.run("/usr/bin/condor_vacate_job", str(cluster), user=condor.user).returncode == 0
    wait_for(lambda: (condor.checkpoints / job / "manifest.json").exists(), "the checkpoint", 120, condor)
    condor.pool.wait_job(cluster, 0, (1,), 60)
    r = condor.gc()
    assert r.returncode == 0, r.stdout + r.stderr
    assert (condor.checkpoints / job / "manifest.json").exists()  # still queued: kept
    assert condor.pool.run("/usr/bin/condor_rm", str(cluster), user=condor.user).returncode == 0
    wait_for(lambda: condor.pool.query("jobs", f"ClusterId == {cluster} && JobStatus =!= 3", ["ClusterId"]) == [],
             "the job to leave the queue", 60, condor)
    r = condor.gc()
    assert r.returncode == 0 and f"job {job}: ended while saved" in r.stdout, r.stdout + r.stderr
    assert not (condor.checkpoints / job).exists()


def test_a_vacated_sandbox_job_starts_again_from_the_beginning(condor):
    """With file transfer the job's work dir is a new sandbox on every match, where its saved VM
    could not be restored: it is not saved, and runs again from the beginning like a bare job
    (instead of being held for a checkpoint it can never use)."""
    d = condor.jobdir()
    (d / "count.sh").write_text(COUNTER.format(extra=""))
    (d / "count.sh").chmod(0o755)
    os.chown(d / "count.sh", 1234, 1234)
    cluster, r = condor.submit(d, "\n".join([
        "executable = count.sh", "should_transfer_files = YES", "when_to_transfer_output = ON_EXIT",
        "output = out.txt", "error = err.txt", "request_memory = 512", '+VmwrapImage = "busybox"',
        '+VmwrapAvoid = "none"', "requirements = TARGET.VmwrapStartd =!= MY.VmwrapAvoid", "queue", ""]))
    assert cluster > 0, r.stderr
    job = f"{cluster}.0"
    wait_for(lambda: "created" in [e for e, _ in condor.ledger(job)], "the job's VM", 180, condor)
    time.sleep(5)  # counting in its VM
    host = condor.pool.job(cluster, 0, ["RemoteHost"])["RemoteHost"]
    assert condor.pool.run("/usr/bin/condor_qedit", str(cluster), "VmwrapAvoid", f'"{host.split("@")[1]}"',
                           user=condor.user).returncode == 0
    assert condor.pool.run("/usr/bin/condor_vacate_job", str(cluster), user=condor.user).returncode == 0
    ad = condor.pool.wait_job(cluster, 0, (4, 5), 240, ["ExitCode", "HoldReason", "JobRunCount"])
    out = (d / "out.txt").read_text()
    assert (ad["JobStatus"], ad["ExitCode"], ad["JobRunCount"]) == (4, 0, 2), (ad, condor.logs())
    assert values(out) == list(range(1, N + 1)), out
    assert [e for e, _ in condor.ledger(job) if e in LIFE] == ["created", "exited", "created", "exited"]
    assert not (condor.checkpoints / job).exists()


@pytest.mark.parametrize("policy,damage", [("fail", "corrupt"), ("restart", "corrupt"),
                                           ("fail", "missing"), ("restart", "missing")])
def test_a_lost_checkpoint_follows_the_jobs_policy(condor, policy, damage):
    """The saved VM is damaged (a byte of its memory image flipped) or gone while the vacated job
    waits (VmwrapGo = false). `restart`: it runs again from the beginning in a fresh VM and says so
    on its stderr; `fail` (the default): held with a `vmwrap:` reason naming the lost checkpoint,
    never back to idle, and no node is blamed."""
    extra = "#VMWRAP --on-lost-checkpoint=restart\n" if policy == "restart" else ""
    d, cluster = submit_counter(condor, extra)
    job = f"{cluster}.0"
    counting_on(condor, d, cluster, 3)
    assert condor.pool.run("/usr/bin/condor_qedit", str(cluster), "VmwrapGo", "false", user=condor.user).returncode == 0
    assert condor.pool.run("/usr/bin/condor_vacate_job", str(cluster), user=condor.user).returncode == 0
    saved = condor.checkpoints / job
    wait_for(lambda: (saved / "manifest.json").exists(), "the checkpoint", 120, condor)
    condor.pool.wait_job(cluster, 0, (1,), 60)
    if damage == "missing":
        shutil.rmtree(saved)
    else:
        mem = saved / "memory.save"
        with open(mem, "r+b") as f:  # flip a byte in the middle of the guest's memory image
            f.seek(mem.stat().st_size // 2)
            b = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([b[0] ^ 0xFF]))
    assert condor.pool.run("/usr/bin/condor_qedit", str(cluster), "VmwrapGo", "true", user=condor.user).returncode == 0
    ad = condor.pool.wait_job(cluster, 0, (4, 5), 240, ["ExitCode", "HoldReason", "JobRunCount", "NumHolds"])
    out, err = (d / "out.txt").read_text(), (d / "err.txt").read_text()
    why = "memory.save is corrupt" if damage == "corrupt" else "has no checkpoint to continue from"
    events = [e for e, _ in condor.ledger(job) if e in LIFE]
    if policy == "fail":
        assert ad["JobStatus"] == 5 and ad["JobRunCount"] == 2, (ad, out, err, condor.logs())
        reason = ad["HoldReason"]
        assert reason.startswith("vmwrap: ") and why in reason, reason
        assert "not starting the job again from the beginning" in reason, reason
        assert events[:3] == ["created", "saved", "failed"] and "created" not in events[3:], events
        time.sleep(3)  # held, not sent back to idle by anything
        assert condor.pool.job(cluster, 0, ["JobStatus"])["JobStatus"] == 5
        assert condor.pool.run("/usr/bin/condor_rm", str(cluster), user=condor.user).returncode == 0
    else:
        assert (ad["JobStatus"], ad["ExitCode"], ad["JobRunCount"]) == (4, 0, 2), (ad, out, err, condor.logs())
        assert why in err and "starting the job again from the beginning (--on-lost-checkpoint=restart)" in err, err
        assert values(out)[-N:] == list(range(1, N + 1)), out
        assert events == ["created", "saved", "created", "exited"], events
    # The job's fault or nobody's: the node is not taken out.
    assert not Path(str(condor.sock) + ".fault").exists()
    assert all(s.get("VmwrapFault") is None for s in condor.pool.query("startds", "true", ["Name", "VmwrapFault"]))
    assert not saved.exists()
    assert not any(p.name.startswith(job + ".") for p in condor.checkpoints.iterdir())
