"""Grid Engine moves a VM job to its other host with the VM's memory: `qmod -rj` and a
checkpointing environment's migration save the VM in the epilog, the next host's prolog restores it.

A real Grid Engine 8.1.9 cell with two execution hosts on this machine (harness.sge_cell: the second
sge_execd in its own network and UTS namespace), real VMs, one shared checkpoint store. The guest's
counter lives only in the shell's memory: after the move it must continue, and the job's output must
hold every value exactly once.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import sge_jobs
from harness.polling import values, wait_for
from harness.sge_cell import CKPT
from harness.sge_jobs import module_cell, running_host
from vmwrap_plugins.sge import hooks

vm = pytest.mark.vm
N = 24
COUNTER = ("#!/bin/sh\n#VMWRAP --image=busybox\n{extra}"
           f"i=0; while [ $i -lt {N} ]; do i=$((i+1)); echo n=$i; sleep 1; done\n")


@pytest.fixture(scope="module")
def cell(appliance, virt_type, test_user):
    # fast_start: a host with a prepared snapshot of the job's shape restores it instead of booting;
    # the snapshots are prepared by one test only, the others cold-boot as without it
    with module_cell("sgeckpt", appliance, virt_type, hosts=2, fast_start=True) as c:
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


def output(jobdir: Path, job: str) -> tuple[str, str]:
    o = next(jobdir.glob(f"*.o{job}"), None)
    e = next(jobdir.glob(f"*.e{job}"), None)
    return (o.read_text() if o else ""), (e.read_text() if e else "")



def counting_on(cell, jobdir, job: str, n: int = 5) -> str:
    """Wait until the job counted to n; the host it runs on."""
    wait_for(lambda: len(values(output(jobdir, job)[0])) >= n, f"job {job} to count to {n}")
    return wait_for(lambda: running_host(cell, job), f"job {job} to show as running")


def final(cell, job: str, runs: int = 1, timeout: float = 240) -> list[dict]:
    """qacct's records of the job's runs (oldest first) once GE is done with it and wrote `runs` of
    them (a rescheduled or migrated run has its own record)."""
    wait_for(lambda: cell.run("qstat", "-j", job).returncode != 0, f"job {job} to end", timeout)

    def records():
        text = cell.run("qacct", "-j", job).stdout
        found = [dict(re.findall(r"^(\w+)\s+(.*?)\s*$", rec, re.M)) for rec in re.split(r"^=+$", text, flags=re.M)
                 if "exit_status" in rec]
        return found if len(found) >= runs else None

    return wait_for(records, f"{runs} accounting records of job {job}", 30)


def store(cell) -> Path:
    return cell.base / "checkpoints"


def ledger(cell, host: str, job: str) -> list[tuple[str, dict]]:
    db = sqlite3.connect(cell.node_dir(host) / "state" / "ledger.sqlite")
    try:
        return [(e, json.loads(d)) for e, d in
                db.execute("select event, detail from events where job_id=? order by id", (job,))]
    finally:
        db.close()


def qemu_running(job: str) -> bool:
    return subprocess.run(["pgrep", "-f", f"guest=vmwrap-{job},"], capture_output=True).returncode == 0


LIFE = ("created", "saved", "save_failed", "restored", "exited", "failed")


def check_moved(cell, jobdir, job: str, first: str) -> None:
    """The job ended once, on the other host, having counted every value exactly once; the VM was
    saved on the first host and restored on the second; the checkpoint is gone with the job."""
    other = next(h for h in cell.hosts if h != first)
    runs = final(cell, job, runs=2)
    out, err = output(jobdir, job)
    assert runs[-1]["exit_status"] == "0", (runs, out, err)
    assert runs[-1]["hostname"] == other, runs
    assert values(out) == list(range(1, N + 1)), (out, err)
    assert not (store(cell) / job).exists()
    assert not any(p.name.startswith(job + ".") for p in store(cell).iterdir())  # no markers left
    # The ledger tells the same story as a Slurm job's (the core writes both): on the first host the
    # VM was created and saved, on the second restored and ended.
    a, b = ledger(cell, first, job), ledger(cell, other, job)
    assert [e for e, _ in a if e in LIFE] == ["created", "saved"], a
    saved = dict(a)["saved"]
    assert saved["scheduler"] == "sge" and saved["memory_bytes"] > 0 and saved["total_s"] > 0, saved
    assert [e for e, _ in b if e in LIFE] == ["restored", "exited"], b
    assert dict(b)["restored"]["from_node"] == first, b
    assert dict(b)["exited"]["scheduler"] == "sge", b
    assert not (cell.node_dir(first) / "state" / "jobs" / job).exists()
    assert not (cell.node_dir(other) / "state" / "jobs" / job).exists()


@vm
def test_qmod_rj_continues_on_the_other_host_with_the_vms_memory(cell, jobdir):
    """The job waits (both queue instances disabled) until the old run saved its VM: GE 8.1.9 would
    restart it at once, and this cell's two hosts share one libvirtd, where the restart's prolog
    would destroy the old run's VM by its name (separate hosts have separate libvirtds)."""
    job = qsub(cell, jobdir, COUNTER.format(extra=""), "-r", "y")
    move_by_qmod_rj(cell, jobdir, job, counting_on(cell, jobdir, job))


def move_by_qmod_rj(cell, jobdir, job: str, first: str) -> None:
    """Reschedule the job counting on `first` with both queue instances disabled, let the other host
    take it once its checkpoint is there, and check it moved (check_moved)."""
    for h in cell.hosts:
        assert cell.run("qmod", "-d", f"vmwrap.q@{h}").returncode == 0
    assert cell.run("qmod", "-rj", job, user="vmwrapuser").returncode == 0
    wait_for(lambda: (store(cell) / job / "manifest.json").exists(), "the checkpoint", 90)
    other = next(h for h in cell.hosts if h != first)
    assert cell.run("qmod", "-e", f"vmwrap.q@{other}").returncode == 0
    check_moved(cell, jobdir, job, first)


@vm
def test_a_job_started_from_a_snapshot_under_grid_engine_moves_like_a_booted_one(cell, jobdir):
    """Issue 21: the pre-booted snapshot start works under Grid Engine (the core's, not Slurm's), and
    the VM it started is saved on one host and restored on the other like a cold-booted one."""
    vmwrap = [sys.executable, "-I", "-m", "vmwrap.cli"]
    for h in cell.hosts:
        r = subprocess.run(vmwrap + ["--config", cell.configs[h], "snapshot", "prepare", "busybox"],
                           capture_output=True, text=True, cwd="/")
        assert r.returncode == 0, r.stdout + r.stderr
    try:
        job = qsub(cell, jobdir, COUNTER.format(extra=""), "-r", "y")
        first = counting_on(cell, jobdir, job)
        created = dict(ledger(cell, first, job))["created"]
        assert created.get("started_from") == "snapshot", created
        move_by_qmod_rj(cell, jobdir, job, first)
    finally:
        for h in cell.hosts:
            subprocess.run(vmwrap + ["--config", cell.configs[h], "snapshot", "clear"], capture_output=True, cwd="/")


@vm
def test_checkpointing_environment_migrates_the_vm_to_the_other_host(cell, jobdir):
    """`qsub -ckpt vmwrap`: suspending the job (when=x) migrates it; migr_command hands the VM over."""
    job = qsub(cell, jobdir, COUNTER.format(extra=""), "-ckpt", CKPT)
    first = counting_on(cell, jobdir, job)
    assert cell.run("qmod", "-d", f"vmwrap.q@{first}").returncode == 0
    assert cell.run("qmod", "-sj", job, user="vmwrapuser").returncode == 0
    wait_for(lambda: (store(cell) / job / "manifest.json").exists(), "the checkpoint", 90)
    check_moved(cell, jobdir, job, first)


@vm
def test_qdel_is_not_a_reschedule(cell, jobdir):
    """A job deleted for good is stopped in its VM, never saved."""
    job = qsub(cell, jobdir, COUNTER.format(extra=""), "-r", "y")
    host = counting_on(cell, jobdir, job, 3)
    assert cell.run("qdel", job, user="vmwrapuser").returncode == 0
    final(cell, job)
    wait_for(lambda: "exited" in [e for e, _ in ledger(cell, host, job)], "the epilog")
    assert not (store(cell) / job).exists()
    assert "saved" not in [e for e, _ in ledger(cell, host, job)]
    assert not qemu_running(job)


@vm
@pytest.mark.parametrize("policy", ["fail", "restart"])
def test_lost_checkpoint_follows_the_jobs_policy(cell, jobdir, policy):
    """The checkpoint is damaged while the job waits: the restored start follows --on-lost-checkpoint."""
    extra = "" if policy == "fail" else "#VMWRAP --on-lost-checkpoint=restart\n"
    job = qsub(cell, jobdir, COUNTER.format(extra=extra), "-r", "y")
    first = counting_on(cell, jobdir, job, 3)
    for h in cell.hosts:  # it waits until the checkpoint is damaged
        cell.run("qmod", "-d", f"vmwrap.q@{h}")
    assert cell.run("qmod", "-rj", job, user="vmwrapuser").returncode == 0
    saved = store(cell) / job / "memory.save"
    wait_for(lambda: (store(cell) / job / "manifest.json").exists(), "the checkpoint", 90)
    with open(saved, "r+b") as f:  # flip a byte in the middle of the guest's memory image
        f.seek(saved.stat().st_size // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    other = next(h for h in cell.hosts if h != first)
    cell.run("qmod", "-e", f"vmwrap.q@{other}")
    runs = final(cell, job, runs=2)
    out, err = output(jobdir, job)
    assert "memory.save is corrupt" in err, (out, err)
    if policy == "fail":
        assert runs[-1]["exit_status"] == "66", runs
        assert "not starting the job again from the beginning" in err
    else:
        assert runs[-1]["exit_status"] == "0", runs
        assert "starting the job again from the beginning" in err
        assert values(out)[-N:] == list(range(1, N + 1)), out
    assert not (store(cell) / job).exists()
    assert not any(p.name.startswith(job + ".") for p in store(cell).iterdir())


# --- the facts the adapter reads, without a cell ----------------------------------------------------

QSTAT = """job-ID  prior   name       user         state submit/start at     queue                          slots ja-task-ID
-----------------------------------------------------------------------------------------------------------------
     40 0.55500 job-0.sh   vmwrapuser   r     12/03/2026 05:40:00 vmwrap.q@vm                        1
     41 0.55500 job-1.sh   vmwrapuser   Rq    12/03/2026 05:40:01                                    1
     42 0.55500 x 1 Rr 12/03/2026 05:40:02 vmwrap.q@b vmwrapuser   r     12/03/2026 05:40:03 vmwrap.q@vm 1
     43 0.55500 arr.sh     vmwrapuser   Rr    12/03/2026 05:40:04 vmwrap.q@sgehost2                  1 3
     43 0.55500 arr.sh     vmwrapuser   r     12/03/2026 05:40:04 vmwrap.q@vm                        1 4
     43 0.55500 arr.sh     vmwrapuser   qw    12/03/2026 05:40:04                                    1 5-9:2
     44 0.55500 job-4.sh   vmwrapuser   dr    12/03/2026 05:40:05 vmwrap.q@vm                        1
"""


def test_qstat_lines_are_read_from_the_date_on():
    """A job name is the user's and may look like a state, a date and a queue: it never decides."""
    assert hooks.job_lines(QSTAT, "41") == [("Rq", "", "")]
    assert hooks.job_lines(QSTAT, "42") == [("r", "vmwrap.q@vm", "")]
    assert hooks.job_lines(QSTAT, "43")[2] == ("qw", "", "5-9:2")
    assert hooks.job_lines(QSTAT, "4") == []
    assert [t for t in ("3", "5", "6", "7", "9", "11") if hooks._in_tasks(t, "3,5-9:2")] == ["3", "5", "7", "9"]
    assert not hooks._in_tasks("x", "1-3")


def test_moved_means_waiting_again_or_running_elsewhere():
    """What the epilog and the payload on host `vm` conclude from qmaster's view of the job."""
    assert not hooks.moved(QSTAT, "40", "vm")      # still this run: it ends (normally, or qdel)
    assert hooks.moved(QSTAT, "41", "vm")          # qmod -rj: pending again
    assert not hooks.moved(QSTAT, "42", "vm")      # the name's forged 'Rr ... vmwrap.q@b' is ignored
    assert hooks.moved(QSTAT, "43.3", "vm")        # the task restarted on the other host
    assert not hooks.moved(QSTAT, "43.4", "vm")
    assert hooks.moved(QSTAT, "43.7", "vm")
    assert not hooks.moved(QSTAT, "44", "vm")      # qdel: deleted, not moved
    assert not hooks.moved(QSTAT, "45", "vm")      # gone


def test_restarted_comes_from_execd_as_a_small_number():
    assert hooks.restarted({}) == 0 and hooks.restarted({"RESTARTED": "2"}) == 2
    with pytest.raises(hooks.UserError):
        hooks.restarted({"RESTARTED": "9" * 5000})


def test_migrated_trusts_only_execds_active_dir(tmp_path, test_user):
    """`checkpointed` counts in execd's active_jobs/<job> dir (root's or sgeadmin's, not writable by
    others), not in a directory the job's user made to look like one."""
    d = tmp_path / "active_jobs" / "7.1"
    d.mkdir(parents=True)
    (d / "checkpointed").write_text("1\n")
    assert hooks.migrated({"SGE_JOB_SPOOL_DIR": str(d)})
    assert not hooks.migrated({"SGE_JOB_SPOOL_DIR": str(d) + "/."})
    assert not hooks.migrated({"SGE_JOB_SPOOL_DIR": str(tmp_path / "7.1")})
    assert not hooks.migrated({})
    os.chown(d, test_user.pw_uid, test_user.pw_gid)
    assert not hooks.migrated({"SGE_JOB_SPOOL_DIR": str(d)})
    os.chown(d, 0, 0)
    d.chmod(0o777)
    assert not hooks.migrated({"SGE_JOB_SPOOL_DIR": str(d)})
    d.chmod(0o755)
    (d / "checkpointed").unlink()
    assert not hooks.migrated({"SGE_JOB_SPOOL_DIR": str(d)})


def test_config_render_sge_has_the_checkpointing_environment():
    r = subprocess.run(["vmwrap", "config", "render", "sge"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    keys = dict(ln.split(None, 1) for ln in r.stdout.splitlines() if ln.startswith("   ") and len(ln.split()) > 1)
    assert keys["ckpt_list"] == "vmwrap" and keys["ckpt_name"] == "vmwrap"
    assert keys["interface"] == "application-level" and keys["when"] == "xsr"
    assert keys["migr_command"].endswith("sge-method migrate $job_id $job_pid")


def test_a_restart_waits_for_the_checkpoint_its_previous_run_is_still_saving(tmp_path):
    """vmwrap.lifecycle for schedulers that restart a job before its old run ended (GE's qmod -rj):
    the restart waits for a checkpoint newer than the job's last start, a recorded failed save, or
    the markers' removal; an older checkpoint is not it."""
    import threading

    from vmwrap import checkpoint, lifecycle

    checkpoint.keygen(tmp_path / "key")
    checkpoint.init_store(tmp_path / "ckpt", tmp_path / "key")  # a site's store (`vmwrap checkpoints init`)
    store = checkpoint.Store(tmp_path / "ckpt", tmp_path / "key")
    (store.root / "7").mkdir(parents=True)
    old = store.root / "7" / "manifest.json"
    old.write_text("{}")
    os.utime(old, (1, 1))  # a checkpoint from before the last start
    store.mark_ran("7")
    events = []

    def save_later():
        time.sleep(1.0)
        events.append("saved")
        old.write_text("{}")  # the old run's epilog commits its checkpoint

    t = threading.Thread(target=save_later)
    t.start()
    lifecycle._await_checkpoint(store, "7", 30)
    events.append("restored")
    t.join()
    assert events == ["saved", "restored"]
    store.mark_ran("7")  # restored: a next checkpoint must be newer than this
    os.utime(old, (1, 1))

    def answered() -> bool:
        w = threading.Thread(target=lifecycle._await_checkpoint, args=(store, "7", 60), daemon=True)
        w.start()
        w.join(10)
        return not w.is_alive()

    store.mark_lost("7", "saving its VM failed")
    assert answered()  # a failed save is an answer too
    store.delete("7")
    assert answered()  # no markers: nothing to wait for
