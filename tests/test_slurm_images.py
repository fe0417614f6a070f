"""Image policy and provenance on real Slurm 22.05 (3 nodes, slurmdbd accounting, real VMs): a request
above an image's max_memory is refused at sbatch; a python3 job runs in a Debian appliance built with
packages, and its image's digest is in sacct's AdminComment and the node's ledger; a requeued job of
a `checkpoint = false` image is not saved and follows its --on-lost-checkpoint (restart or fail)."""

from __future__ import annotations

import dataclasses
import fcntl
import os
import tempfile
from pathlib import Path

import pytest

from harness.slurm_jobs import FINAL, jobdir, module_cluster, submit, values, wait_for
from vmwrap import appliance as builder
from vmwrap import config as vmwrap_config
from vmwrap.ledger import Ledger

pytestmark = pytest.mark.vm
APPLIANCES = Path(os.environ.get("VMWRAP_APPLIANCE_DIR", "/var/cache/vmwrap/appliances"))
PACKAGES = ["python3-minimal"]
N = 12
COUNTER = ("#!/bin/sh\n#VMWRAP --image=nockpt --on-lost-checkpoint={policy}\n"
           f"i=0; while [ $i -lt {N} ]; do i=$((i+1)); echo n=$i; sleep 1; done\n")


def python3_disk() -> Path:
    """A bookworm minbase root disk with python3, built once per machine by vmwrap's own builder
    (debootstrap --include) under the appliance dir, outside the repository; reused afterwards."""
    d = APPLIANCES / "python3-test"
    disk, stamp = d / "root.qcow2", d / ".inputs"
    key = f"bookworm {','.join(PACKAGES)}\n"
    d.mkdir(parents=True, exist_ok=True)
    with open(d / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (disk.is_file() and stamp.exists() and stamp.read_text() == key):
            stamp.unlink(missing_ok=True)
            with tempfile.TemporaryDirectory(prefix="vmwrap-py3-", dir="/var/tmp") as t:
                builder.build_debootstrap_root(Path(t) / "root.qcow2", Path(t), packages=PACKAGES,
                                               debs=APPLIANCES / ".debs")
                os.replace(Path(t) / "root.qcow2", disk)
            stamp.write_text(key)
    return disk


@pytest.fixture(scope="module")
def images(appliance):
    """Entries sharing the busybox appliance's kernel and initrd (the guest agent under test)."""
    return {
        "small": dataclasses.replace(appliance, name="small", memory_mib=None, max_memory_mib=256),
        "nockpt": dataclasses.replace(appliance, name="nockpt", checkpoint=False),
        "python3": dataclasses.replace(appliance, name="python3", disk=builder.artifact(python3_disk(), "qcow2"),
                                       origin="appliance debootstrap bookworm +" + ",".join(PACKAGES)),
    }


@pytest.fixture(scope="module")
def cluster(appliance, images, virt_type, test_user):
    with module_cluster("images", appliance, virt_type, images=images.values(), accounting=True) as c:
        yield c


def test_above_max_memory_is_refused_at_sbatch(cluster, test_user):
    d = jobdir(cluster, test_user)
    r = cluster.sbatch("#!/bin/sh\n#VMWRAP --image=small --memory=512M\necho hi\n", user="vmwrapuser", cwd=d)
    assert r.returncode != 0
    assert "sbatch: error: vmwrap: --memory=512M is more than image small allows (max_memory = 256M)" in r.stderr
    assert submit(cluster, d, "#!/bin/sh\n#VMWRAP --image=small --memory=256M\ntrue\n")  # at the limit: accepted


def test_python3_job_runs_and_accounting_names_the_image_digest(cluster, images, test_user):
    d = jobdir(cluster, test_user)
    job = submit(cluster, d, "#!/bin/sh\n#VMWRAP --image=python3 --memory=256M\n"
                             "exec python3 -c 'import sys, platform; print(\"python\", sys.version.split()[0], "
                             "platform.release())'\n")
    info = cluster.wait_state(job, FINAL, timeout=180)
    out = (d / f"slurm-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", (info, out)
    assert "python 3.11" in out, out
    digest = images["python3"].digest
    want = f"vmwrap image=python3 digest={digest}"

    def admin_comment():
        return cluster.run("sacct", "-n", "-P", "-X", "-j", job, "-o", "AdminComment").stdout.strip() == want
    wait_for(admin_comment, f"sacct to show {want!r}", timeout=60)
    node = info["BatchHost"]
    led = Ledger(vmwrap_config.load(str(cluster.base / f"vmwrap-{node}.toml")).ledger_path)
    assert led.provenance()[job] == {"image": "python3", "digest": digest, "origin": images["python3"].origin}


def test_requeued_job_of_a_checkpoint_false_image_is_not_saved(cluster, test_user):
    d = jobdir(cluster, test_user)
    jobs = {p: submit(cluster, d, COUNTER.format(policy=p), "-p", "requeue") for p in ("restart", "fail")}
    outs = {p: d / f"slurm-{j}.out" for p, j in jobs.items()}
    for p, out in outs.items():
        wait_for(lambda: out.exists() and len(values(out.read_text())) >= 3, f"the {p} job to count to 3", timeout=180)
    for j in jobs.values():
        assert cluster.run("scontrol", "requeue", j).returncode == 0
    done = {p: cluster.wait_state(j, FINAL, timeout=240) for p, j in jobs.items()}
    why = "its VM was not saved: image nockpt may not be saved (checkpoint = false in the site's image catalog)"
    text = {p: out.read_text() for p, out in outs.items()}
    assert done["restart"]["JobState"] == "COMPLETED" and done["restart"]["Restarts"] == "1", done
    assert why in text["restart"] and "starting the job again from the beginning" in text["restart"], text
    assert values(text["restart"])[-N:] == list(range(1, N + 1)), text["restart"]
    assert done["fail"]["JobState"] == "FAILED" and done["fail"]["ExitCode"] == "66:0", done
    assert why in text["fail"] and "not starting the job again from the beginning" in text["fail"], text
    for j in jobs.values():
        assert not (cluster.base / "checkpoints" / j).exists()
        events = [e["event"] for n in ("c1", "c2", "c3")
                  for e in Ledger(vmwrap_config.load(str(cluster.base / f"vmwrap-{n}.toml")).ledger_path).events(j)]
        assert "save_failed" in events and "saved" not in events, events
