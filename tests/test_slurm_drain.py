"""`vmwrap drain NODE` on a real Slurm 22.05 cluster with real VMs (issue 20).

A counter VM job and a plain job share node c1. Draining c1 must leave it DRAIN with the admin's
reason, save the VM job and restore it on another node (its output holds every value exactly once),
and leave the plain job running to its end on c1: requeueing a job without a VM would throw its work
away, and a drained node waits for its running jobs anyway (what `scontrol update state=drain` does).
"""

from __future__ import annotations

import subprocess

import pytest

from harness.terminal import run_on_pty
from harness.slurm_jobs import FINAL, module_cluster, submit, values, wait_for
from harness.slurm_jobs import jobdir as new_jobdir

pytestmark = pytest.mark.vm
N = 24
COUNTER = ("#!/bin/sh\n#VMWRAP --image=busybox\n"
           f"i=0; while [ $i -lt {N} ]; do i=$((i+1)); echo n=$i; sleep 1; done\n")


@pytest.fixture(scope="module")
def cluster(appliance, virt_type, test_user):
    with module_cluster("drain", appliance, virt_type) as c:
        yield c


@pytest.fixture
def jobdir(cluster, test_user):
    return new_jobdir(cluster, test_user)


def vmwrap_drain(cluster, *args) -> subprocess.CompletedProcess:
    return subprocess.run(["vmwrap", "--config", str(cluster.base / "vmwrap-c1.toml"), "drain", *args],
                          capture_output=True, text=True, env=cluster.env, timeout=300)


def node_line(cluster, node: str) -> str:
    return cluster.run("scontrol", "show", "node", "-o", node).stdout


def test_drain_saves_the_vm_job_elsewhere_and_leaves_the_plain_job(cluster, jobdir):
    # Not pinned with -w: a requeued job keeps its requested nodes, and it must be free to move.
    job = submit(cluster, jobdir, COUNTER, "-n", "1", "--mem=1000")
    out = jobdir / f"slurm-{job}.out"
    wait_for(lambda: out.exists() and len(values(out.read_text())) >= 2, "the VM job to count to 2")
    node = cluster.job(job)["BatchHost"]
    plain = submit(cluster, jobdir, "#!/bin/sh\nsleep 40\necho plain-done\n", "-w", node, "-n", "1", "--mem=100")
    wait_for(lambda: out.exists() and len(values(out.read_text())) >= 4, "the VM job to count to 4")
    assert cluster.job(plain)["JobState"] == "RUNNING"

    dry = vmwrap_drain(cluster, node, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"job {job}: would requeue" in dry.stdout and f"job {plain}: left running" in dry.stdout, dry.stdout
    assert "DRAIN" not in node_line(cluster, node)                     # a dry run changes nothing
    assert cluster.job(job)["Restarts"] == "0"

    # On a terminal (stderr), the admin sees the saves counted while they wait.
    code, stdout, stderr = run_on_pty(["vmwrap", "--config", str(cluster.base / "vmwrap-c1.toml"), "drain", node,
                                       "--reason", "disk swap", "--timeout", "120"], env=cluster.env, timeout=150)
    assert code == 0, stdout + stderr.decode(errors="replace")
    assert f"job {job}: saved" in stdout, stdout
    assert f"job {plain}: left running" in stdout, stdout
    assert "saving VM jobs" in stderr.decode(errors="replace") and "1/1" in stderr.decode(errors="replace"), stderr
    line = node_line(cluster, node)
    assert "DRAIN" in line and "Reason=disk swap" in line, line

    info = cluster.wait_state(job, FINAL, timeout=180)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", info
    assert info["NodeList"] != node and info["Restarts"] == "1", info
    assert values(out.read_text()) == list(range(1, N + 1)), out.read_text()

    p = cluster.wait_state(plain, FINAL, timeout=60)
    assert p["JobState"] == "COMPLETED" and p["NodeList"] == node and p["Restarts"] == "0", p
    assert "plain-done" in (jobdir / f"slurm-{plain}.out").read_text()
    ledger = subprocess.run(["sqlite3", str(cluster.base / "nodes" / "c1" / "state" / "ledger.sqlite"),
                             f"select json_extract(detail, '$.status') from events where job_id='{job}' "
                             "and event='drained'"], capture_output=True, text=True).stdout
    assert ledger.split() == ["saved"], ledger
    cluster.run("scontrol", "update", f"nodename={node}", "state=resume", check=True)


def test_a_bad_node_name_is_a_clear_error(cluster):
    r = vmwrap_drain(cluster, "c9")
    assert r.returncode == 1 and "Slurm has no node 'c9'" in r.stderr, r.stderr
    r = vmwrap_drain(cluster, "c1,c2")
    assert r.returncode == 1 and "invalid node name 'c1,c2'" in r.stderr, r.stderr
    r = vmwrap_drain(cluster, "c2", "--reason", "two\nlines")
    assert r.returncode == 1 and "one line of printable characters" in r.stderr, r.stderr
    for n in ("c1", "c2"):
        assert "DRAIN" not in node_line(cluster, n)


def test_a_job_slurm_will_not_requeue_is_reported_failed_and_keeps_running(cluster, jobdir):
    job = submit(cluster, jobdir, COUNTER, "-w", "c3", "-n", "1", "--mem=1000", "--no-requeue")
    out = jobdir / f"slurm-{job}.out"
    wait_for(lambda: out.exists() and len(values(out.read_text())) >= 2, "the VM job to count to 2")
    # Asked for c3 by name: requeued, it would wait for c3 to come back, and the admin is told so.
    dry = vmwrap_drain(cluster, "c3", "--dry-run")
    assert f"job {job}: would requeue (it asked for node c3 by name (--nodelist)" in dry.stdout, dry.stdout
    r = vmwrap_drain(cluster, "c3", "--reason", "bios update", "--timeout", "60")
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"job {job}: failed (the scheduler refused to requeue it" in r.stdout, r.stdout
    assert "DRAIN" in node_line(cluster, "c3")
    info = cluster.wait_state(job, FINAL, timeout=120)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", info
    assert values(out.read_text()) == list(range(1, N + 1))
    cluster.run("scontrol", "update", "nodename=c3", "state=resume", check=True)
