"""Issue 20's fault matrix on a real Grid Engine 8.1.9 cell: each fault ends with the job's documented
fate, the queue instance still enabled and out of error (never taken out for what a user's job did),
and nothing of the job left (VM, run dir, cache pins, its processes, partial checkpoints).

The model is tests/test_slurm_faults.py; the faults are real ones (SIGKILL, a daemon restarted, a full
store). One execution host with its own node agent (harness.sge_cell with site_config), real VMs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from harness import sge_cell, sge_jobs
from harness.padded_image import padded
from harness.polling import values, wait_for
from harness.processes import crash, matching
from harness.sge_jobs import module_cell
from harness.site_store import store_elsewhere
from vmwrap import agent, checkpoint, config
from vmwrap.cache import Cache
from vmwrap.catalog import register
from vmwrap.errors import NodeError

pytestmark = pytest.mark.vm
ROOT = Path(__file__).resolve().parents[1]
WAITER = "#!/bin/sh\n#VMWRAP --image=busybox --memory=128M\necho up; while [ ! -e go ]; do sleep 1; done; echo done\n"
N = 20
COUNTER = ("#!/bin/sh\n#VMWRAP --image=busybox --memory=128M\n{extra}"
           f"i=0; while [ $i -lt {N} ]; do i=$((i+1)); echo n=$i; sleep 1; done\n")


@pytest.fixture(scope="module")
def cell(appliance, virt_type, test_user):
    with module_cell("sgefaults", appliance, virt_type, queue={"rerun": "TRUE"}) as c:
        (c.base / "checkpoints").mkdir(exist_ok=True)
        try:
            yield c
        finally:  # a store a test mounted over (full store) goes before the cell's dir
            subprocess.run(["umount", str(c.base / "checkpoints")], capture_output=True)


@pytest.fixture
def jobdir(cell, test_user):
    d = sge_jobs.jobdir(cell, test_user)
    yield d
    cell.run("qmod", "-e", "vmwrap.q")


def virsh(*args: str) -> str:
    return subprocess.run(["virsh", "-c", "qemu:///system", *args], capture_output=True, text=True).stdout.strip()


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
    return (o.read_text(errors="replace") if o else ""), (e.read_text(errors="replace") if e else "")


def final(cell, job: str, runs: int = 1, timeout: float = 240) -> list[dict]:
    """qacct's records of the job's runs (oldest first) once GE is done with it."""
    wait_for(lambda: cell.run("qstat", "-j", job).returncode != 0, f"job {job} to end", timeout)

    def records():
        text = cell.run("qacct", "-j", job).stdout
        found = [dict(re.findall(r"^(\w+)\s+(.*?)\s*$", rec, re.M)) for rec in re.split(r"^=+$", text, flags=re.M)
                 if "exit_status" in rec]
        return found if len(found) >= runs else None

    return wait_for(records, f"{runs} accounting records of job {job}", 30)


def qemu_pid(job: str) -> int | None:
    r = subprocess.run(["pgrep", "-f", f"guest=vmwrap-{job},"], capture_output=True, text=True)
    return int(r.stdout.split()[0]) if r.returncode == 0 and r.stdout.split() else None


def host_ok(cell) -> bool:
    """The queue instance is neither in error nor disabled (what a user's job must never cause)."""
    state = cell.queue_state()
    return "E" not in state and "d" not in state


def leftovers(cell, job: str) -> list[str]:
    """Everything of `job` vmwrap could leave behind on the host or in the shared store."""
    found = []
    if f"vmwrap-{job}" in virsh("list", "--all", "--name").split():
        found.append("vm")
    node = cell.node_dir(cell.host)
    if (node / "state" / "jobs" / job).exists():
        found.append("run dir")
    pins = node / "cache" / "pins"
    if pins.is_dir() and any((s / job).exists() for s in pins.iterdir()):
        found.append("pin")
    procs = subprocess.run(["pgrep", "-af", f"/state/jobs/{job}/"], capture_output=True, text=True).stdout
    found += [f"process {ln[:120]}" for ln in procs.splitlines()]
    store = cell.base / "checkpoints"
    found += [f"store {p.name}" for p in store.iterdir() if p.name == job or p.name.startswith(job + ".")]
    return found


def clean(cell, job: str) -> None:
    """The epilog runs after qstat forgot the job: allow it a moment, then nothing may be left."""
    try:
        wait_for(lambda: not leftovers(cell, job), f"job {job}'s leftovers to go", timeout=60)
    except AssertionError:
        raise AssertionError(f"job {job} left {leftovers(cell, job)}") from None


def ledger(cell, job: str) -> list[tuple[str, dict]]:
    db = sqlite3.connect(cell.node_dir(cell.host) / "state" / "ledger.sqlite")
    try:
        return [(e, json.loads(d)) for e, d in
                db.execute("select event, detail from events where job_id=? order by id", (job,))]
    finally:
        db.close()


def execd_pid(cell) -> int:
    pid = next((p for d in ("localhost", cell.host) if sge_cell._alive(
        p := sge_cell._pid(sge_cell.EXECD_SPOOL / d / "execd.pid"), "sge_execd")), None)
    assert pid, "no sge_execd"
    return pid


def start_execd(cell) -> None:
    sge_cell._daemon("/usr/sbin/sge_execd")
    wait_for(lambda: cell._execd_alive(cell.host), "sge_execd to start", 30)


def agent_argv(cell) -> list[str]:
    return ["vmwrap", "--config", cell.vmwrap_config, "agent"]


def kill_agent(cell) -> None:
    for a in cell.agents:
        if a.poll() is None:
            a.send_signal(signal.SIGKILL)
            a.wait()


def start_agent(cell, *extra: str, log: str = "agent.log") -> None:
    cell.agents.append(subprocess.Popen(agent_argv(cell) + list(extra), start_new_session=True,
                                        stdout=subprocess.DEVNULL, stderr=open(cell.base / log, "a")))
    settings = config.load(cell.vmwrap_config)

    def answers() -> bool:
        try:
            return agent.ping(settings) > 0
        except NodeError:
            return False

    wait_for(answers, "the node agent", 30)


def up(jobdir: Path, job: str, text: str = "up") -> None:
    wait_for(lambda: text in output(jobdir, job)[0], f"job {job} to print {text!r}", 180)


@pytest.mark.timeout(300)
def test_the_jobs_qemu_killed_fails_the_job_with_a_reason_and_keeps_the_host(cell, jobdir):
    job = qsub(cell, jobdir, WAITER)
    up(jobdir, job)
    os.kill(qemu_pid(job), signal.SIGKILL)
    runs = final(cell, job)
    out, err = output(jobdir, job)
    assert runs[-1]["exit_status"] == "70", (runs, out, err)
    assert "vmwrap: the guest died without reporting an exit status" in err, err
    assert host_ok(cell), cell.queue_state()
    clean(cell, job)


@pytest.mark.exclusive  # restarts the host's libvirtd (see conftest)
@pytest.mark.timeout(300)
def test_libvirtd_restarted_mid_job_the_job_goes_on_and_still_suspends(cell, jobdir):
    job = qsub(cell, jobdir, WAITER)
    up(jobdir, job)
    pids = subprocess.run(["pgrep", "-x", "libvirtd"], capture_output=True, text=True).stdout.split()
    assert len(pids) == 1, pids
    os.kill(int(pids[0]), signal.SIGTERM)
    wait_for(lambda: subprocess.run(["pgrep", "-x", "libvirtd"], capture_output=True).returncode != 0,
             "libvirtd to exit", 30)
    assert qemu_pid(job), "the guest died with libvirtd"
    subprocess.run(["bash", str(ROOT / "scripts" / "start-libvirtd.sh")], check=True)
    # the node agent (which pauses and resumes for the job's owner) reconnects to the new libvirtd
    assert cell.run("qmod", "-sj", job, user="vmwrapuser").returncode == 0
    wait_for(lambda: virsh("domstate", f"vmwrap-{job}") == "paused", "the VM to pause", 30)
    assert cell.run("qmod", "-usj", job, user="vmwrapuser").returncode == 0
    wait_for(lambda: virsh("domstate", f"vmwrap-{job}") == "running", "the VM to resume", 30)
    (jobdir / "go").write_text("")
    runs = final(cell, job)
    out, err = output(jobdir, job)
    assert runs[-1]["exit_status"] == "0", (runs, out, err)
    assert out == "up\ndone\n", (out, err)
    assert host_ok(cell), cell.queue_state()
    clean(cell, job)


@pytest.mark.timeout(300)
def test_execd_killed_mid_job_and_restarted_the_job_goes_on(cell, jobdir):
    """The shepherd (and so the job) outlives a SIGKILLed sge_execd; the restarted execd takes the job
    up again from its spool, and the job ends as if nothing happened."""
    job = qsub(cell, jobdir, WAITER)
    up(jobdir, job)
    os.kill(execd_pid(cell), signal.SIGKILL)
    time.sleep(2)
    assert qemu_pid(job), "the guest died with sge_execd"
    start_execd(cell)
    time.sleep(3)
    (jobdir / "go").write_text("")
    runs = final(cell, job)
    out, err = output(jobdir, job)
    assert runs[-1]["exit_status"] == "0", (runs, out, err)
    assert out == "up\ndone\n", (out, err)
    assert host_ok(cell), cell.queue_state()
    clean(cell, job)


@pytest.mark.timeout(300)
def test_the_node_agent_killed_while_the_job_is_suspended_the_job_resumes_once_it_is_back(cell, jobdir):
    """`qmod -usj` while the agent is down cannot resume the VM: the job must not sleep for ever; it
    resumes when the agent is back (the init system restarts it)."""
    job = qsub(cell, jobdir, COUNTER.format(extra=""))
    wait_for(lambda: len(values(output(jobdir, job)[0])) >= 3, "the job to count to 3", 180)
    assert cell.run("qmod", "-sj", job, user="vmwrapuser").returncode == 0
    wait_for(lambda: virsh("domstate", f"vmwrap-{job}") == "paused", "the VM to pause", 30)
    kill_agent(cell)
    assert cell.run("qmod", "-usj", job, user="vmwrapuser").returncode == 0
    time.sleep(5)
    assert virsh("domstate", f"vmwrap-{job}") == "paused"   # nobody could resume it yet
    start_agent(cell)
    runs = final(cell, job, timeout=120)
    out, err = output(jobdir, job)
    assert runs[-1]["exit_status"] == "0", (runs, out, err)
    assert values(out) == list(range(1, N + 1)), (out, err)
    assert "vmwrap: the VM resumed" in err, err
    assert host_ok(cell), cell.queue_state()
    clean(cell, job)


@pytest.mark.timeout(300)
def test_an_epilog_run_again_after_the_job_is_a_harmless_no_op(cell, jobdir):
    job = qsub(cell, jobdir, "#!/bin/sh\n#VMWRAP --image=busybox --memory=128M\necho once\n")
    runs = final(cell, job)
    assert runs[-1]["exit_status"] == "0", (runs, output(jobdir, job))
    clean(cell, job)
    before = ledger(cell, job)
    assert [e for e, _ in before if e == "exited"] == ["exited"], before
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "JOB_ID": job, "SGE_TASK_ID": "undefined",
           "HOSTNAME": cell.host, "SGE_ROOT": str(sge_cell.SGE_ROOT), "SGE_CELL": sge_cell.CELL}
    for _ in range(2):
        r = subprocess.run([str(cell.base / "hooks" / "sge-epilog")], env=env, cwd=str(jobdir),
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, (r.stdout, r.stderr)
    assert ledger(cell, job) == before        # nothing happened twice: no second "exited"
    assert output(jobdir, job)[0] == "once\n"
    assert host_ok(cell), cell.queue_state()
    clean(cell, job)


@pytest.mark.timeout(400)
@pytest.mark.parametrize("policy", ["restart", "fail"])
def test_a_full_checkpoint_store_gives_the_job_its_lost_checkpoint_policy_not_the_host(cell, jobdir, policy):
    """`qmod -rj` saves the VM in the old run's epilog; the store has 8 MiB left, the guest's memory
    needs more. The save fails, no partial checkpoint stays, the restart follows --on-lost-checkpoint,
    the queue instance serves on. (The queue waits disabled until the old run's epilog is done: this
    one host's restart would otherwise begin while the old run still has its VM.)"""
    store = cell.base / "checkpoints"
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0755", "vmwrap-full-store", str(store)], check=True)
    try:
        checkpoint.init_store(store, cell.base / "checkpoint.key")  # new storage: `vmwrap checkpoints init`
        extra = "#VMWRAP --on-lost-checkpoint=restart\n" if policy == "restart" else ""
        job = qsub(cell, jobdir, COUNTER.format(extra=extra), "-r", "y")
        wait_for(lambda: len(values(output(jobdir, job)[0])) >= 4, "the job to count to 4", 180)
        assert cell.run("qmod", "-d", "vmwrap.q").returncode == 0
        assert cell.run("qmod", "-rj", job, user="vmwrapuser").returncode == 0
        wait_for(lambda: "save_failed" in [e for e, _ in ledger(cell, job)], "the failed save", 120)
        assert not (store / job).exists()                    # no partial checkpoint
        assert cell.run("qmod", "-e", "vmwrap.q").returncode == 0
        runs = final(cell, job, runs=2)
        out, err = output(jobdir, job)
        if policy == "restart":
            assert runs[-1]["exit_status"] == "0", (runs, out, err)
            assert "starting the job again from the beginning" in err, err
            assert values(out)[-N:] == list(range(1, N + 1)), out
        else:
            assert runs[-1]["exit_status"] == "66", (runs, out, err)
            assert "not starting the job again from the beginning" in err, err
        assert re.search(r"sav\w* its VM on \S+ failed: .*(No space left|space)", err, re.I), err
        # GE ignores the exit status of the old run's epilog after `qmod -rj`, so the queue state
        # cannot show a host taken out there; execd's log shows a failed epilog.
        failed_hooks = [ln for ln in execd_log(cell, job) if "exited with exit status" in ln]
        assert not failed_hooks, failed_hooks
        assert host_ok(cell), cell.queue_state()
        clean(cell, job)
    finally:
        subprocess.run(["umount", str(store)], check=True)


def execd_log(cell, job: str) -> list[str]:
    """sge_execd's messages about `job`'s first run (a failed prolog or epilog is logged there)."""
    lines = []
    for d in ("localhost", cell.host):
        p = sge_cell.EXECD_SPOOL / d / "messages"
        if p.exists():
            lines += [ln for ln in p.read_text(errors="replace").splitlines() if f"job {job}.1 " in ln]
    return lines


@pytest.mark.timeout(400)
def test_a_store_unreachable_during_the_save_gives_the_job_its_lost_checkpoint_policy_not_the_host(cell, jobdir):
    """The shared store disappears from the host (its path now an empty local directory) just before
    `qmod -rj` has the old run's epilog save the VM. The save fails, nothing is written to the host's
    own disk, the epilog does not fail (a failed epilog is GE's way to take a host out; Slurm's test
    asserts the node is not drained), and the restart follows --on-lost-checkpoint (fail: exit 66)."""
    local = cell.base / "not-mounted"
    cfg = Path(cell.vmwrap_config)
    job = qsub(cell, jobdir, COUNTER.format(extra=""), "-r", "y")
    before = None
    try:
        wait_for(lambda: len(values(output(jobdir, job)[0])) >= 4, "the job to count to 4", 180)
        before = store_elsewhere(Path(cell.vmwrap_config), cell.base / "checkpoints", local)
        assert cell.run("qmod", "-d", "vmwrap.q").returncode == 0   # the restart waits for the old run's epilog
        assert cell.run("qmod", "-rj", job, user="vmwrapuser").returncode == 0
        wait_for(lambda: "save_failed" in [e for e, _ in ledger(cell, job)], "the failed save", 120)
        [failed] = [d for e, d in ledger(cell, job) if e == "save_failed"]
        assert f"checkpoint store {local} has no .vmwrap-store stamp" in failed["message"], failed
        assert list(local.iterdir()) == [], list(local.iterdir())   # nothing of the job on the host's disk
        # qmaster wrote the old run off at `qmod -rj` and ignores its epilog's exit status (no error state
        # either way): execd's log is where a failed epilog shows ("exited with exit status = 15").
        wait_for(lambda: not matching(f"sge_shepherd-{job} "), "the old run's shepherd to end", 120)
        time.sleep(3)                                        # execd reaps it and logs its exit in its loop
        failed_hooks = [ln for ln in execd_log(cell, job) if "exited with exit status" in ln]
        assert not failed_hooks, f"the epilog failed on the failed save (the host's fault): {failed_hooks}"
        cfg.write_text(before)                               # the storage is back for the restart
        before = None
        assert cell.run("qmod", "-e", "vmwrap.q").returncode == 0
        runs = final(cell, job, runs=2)
        out, err = output(jobdir, job)
        assert runs[-1]["exit_status"] == "66", (runs, out, err)
        assert "has no checkpoint to continue from" in err, err
        assert "not starting the job again from the beginning" in err, err
        assert host_ok(cell), cell.queue_state()
        clean(cell, job)
    finally:
        if before is not None:
            cfg.write_text(before)
        cell.run("qdel", job)
        shutil.rmtree(local, ignore_errors=True)


@pytest.mark.timeout(400)
def test_after_a_host_reboot_the_restarted_agent_repairs_the_host(cell, jobdir):
    """Every process of the host dies at once (sge_execd, the node agent, the job's shepherd and
    payload, its 9P server and QEMU); the state dirs stay. The agent comes back first, with its repair
    pass (`vmwrap agent --reconcile sge`), then sge_execd: GE ends the job, the agent removes what it
    left, with a ledger record."""
    job = qsub(cell, jobdir, WAITER, "-r", "n")
    up(jobdir, job)
    crash([execd_pid(cell)] + [a.pid for a in cell.agents if a.poll() is None]
                   + matching(f"sge_shepherd-{job} ") + matching(f"/state/jobs/{job}/") + [qemu_pid(job)])
    for a in cell.agents:
        a.poll()
    wait_for(lambda: qemu_pid(job) is None, "QEMU to die", 30)
    left = leftovers(cell, job)
    assert "run dir" in left, left          # what the "reboot" left: the repair has work to do
    start_agent(cell, "--reconcile", "sge", "--reconcile-interval", "10", log="agent-reboot.log")
    start_execd(cell)
    runs = final(cell, job, timeout=180)
    assert runs[-1]["failed"].startswith("19 "), runs[-1]["failed"]   # GE: "before writing exit_status"
    clean(cell, job)
    events = ledger(cell, job)
    assert [d["removed"][:1] for e, d in events if e == "reconciled"] == [["run dir"]], events
    wait_for(lambda: host_ok(cell), "the queue instance to be in service", 60)


def fetches(cell, job: str, sha: str) -> list[tuple[str, int]]:
    return [(e, d["bytes"]) for e, d in ledger(cell, job) if e in ("cache_hit", "cache_miss") and d["sha256"] == sha]


@pytest.mark.timeout(600)
def test_two_jobs_fetch_one_image_into_a_nearly_full_cache(cell, jobdir, appliance):
    """The host's cache holds the busybox image and has room for a second, larger image only once an
    older blob goes. Two jobs of the second image released together: one fetch, both run, the old
    blob is evicted, no partial file stays. Then, with a busybox job holding its blobs, a job of the
    second image fails with the cache-full reason and the queue instance serves on (the host is not
    taken out for a busy cache), while the busybox job finishes as usual."""
    warm = qsub(cell, jobdir, "#!/bin/sh\n#VMWRAP --image=busybox --memory=128M\necho warm\n")
    assert final(cell, warm)[-1]["exit_status"] == "0"
    cache = Cache(cell.node_dir(cell.host) / "cache", 1 << 40)
    old = appliance.initrd
    assert old.sha256 in {e.sha256 for e in cache.entries()}
    big = padded(appliance, cell.base / "images", "busybox-big", 4 << 20)
    register(str(cell.base / "images.toml"), big)
    used = cache.used_bytes()
    bound = used + big.initrd.size - old.size // 2      # the new blob fits only once the old initrd goes
    script = "#!/bin/sh\n#VMWRAP --image=busybox-big --memory=128M\necho big $$\n"
    before = dict(cell.site_config)
    cell.site_config["cache_max_bytes"] = bound
    cell._write_configs()
    try:
        jobs = [qsub(cell, jobdir, script, "-h") for _ in range(2)]
        assert cell.run("qrls", *jobs).returncode == 0
        for j in jobs:
            runs = final(cell, j, timeout=300)
            out, err = output(jobdir, j)
            assert runs[-1]["exit_status"] == "0" and out.startswith("big "), (runs, out, err)
        got = sorted(f for j in jobs for f in fetches(cell, j, big.initrd.sha256))
        assert got == [("cache_hit", 0), ("cache_miss", big.initrd.size)], got     # one fetch
        left = {e.sha256 for e in cache.entries()}
        assert big.initrd.sha256 in left and old.sha256 not in left, left
        assert cache.used_bytes() <= bound and os.listdir(cache.root / "tmp") == []
        for j in jobs:
            clean(cell, j)

        holder = qsub(cell, jobdir, WAITER)           # fetches busybox's initrd again, evicting the big one
        up(jobdir, holder)
        refused = qsub(cell, jobdir, script)
        runs = final(cell, refused, timeout=300)
        out, err = output(jobdir, refused)
        assert runs[-1]["exit_status"] == "69" and "image cache full" in err, (runs, out, err)   # EXIT_NODE
        assert f"jobs {holder}" in err, err                       # who holds the cache, named
        assert host_ok(cell), cell.queue_state()
        (jobdir / "go").touch()
        runs = final(cell, holder)
        assert runs[-1]["exit_status"] == "0" and "done" in output(jobdir, holder)[0], runs
        assert os.listdir(cache.root / "tmp") == []
        for j in (refused, holder):
            clean(cell, j)
    finally:
        cell.site_config.clear()
        cell.site_config.update(before)
        cell._write_configs()
        (jobdir / "go").unlink(missing_ok=True)
