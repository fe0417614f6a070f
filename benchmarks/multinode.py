"""Ping-pong between a 2-node job's two VMs over the job's private network (vmwrap/jobnet.py) against
the same between two bare processes of a 2-node job, side by side in one run on the local cluster.

- MPI (benchmarks/mpi_pingpong.c, built with the host's mpicc; Debian's OpenMPI in the test suite's
  `mpi` appliance, tests/test_slurm_multinode.py builds it): `mpirun -np 2 --map-by node`.
- TCP (benchmarks/pingpong.c, static, in the busybox appliance): the same pattern over plain sockets.
Latency = half a 1-byte round trip; bandwidth = 1 MiB messages sent back and forth. The 3 nodes share
this host, so the bare pair talks over loopback (or OpenMPI's shared memory) and the VM pair over the
job's bridge (no VXLAN); under TCG here (no usable KVM), where each guest's network stack runs emulated.

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
TCP = """#!/bin/sh
{vm}srun -N 2 -n 2 sh -c 'if [ "$SLURM_NODEID" = 1 ]; then ./pingpong serve 5200; else sleep 1; ./pingpong {peer} 5200 {rounds} {mib}; fi'
"""
MPI = """#!/bin/sh
{vm}mpirun -np 2 --map-by node ./mpi_pingpong {rounds} {mib}
"""
APPLIANCES = Path("/var/cache/vmwrap/appliances")


def run(c: Cluster, work: Path, kind: str, vm: bool, rounds: int, mib: int) -> tuple[float, float]:
    image = "mpi" if kind == "mpi" else "busybox"
    script = (MPI if kind == "mpi" else TCP).format(vm=f"#VMWRAP --image={image}\n" if vm else "",
                                                    peer="10.77.0.2" if vm else "127.0.0.1", rounds=rounds, mib=mib)
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
    from vmwrap.catalog import Catalog

    mpi = Catalog.load(str(APPLIANCES / "vmwrap-mpi-catalog.toml")).images["vmwrap-mpi"]  # built by the tests
    mpi.name = "mpi"
    base = Path("/var/tmp/vmwrap-bench-multinode")
    c = Cluster.for_site(base, images=("busybox", mpi))
    c.start()
    try:
        work = c.user_dir(USER)
        here = Path(__file__).resolve().parent
        for argv in (["gcc", "-O2", "-static", "-o", str(work / "pingpong"), str(here / "pingpong.c")],
                     ["mpicc", "-O2", "-o", str(work / "mpi_pingpong"), str(here / "mpi_pingpong.c")]):
            subprocess.run(argv, check=True, capture_output=True)
            shutil.chown(argv[argv.index("-o") + 1], USER)
        for kind in ("mpi", "tcp"):
            got: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
            for _ in range(a.repeat):   # interleaved: drift hits both alike
                for vm in (False, True):
                    got[vm].append(run(c, work, kind, vm, a.rounds if kind == "tcp" else a.rounds // 4,
                                       a.mib if kind == "tcp" else a.mib // 4))
                    time.sleep(1)
            for vm in (False, True):
                lat = statistics.median(x[0] for x in got[vm])
                bw = statistics.median(x[1] for x in got[vm])
                print(f"{kind.upper():3} {'2 VMs, job network' if vm else '2 bare processes  '}: latency {lat:9.1f} us  "
                      f"bandwidth {bw:8.1f} MiB/s  (runs: {', '.join(f'{x[0]:.0f}us/{x[1]:.0f}' for x in got[vm])})")
            lb, lv = (statistics.median(x[0] for x in got[v]) for v in (False, True))
            bb, bv = (statistics.median(x[1] for x in got[v]) for v in (False, True))
            print(f"{kind.upper():3} ratio VM/bare: latency {lv / lb:.1f}x, bandwidth {bv / bb:.4f}x (TCG, one host)")
    finally:
        c.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
