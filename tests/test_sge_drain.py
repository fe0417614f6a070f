"""`vmwrap drain HOST --scheduler sge` on a real Grid Engine 8.1.9 cell of two hosts, real VMs.

The VM job's host is drained (its queue instances disabled) and the job rescheduled with `qmod -rj`:
its epilog saves the VM, the other host restores it, and its output holds every value exactly once.
This cell's two hosts share one libvirtd, where a restart's prolog would destroy the old run's VM by
its name (see test_sge_checkpoint): the other host is disabled until the checkpoint is there, as when
a site has no free host at once.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
from pathlib import Path

import pytest

from harness import sge_jobs
from harness.polling import values, wait_for
from harness.sge_jobs import module_cell, running_host

pytestmark = pytest.mark.vm
N = 24
COUNTER = ("#!/bin/sh\n#VMWRAP --image=busybox\n"
           f"i=0; while [ $i -lt {N} ]; do i=$((i+1)); echo n=$i; sleep 1; done\n")


@pytest.fixture(scope="module")
def cell(appliance, virt_type, test_user):
    with module_cell("sgedrain", appliance, virt_type, hosts=2) as c:
        yield c


@pytest.fixture
def jobdir(cell, test_user):
    with sge_jobs.fresh_jobdir(cell, test_user) as d:
        yield d


def qsub(cell, jobdir, script: str, *args: str) -> str:
    path = jobdir / f"job-{os.urandom(3).hex()}.sh"
    path.write_text(script)
    os.chown(path, 1234, 1234)
    r = cell.run("qsub", "-terse", "-cwd", "-q", "vmwrap.q", *args, str(path), user="vmwrapuser", cwd=str(jobdir))
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout.strip()


def stdout(jobdir: Path, job: str) -> str:
    o = next(jobdir.glob(f"*.o{job}"), None)
    return o.read_text() if o else ""



def drain(cell, *args) -> subprocess.Popen:
    return subprocess.Popen(["vmwrap", "--config", cell.vmwrap_config, "drain", "--scheduler", "sge", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_drain_moves_the_vm_job_to_the_other_host(cell, jobdir):
    job = qsub(cell, jobdir, COUNTER, "-r", "y")
    wait_for(lambda: len(values(stdout(jobdir, job))) >= 4, "the job to count to 4")
    first = wait_for(lambda: running_host(cell, job), "the job to show as running")
    other = next(h for h in cell.hosts if h != first)
    dry = drain(cell, first, "--dry-run")
    out, err = dry.communicate(timeout=120)
    assert dry.returncode == 0 and f"job {job}: would requeue" in out, out + err
    assert "d" not in cell.queue_state(first)
    assert cell.run("qmod", "-d", f"vmwrap.q@{other}").returncode == 0   # no room elsewhere yet
    p = drain(cell, first, "--reason", "disk swap", "--timeout", "180")
    wait_for(lambda: (cell.base / "checkpoints" / job / "manifest.json").exists(), "the checkpoint", 150)
    assert cell.run("qmod", "-e", f"vmwrap.q@{other}").returncode == 0
    out, err = p.communicate(timeout=200)
    assert p.returncode == 0, out + err
    assert f"job {job}: saved" in out, out + err
    assert "d" in cell.queue_state(first)
    wait_for(lambda: cell.run("qstat", "-j", job).returncode != 0, "the job to end", 240)
    assert values(stdout(jobdir, job)) == list(range(1, N + 1)), stdout(jobdir, job)
    # qacct gets the second run's record a moment after qstat forgot the job
    hosts = wait_for(lambda: (lambda h: h if len(h) >= 2 else None)(
        re.findall(r"^hostname\s+(\S+)", cell.run("qacct", "-j", job).stdout, re.M)), "both runs' records", 30)
    assert hosts[-1] == other, hosts
    db = sqlite3.connect(cell.node_dir(cell.host) / "state" / "ledger.sqlite")
    rows = [json.loads(d) for (d,) in db.execute(
        "select detail from events where job_id=? and event='drained'", (job,))]
    db.close()
    assert [r["status"] for r in rows] == ["saved"] and rows[0]["node"] == first, rows


def test_an_unknown_host_is_a_clear_error(cell):
    p = drain(cell, "nosuchhost")
    out, err = p.communicate(timeout=120)
    assert p.returncode == 1 and "Grid Engine has no execution host 'nosuchhost'" in err, out + err
