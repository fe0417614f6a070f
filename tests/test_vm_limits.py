"""Per-job disk limits and a full state disk, with real guests (issue 14, finding 9).

A job over a limit is stopped by root and fails naming the setting; a disk that fills up while a job
is prepared fails that job, never the prolog (which would drain the node)."""

from __future__ import annotations

import errno
import os
import subprocess
import time
from pathlib import Path

import pytest
from conftest import Site

from vmwrap import launcher, limits, payload
from vmwrap.errors import CacheFullError, JobDiskError
from vmwrap.job import Job
from vmwrap.ledger import Ledger

pytestmark = pytest.mark.vm

HDR = "#!/bin/sh\n#VMWRAP --image=busybox\n"


def _watchers(site_dir: Path) -> list[int]:
    """The output-limit watchers of this test's site (their argv names its run dir): another test's
    jobs on the same host have their own."""
    out = []
    for p in os.listdir("/proc"):
        try:
            argv = open(f"/proc/{p}/cmdline", "rb").read() if p.isdigit() else b""
            if b"vmwrap.limits" in argv and str(site_dir).encode() + b"/" in argv:
                out.append(int(p))
        except OSError:
            pass
    return out


def test_output_over_job_output_max_bytes_stops_the_job(tmp_path, appliance, virt_type, workdir):
    site = Site(tmp_path, appliance, virt_type, job_output_max_bytes=1 << 20)
    before = set(_watchers(tmp_path))
    t0 = time.monotonic()
    r = site.run(HDR + "echo start; head -c 200000000 /dev/zero | tr '\\0' x; echo never-reached >&2\n", workdir,
                 "--job-id", "lim-out", timeout=300)
    took = time.monotonic() - t0
    assert r.returncode == limits.EXIT_LIMIT == 153, r.stderr[-2000:]
    err = r.stderr.decode()
    assert "vmwrap: the job's output exceeded job_output_max_bytes = 1048576 (1.0 MiB): " in err, err[-2000:]
    assert err.endswith(" bytes written to stdout/stderr; its VM was stopped\n")
    assert b"never-reached" not in r.stderr
    assert r.stdout.startswith(b"start\nxxxx") and (1 << 20) - 100 < len(r.stdout) < 200_000_000
    print(f"delivered {len(r.stdout)} bytes of stdout with a 1 MiB limit, job took {took:.1f} s")
    events = [(e["event"], e["detail"].get("kind")) for e in Ledger(site.settings().ledger_path).events("lim-out")]
    assert ("failed", "limit") in events and events[-1][0] == "destroyed"
    assert site.leftovers() == []
    assert set(_watchers(tmp_path)) <= before


def test_guest_flooding_its_console_is_stopped(tmp_path, appliance, virt_type, workdir):
    """A hostile guest (root inside: the default user of `vmwrap run` here) writes the serial console,
    which nothing the job's user runs on the host can stop."""
    site = Site(tmp_path, appliance, virt_type, console_max_bytes=64 << 10)
    r = site.run(HDR + "echo start; yes 0123456789abcdef0123456789abcdef > /dev/ttyS0\n", workdir, timeout=300)
    assert r.returncode == 153, r.stderr[-2000:]
    assert "vmwrap: the guest's serial console output exceeded console_max_bytes = 65536 (64.0 KiB)" in r.stderr.decode()
    assert r.stdout == b"start\n"
    assert site.leftovers() == []


def test_a_job_within_its_limits_is_untouched(tmp_path, appliance, virt_type, workdir):
    site = Site(tmp_path, appliance, virt_type, job_output_max_bytes=1 << 20, console_max_bytes=64 << 10)
    r = site.run(HDR + "head -c 500000 /dev/zero | tr '\\0' y; echo; echo err >&2; exit 3\n", workdir)
    assert (r.returncode, len(r.stdout), r.stderr) == (3, 500_001, b"err\n")
    assert site.leftovers() == []


# ---- ENOSPC while a job is prepared: the job fails with the reason, the node stays up ----

def _job(job_id: str, workdir) -> Job:
    return Job(job_id=job_id, scheduler="none", user="root", uid=0, gid=0, work_dir=str(workdir), script=HDR)


@pytest.fixture
def slurm_hooks(monkeypatch, tmp_path):
    """vmwrap_plugins/slurm/hooks.py with a stand-in scontrol (no Slurm here) and drains recorded, not done."""
    from vmwrap_plugins.slurm import hooks

    fake = tmp_path / "scontrol"
    fake.write_text('#!/bin/sh\necho "JobId=$4 JobName=x MinMemoryNode=0"\n')
    fake.chmod(0o755)
    monkeypatch.setattr(hooks, "SCONTROL", str(fake))
    hooks.drained = []
    monkeypatch.setattr(hooks.Slurm, "take_out", lambda self, env, reason: hooks.drained.append(reason))
    return hooks


def _slurm_env(job_id: str, workdir) -> dict[str, str]:
    return {"SLURM_JOB_ID": job_id, "SLURM_JOB_USER": "root", "SLURM_JOB_UID": "0", "SLURM_JOB_GID": "0",
            "SLURM_JOB_WORK_DIR": str(workdir), "SLURM_JOB_CPUS_PER_NODE": "1",
            "SLURM_JOB_COMMENT": "vmwrap:image=busybox,memory=,cpus=,lost="}


def _payload_says(site, job_id: str, capfd) -> tuple[int, str]:
    capfd.readouterr()
    rc = payload.attach(site.settings().jobs_dir / job_id, job_id, "echo ran\n", {})
    return rc, capfd.readouterr().err


def _no_space(self):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.run_dir / "ctl" / "ids"))


def test_enospc_writing_control_files_is_a_job_failure(site, workdir, monkeypatch):
    monkeypatch.setattr(launcher.Launcher, "_write_control", _no_space)
    lx = launcher.Launcher(_job("nospc0", workdir), site.settings())
    with pytest.raises(JobDiskError) as e:
        lx.prepare()
    assert isinstance(e.value, CacheFullError)  # what every scheduler hook fails the job for
    assert str(e.value) == (f"cannot prepare the job's VM: No space left on device writing "
                            f"{site.state}/jobs/nospc0/ctl/ids (state_dir = {site.state})")
    launcher.teardown("nospc0", site.settings())


def test_enospc_in_the_prolog_fails_the_job_not_the_node(site, workdir, monkeypatch, slurm_hooks, capfd):
    monkeypatch.setattr(launcher.Launcher, "_write_control", _no_space)
    assert slurm_hooks.prolog(site.settings(), _slurm_env("nospc1", workdir)) == 0
    assert slurm_hooks.drained == []
    rc, err = _payload_says(site, "nospc1", capfd)
    assert rc == payload.EXIT_NODE
    assert err == (f"vmwrap: error: cannot prepare the job's VM: No space left on device writing "
                   f"{site.state}/jobs/nospc1/ctl/ids (state_dir = {site.state})\n")
    assert sorted(p.name for p in (site.state / "jobs" / "nospc1").iterdir()) == ["error"]


def test_full_state_disk_fails_the_job_not_the_node(site, workdir, slurm_hooks, capfd):
    """A really full file system (a 2 MiB tmpfs as state_dir): the job's overlay does not fit."""
    site.state.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2M", "vmwrap-test-full", str(site.state)], check=True)
    try:
        settings = site.settings()
        Ledger(settings.ledger_path).record("x", "vmwrap-x", "prepare")  # an existing node has its ledger
        st = os.statvfs(site.state)
        with open(site.state / "filler", "wb") as f:  # leave 64 KiB: less than a qcow2 overlay needs
            f.write(b"\0" * (st.f_bavail * st.f_frsize - (64 << 10)))
        assert slurm_hooks.prolog(settings, _slurm_env("nospc2", workdir)) == 0
        assert slurm_hooks.drained == []
        rc, err = _payload_says(site, "nospc2", capfd)
        assert rc == payload.EXIT_NODE
        assert err.startswith("vmwrap: error: no space left on the node's state disk for the job's overlay "), err
        assert launcher.teardown("nospc2", settings)  # the epilog then cleans up as usual
    finally:
        subprocess.run(["umount", "-l", str(site.state)], check=False)
