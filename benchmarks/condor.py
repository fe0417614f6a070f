"""HTCondor benchmarks on the local pool (harness/condor_pool.py: one schedd, two startds), one run.

  submit: condor_submit throughput, N submissions with vmwrap's submit-side config (the job transforms
          and the +VmwrapImage submit requirements) vs without it, on the same schedd: the schedd is
          reconfigured (condor_reconfig, checked with condor_config_val -schedd) between rounds, which
          alternate ABBA so that drift hits both sides alike. One condor_submit process per job, as
          users submit (the requirement is evaluated per submission). Every job asks for
          +VmwrapImage = "busybox" and is submitted held (never runs); all are removed afterwards.
          Goal (issue 16): ratio >= 0.9.
  start:  real VM jobs, one at a time: from the startd activating the job's claim to the payload
          running in the guest, from the startd's and starter's logs (D_SUB_SECOND), the bridge's
          first schedd query for the job (its --condor-python goes through a shim that stamps each
          query: the bridge request itself has no time stamp), the ledger's prepare and created, and
          the guest's uptimes (booted/ready/started, in the ledger's exited event).

usage: /opt/vmwrap/venv/bin/python -m benchmarks.condor [--jobs 200] [--round 20] [--vm-jobs 3]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness.condor_pool import VmwrapSite  # noqa: E402
from vmwrap.catalog import Catalog  # noqa: E402
from vmwrap.config import Settings  # noqa: E402
from vmwrap.ledger import Ledger  # noqa: E402
from vmwrap_plugins.htcondor import render as condor_render  # noqa: E402

USER = "vmwrapuser"
HELD = ("executable = /bin/echo\narguments = hi\ntransfer_executable = false\nhold = true\n"
        'request_memory = 256\n+VmwrapImage = "busybox"\nqueue\n')
VM_JOB = ("executable = /bin/echo\narguments = hi\ntransfer_executable = false\noutput = out.txt\n"
          'error = err.txt\nrequest_memory = 256\n+VmwrapImage = "busybox"\nqueue\n')
# A StartLog/StarterLog line with D_SUB_SECOND: "12/03/26 11:57:08.765 ...".
STAMP = re.compile(r"^(\d\d/\d\d/\d\d \d\d:\d\d:\d\d\.\d+) ")


def set_submit_side(site: VmwrapSite, block: str, on: bool) -> None:
    """The schedd with or without vmwrap's submit-side lines; returns once the running schedd says so."""
    text = site.pool.config.read_text()
    if on and block not in text:
        text = text.replace("\n# vmwrap-submit-side-off\n", "\n" + block + "\n")
    elif not on and block in text:
        text = text.replace("\n" + block + "\n", "\n# vmwrap-submit-side-off\n")
    site.pool.config.write_text(text)
    site.pool.run("/usr/sbin/condor_reconfig", "-schedd", check=True)
    want = "VmwrapAllowed" if on else ""
    for _ in range(100):
        r = site.pool.run("/usr/bin/condor_config_val", "-schedd", "SUBMIT_REQUIREMENT_NAMES")
        if (want in r.stdout) if on else ("Vmwrap" not in r.stdout):
            return
        time.sleep(0.1)
    raise RuntimeError(f"the schedd did not take the submit side {'on' if on else 'off'}: {r.stdout}{r.stderr}")


def submit_round(site: VmwrapSite, sub: Path, n: int) -> list[float]:
    """Seconds of each of `n` condor_submit calls (as the user, in the chroot: what users run)."""
    took = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = site.pool.run("/usr/bin/condor_submit", "-terse", str(sub), user=USER, cwd=str(sub.parent))
        took.append(time.perf_counter() - t0)
        if r.returncode != 0:
            raise RuntimeError(f"condor_submit failed: {r.stderr}")
    return took


def throughput(site: VmwrapSite, block: str, n: int, size: int) -> dict[bool, list[float]]:
    """Per-call seconds with (True) and without (False) the submit side."""
    d = site.jobdir()
    sub = d / "held.sub"
    sub.write_text(HELD)
    sub.chmod(0o644)
    took: dict[bool, list[float]] = {True: [], False: []}
    rounds = max(1, n // size)
    try:
        for i in range(rounds):
            for on in ((False, True) if i % 2 == 0 else (True, False)):
                set_submit_side(site, block, on)
                took[on] += submit_round(site, sub, size)
        held = site.pool.query("jobs", "true", ["VmwrapRequested", "JobStatus"])
        assert len(held) == 2 * rounds * size and all(j["JobStatus"] == 5 for j in held), held[:3]
        assert sum(1 for j in held if j["VmwrapRequested"]) == rounds * size  # the transform ran on half
    finally:
        set_submit_side(site, block, True)
        site.pool.run("/usr/bin/condor_rm", "-all")
        site.pool.wait_for(lambda: not site.pool.query("jobs", "true", ["ClusterId"]), "the queue to empty", 120)
    return took


def _stamp(ln: str) -> float:
    m = STAMP.match(ln)
    if not m:
        raise ValueError(f"no D_SUB_SECOND time stamp: {ln!r}")
    return datetime.strptime(m.group(1), "%m/%d/%y %H:%M:%S.%f").replace(tzinfo=timezone.utc).timestamp()


def _log_times(logs: list[Path], job: str) -> dict[str, float]:
    """From the daemons' logs (UTC here): the startd's activate_claim for `job` (the job's start),
    the starter starting it, and the starter's exec of the wrapper (Create_Process)."""
    out: dict[str, float] = {}
    for log in logs:
        lines = log.read_text(errors="replace").splitlines()
        for i, ln in enumerate(lines):
            if ln.endswith(f"Remote job ID is {job}") and i and "Got activate_claim request" in lines[i - 1]:
                out.setdefault("activated", _stamp(lines[i - 1]))
            elif ln.endswith(f"universe job with ID: {job}"):
                out.setdefault("starter", _stamp(ln))
                nxt = next((x for x in lines[i:] if "Create_Process succeeded" in x), None)
                if nxt:
                    out.setdefault("wrapper", _stamp(nxt))
    return out


def start_breakdown(site: VmwrapSite, queries: Path, jobs: int) -> list[dict]:
    rows = []
    for _ in range(jobs):
        d = site.jobdir()
        cluster, r = site.submit(d, VM_JOB)
        if cluster < 0:
            raise RuntimeError(r.stderr)
        ad = site.pool.wait_job(cluster, 0, (4, 5), 240, ["ExitCode", "HoldReason"])
        if ad.get("JobStatus") != 4 or (d / "out.txt").read_text() != "hi\n":
            err = (d / "err.txt").read_text(errors="replace") if (d / "err.txt").exists() else ""
            raise RuntimeError(f"VM job {cluster}.0 did not run: {ad}\nerr.txt: {err}\n{site.logs()}")
        job = f"{cluster}.0"
        ev = {e["event"]: e for e in Ledger(site.state / "ledger.sqlite").events(job)}
        t = _log_times(sorted(site.pool.local("log").glob("Start*Log*")), job)
        asked = min(float(ln.split()[0]) for ln in queries.read_text().splitlines()
                    if f"ClusterId == {cluster} && ProcId == 0" in ln)
        g = ev["exited"]["detail"]
        rows.append({**t, "asked": asked, "prepare": ev["prepare"]["ts"],
                     "created": ev["created"]["ts"], "booted": g["booted"], "ready": g["ready"],
                     "started": g["started"]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=200, help="condor_submit calls per configuration")
    ap.add_argument("--round", type=int, default=20, help="submissions per round (rounds alternate ABBA)")
    ap.add_argument("--vm-jobs", type=int, default=3, help="real VM jobs for the start breakdown")
    a = ap.parse_args()
    subprocess.run(["bash", str(ROOT / "scripts" / "start-libvirtd.sh")], check=True)
    cat = Catalog.load("/var/cache/vmwrap/appliances/test-catalog.toml")
    img = next(iter(cat.images.values()))
    img.name = "busybox"
    base = Path(f"/var/tmp/vmwrap-bench-condor-{os.getpid()}")
    site = VmwrapSite(base, img, os.environ.get("VMWRAP_BENCH_ACCEL", "tcg"))
    block = condor_render.submit_side(Settings(catalog=str(base / "images.toml")))
    if block not in site.pool.extra_config:
        raise RuntimeError("the pool's config does not hold vmwrap's submit side as rendered")
    site.pool.extra_config += "\nSTARTD_DEBUG = D_SUB_SECOND\nSTARTER_DEBUG = D_SUB_SECOND\n"  # ms in their logs
    queries = base / "bridge-queries.log"
    shim = base / "condor-python"
    shim.write_text(f'#!/bin/sh\necho "$(date +%s.%N) $4" >> {queries}\nexec {site.condor_python()} "$@"\n')
    shim.chmod(0o755)
    try:
        site.start_bridge(condor_python=f"/bin/sh {shim}")
        site.pool.start()
        took = throughput(site, block, a.jobs, a.round)
        n = len(took[True])
        rate = {on: n / sum(t) for on, t in took.items()}
        med = {on: statistics.median(t) * 1000 for on, t in took.items()}
        ratio = rate[True] / rate[False]
        print(f"condor_submit throughput, {n} held jobs each, one condor_submit per job (as users submit), "
              f"rounds of {a.round} alternating ABBA:")
        print(f"  without vmwrap's submit side:       {rate[False]:5.1f}/s "
              f"(median {med[False]:.1f} ms per condor_submit)")
        print(f"  with its transforms + requirements: {rate[True]:5.1f}/s "
              f"(median {med[True]:.1f} ms per condor_submit) | ratio {ratio:.2f} (goal >= 0.9): "
              f"{'PASS' if ratio >= 0.9 else 'FAIL'}")

        rows = start_breakdown(site, queries, a.vm_jobs)
        phases = [
            ("startd activates the claim -> starter starts the job", "activated", "starter"),
            ("starter starts the job -> wrapper exec'd (Create_Process)", "starter", "wrapper"),
            ("wrapper exec'd -> bridge request (wrapper start, connect)", "wrapper", "asked"),
            ("bridge request -> prolog starts (the schedd confirms the job)", "asked", "prepare"),
            ("prolog -> VM created (cache, overlay, createXML)", "prepare", "created"),
        ]
        table = [(name, statistics.median(r[end] - r[begin] for r in rows)) for name, begin, end in phases]
        table += [
            ("guest kernel -> init (guest uptime at booted)", statistics.median(r["booted"] for r in rows)),
            ("init -> agent ready", statistics.median(r["ready"] - r["booted"] for r in rows)),
            ("agent ready -> payload running (attach as the user, GO)",
             statistics.median(r["started"] - r["ready"] for r in rows)),
        ]
        total = statistics.median(r["created"] - r["activated"] + r["started"] for r in rows)
        print(f"\njob start to payload running in the guest, median of {len(rows)} VM jobs "
              f"(accel {os.environ.get('VMWRAP_BENCH_ACCEL', 'tcg')}):")
        for name, v in table:
            print(f"  {name:<66} {v:6.2f} s")
        print(f"  {'total (median of per-job sums)':<66} {total:6.2f} s")
        print("  (QEMU's start before the guest kernel runs is in 'VM created'; guest phases are guest uptimes)")
    finally:
        site.__exit__(None, None, None)


if __name__ == "__main__":
    main()
