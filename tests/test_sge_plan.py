"""The core daemon loops on a real Grid Engine 8.1.9 cell through the GE adapter (issue 15).

Prestage: a VM job GE will start next (`-R y`: GE reserves the host for it once the running job
ends, and says so in its schedule file) finds its image in the node cache when it starts.
Planner: an advance reservation (`qrsub`) holds the only slot in T seconds; the queue head, a VM
counter job whose h_rt is longer than the gap, runs in the gap (`vmwrap sge plan` lowers its h_rt
so GE's own scheduler starts it), is saved before the reservation starts (`qmod -rj`: its epilog
saves the VM), and resumes after the reservation with its memory: every value exactly once.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from harness.polling import values
from harness.sge_cell import Cell, qconf
from vmwrap.catalog import register
from vmwrap.config import render
from vmwrap.ledger import Ledger

pytestmark = pytest.mark.vm
N = 100         # values the counter counts, one a second: more than fits into the gap
T = 100         # seconds until the reservation starts
COUNTER = ("#!/bin/sh\n#VMWRAP --image=busybox\n"
           f"i=0; while [ $i -lt {N} ]; do i=$((i+1)); echo n=$i; sleep 1; done\n")


@pytest.fixture(scope="module")
def cell(appliance, virt_type, test_user):
    base = Path(f"/var/tmp/vmwrap-sgeplan-{os.getpid()}")
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    base.chmod(0o755)
    register(str(base / "images.toml"), appliance)
    cfg = base / "vmwrap.toml"
    cfg.write_text(render({"catalog": str(base / "images.toml"), "accel": virt_type, "grace_seconds": 5.0,
                           "state_dir": str(base / "state"), "cache_dir": str(base / "cache"),
                           "checkpoint_dir": str(base / "checkpoints"), "plan_enabled": True,
                           "plan_min_run_s": 20.0, "plan_save_fixed_s": 5.0, "plan_save_margin_s": 5.0,
                           "plan_setup_s": 10.0, "plan_teardown_s": 10.0}))
    agent = subprocess.Popen(["vmwrap", "--config", str(cfg), "agent"], start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    c = Cell(base, str(cfg), slots=1)   # one slot: a reservation of one slot holds the whole host
    c.start()
    # What a site sets for these loops (qconf, not the harness): users who may make reservations;
    # GE's own reservations for `-R y` jobs and the schedule file that shows them (MONITOR=1); a
    # short DURATION_OFFSET (GE plans a job's slot busy that long past its h_rt) and load report
    # interval (a rescheduled job's old run is killed at execd's next report).
    qconf("-au", "vmwrapuser", "arusers", check=False)
    _conf(base, "-ssconf", "-Msconf", max_reservation="10", params="MONITOR=1,DURATION_OFFSET=00:00:05")
    _conf(base, "-sconf", "-Mconf", load_report_time="00:00:05")
    c.cfg = cfg
    c.daemons = []
    for name, argv in (("prestage", ["sge", "prestage", "--node", c.host, "--interval", "1"]),
                       ("planner", ["sge", "plan", "--interval", "1"])):
        log = open(base / f"{name}.log", "w")
        c.daemons.append(subprocess.Popen(["vmwrap", "--config", str(cfg), *argv], stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True))
    for _ in range(100):
        if (base / "state" / "agent.sock").exists():
            break
        time.sleep(0.1)
    yield c
    for p in c.daemons:
        p.terminate()
        p.wait(10)
    c.run("qdel", "-f", "-u", "vmwrapuser")
    c.run("qrdel", "-u", "*")
    _conf(base, "-ssconf", "-Msconf", max_reservation="0", params="none")
    _conf(base, "-sconf", "-Mconf", load_report_time="00:00:40")
    c.stop()
    agent.kill()
    shutil.rmtree(base, ignore_errors=True)


def _conf(base: Path, show: str, modify: str, **values: str) -> None:
    """Set `values` in the scheduler (-ssconf/-Msconf) or global (-sconf/-Mconf) configuration."""
    text = qconf(show).stdout
    lines = [f"{ln.split()[0]:<33} {values[ln.split()[0]]}" if ln.split() and ln.split()[0] in values else ln
             for ln in text.splitlines()]
    d = base / "conf-plan"
    d.mkdir(exist_ok=True)
    f = d / ("global" if modify == "-Mconf" else "sched")   # -Mconf takes the name from the file's
    f.write_text("\n".join(lines) + "\n")
    qconf(modify, str(f))


@pytest.fixture
def jobdir(cell, test_user):
    d = cell.base / "work" / f"t{os.urandom(3).hex()}"
    d.mkdir(parents=True)
    os.chown(d, test_user.pw_uid, test_user.pw_gid)
    return d


def qsub(cell, jobdir, script, *args) -> str:
    path = jobdir / f"job-{os.urandom(3).hex()}.sh"
    path.write_text(script)
    os.chown(path, 1234, 1234)
    r = cell.run("qsub", "-terse", "-cwd", "-q", "vmwrap.q", *args, str(path), user="vmwrapuser", cwd=str(jobdir))
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout.strip()


def state(cell, job) -> str:
    """The job's qstat state letters ('' once GE no longer has it)."""
    for line in cell.run("qstat", "-u", "*").stdout.splitlines()[2:]:
        f = line.split()
        if f and f[0] == job:
            return f[4]
    return ""


def finished(cell, job, timeout=300) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        r = cell.run("qacct", "-j", job)
        if r.returncode == 0 and "exit_status" in r.stdout and not state(cell, job):
            return dict(re.findall(r"^(\w+)\s+(.*?)\s*$", r.stdout.split("=" * 20)[-1], re.M))
        time.sleep(1)
    raise AssertionError(f"job {job} did not finish: {cell.run('qstat', '-j', job).stdout}\n"
                         f"{events(cell, job)}\n{(cell.base / 'planner.log').read_text()}")


def events(cell, job):
    return Ledger(cell.base / "state" / "ledger.sqlite").events(job)


def qemu_running(job: str) -> bool:
    return subprocess.run(["pgrep", "-f", f"guest=vmwrap-{job},"], capture_output=True).returncode == 0


def test_image_is_prestaged_for_the_job_ge_reserved_the_host_for(cell, jobdir):
    assert not (cell.base / "cache" / "blobs").exists() or not os.listdir(cell.base / "cache" / "blobs")
    blocker = qsub(cell, jobdir, "#!/bin/sh\nsleep 25\n", "-l", "h_rt=40")
    end = time.monotonic() + 60
    while time.monotonic() < end and "r" not in state(cell, blocker):
        time.sleep(0.5)
    job = qsub(cell, jobdir, "#!/bin/sh\n#VMWRAP --image=busybox\necho prestaged\n", "-R", "y", "-l", "h_rt=60")
    info = finished(cell, job)
    assert info["exit_status"] == "0", info
    assert "prestaged" in (jobdir / f"{Path(info['jobname']).name}.o{job}").read_text()
    ev = events(cell, job)
    staged = [e for e in ev if e["event"] == "prestage"]
    assert staged and staged[0]["detail"]["action"] == "fetched", (ev, (cell.base / "prestage.log").read_text())
    assert "planned to start here" in staged[0]["detail"]["reason"]
    at_start = [e for e in ev if e["event"] in ("cache_hit", "cache_miss")]
    assert at_start and all(e["event"] == "cache_hit" and e["detail"]["bytes"] == 0 for e in at_start), at_start
    assert staged[0]["ts"] < min(e["ts"] for e in at_start)
    finished(cell, blocker)


@pytest.mark.exclusive  # a save deadline: another worker's load on the 2 cores would move it (see conftest)
@pytest.mark.timeout(600)
def test_queue_head_runs_before_the_reservation_is_saved_in_time_and_resumes_after(cell, jobdir):
    start = time.time() + T
    r = cell.run("qrsub", "-a", time.strftime("%Y%m%d%H%M.%S", time.localtime(start)), "-d", "30", "-q", f"vmwrap.q@{cell.host}",
                 "-N", "maint", "-u", "vmwrapuser", user="vmwrapuser", cwd=str(jobdir))
    assert r.returncode == 0, r.stdout + r.stderr
    ar = re.search(r"\b(\d+)\b", r.stdout).group(1)
    ar_start = int(start)   # qrsub -a has whole seconds
    job = qsub(cell, jobdir, COUNTER, "-l", "h_rt=600")
    ar_job = qsub(cell, jobdir, "#!/bin/sh\ndate +%s\nsleep 10\n", "-ar", ar, "-l", "h_rt=20")

    end = time.monotonic() + 40
    while time.monotonic() < end and "r" not in state(cell, job):
        time.sleep(0.5)
    assert "r" in state(cell, job), ((cell.base / "planner.log").read_text(), cell.run("qrstat", "-ar", ar).stdout)
    started = time.time()
    assert started < ar_start - 50
    # saved before the reservation starts: no QEMU left, a checkpoint in the store, pending again
    manifest = cell.base / "checkpoints" / job / "manifest.json"
    while time.time() < ar_start and (qemu_running(job) or not manifest.exists()):
        time.sleep(0.3)
    saved_at = time.time()
    said = (cell.base / "planner.log").read_text()
    assert saved_at < ar_start, f"the gap job was not saved before the reservation started\n{said}"
    assert "q" in state(cell, job)
    saved = [e for e in events(cell, job) if e["event"] == "saved"]
    assert saved, events(cell, job)

    ar_info = finished(cell, ar_job, timeout=T + 120)
    ar_ran = int((jobdir / f"{Path(ar_info['jobname']).name}.o{ar_job}").read_text().split()[0])
    assert ar_start <= ar_ran <= ar_start + 10, (ar_ran, ar_start)

    info = finished(cell, job, timeout=300)
    out = (jobdir / f"{Path(info['jobname']).name}.o{job}").read_text()
    said = (cell.base / "planner.log").read_text()
    assert info["exit_status"] == "0", (info, out)
    assert f"job {job}: gap before maint" in said and f"job {job}: reservation maint" in said, said
    restored = [e for e in events(cell, job) if e["event"] == "restored"]
    assert restored and restored[0]["ts"] > ar_start, events(cell, job)
    assert values(out) == list(range(1, N + 1)), out   # continued after the reservation: every value once
    print(f"\nstarted {ar_start - started:.0f}s before the reservation, saved {ar_start - saved_at:.1f}s before it, "
          f"reservation job started {ar_ran - ar_start}s after its start\n{said}")


def test_checkpoints_of_jobs_ge_no_longer_has_are_collected(cell, jobdir):
    store = cell.base / "checkpoints"
    held = qsub(cell, jobdir, "#!/bin/sh\nsleep 60\n", "-h")   # held: still queued, may run again
    for j in (held, "99999"):                                # 99999: deleted while it was saved
        (store / j).mkdir(parents=True, exist_ok=True)
        (store / j / "manifest.json").write_text("{}")
    r = subprocess.run(["vmwrap", "--config", str(cell.cfg), "sge", "gc", "--once"], capture_output=True, text=True,
                       timeout=120)
    cell.run("qdel", held)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "job 99999: ended while saved, checkpoint deleted" in r.stdout
    assert (store / held / "manifest.json").exists() and not (store / "99999").exists()


# -- the VM's memory the planner budgets a save for: the script's --memory, as the prolog sizes it ------

def _job_list(jid: str, state: str = "qw", slots: int = 1):
    import xml.etree.ElementTree as ET

    return ET.fromstring(f"<job_list><JB_job_number>{jid}</JB_job_number><JB_owner>vmwrapuser</JB_owner>"
                         f"<state>{state}</state><slots>{slots}</slots><JAT_prio>0.5</JAT_prio></job_list>")


@pytest.mark.parametrize("context,hard,slots,want", [
    ({"vmwrap_memory": {"300"}}, {}, 1, 300.0),
    ({"vmwrap_memory": {"2048"}}, {"h_rt": "60"}, 1, 2048.0),
    # a hard memory request per slot still caps it (the prolog would refuse the rest)
    ({"vmwrap_memory": {"3072"}}, {"h_vmem": "1G"}, 2, 2048.0),
    # no --memory: the image's default, else the site's
    ({}, {}, 1, None),
], ids=["memory", "with-h_rt", "capped", "no-memory"])
def test_planner_budgets_the_save_for_the_scripts_memory(context, hard, slots, want):
    from vmwrap.config import Settings
    from vmwrap_plugins.sge import facts

    settings = Settings()
    details = {"hard": hard, "context": {"vmwrap_image": {"busybox"}, **context}, "ar": ""}
    *_, q = facts._queued(settings, {}, {"vmwrap.q": {"node1"}}, details, "4711", _job_list("4711", slots=slots))
    assert q.mem_mb == (want if want is not None else float(settings.default_memory_mib))
    assert q.saveable and q.state == "pending"


@pytest.mark.parametrize("forged", ["0", "1e9", "9" * 40, "x"])
def test_a_forged_memory_context_leaves_the_job_out_of_the_plan(forged):
    from vmwrap.config import Settings
    from vmwrap.errors import UserError
    from vmwrap_plugins.sge import facts

    details = {"hard": {}, "context": {"vmwrap_image": {"busybox"}, "vmwrap_memory": {forged}}, "ar": ""}
    with pytest.raises(UserError):   # facts.queue logs it and leaves the job out
        facts._queued(Settings(), {}, {}, details, "4711", _job_list("4711"))


def _jsv(monkeypatch, params: str, memory) -> list[str]:
    import io

    from vmwrap.config import Settings
    from vmwrap_plugins.sge import facts, hooks

    monkeypatch.setattr(facts, "cached_complex_defined", lambda: False)
    monkeypatch.setattr(hooks, "check_request", lambda *a, **k: ("busybox", memory, None))
    out = io.StringIO()
    hooks.jsv(Settings(), io.StringIO(f"START\n{params}BEGIN\nQUIT\n"), out)
    return out.getvalue().splitlines()[1:]


def test_jsv_copies_the_scripts_memory_into_the_context(monkeypatch):
    assert _jsv(monkeypatch, "", 300) == ["PARAM ac vmwrap_image=busybox,vmwrap_memory=300", "RESULT STATE CORRECT"]
    # the user's own value is replaced by the script's, or dropped when the script gives none
    assert _jsv(monkeypatch, "PARAM ac a=1,vmwrap_memory=1\n", 300) == [
        "PARAM ac a=1,vmwrap_image=busybox,vmwrap_memory=300", "RESULT STATE CORRECT"]
    assert _jsv(monkeypatch, "PARAM ac vmwrap_image=busybox,vmwrap_memory=1\n", None) == [
        "PARAM ac vmwrap_image=busybox", "RESULT STATE CORRECT"]
    assert _jsv(monkeypatch, "PARAM ac vmwrap_image=busybox,vmwrap_memory=300\n", 300) == ["RESULT STATE ACCEPT"]


def test_planner_sees_the_memory_of_a_job_qmaster_holds(cell, jobdir):
    """On the real cell: the JSV puts the script's --memory where the planner reads it; a job whose
    context was changed since (`qalter -ac`) fails in its prolog with the reason, the node stays up."""
    from vmwrap import config
    from vmwrap_plugins.sge import facts

    job = qsub(cell, jobdir, "#!/bin/sh\n#VMWRAP --image=busybox --memory=300M\necho hi\n", "-h")
    try:
        queued = {q.job: q for q in facts.queue(config.load(str(cell.cfg)), time.time())}
        assert queued[job].mem_mb == 300.0 and not queued[job].eligible
        r = cell.run("qalter", "-ac", "vmwrap_memory=64", job, user="vmwrapuser")
        assert r.returncode == 0, r.stderr
        assert cell.run("qrls", job, user="vmwrapuser").returncode == 0
        info = finished(cell, job, timeout=120)
        assert info["exit_status"] != "0", info
        err = (jobdir / f"{Path(info['jobname']).name}.e{job}").read_text()
        assert "vmwrap_memory=64 but its script asks for --memory=300M" in err, err
        assert cell.queue_state() == "", cell.queue_state()
    finally:
        cell.run("qdel", job)
