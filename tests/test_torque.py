"""Torque jobs in per-job VMs, through the glue exactly as qsub and pbs_mom call it.

harness/torque_contract.py plays qsub (SUBMITFILTER), pbs_mom (prologue, the job's login shell with
the spooled script on stdin, epilogue, output delivery as NAME.o<SEQ>/NAME.e<SEQ>), qdel, qsig and
the checkpoint/restart scripts; the VMs, libvirt, QEMU and the node agents are real. Two moms share
the checkpoint store and key (each its own state dir, as two nodes)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.torque_contract import Mom, Server, output, wait_for
from vmwrap.catalog import register
from vmwrap.config import render
from vmwrap.resources import HOOKS

pytestmark = pytest.mark.vm
HDR = "#!/bin/sh\n#PBS -N {name}\n#VMWRAP --image=busybox\n"


@pytest.fixture(scope="module")
def torque(appliance, virt_type, test_user):
    base = Path(f"/var/tmp/vmwrap-torque-{os.getpid()}")
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    base.chmod(0o755)
    register(str(base / "images.toml"), appliance)
    from vmwrap.checkpoint import init_store, keygen

    init_store(base / "store", keygen(base / "checkpoint.key"))  # the site's key, `vmwrap checkpoints init`
    agents, moms = [], []
    filt = base / "submitfilter"
    server = None
    for name in ("mom1", "mom2"):
        cfg = base / f"vmwrap-{name}.toml"
        cfg.write_text(render({"catalog": str(base / "images.toml"), "accel": virt_type, "grace_seconds": 5.0,
                               "state_dir": str(base / name / "vmwrap"), "cache_dir": str(base / name / "cache"),
                               "checkpoint_dir": str(base / "store"),
                               "checkpoint_key_file": str(base / "checkpoint.key")}))
        if server is None:
            filt.write_text(f"#!/bin/sh\nexec {HOOKS / 'torque-submitfilter'} --config {cfg} \"$@\"\n")
            filt.chmod(0o755)
            server = Server(base, filt)
        agents.append(subprocess.Popen([sys.executable, "-m", "vmwrap.cli", "--config", str(cfg), "agent"],
                                       start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        moms.append(Mom(server, base, name, HOOKS, cfg))
    wait_for(lambda: all((base / n / "vmwrap" / "agent.sock").exists() for n in ("mom1", "mom2")), "node agents", 30)
    yield server, moms
    for a in agents:
        a.kill()
        a.wait()
    for n in ("mom1", "mom2"):
        for d in (base / n / "vmwrap" / "jobs").glob("*"):
            subprocess.run(["virsh", "-c", "qemu:///system", "destroy", f"vmwrap-{d.name}"], capture_output=True)
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def jobdir(torque, test_user):
    server, _ = torque
    d = server.base / "work" / f"t{os.urandom(3).hex()}"
    d.mkdir(parents=True)
    os.chown(d, test_user.pw_uid, test_user.pw_gid)
    return d


def submit(torque, jobdir, user, script: str, *args):
    server, _ = torque
    p = jobdir / "job.sh"
    p.write_text(script)
    os.chown(p, user.pw_uid, user.pw_gid)
    rc, err, job = server.qsub(p, *args, user=user, cwd=jobdir)
    assert rc == 0, err
    return job


def run_dir(mom: Mom, job) -> Path:
    from vmwrap_plugins.torque.jobs import job_id

    return Path(str(mom.config).replace(f"vmwrap-{mom.name}.toml", f"{mom.name}/vmwrap/jobs")) / job_id(job.id)


def domain(job) -> str:
    from vmwrap_plugins.torque.jobs import job_id

    return f"vmwrap-{job_id(job.id)}"


def spool_out(mom: Mom, job) -> str:
    p = mom.spool / f"{job.id}.OU"
    return p.read_text(errors="replace") if p.exists() else ""


def qemu_running(job) -> bool:
    return subprocess.run(["pgrep", "-f", f"guest={domain(job)},"], capture_output=True).returncode == 0


@pytest.mark.parametrize("code", [0, 3])
def test_job_runs_in_its_vm_with_pbs_output_and_exit_code(torque, jobdir, test_user, code):
    """Submit filter -> prologue (root, Torque 6.1's argv and environment, umask 0077) -> the job's
    login shell as the user with the spooled script on stdin -> epilogue (11 args, the exit status)
    -> NAME.o<SEQ> / NAME.e<SEQ> in PBS_O_WORKDIR (Admin Guide appendix G; start_exec.c)."""
    _, (mom, _) = torque
    job = submit(torque, jobdir, test_user, HDR.format(name="vmjob")
                 + f'uname -r; id -u; pwd; echo "$PBS_JOBID"; echo err >&2; exit {code}\n')
    assert mom.start(job) == 0, job.history
    assert mom.wait(job) == code, output(job)
    out, err = output(job)
    guest_kernel = Path("/var/cache/vmwrap/appliances/.kernel/version").read_text().strip()
    assert out.splitlines() == [guest_kernel, str(test_user.pw_uid), str(jobdir), job.id], out
    assert err == "err\n"
    assert (jobdir / f"vmjob.o{job.seq}").exists() and (jobdir / f"vmjob.e{job.seq}").exists()
    assert not run_dir(mom, job).exists() and not qemu_running(job)


def test_native_request_with_qsub_v(torque, jobdir, test_user):
    """`qsub -v VMWRAP_IMAGE=busybox` on a script with no directive at all."""
    _, (mom, _) = torque
    job = submit(torque, jobdir, test_user, "#!/bin/sh\nuname -r\n", "-v", "VMWRAP_IMAGE=busybox")
    assert mom.start(job) == 0 and mom.wait(job) == 0
    assert output(job)[0].strip() == Path("/var/cache/vmwrap/appliances/.kernel/version").read_text().strip()


def test_job_without_request_runs_bare(torque, jobdir, test_user):
    _, (mom, _) = torque
    job = submit(torque, jobdir, test_user, "#!/bin/sh\n#PBS -N bare\nuname -r\n")
    assert mom.start(job) == 0 and mom.wait(job) == 0
    assert output(job)[0].strip() == os.uname().release


def test_qdel_kills_the_job_then_the_epilogue_removes_its_vm(torque, jobdir, test_user):
    """qdel: SIGTERM to the session, SIGKILL kill_delay later; the epilogue then runs (exit status
    271) and destroys the VM, which Torque never signals (libvirtd started it)."""
    _, (mom, _) = torque
    job = submit(torque, jobdir, test_user, HDR.format(name="del") + "echo started; sleep 300\n")
    assert mom.start(job) == 0
    wait_for(lambda: "started" in spool_out(mom, job), "the job to start", 90)
    mom.qdel(job)
    status = mom.wait(job)
    assert status in (271, 143, 128 + 15) or status > 0, status
    assert not qemu_running(job) and not run_dir(mom, job).exists()


def test_qsig_suspend_pauses_the_whole_vm_and_resume_continues(torque, jobdir, test_user):
    """qsig -s suspend: SIGTSTP to every process of the session, SIGSTOP 5 s later; resume: SIGCONT
    (requests.c). The payload pauses the VM through the node agent on SIGTSTP, before it is stopped."""
    _, (mom, _) = torque
    job = submit(torque, jobdir, test_user, HDR.format(name="susp")
                 + "i=0; while [ $i -lt 14 ]; do i=$((i+1)); echo n=$i; sleep 1; done\n")
    assert mom.start(job) == 0
    wait_for(lambda: "n=3\n" in spool_out(mom, job), "the job to count", 90)
    mom.suspend(job)   # returns after the SIGSTOP, 5 s after the SIGTSTP
    state = subprocess.run(["virsh", "-c", "qemu:///system", "domstate", domain(job)], capture_output=True,
                           text=True).stdout.strip()
    assert state == "paused"
    frozen = spool_out(mom, job)
    time.sleep(3)
    assert spool_out(mom, job) == frozen
    mom.resume(job)
    assert mom.wait(job) == 0
    assert [int(n) for n in re.findall(r"^n=(\d+)$", output(job)[0], re.M)] == list(range(1, 15))


def test_qhold_saves_the_vm_and_qrls_restores_it_on_another_mom(torque, jobdir, test_user):
    """qhold: `$checkpoint_script SID ID USER GROUP DIR NAME 15 DEPTH` (checkpoint.c) saves the VM into
    the shared store; the job ends and is held. qrls on mom2: no prologue, `$restart_script SID ID USER
    GROUP DIR NAME` becomes the job, restores the VM and streams on. The counter lives only in the
    guest shell's memory: every value appears exactly once."""
    _, (mom1, mom2) = torque
    n = 20
    job = submit(torque, jobdir, test_user, HDR.format(name="ckpt")
                 + f"i=0; while [ $i -lt {n} ]; do i=$((i+1)); echo n=$i; sleep 1; done\n", "-c", "enabled")
    assert mom1.start(job) == 0
    wait_for(lambda: "n=4\n" in spool_out(mom1, job), "the job to count", 90)
    rc, why = mom1.qhold(job)
    assert rc == 0, why
    mom1.wait(job)
    assert job.state == "H" and not qemu_running(job) and not run_dir(mom1, job).exists()
    store = mom1.server.base / "store"
    assert (store / domain(job)[len("vmwrap-"):] / "manifest.json").exists()
    time.sleep(2)
    mom2.restart(job)
    assert mom2.wait(job, timeout=180) == 0, output(job)
    out, err = output(job)
    assert [int(v) for v in re.findall(r"^n=(\d+)$", out, re.M)] == list(range(1, n + 1)), out + err
    jid = domain(job)[len("vmwrap-"):]
    assert not run_dir(mom2, job).exists() and not (store / jid).exists() and not (store / f".{jid}.torque.json").exists()
    assert any(h.startswith("restarted mom2") for h in job.history)
