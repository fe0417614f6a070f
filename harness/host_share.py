"""What test clusters running side by side on one host (pytest-xdist workers) must not share.

libvirt names each job's VM `vmwrap-<job id>` host-wide and a prolog tears down whatever VM holds its
job's name first, so every cluster hands out job ids from a range of its own: Slurm from 1,000,000
per xdist worker, Grid Engine from 300,000, HTCondor clusters from 400,000, the PBS and Torque
stand-ins from 200 and 100 plus 10,000 per worker (core tests use small fixed ids like "7"; the deb
demo 7,300,000). Host-wide setup steps run under one lock, and a cluster that stops destroys only the
VMs under its own directory (destroy_vms_under)."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator

SGE_FIRST_JOB = 300_000
CONDOR_FIRST_CLUSTER = 400_000
_LOCK = "/run/vmwrap-test-host.lock"


def worker() -> int:
    """This pytest-xdist worker's index (gw0 -> 0), 0 outside xdist."""
    w = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    return int(w[2:]) if w.startswith("gw") and w[2:].isdigit() else 0


def slurm_first_job() -> int:
    return 1_000_000 * (1 + worker())


@contextlib.contextmanager
def host_lock() -> Iterator[None]:
    """One host-wide setup step at a time (starting munged or libvirtd, adding the test user)."""
    with open(_LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def destroy_vms_under(base) -> list[str]:
    """Destroy the job VMs whose files lie under `base` (a test cluster's directory), and only those:
    another worker's cluster runs its VMs on the same libvirtd. Destroying every `vmwrap-*` domain at
    a cluster's stop killed the other worker's guests mid-job (exit 70, "the guest died without
    reporting an exit status"; libvirt's log: reason=destroyed). Returns the names destroyed."""
    import subprocess

    virsh = ["virsh", "-c", "qemu:///system"]
    prefix = str(base).rstrip("/") + "/"
    gone = []
    names = subprocess.run(virsh + ["list", "--all", "--name"], capture_output=True, text=True).stdout.split()
    for n in names:
        if not n.startswith("vmwrap-") or "kvmprobe" in n:
            continue
        xml = subprocess.run(virsh + ["dumpxml", n], capture_output=True, text=True).stdout
        if prefix in xml:
            subprocess.run(virsh + ["destroy", n], capture_output=True)
            gone.append(n)
    return gone


def clear_job_networks_under(base) -> list[str]:
    """Remove the multi-node jobs' networks (vmwrap/jobnet.py) that sites under `base` made and left (a
    cluster stopped mid-job runs no epilog), once their VMs are destroyed; returns the job ids."""
    from vmwrap import jobnet

    prefix = str(base).rstrip("/") + "/"
    cleared = []
    for job_id, site in jobnet.owners():
        if site.startswith(prefix):
            jobnet.clear(job_id)
            cleared.append(job_id)
    return cleared


LOGS = "/var/tmp/vmwrap-test-logs"
_KEEP_MAX = 1 << 20


def keep_logs(base, name: str) -> None:
    """Copy a stopping cluster's small text files (daemon logs, ledgers, run dirs' records) to
    LOGS/NAME before its directory goes: CI runs on this host, and a flaky failure is read afterwards.
    Images, cache blobs, keys, sockets and anything above 1 MiB stay behind; the last run of each module
    is kept."""
    import shutil
    from pathlib import Path

    src, dst = Path(base), Path(LOGS) / name
    shutil.rmtree(dst, ignore_errors=True)
    try:
        dev = src.stat().st_dev
    except OSError:
        return
    for d, dirs, files in os.walk(src):
        dirs[:] = [x for x in dirs if x != "blobs" and os.lstat(os.path.join(d, x)).st_dev == dev]
        for f in files:
            p = Path(d) / f
            try:
                st = p.lstat()
                if (p.is_symlink() or not p.is_file() or st.st_size > _KEEP_MAX
                        or p.suffix in (".qcow2", ".img", ".raw", ".sav", ".key")):
                    continue
                out = dst / p.relative_to(src)
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(p, out)
            except OSError:
                continue
