"""Issue 20: a VM job's start that would overrun Slurm's PrologEpilogTimeout (here 20 s: the image's
initrd comes from an HTTP server that trickles it).

Knowing the timeout (`prolog_timeout_s`), vmwrap's prolog gives up in time: the job fails with the
reason, the node is not drained, and no pin, partial download or cache reservation stays. Not knowing
it (node c3), slurmd kills the prolog as it kills any: Slurm drains the node ("Prolog error") and
requeues the job held, as for a bare prolog that times out; the epilog still leaves nothing of the
job, and once the admin resumes the node its next VM job runs.

Real Slurm 22.05 (3 nodes on this host), real libvirtd/QEMU; the slow server is the only stand-in.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from harness.slurm_cluster import Cluster
from harness.slurm_jobs import FINAL, jobdir as new_jobdir, submit, wait_for
from vmwrap.catalog import register

pytestmark = pytest.mark.vm
TIMEOUT = 20
HELLO = "#!/bin/sh\n#VMWRAP --image=busybox --memory=128M\necho hello\n"
SLOW = "#!/bin/sh\n#VMWRAP --image=slow --memory=128M\necho never\n"


class Trickle(BaseHTTPRequestHandler):
    """Announces the artifact's full length, then sends 64 KiB every half second (8 MiB: ~1 min)."""

    size = 0

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(200)
        self.send_header("Content-Length", str(self.size))
        self.end_headers()
        sent = 0
        try:
            while sent < self.size and not self.server.closing:
                n = min(65536, self.size - sent)
                self.wfile.write(b"\0" * n)
                self.wfile.flush()
                sent += n
                time.sleep(0.5)
        except OSError:
            pass  # the prolog gave up (or was killed)

    def log_message(self, *_):
        pass


@pytest.fixture(scope="module")
def cluster(appliance, virt_type, test_user):
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    srv.closing = False
    srv.daemon_threads = True
    Trickle.size = appliance.initrd.size
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    base = Path(f"/var/tmp/vmwrap-prologto-{os.getpid()}")
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    base.chmod(0o755)
    register(str(base / "images.toml"), appliance)
    slow = replace(appliance, name="slow",
                   initrd=replace(appliance.initrd, source=f"http://127.0.0.1:{srv.server_address[1]}/initrd"))
    register(str(base / "images.toml"), slow)
    knows = {"prolog_timeout_s": float(TIMEOUT)}   # c1 and c2 know Slurm's timeout, c3 does not
    c = Cluster(base, {"catalog": str(base / "images.toml"), "accel": virt_type, "grace_seconds": 5.0},
                node_config={"c1": knows, "c2": knows}, prolog_timeout=TIMEOUT)
    c.start()
    try:
        yield c
    finally:
        srv.closing = True
        srv.shutdown()
        c.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def jobdir(cluster, test_user):
    return new_jobdir(cluster, test_user)


def output(d: Path, job: str) -> str:
    p = d / f"slurm-{job}.out"
    return p.read_text(errors="replace") if p.exists() else ""


def node_state(cluster, node: str) -> str:
    return cluster.run("sinfo", "-h", "-n", node, "-o", "%T %E").stdout.splitlines()[0].strip()


def leftovers(cluster, node: str, job: str) -> list[str]:
    """What of `job` (or any unfinished fetch) could stay on `node`: run dir, pins, partial downloads,
    cache reservations, a VM."""
    d = cluster.node_dir(node)
    found = []
    if (d / "state" / "jobs" / job).exists():
        found.append("run dir")
    pins = d / "cache" / "pins"
    found += [f"pin {p.name[:12]}" for p in pins.iterdir() if (p / job).exists()] if pins.is_dir() else []
    for sub in ("tmp", "reserve"):
        found += [f"{sub}/{p.name}" for p in (d / "cache" / sub).glob("*")] if (d / "cache" / sub).is_dir() else []
    import subprocess

    if f"vmwrap-{job}" in subprocess.run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"],
                                         capture_output=True, text=True).stdout.split():
        found.append("vm")
    return found


def clean(cluster, node: str, job: str) -> None:
    try:
        wait_for(lambda: not leftovers(cluster, node, job), f"job {job}'s leftovers on {node} to go", timeout=60)
    except AssertionError:
        raise AssertionError(f"job {job} left {leftovers(cluster, node, job)} on {node}") from None


def next_job_runs(cluster, jobdir, node: str) -> None:
    job = submit(cluster, jobdir, HELLO, "-w", node)
    info = cluster.wait_state(job, FINAL, timeout=240)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), (info, output(jobdir, job))
    assert output(jobdir, job) == "hello\n"


@pytest.mark.timeout(400)
def test_a_start_that_would_overrun_the_prolog_timeout_fails_the_job_in_time_not_the_node(cluster, jobdir):
    t0 = time.monotonic()
    job = submit(cluster, jobdir, SLOW, "-w", "c1")
    info = cluster.wait_state(job, FINAL, timeout=240)
    out = output(jobdir, job)
    assert info["JobState"] == "FAILED", (info, out)
    assert "prolog timeout" in out and f"of the scheduler's {TIMEOUT} s" in out, out
    assert time.monotonic() - t0 < 120, "the prolog's own deadline, not Slurm's kill"
    assert "drain" not in node_state(cluster, "c1").lower(), node_state(cluster, "c1")
    clean(cluster, "c1", job)
    next_job_runs(cluster, jobdir, "c1")


@pytest.mark.timeout(400)
def test_a_prolog_killed_by_slurms_timeout_leaves_nothing_and_the_node_serves_again(cluster, jobdir):
    job = submit(cluster, jobdir, SLOW, "-w", "c3")
    wait_for(lambda: "drain" in node_state(cluster, "c3").lower(), "slurmd to drain c3 after the prolog's kill", 120)
    assert "Prolog error" in node_state(cluster, "c3"), node_state(cluster, "c3")
    # requeued held, as a bare job whose prolog times out
    info = wait_for(lambda: (lambda i: i if i.get("JobState") == "PENDING" else None)(cluster.job(job)),
                    "the job to be requeued", 60)
    assert "held" in info.get("Reason", "").lower(), info
    clean(cluster, "c3", job)
    cluster.run("scancel", job, check=True)
    cluster.run("scontrol", "update", "nodename=c3", "state=resume", check=True)
    next_job_runs(cluster, jobdir, "c3")


def test_the_prolog_deadline_fails_just_the_job_in_time(tmp_path):
    """No cluster: lifecycle.start with a 2 s prolog timeout and a job whose reading never ends (a hung
    scheduler command, a slow fetch) returns a job failure at the budget (2 s less a fifth), with the
    reason where the job's payload prints it; the prolog's alarm is gone afterwards."""
    import signal

    from vmwrap import lifecycle, rundir
    from vmwrap.config import Settings

    s = Settings(state_dir=str(tmp_path / "state"), cache_dir=str(tmp_path / "cache"),
                 checkpoint_dir=str(tmp_path / "ckpt"), prolog_timeout_s=2.0,
                 libvirt_uri="qemu:///system?socket=/nonexistent")
    t0 = time.monotonic()
    out = lifecycle.start(s, "77", lambda: time.sleep(30), "slurm")
    assert 1.5 < time.monotonic() - t0 < 5, time.monotonic() - t0
    assert out.verdict is lifecycle.Verdict.JOB_FAILED, out
    err = (rundir.path(s, "77") / rundir.ERROR).read_text()
    assert "did not finish within 1.6 s of the scheduler's 2 s prolog timeout" in err, err
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
