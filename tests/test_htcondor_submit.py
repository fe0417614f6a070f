"""What condor_submit accepts as a VM job on a real HTCondor 23.9 pool (harness.condor_pool): a
vmwrap job is one VM on one node in the vanilla universe, or one VM per node in the parallel universe.
A job asking for an image in any other universe is refused at submit with a reason naming what it
asked for and what to submit instead; a vanilla job with several CPUs is accepted and runs in a VM."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness.condor_pool import ROOT, VmwrapSite

pytestmark = pytest.mark.vm

if not (ROOT / ".vmwrap-condor-root").exists():
    pytest.skip(f"no HTCondor root at {ROOT} (scripts/build-condor-root.sh)", allow_module_level=True)


@pytest.fixture(scope="module")
def condor(appliance, virt_type, test_user, libvirtd):
    site = VmwrapSite(Path(f"/var/tmp/vmwrap-condorsubmit-{os.getpid()}"), appliance, virt_type)
    site.pool.extra_config += "\nNUM_CPUS = 2\n"  # each startd one slot of 2 CPUs (the harness gives 1)
    with site:
        yield site


def _submit(condor, universe_lines: list[str], image: bool = True):
    d = condor.jobdir()
    text = "\n".join(["executable = /bin/true", "transfer_executable = false", "request_memory = 256",
                      *universe_lines, *(['+VmwrapImage = "busybox"'] if image else []), "queue", ""])
    return condor.submit(d, text)


def test_parallel_universe_vm_job_is_accepted_at_submit(condor):
    """One VM per node (tests/test_htcondor_parallel.py runs one); this pool has no dedicated scheduler."""
    cluster, r = _submit(condor, ["universe = parallel", "machine_count = 2"])
    assert cluster > 0, r.stdout + r.stderr
    condor.pool.run("/usr/bin/condor_rm", str(cluster), user=condor.user)


@pytest.mark.parametrize("universe, lines", [
    ("vm", ["universe = vm", "vm_type = kvm", "vm_memory = 256", "vm_disk = disk.img:vda:w"]),
    ("docker", ["universe = docker", "docker_image = debian"]),
    ("docker", ["universe = parallel", "machine_count = 2", "+WantDocker = true"]),   # docker in disguise
    ("container", ["universe = container", "container_image = debian.sif"]),
    ("grid", ["universe = grid", "grid_resource = batch slurm"]),
    ("scheduler", ["universe = scheduler"]),
    ("local", ["universe = local"]),
])
def test_vm_job_in_another_universe_is_refused_at_submit(condor, universe, lines):
    cluster, r = _submit(condor, lines)
    out = r.stdout + r.stderr
    assert cluster == -1, out
    assert f"vmwrap: +VmwrapImage needs the vanilla or parallel universe (this job: universe = {universe})" in out, out
    assert "or, for several nodes, the parallel universe (universe = parallel; machine_count = N)" in out, out


def test_interactive_vm_job_is_refused_at_submit(condor):
    """condor_submit -interactive: its session would start beside the VM (docs/interactive.md)."""
    d = condor.jobdir()
    f = d / "interactive.sub"
    f.write_text('request_memory = 256\n+VmwrapImage = "busybox"\nqueue\n')
    f.chmod(0o644)
    r = condor.pool.run("/usr/bin/condor_submit", "-interactive", str(f), user=condor.user, cwd=str(d), timeout=60)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert "vmwrap: interactive jobs (condor_submit -interactive) cannot run in a VM under HTCondor yet" in out, out


def test_parallel_job_without_an_image_is_untouched(condor):
    cluster, r = _submit(condor, ["universe = parallel", "machine_count = 2"], image=False)
    assert cluster > 0, r.stdout + r.stderr
    condor.pool.run("/usr/bin/condor_rm", str(cluster), user=condor.user)


def test_vanilla_job_with_several_cpus_is_accepted_and_runs_in_its_vm(condor):
    d = condor.jobdir()
    (d / "nproc.sh").write_text("#!/bin/sh\ngrep -c ^processor /proc/cpuinfo\n")
    os.chown(d / "nproc.sh", 1234, 1234)
    (d / "nproc.sh").chmod(0o755)
    cluster, r = condor.submit(d, "\n".join([
        "universe = vanilla", "executable = nproc.sh", "should_transfer_files = YES",
        "when_to_transfer_output = ON_EXIT", "output = out.txt", "error = err.txt", "request_cpus = 2",
        "request_memory = 256", '+VmwrapImage = "busybox"', "queue", ""]))
    assert cluster > 0, r.stdout + r.stderr
    ad = condor.pool.wait_job(cluster, 0, (4, 5), 150, ["ExitCode", "HoldReason"])
    assert ad["JobStatus"] == 4, (ad, condor.logs())
    assert (d / "out.txt").read_text() == "2\n", ((d / "err.txt").read_text(), condor.logs())
    assert "created" in [e for e, _ in condor.ledger(f"{cluster}.0")]
