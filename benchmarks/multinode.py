"""Ping-pong between a 2-node job's two VMs over the job's private network (vmwrap/jobnet.py) against
the same between two bare processes of a 2-node job, side by side in one run on the local cluster.

TCP ping-pong (benchmarks/pingpong.c, static, run from the job's work dir): latency = half a 1-byte
round trip; bandwidth = 1 MiB messages echoed back. Not MPI: no appliance with an MPI library is
built yet. The 3 nodes share this host, so the bare pair talks over loopback and the VM pair over the
job's bridge (no VXLAN); under TCG here (no usable KVM), where the guest's network stack runs emulated.

usage: /opt/vmwrap/venv/bin/python benchmarks/multinode.py [--repeat 3] [--rounds 2000] [--mib 64]
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.slurm_cluster import Cluster  # noqa: E402

USER = "vmwrapuser"
RESULT = re.compile(r"latency_us ([0-9.]+) bandwidth_mib_s ([0-9.]+)")
SCRIPT = """#!/bin/sh
{vm}srun -N 2 -n 2 sh -c 'if [ "$SLURM_NODEID" = 1 ]; then ./pingpong serve 5200; else sleep 1; ./pingpong {peer} 5200 {rounds} {mib}; fi'
"""


def run(c: Cluster, work: Path, vm: bool, rounds: int, mib: int) -> tuple[float, float]:
    script = SCRIPT.format(vm="#VMWRAP --image=busybox\n" if vm else "", peer="10.77.0.2" if vm else "127.0.0.1",
                           rounds=rounds, mib=mib)
    r = c.sbatch(script, "-N", "2", user=USER, cwd=work)
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().split(";")[0]
    info = c.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 600)
    out = (work / f"slurm-{job}.out").read_text()
    m = RESULT.search(out)
    assert info["JobState"] == "COMPLETED" and m, (info["JobState"], out)
    return float(m.group(1)), float(m.group(2))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2000)
    ap.add_argument("--mib", type=int, default=64)
    a = ap.parse_args()
    base = Path("/var/tmp/vmwrap-bench-multinode")
    c = Cluster.for_site(base)
    c.start()
    try:
        work = c.user_dir(USER)
        exe = work / "pingpong"
        subprocess.run(["gcc", "-O2", "-static", "-o", str(exe), str(Path(__file__).with_name("pingpong.c"))],
                       check=True, capture_output=True)
        shutil.chown(exe, USER)
        got: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
        for _ in range(a.repeat):   # interleaved: drift hits both alike
            for vm in (False, True):
                got[vm].append(run(c, work, vm, a.rounds, a.mib))
                time.sleep(1)
        for vm in (False, True):
            lat = statistics.median(x[0] for x in got[vm])
            bw = statistics.median(x[1] for x in got[vm])
            print(f"{'2 VMs, job network' if vm else '2 bare processes  '}: latency {lat:8.1f} us   "
                  f"bandwidth {bw:8.1f} MiB/s   (runs: {', '.join(f'{x[0]:.0f}us/{x[1]:.0f}' for x in got[vm])})")
        lb, lv = (statistics.median(x[0] for x in got[v]) for v in (False, True))
        bb, bv = (statistics.median(x[1] for x in got[v]) for v in (False, True))
        print(f"ratio VM/bare: latency {lv / lb:.1f}x, bandwidth {bv / bb:.3f}x (TCG, one host)")
    finally:
        c.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
