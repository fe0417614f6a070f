"""The queue head runs before an advance reservation, is saved when it starts, resumes after it.

Real Slurm 22.05 (3 nodes), real VMs, `vmwrap plan` running next to slurmctld. A reservation on all
nodes starts in T seconds; two identical counter jobs whose time limit exceeds T wait for it: one in
partition `requeue` (planned), one in `debug` (not planned: the planner-off control, same cluster,
same run). The guest's counter lives only in the shell's memory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from harness.slurm_cluster import Cluster
from vmwrap.catalog import register

pytestmark = pytest.mark.vm
N = 60          # values the job counts, one a second
T = 150         # seconds until the reservation starts
COUNTER = ("#!/bin/sh\n#VMWRAP --image=busybox\n"
           f"i=0; while [ $i -lt {N} ]; do i=$((i+1)); echo n=$i; sleep 1; done\n")
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}


@pytest.fixture(scope="module")
def cluster(appliance, virt_type, test_user):
    base = Path(f"/var/tmp/vmwrap-plan-{os.getpid()}")
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    base.chmod(0o755)
    register(str(base / "images.toml"), appliance)
    c = Cluster(base, {"catalog": str(base / "images.toml"), "accel": virt_type, "grace_seconds": 5.0,
                       "plan_enabled": True, "plan_partitions": "requeue", "plan_min_run_s": 20.0})
    c.start()
    log = open(base / "planner.log", "w")
    planner = subprocess.Popen(["vmwrap", "--config", str(base / "vmwrap-c1.toml"), "plan", "--interval", "1"],
                               env=c.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    c.planner_log = base / "planner.log"
    yield c
    planner.terminate()
    planner.wait(10)
    c.stop()
    shutil.rmtree(base, ignore_errors=True)


def submit(cluster, d: Path, *args) -> str:
    r = cluster.sbatch(COUNTER, "--time=10", *args, user="vmwrapuser", cwd=d)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def workdir(cluster, test_user) -> Path:
    d = cluster.base / "work" / f"t{os.urandom(3).hex()}"
    d.mkdir(parents=True)
    os.chown(d, test_user.pw_uid, test_user.pw_gid)
    return d


def reservation(cluster, name: str, after: int) -> float:
    cluster.run("scontrol", "create", "reservation", f"ReservationName={name}", f"StartTime=now+{after}",
                "Duration=1", "Nodes=c1,c2,c3", "Users=root", check=True)
    out = cluster.run("scontrol", "show", "reservation", name, "-o").stdout
    return time.mktime(time.strptime(re.search(r"StartTime=(\S+)", out).group(1), "%Y-%m-%dT%H:%M:%S"))


def epoch(stamp: str) -> float:
    return time.mktime(time.strptime(stamp, "%Y-%m-%dT%H:%M:%S"))


def values(path: Path) -> list[int]:
    return [int(m) for m in re.findall(r"^n=(\d+)$", path.read_text(), re.M)]


def qemu_running(job: str) -> bool:
    return subprocess.run(["pgrep", "-f", f"guest=vmwrap-{job},"], capture_output=True).returncode == 0


def test_the_save_must_fit_or_the_job_is_not_started(cluster, test_user):
    store = cluster.base / "checkpoints"
    store.mkdir(exist_ok=True)
    rates = store / ".save-rates"
    before = rates.read_text() if rates.exists() else None
    # the store's measured saves say 0.27 MB/s: a 256 MiB guest needs ~1000 s, the gap is 300 s
    rates.write_text(json.dumps({"ts": time.time(), "bytes": 268_435_456, "seconds": 1000.0}) + "\n")
    try:
        reservation(cluster, "nofit", 300)
        job = submit(cluster, workdir(cluster, test_user), "-p", "requeue")
        time.sleep(8)   # eight planner passes
        info = cluster.job(job)
        assert info["JobState"] == "PENDING" and info["TimeLimit"] == "00:10:00", info
        said = cluster.planner_log.read_text()
        assert re.search(rf"job {job}: gap before nofit: gap of \d+s leaves \d+s of work before a \d+s save; needs",
                         said), said
        dry = subprocess.run(["vmwrap", "--config", str(cluster.base / "vmwrap-c1.toml"), "plan", "--once",
                              "--dry-run"], env=cluster.env, capture_output=True, text=True, timeout=60)
        assert f"job {job}: gap before nofit" in dry.stderr + dry.stdout
        cluster.run("scancel", job)
    finally:
        cluster.run("scontrol", "delete", "ReservationName=nofit")
        rates.unlink() if before is None else rates.write_text(before)


@pytest.mark.exclusive  # a save deadline: another worker's load on the 2 cores would move it (see conftest)
@pytest.mark.timeout(600)
def test_head_runs_before_the_reservation_is_saved_in_time_and_resumes_after(cluster, test_user):
    ar_start = reservation(cluster, "ar", T)
    d_off, d_on = workdir(cluster, test_user), workdir(cluster, test_user)
    off = submit(cluster, d_off, "-p", "debug")      # not planned: waits for the reservation
    on = submit(cluster, d_on, "-p", "requeue")      # planned: runs in the gap
    ar_dir = workdir(cluster, test_user)
    (ar_dir / "ar.sh").write_text("#!/bin/sh\ndate +%s > started\nsleep 15\n")
    r = cluster.run("sbatch", "--parsable", "-N3", "--reservation=ar", "--time=1", "-D", str(ar_dir),
                    str(ar_dir / "ar.sh"))
    assert r.returncode == 0, r.stderr
    ar_job = r.stdout.strip()

    info = cluster.wait_state(on, {"RUNNING"}, timeout=30)
    assert epoch(info["StartTime"]) < ar_start - 60
    assert cluster.job(off)["JobState"] == "PENDING"
    # saved before the reservation starts: no QEMU left, a checkpoint in the store, job requeued
    while time.time() < ar_start and (qemu_running(on) or not (cluster.base / "checkpoints" / on / "manifest.json").exists()):
        time.sleep(0.3)
    saved_at = time.time()
    assert saved_at < ar_start, ("the gap job was not saved before the reservation started "
                                 f"(QEMU still running: {qemu_running(on)}); the planner said:\n"
                                 + cluster.planner_log.read_text()[-4000:])
    assert cluster.job(on)["JobState"] in ("PENDING", "COMPLETING", "REQUEUED")

    ar = cluster.wait_state(ar_job, {"RUNNING", "COMPLETED"}, timeout=T + 30)
    assert ar["NodeList"] == "c[1-3]"
    ar_delay = epoch(ar["StartTime"]) - ar_start
    assert 0 <= ar_delay <= 5, (ar["StartTime"], ar_start)
    assert cluster.job(off)["JobState"] == "PENDING"

    done_on = cluster.wait_state(on, FINAL, timeout=240)
    done_off = cluster.wait_state(off, FINAL, timeout=240)
    assert (done_on["JobState"], done_on["ExitCode"], done_on["Restarts"]) == ("COMPLETED", "0:0", "1")
    assert done_off["JobState"] == "COMPLETED"
    assert epoch(done_on["StartTime"]) >= ar_start + 60          # restored after the reservation
    assert done_on["TimeLimit"] == "00:10:00"     # given back: it ran < 1 min in the gap (minutes are charged whole)
    assert values(d_on / f"slurm-{on}.out") == list(range(1, N + 1))   # continued: every value once
    assert values(d_off / f"slurm-{off}.out") == list(range(1, N + 1))
    # what the planner bought: the planned job finished earlier than the identical one without it
    gain = epoch(done_off["EndTime"]) - epoch(done_on["EndTime"])
    assert gain > 10, (done_on["EndTime"], done_off["EndTime"])
    said = cluster.planner_log.read_text()
    assert f"job {on}: gap before ar:" in said and f"job {on}: reservation ar starts at" in said
    assert f"job {off}: partition debug is not planned" in said
    print(f"\nplanner on: started {info['StartTime']}, saved {ar_start - saved_at:.1f}s before the reservation, "
          f"reservation job started {ar_delay:.0f}s after its start on {ar['NodeList']}, ended {done_on['EndTime']}; "
          f"planner off: ended {done_off['EndTime']} -> {gain:.0f}s earlier with the planner")
    print(said)
