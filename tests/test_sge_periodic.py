"""Periodic checkpoints on real Grid Engine (issue 20), the twin of tests/test_slurm_periodic.py:
`#VMWRAP --checkpoint-every` saves the running VM into the shared store while the job goes on; after
its execution host crashes, GE reschedules the job (`reschedule_unknown`) and it continues on the other
host from its last checkpoint, every value exactly once; an interval below the site's minimum is
refused at qsub by the JSV.

A real Grid Engine 8.1.9 cell with two execution hosts on this machine (harness.sge_cell: the second
sge_execd in its own network and UTS namespace), real VMs, a node agent per host, one shared store.
The crash is real SIGKILLs; what GE then does is its own: the host's queue instance goes unknown
after `max_unheard`, and `reschedule_unknown` later qmaster reschedules its rerunnable jobs.
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
from harness.processes import crash, matching
from harness.sge_jobs import module_cell, running_host

pytestmark = pytest.mark.vm
EVERY = 5    # s: the job's interval, the site's minimum
N = 24
# The guest counts in its shell's memory and appends each value to a work dir file: after a restore the
# count goes on (values before the checkpoint are not computed again, the file shows each once).
COUNTER = ("#!/bin/sh\n#VMWRAP --image=busybox --memory=128M\n{extra}"
           f"i=0; while [ $i -lt {N} ]; do i=$((i+1)); echo n=$i; echo $i >> progress; sleep 1; done\n")
# What a site sets for jobs to leave a dead host (sge_conf(5)): the host is unknown once qmaster heard
# nothing from its execd for max(max_unheard, 3 x load_report_time) (the cell reports every 5 s), and
# its jobs with the rerun flag are rescheduled reschedule_unknown later. GE's defaults: 5 min, never.
CRASH_CONF = {"max_unheard": "00:00:20", "reschedule_unknown": "00:00:05"}
GE_DEFAULTS = {"max_unheard": "00:05:00", "reschedule_unknown": "00:00:00"}


@pytest.fixture(scope="module")
def cell(appliance, virt_type, test_user):
    with module_cell("sgeperiodic", appliance, virt_type, hosts=2, checkpoint_min_every_s=float(EVERY)) as c:
        before = c.global_conf(**CRASH_CONF)
        try:
            yield c
        finally:  # the global configuration outlives this cell
            c.global_conf(**{**GE_DEFAULTS, **before})


@pytest.fixture
def jobdir(cell, test_user):
    with sge_jobs.fresh_jobdir(cell, test_user) as d:
        yield d


def qsub(cell, jobdir, script: str, *args: str, queue: str = "vmwrap.q") -> str:
    path = jobdir / f"job-{os.urandom(3).hex()}.sh"
    path.write_text(script)
    os.chown(path, 1234, 1234)
    r = cell.run("qsub", "-terse", "-cwd", "-q", queue, *args, str(path), user="vmwrapuser", cwd=str(jobdir))
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout.strip()


def output(jobdir: Path, job: str) -> str:
    o = next(jobdir.glob(f"*.o{job}"), None)
    return o.read_text(errors="replace") if o else ""


def errors(jobdir: Path, job: str) -> str:
    e = next(jobdir.glob(f"*.e{job}"), None)
    return e.read_text(errors="replace") if e else ""


def final(cell, job: str, timeout: float = 300, host: str | None = None) -> list[dict]:
    """qacct's records of the job's runs once GE is done with it."""
    wait_for(lambda: cell.run("qstat", "-j", job).returncode != 0, f"job {job} to end", timeout)

    def records():
        text = cell.run("qacct", "-j", job).stdout
        found = [dict(re.findall(r"^(\w+)\s+(.*?)\s*$", rec, re.M)) for rec in re.split(r"^=+$", text, flags=re.M)
                 if "exit_status" in rec]
        # a rescheduled run has its own record (written at the reschedule); `host`: the one run there
        return found if found and (host is None or any(r.get("hostname") == host for r in found)) else None

    return wait_for(records, f"the accounting record of job {job}" + (f" on {host}" if host else ""), 60)


def events(cell, job: str, host: str | None = None) -> list[dict]:
    out = []
    for h in [host] if host else cell.hosts:
        path = cell.node_dir(h) / "state" / "ledger.sqlite"
        if not path.exists():  # no job ran on that host yet (connecting would create an empty file)
            continue
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            out += [{"node": h, "event": e, "detail": json.loads(d)} for e, d in
                    db.execute("select event, detail from events where job_id=? order by id", (job,))]
        except sqlite3.OperationalError:  # the ledger is being created
            pass
        finally:
            db.close()
    return out


def named(evs: list[dict], name: str) -> list[dict]:
    return [e for e in evs if e["event"] == name]



def qemu_pid(job: str) -> int | None:
    r = subprocess.run(["pgrep", "-f", f"guest=vmwrap-{job},"], capture_output=True, text=True)
    return int(r.stdout.split()[0]) if r.returncode == 0 and r.stdout.split() else None


def store(cell) -> Path:
    return cell.base / "checkpoints"


def host_ok(cell, host: str) -> bool:
    state = cell.queue_state(host)
    return not any(s in state for s in "Edu?")


@pytest.mark.timeout(400)
def test_a_job_with_periodic_checkpoints_runs_through_with_the_same_output(cell, jobdir):
    a, b = cell.hosts
    plain_dir = jobdir / "plain"
    plain_dir.mkdir()
    os.chown(plain_dir, jobdir.stat().st_uid, jobdir.stat().st_gid)
    ckpt = qsub(cell, jobdir, COUNTER.format(extra=f"#VMWRAP --checkpoint-every={EVERY}s\n"), queue=f"vmwrap.q@{a}")
    plain = qsub(cell, plain_dir, COUNTER.format(extra=""), queue=f"vmwrap.q@{b}")
    for job, d in ((ckpt, jobdir), (plain, plain_dir)):
        runs = final(cell, job)
        assert runs[-1]["exit_status"] == "0", (runs, output(d, job), errors(d, job))
    assert output(jobdir, ckpt) == output(plain_dir, plain) == "".join(f"n={i}\n" for i in range(1, N + 1))
    assert errors(jobdir, ckpt) == errors(plain_dir, plain) == ""
    saves = named(events(cell, ckpt, a), "checkpointed")
    assert len(saves) >= 2, [e["detail"] for e in named(events(cell, ckpt, a), "checkpoint_failed")]
    assert all(0 < s["detail"]["pause_s"] < 5 for s in saves), saves
    assert not named(events(cell, plain, b), "checkpointed")
    wait_for(lambda: not (store(cell) / ckpt).exists(), "the ended job's checkpoint to be deleted", timeout=60)
    assert host_ok(cell, a) and host_ok(cell, b), (cell.queue_state(a), cell.queue_state(b))


@pytest.mark.timeout(400)
def test_a_periodic_save_into_a_full_store_keeps_the_job_and_the_last_checkpoint(cell, jobdir):
    """The shared store fills up while the job runs: the next periodic saves fail (ledger
    checkpoint_failed), the last good checkpoint stays whole and authentic, the job runs through once
    with its whole output, and the host is not taken out. The twin of Slurm's."""
    from vmwrap.checkpoint import Store, init_store

    a = cell.hosts[0]
    path = store(cell)       # the shared store on a small file system of its own, filled up below
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m,mode=0700", "vmwrap-sge-periodic-store", str(path)],
                   check=True)
    try:
        init_store(path, cell.base / "checkpoint.key")   # new storage: `vmwrap checkpoints init`
        st = Store(path, cell.base / "checkpoint.key")
        job = qsub(cell, jobdir, COUNTER.format(extra=f"#VMWRAP --checkpoint-every={EVERY}s\n"), queue=f"vmwrap.q@{a}")
        first = wait_for(lambda: named(events(cell, job, a), "checkpointed"), "a first checkpoint", 300)
        created = st.verify(job)["created"]
        filler = path / ".filler"
        vfs = os.statvfs(path)
        subprocess.run(["fallocate", "-l", str(vfs.f_bavail * vfs.f_frsize - (1 << 20)), str(filler)], check=True)
        try:
            wait_for(lambda: named(events(cell, job, a), "checkpoint_failed"), "a failed periodic save", 120)
            assert st.verify(job)["created"] == created      # the last good checkpoint, whole and authentic
            assert len(named(events(cell, job, a), "checkpointed")) == len(first)
        finally:
            filler.unlink()
        runs = final(cell, job)
        assert [r["exit_status"] for r in runs] == ["0"], (runs, output(jobdir, job), errors(jobdir, job))
        assert output(jobdir, job) == "".join(f"n={i}\n" for i in range(1, N + 1))
        assert host_ok(cell, a), cell.queue_state(a)
        wait_for(lambda: not (path / job).exists(), "the ended job's checkpoint to be deleted", timeout=60)
    finally:
        subprocess.run(["umount", str(path)], check=True)


def checkpointed_values(cell, job: str, out: str) -> int:
    """How many values the job's output file held when its last checkpoint was taken: the file's size
    the checkpoint recorded (what a restart after a crash cuts GE's appended -o file back to)."""
    meta = json.loads((store(cell) / job / "job.json").read_text())
    return len(values(out.encode()[:meta["delivered"]["stdout_size"]].decode(errors="replace")))


@pytest.mark.timeout(600)
@pytest.mark.parametrize("first", [0, 1], ids=["qmaster-host", "second-host"])
def test_after_its_host_crashes_the_job_continues_on_the_other_host_from_its_last_checkpoint(cell, jobdir, first):
    """GE's shepherd opens the job's -o/-e files with O_APPEND and never truncates them (8.1.9,
    builtin_starter.c): the rescheduled run finds what the crashed run delivered after its last
    checkpoint in the file, and the payload cuts it back to the checkpoint's size. The job prefers a
    host (a soft request, so that GE may run it elsewhere): the crash of each host is tried."""
    job = qsub(cell, jobdir, COUNTER.format(extra=f"#VMWRAP --checkpoint-every={EVERY}s\n"), "-r", "y",
               "-soft", "-q", f"vmwrap.q@{cell.hosts[first]}")
    node = wait_for(lambda: running_host(cell, job), f"job {job} to run on a host", timeout=300)
    other = next(h for h in cell.hosts if h != node)
    # A checkpoint taken before the first value (the guest still starting) could not tell a resume
    # from a start again: wait for one that holds values.
    wait_for(lambda: named(events(cell, job, node), "checkpointed")
             and checkpointed_values(cell, job, output(jobdir, job)) > 0,
             "a periodic checkpoint holding values", timeout=300)
    # Crash at the first value delivered after this checkpoint, well before the next one.
    seen = len(values(output(jobdir, job)))
    wait_for(lambda: len(values(output(jobdir, job))) > seen, "the job to count on after it", timeout=60)
    execd = cell.execd_pid(node)
    assert execd, f"no sge_execd on {node}"
    crash([execd] + matching(f"sge_shepherd-{job} ") + matching(f"/state/jobs/{job}/")
                   + [p for p in [qemu_pid(job)] if p])
    try:
        wait_for(lambda: qemu_pid(job) is None, "QEMU to die", timeout=30)
        before = len(values(output(jobdir, job)))
        saved = checkpointed_values(cell, job, output(jobdir, job))
        assert saved < before < N, (saved, before)    # values delivered after the checkpoint are in the file
        # GE: the host goes unknown, its job is rescheduled (RESTARTED=1) and starts on the other host.
        wait_for(lambda: "u" in cell.queue_state(node), f"{node} to be unknown to qmaster", timeout=120)
        try:
            runs = final(cell, job, timeout=400, host=other)
        except AssertionError as e:
            raise AssertionError(f"{e}\noutput: {output(jobdir, job)!r}\nerrors: {errors(jobdir, job)!r}\nprogress: "
                                 f"{(jobdir / 'progress').read_text().split() if (jobdir / 'progress').exists() else None}"
                                 f"\nledger: {[(e['node'], e['event']) for e in events(cell, job)]}") from None
        out, err = output(jobdir, job), errors(jobdir, job)
        last = next(r for r in runs if r.get("hostname") == other)
        assert last["exit_status"] == "0", (runs, out, err)
        assert values(out) == list(range(1, N + 1)), (out, err)     # every value exactly once
        assert err == "", err
        restored = named(events(cell, job, other), "restored")
        assert restored and restored[0]["detail"]["from_node"] == node, events(cell, job, other)
        done = [int(v) for v in (jobdir / "progress").read_text().split()]
        # Resumed, not started again: the values before the checkpoint were computed once; those
        # after it (at most an interval and the crash's moment) twice.
        assert all(done.count(v) == 1 for v in range(1, saved + 1)), (saved, done)
        assert sorted(set(done)) == list(range(1, N + 1)), done
        again = len(done) - N
        assert 0 <= again <= EVERY + 4 and again <= before, (done, before)
    finally:
        if not cell.execd_pid(node):
            cell.start_execd(node)
        wait_for(lambda: "u" not in cell.queue_state(node), f"{node}'s execd back", timeout=120)
    # The crashed host's leftovers go with its repair pass; the store keeps nothing of the ended job.
    env = {k: v for k, v in os.environ.items() if k != "VMWRAP_CONFIG"}
    r = subprocess.run(["vmwrap", "--config", cell.configs[node], "reconcile", "sge", "--once"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    wait_for(lambda: not (cell.node_dir(node) / "state" / "jobs" / job).exists(), "the crashed run dir to go")
    wait_for(lambda: not any(p.name.startswith(job) for p in store(cell).iterdir()), "the checkpoint to go", timeout=60)
    wait_for(lambda: host_ok(cell, node) and host_ok(cell, other), "both hosts in service", timeout=120)


def test_an_interval_below_the_site_minimum_is_refused_at_qsub(cell, jobdir):
    for every, said in (("2s", f"--checkpoint-every=2s is below this site's minimum of {EVERY}s "
                                "(checkpoint_min_every_s)"),
                        ("soon", "line 3: --checkpoint-every=soon: not a duration")):
        path = jobdir / f"job-{every}.sh"
        path.write_text(COUNTER.format(extra=f"#VMWRAP --checkpoint-every={every}\n"))
        os.chown(path, 1234, 1234)
        r = cell.run("qsub", "-terse", "-cwd", "-q", "vmwrap.q", str(path), user="vmwrapuser", cwd=str(jobdir))
        assert r.returncode != 0, r.stdout
        assert f"vmwrap: {said}" in r.stdout + r.stderr, r.stdout + r.stderr
    assert cell.run("qstat", "-u", "vmwrapuser").stdout.strip() == ""
