"""Per-job disk limits under Slurm: the root watcher started by the prolog outlives it, stops the VM of a
job writing too much, and the batch step (the job's user) fails the job naming the setting."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from harness.slurm_cluster import Cluster
from vmwrap.catalog import register

pytestmark = pytest.mark.vm
HDR = "#!/bin/sh\n#VMWRAP --image=busybox\n"


@pytest.fixture(scope="module")
def cluster(appliance, virt_type, test_user):
    base = Path(f"/var/tmp/vmwrap-slurm-lim-{os.getpid()}")
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    base.chmod(0o755)
    catalog = base / "images.toml"
    register(str(catalog), appliance)
    c = Cluster(base, {"catalog": str(catalog), "accel": virt_type, "grace_seconds": 5.0,
                       "job_output_max_bytes": 1 << 20})
    c.start()
    yield c
    c.stop()
    shutil.rmtree(base, ignore_errors=True)


def test_job_over_its_output_limit_fails_and_the_node_stays_up(cluster, test_user):
    d = cluster.base / "work" / "lim"
    d.mkdir(parents=True)
    os.chown(d, test_user.pw_uid, test_user.pw_gid)
    script = HDR + "echo start; head -c 100000000 /dev/zero | tr '\\0' x; echo; echo never-reached\n"
    r = cluster.sbatch(script, user=test_user.pw_name, cwd=d)
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().split(";")[0]
    info = cluster.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, 180)
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "153:0"), info
    out = (d / f"slurm-{job}.out").read_bytes()
    assert b"vmwrap: the job's output exceeded job_output_max_bytes = 1048576 (1.0 MiB)" in out
    assert b"never-reached" not in out and len(out) < 100_000_000
    node = info["NodeList"]
    assert "DRAIN" not in cluster.run("scontrol", "show", "node", node).stdout.upper()
    ok = cluster.sbatch(HDR + "echo fine\n", user=test_user.pw_name, cwd=d)
    job2 = ok.stdout.strip().split(";")[0]
    info2 = cluster.wait_state(job2, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, 180)
    assert info2["JobState"] == "COMPLETED"
