"""Load (issue 20): many small jobs through the local 3-node Slurm cluster, each in its own VM, against
the same jobs bare, in one run on one cluster; then no leak and no stuck job.

Both batches are submitted at once and run concurrently up to the nodes' limits (2 cores each, one
core and 128 MiB per job, so 6 at a time); jobs/min = jobs / (last end - first submission). The VM
batch runs first, the bare one right after; the same script either way (the bare one without its
#VMWRAP line). After the VM batch: every job COMPLETED with its output, no VM, run dir, cache pin or
job process left on any node, none drained.

usage: flock -o /tmp/vmwrap-heavy.lock /opt/vmwrap/venv/bin/python benchmarks/load.py [--jobs 100]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.slurm_cluster import NODES, Cluster  # noqa: E402

USER = "vmwrapuser"
BODY = "echo job=$SLURM_JOB_ID; i=0; while [ $i -lt 3 ]; do i=$((i+1)); sleep 1; done; echo done\n"
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED"}


def batch(c: Cluster, work: Path, n: int, vm: bool, timeout: float) -> tuple[float, dict[str, str]]:
    """Submit n jobs, wait for all; (seconds from first submission to all final, job -> state)."""
    head = "#!/bin/sh\n" + ("#VMWRAP --image=busybox --memory=128M\n" if vm else "")
    script = work / ("vm.sh" if vm else "bare.sh")
    script.write_text(head + BODY)
    script.chmod(0o755)
    t0 = time.monotonic()
    jobs = []
    for _ in range(n):
        r = c.run("sbatch", "--parsable", "-c", "1", "--mem=128M", "-D", str(work), str(script), user=USER)
        if r.returncode != 0:
            raise SystemExit(f"sbatch failed: {r.stderr}")
        jobs.append(r.stdout.strip().split(";")[0])
    states: dict[str, str] = {}
    end = t0 + timeout
    while time.monotonic() < end:
        out = c.run("scontrol", "-o", "show", "job").stdout
        states = {}
        for ln in out.splitlines():
            f = dict(t.partition("=")[::2] for t in ln.split() if "=" in t)
            if f.get("JobId") in jobs:
                states[f["JobId"]] = f.get("JobState", "?")
        if len(states) == n and all(s in FINAL for s in states.values()):
            return time.monotonic() - t0, states
        time.sleep(1)
    return time.monotonic() - t0, states  # some never ended: reported as stuck


def leaks(c: Cluster, jobs: list[str]) -> list[str]:
    found = []
    names = subprocess.run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"], capture_output=True,
                           text=True).stdout.split()
    found += [f"vm {n}" for n in names if n.removeprefix("vmwrap-") in jobs]
    for n in NODES:
        d = c.node_dir(n)
        found += [f"run dir {p.name} on {n}" for p in (d / "state" / "jobs").glob("*")]
        pins = d / "cache" / "pins"
        found += [f"pin {p.parent.name[:12]}/{p.name} on {n}" for p in pins.glob("*/*")] if pins.is_dir() else []
    procs = subprocess.run(["pgrep", "-af", f"{c.base}/nodes/.*/state/jobs/"], capture_output=True, text=True).stdout
    found += [f"process {ln[:100]}" for ln in procs.splitlines()]
    found += [ln for ln in c.run("sinfo", "-h", "-N", "-o", "%N %T").stdout.splitlines() if "drain" in ln]
    return found


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=100)
    ap.add_argument("--timeout", type=float, default=3600)
    a = ap.parse_args()
    base = Path("/var/tmp/vmwrap-bench-load")
    c = Cluster.for_site(base, site_config={"grace_seconds": 5.0})
    c.start()
    try:
        work = c.user_dir(USER)
        warm = batch(c, work, 3, True, 300)[1]   # the image into every node's cache is not the load
        assert all(s == "COMPLETED" for s in warm.values()), warm
        vm_s, vm_states = batch(c, work, a.jobs, True, a.timeout)
        time.sleep(5)  # the last epilogs end a moment after their jobs
        left = leaks(c, list(vm_states))
        bare_s, bare_states = batch(c, work, a.jobs, False, a.timeout)
        bad = {j: s for j, s in vm_states.items() if s != "COMPLETED"}
        wrong = [j for j in vm_states if (work / f"slurm-{j}.out").read_text(errors="replace")
                 != f"job={j}\ndone\n"] if not bad else []
        stuck = a.jobs - len([s for s in vm_states.values() if s in FINAL])
        vm_rate, bare_rate = a.jobs / vm_s * 60, a.jobs / bare_s * 60
        print(f"{a.jobs} jobs, 3 nodes x 2 cores (1 core, 128 MiB each), concurrent up to the node limits")
        print(f"vm:   {vm_s:7.1f} s  {vm_rate:6.1f} jobs/min")
        print(f"bare: {bare_s:7.1f} s  {bare_rate:6.1f} jobs/min")
        print(f"ratio vm/bare: {vm_rate / bare_rate:.2f}")
        print(f"not COMPLETED: {bad or 'none'}; wrong output: {wrong or 'none'}; stuck: {stuck}; "
              f"bare not COMPLETED: {sum(s != 'COMPLETED' for s in bare_states.values())}")
        print(f"leaks after the VM batch: {left or 'none'}")
        sys.exit(1 if bad or wrong or stuck or left else 0)
    finally:
        c.stop()


if __name__ == "__main__":
    main()
