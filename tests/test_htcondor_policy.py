"""HTCondor's own policies act on the whole VM: the startd's SUSPEND / CONTINUE pause and resume it
(not only condor_suspend), and preemption by a better-priority user saves it, to be restored when
the job is matched again on the other execute node.

A real HTCondor 23.9 pool (harness.condor_pool: two startds on this host), real VMs. The guest's
counter lives only in its shell's memory and appends each value to count.log in the shared work dir
(HTCondor truncates the job's output when it starts it again, count.log is kept): a VM that was not
paused kept counting, one that was not restored starts again from 1; count.log must hold every value
exactly once.
"""

from __future__ import annotations

import os
import pwd
import subprocess
import time
from pathlib import Path

import pytest

from harness.condor_pool import ROOT, VmwrapSite
from test_htcondor_checkpoint import LIFE, counting_on, startd_policy, values, wait_for

pytestmark = pytest.mark.vm
RIVAL = "vmwraprival"  # a second submitter, whose user priority the test makes the better one

if not (ROOT / ".vmwrap-condor-root").exists():
    pytest.skip(f"no HTCondor root at {ROOT} (scripts/build-condor-root.sh)", allow_module_level=True)


@pytest.fixture(scope="module")
def rival(test_user) -> pwd.struct_passwd:
    """Created before the pool starts: the pool copies the host's users into its chroot then."""
    try:
        return pwd.getpwnam(RIVAL)
    except KeyError:
        subprocess.run(["useradd", "-m", "-U", RIVAL], check=True)
        return pwd.getpwnam(RIVAL)


@pytest.fixture(scope="module")
def condor(appliance, virt_type, test_user, rival, libvirtd):
    with VmwrapSite(Path(f"/var/tmp/vmwrap-condorpolicy-{os.getpid()}"), appliance, virt_type) as site:
        yield site


def submit_counter(condor, n: int) -> tuple[Path, int]:
    """A counter to n as a vanilla job in a shared dir (a restore needs the same work dir), avoiding
    the startd named in VmwrapAvoid (the test steers the rematch with condor_qedit)."""
    d = condor.jobdir()
    (d / "count.sh").write_text(
        f"#!/bin/sh\ni=0; while [ $i -lt {n} ]; do i=$((i+1)); echo n=$i; echo n=$i >> count.log; sleep 1; done\n")
    (d / "count.sh").chmod(0o755)
    os.chown(d / "count.sh", pwd.getpwnam(condor.user).pw_uid, -1)
    cluster, r = condor.submit(d, "\n".join([
        "executable = count.sh", "should_transfer_files = NO",
        "output = out.txt", "error = err.txt", "log = log.txt", "request_memory = 512",
        '+VmwrapImage = "busybox"', '+VmwrapAvoid = "none"',
        "requirements = TARGET.VmwrapStartd =!= MY.VmwrapAvoid", "queue", ""]))
    assert cluster > 0, r.stdout + r.stderr
    return d, cluster


def domstate(name: str) -> str:
    return subprocess.run(["virsh", "-c", "qemu:///system", "domstate", name],
                          capture_output=True, text=True).stdout.strip()


def slot_activity(condor, cluster: int) -> str | None:
    ads = condor.pool.query("startds", f"JobId =?= \"{cluster}.0\"", ["Name", "Activity"])
    return ads[0]["Activity"] if ads else None


def test_startd_suspend_pauses_the_vm_and_continue_resumes_it(condor):
    """SUSPEND true for the job's slot: the startd suspends the claim (Activity Suspended), the VM is
    paused and the counter stands still; CONTINUE true: resumed, and it counts on from where it stood."""
    n = 20
    d, cluster = submit_counter(condor, n)
    job, name = f"{cluster}.0", f"vmwrap-{cluster}.0"
    first = counting_on(condor, d, cluster, 3)
    out = d / "count.log"
    mine = f'(MY.VmwrapStartd =?= "{first}") && (TARGET.ClusterId =?= {cluster})'
    with startd_policy(condor, "WANT_SUSPEND = True", f"SUSPEND = {mine}", "CONTINUE = False"):
        wait_for(lambda: domstate(name) == "paused", f"the VM {name} paused", 60, condor)
        wait_for(lambda: slot_activity(condor, cluster) == "Suspended", "the slot's Suspended activity", 30, condor)
        assert condor.pool.job(cluster, 0, ["JobStatus"])["JobStatus"] == 7  # SUSPENDED, as the schedd sees it
        stood = values(out.read_text())
        assert len(stood) < n, stood
        time.sleep(4)
        assert values(out.read_text()) == stood  # paused: not a value more
        with startd_policy(condor, "SUSPEND = False", f"CONTINUE = {mine}"):
            wait_for(lambda: domstate(name) == "running", f"the VM {name} resumed", 60, condor)
            ad = condor.pool.wait_job(cluster, 0, (4, 5), 120, ["ExitCode", "HoldReason", "JobRunCount"])
    text, err = out.read_text(), (d / "err.txt").read_text()
    assert (ad["JobStatus"], ad["ExitCode"], ad["JobRunCount"]) == (4, 0, 1), (ad, text, err, condor.logs())
    assert values((d / "out.txt").read_text()) == list(range(1, n + 1))
    assert values(text) == list(range(1, n + 1)), (text, err)
    events = [e for e, _ in condor.ledger(job)]
    assert [e for e in events if e in LIFE] == ["created", "exited"], events
    assert [e for e in events if e in ("paused", "resumed")] == ["paused", "resumed"], events


def userprio(condor, user: str, factor: int) -> None:
    """condor_userprio finds the negotiator through the collector: a CI run once asked while its ad was
    not there ("Can't locate negotiator in local pool"), though it had matched the job; ask again."""
    end = time.monotonic() + 120
    while True:
        r = condor.pool.run("/usr/bin/condor_userprio", "-setfactor", f"{user}@vmwrap.test", str(factor))
        if r.returncode == 0 or "locate negotiator" not in r.stderr or time.monotonic() > end:
            break
        time.sleep(2)
    if r.returncode != 0:  # two CI runs lost the negotiator's ad for a minute: say what the pool had
        ads = condor.pool.run("/usr/bin/condor_status", "-any", "-af", "MyType", "Name", "MyAddress")
        raise AssertionError(f"{r.stdout}{r.stderr}\ncollector's ads:\n{ads.stdout}{ads.stderr}\n"
                             f"{condor.pool.logs(40)}")


def test_a_better_priority_user_preempts_the_vm_job_which_is_saved_and_restored(condor, rival):
    """The rival's job can only run on the startd the VM job holds; with the negotiator allowed to
    preempt (PREEMPTION_REQUIREMENTS) and the VM job's owner given a far worse priority factor, the
    negotiator hands that slot to the rival. The startd vacates the VM job (WANT_VACATE: a soft kill,
    as for any eviction): its VM is saved, and restored when it is matched again on the other startd."""
    n = 40
    d, cluster = submit_counter(condor, n)
    job = f"{cluster}.0"
    first = counting_on(condor, d, cluster, 3)
    other = next(s for s in condor.pool.startds if s != first)
    assert condor.pool.run("/usr/bin/condor_qedit", str(cluster), "VmwrapAvoid", f'"{first}"',
                           user=condor.user).returncode == 0
    rd = condor.base / "submit" / f"rival-{os.urandom(3).hex()}"
    rd.mkdir()
    os.chown(rd, rival.pw_uid, rival.pw_gid)
    userprio(condor, condor.user, 1000000)
    userprio(condor, RIVAL, 1)
    try:
        with startd_policy(condor, "WANT_VACATE = True", "PREEMPTION_REQUIREMENTS = True"):
            rc, r = condor.pool.submit("\n".join([
                "executable = /bin/sleep", "arguments = 5", "transfer_executable = false",
                "output = out.txt", "error = err.txt", "request_memory = 256",
                f'requirements = TARGET.VmwrapStartd =?= "{first}"', "queue", ""]), RIVAL, rd)
            assert rc > 0, r.stdout + r.stderr
            wait_for(lambda: (condor.pool.job(cluster, 0, ["JobRunCount"]) or {}).get("JobRunCount") == 2
                     or (condor.pool.job(cluster, 0, ["JobStatus"]) or {}).get("JobStatus") in (4, 5),
                     "the VM job's second match", 240, condor)
        ad = condor.pool.wait_job(cluster, 0, (4, 5), 240, ["ExitCode", "HoldReason", "LastRemoteHost", "JobRunCount"])
        rad = condor.pool.wait_job(rc, 0, (4, 5), 120, ["ExitCode", "LastRemoteHost"])
    finally:
        userprio(condor, condor.user, 1000)
    text, err = (d / "count.log").read_text(), (d / "err.txt").read_text()
    assert (ad["JobStatus"], ad["ExitCode"]) == (4, 0), (ad, text, err, condor.logs())
    assert f"@{other}@" in ad["LastRemoteHost"] and ad["JobRunCount"] == 2, (ad, [e for e, _ in condor.ledger(job)])
    assert (rad["JobStatus"], rad["ExitCode"]) == (4, 0) and f"@{first}@" in rad["LastRemoteHost"], rad
    assert values(text) == list(range(1, n + 1)), (text, err)
    events = condor.ledger(job)
    assert [e for e, _ in events if e in LIFE] == ["created", "saved", "restored", "exited"], events
    assert not (condor.checkpoints / job).exists()
