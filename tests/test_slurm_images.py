"""Image policy and provenance on real Slurm 22.05 (3 nodes, slurmdbd accounting, real VMs): a request
above an image's max_memory is refused at sbatch; a python3 job runs in a Debian appliance built with
packages, and its image's digest is in sacct's AdminComment and the node's ledger; a requeued job of
a `checkpoint = false` image is not saved and follows its --on-lost-checkpoint (restart or fail);
an image of each import kind (a whole Debian disk, an OCI layout, a docker save, a SIF, a rootfs
tarball; all made without vmwrap) runs a python3 script and a C program through sbatch."""

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

# The first test's fixtures build the images once per machine (debootstrap): 250 s on a fresh one.
pytestmark = [pytest.mark.vm, pytest.mark.timeout(900)]
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


IMPORTS = ("disk", "oci", "docker-archive", "sif", "tarball")


def imported_images(base: Path) -> dict:
    """One image per import kind, imported (as `vmwrap image import` does) into base/appliances from the
    cached test archives and disk (harness/: debootstrap trees packed without vmwrap)."""
    from harness.disk_images import debian_disk
    from harness.test_archives import archives
    from vmwrap.cli.image_import import _importer

    out, catalog = base / "appliances", str(base / "imported.toml")
    out.mkdir(parents=True)
    (out / ".kernel").symlink_to(APPLIANCES / ".kernel")  # the machine's cached Debian kernel
    sources = {**archives(), "disk": debian_disk("bookworm")}
    return {kind: _importer(kind)(sources[kind], f"imp-{kind}", out, catalog, max_bytes=8 << 30,
                                  on_stage=lambda _s: None) for kind in IMPORTS}


@pytest.fixture(scope="module")
def images(appliance, tmp_path_factory):
    """Entries sharing the busybox appliance's kernel and initrd (the guest agent under test), and one
    image of each import kind."""
    return {
        **imported_images(tmp_path_factory.mktemp("slurm-imports")),
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


@pytest.fixture(scope="module")
def c_program(tmp_path_factory) -> Path:
    from harness.test_archives import host_c_program

    return host_c_program(tmp_path_factory.mktemp("cprog"))


def test_an_image_of_each_import_kind_runs_python_and_c_through_sbatch(cluster, images, c_program, test_user):
    import shutil

    jobs = {}
    for kind in IMPORTS:
        d = jobdir(cluster, test_user)
        (d / "hello.py").write_text("import sys\nprint('python', sys.version_info[:2])\n")
        shutil.copy2(c_program, d / "hello")
        os.chown(d / "hello", test_user.pw_uid, test_user.pw_gid)
        jobs[kind] = (d, submit(cluster, d, f"#!/bin/sh\n#VMWRAP --image=imp-{kind} --memory=256M\n"
                                            "python3 hello.py && ./hello && grep -h ^VERSION_CODENAME= /etc/os-release\n"))
    for kind, (d, job) in jobs.items():
        info = cluster.wait_state(job, FINAL, timeout=300)
        out = (d / f"slurm-{job}.out").read_text()
        assert info["JobState"] == "COMPLETED", (kind, info, out)
        assert out.split("\n") == ["python (3, 11)", "hello from C 42", "VERSION_CODENAME=bookworm", ""], (kind, out)
        want = f"vmwrap image=imp-{kind} digest={images[kind].digest}"
        wait_for(lambda: cluster.run("sacct", "-n", "-P", "-X", "-j", job, "-o", "AdminComment").stdout.strip() == want,
                 f"sacct to show {want!r}", timeout=60)


def test_a_job_in_an_imported_full_os_image_is_saved_and_restored(cluster, test_user):
    """A whole Debian disk with its own kernel still boots through vmwrap's agent and stays saveable:
    requeued mid-run, its VM is saved and restored and the count goes on, every value once."""
    d = jobdir(cluster, test_user)
    job = submit(cluster, d, "#!/bin/sh\n#VMWRAP --image=imp-disk --memory=256M\n"
                             f"i=0; while [ $i -lt {N} ]; do i=$((i+1)); echo n=$i; sleep 1; done\n", "-p", "requeue")
    out = d / f"slurm-{job}.out"
    wait_for(lambda: out.exists() and len(values(out.read_text())) >= 3, "the job to count to 3", timeout=180)
    assert cluster.run("scontrol", "requeue", job).returncode == 0
    info = cluster.wait_state(job, FINAL, timeout=240)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, out.read_text())
    assert values(out.read_text()) == list(range(1, N + 1)), out.read_text()
    events = [e["event"] for n in ("c1", "c2", "c3")
              for e in Ledger(vmwrap_config.load(str(cluster.base / f"vmwrap-{n}.toml")).ledger_path).events(job)]
    assert "saved" in events and "restored" in events, events
