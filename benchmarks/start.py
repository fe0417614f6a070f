"""Job start from a pre-booted snapshot (fast_start) vs a cold boot vs a bare QEMU boot, side by side.

  bare:     QEMU boots the same kernel with a one-line busybox initrd to its first output (as core.py)
  cold:     `vmwrap run` start -> the job's first output, fast_start = false (warm image cache)
  snapshot: the same with fast_start = true and the shape's template prepared
Goal: snapshot start <= 0.5 x bare. Also reports QEMU's host memory (RSS) per job beside the guest's
memory and the snapshot file size per shape (issue 21's footprint).

usage: /opt/vmwrap/venv/bin/python benchmarks/start.py [--repeat N]   (root; libvirtd running)
       /opt/vmwrap/venv/bin/python benchmarks/start.py --slurm N     (the same on the local Slurm cluster)

Measured here (TCG, 2 cores, 2026-12-06, after libvirt stopped reading the guest CPU back one
feature at a time, docs/design.md): --repeat 5, two runs: snapshot 1.08 / 1.00 s vs bare 2.62 / 2.32 s
(0.41x / 0.43x; the code before, interleaved with them: 0.56x / 0.58x); cold 1.49x / 1.42x.
--slurm 3: prolog start -> script running 0.84 s from the snapshot vs bare 1.85 s (0.45x), cold 2.81 s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from core import APPLIANCES, bare_initrd, first_output, med  # noqa: E402

from vmwrap.catalog import Catalog  # noqa: E402

IMAGE = "vmwrap-bench-disk"
VMWRAP = [sys.executable, "-m", "vmwrap.cli"]


def site(tmp: Path, fast: bool) -> dict:
    cfg = tmp / f"vmwrap-{'fast' if fast else 'cold'}.toml"
    cfg.write_text(
        f'catalog = "{tmp / "catalog.toml"}"\ncache_dir = "{tmp / "cache"}"\n'
        f'state_dir = "{tmp / "state"}"\naccel = "{os.environ.get("VMWRAP_BENCH_ACCEL", "tcg")}"\n'
        f"fast_start = {'true' if fast else 'false'}\n")
    return dict(os.environ, VMWRAP_CONFIG=str(cfg), PYTHONPATH=str(HERE.parent))


def qemu_rss_mib(state_dir: Path, timeout: float = 60.0) -> float:
    """RSS of the QEMU running this site's VM, sampled once the job said it runs."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                if b"qemu-system" in cmd and str(state_dir).encode() in cmd:
                    for ln in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if ln.startswith("VmRSS:"):
                            return int(ln.split()[1]) / 1024
            except OSError:
                continue
        time.sleep(0.05)
    return float("nan")


def rss_of_job(env: dict, job: Path, work: Path, state_dir: Path) -> float:
    p = subprocess.Popen(VMWRAP + ["run", str(job), "--workdir", str(work)], env=env, stdout=subprocess.PIPE)
    os.read(p.stdout.fileno(), 64)  # the job runs: its VM is fully up
    rss = qemu_rss_mib(state_dir)
    p.communicate()
    return rss


def slurm(jobs: int) -> None:
    """On the local 3-node Slurm cluster: the prolog's start (ledger `prepare`) to the job's first command
    (a file it creates in its work dir: the 9P server stamps it with the host's clock), cold vs snapshot."""
    import statistics

    from harness.slurm_cluster import Cluster
    from vmwrap.ledger import Ledger

    base = Path("/var/tmp/vmwrap-bench-start-slurm")
    c = Cluster.for_site(base, site_config={"fast_start": True})
    c.start()
    try:
        work = c.user_dir("vmwrapuser")
        (work / "vm.sh").write_text('#!/bin/sh\n#VMWRAP --image=busybox\ntouch "started-$SLURM_JOB_ID"\n')
        nodes = ("c1", "c2", "c3")
        for node in nodes:
            subprocess.run(VMWRAP + ["--config", str(base / f"vmwrap-{node}.toml"), "snapshot", "prepare", "busybox"],
                           check=True, capture_output=True, env=dict(os.environ, PYTHONPATH=str(HERE.parent)))
        out = {}
        for mode in ("snapshot", "cold", "snapshot", "cold"):  # interleaved blocks
            for node in nodes:
                f = base / f"vmwrap-{node}.toml"
                f.write_text(f.read_text().replace(f"fast_start = {'false' if mode == 'snapshot' else 'true'}",
                                                   f"fast_start = {'true' if mode == 'snapshot' else 'false'}"))
            for _ in range(jobs):
                job = c.run("sbatch", "--parsable", "-D", str(work), str(work / "vm.sh"), user="vmwrapuser").stdout.strip()
                c.wait_state(job, {"COMPLETED", "FAILED"}, timeout=180)
                for node in nodes:
                    ev = {e["event"]: e for e in Ledger(c.node_dir(node) / "state" / "ledger.sqlite").events(job)}
                    if "prepare" in ev and (work / f"started-{job}").exists():
                        got = ev.get("created", {}).get("detail", {}).get("started_from", "boot")
                        out.setdefault(got, []).append((work / f"started-{job}").stat().st_mtime - ev["prepare"]["ts"])
        img = Catalog.load(str(base / "images.toml")).images["busybox"]
        tmp = Path(tempfile.mkdtemp(prefix="vmwrap-bench-bare-", dir="/var/tmp"))
        bare_argv = ["qemu-system-x86_64", "-accel", "tcg", "-machine", "pc", "-m", "256", "-nographic",
                     "-no-reboot", "-kernel", img.kernel.source, "-initrd", str(bare_initrd(tmp)),
                     "-append", "console=ttyS0 quiet loglevel=1 panic=-1 mitigations=off acpi=noirq"]
        bare = med([first_output(bare_argv, marker=b"FIRST-OUTPUT")[0] for _ in range(3)])
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"bare QEMU boot of the same kernel to first output: median {bare:.2f} s")
        for k, v in out.items():
            print(f"Slurm prolog start -> job script running, {k}: median {statistics.median(v):.2f} s of {len(v)} "
                  f"({[round(x, 2) for x in v]}), ratio to bare {statistics.median(v) / bare:.2f}"
                  + (" (goal <= 0.5)" if k == "snapshot" else ""))
    finally:
        c.stop()
        shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--slurm", type=int, default=0, metavar="N",
                    help="instead: N jobs per block on the local Slurm cluster, snapshot and cold blocks alternating")
    args = ap.parse_args()
    if args.slurm:
        return slurm(args.slurm)
    from vmwrap import appliance

    tmp = Path(tempfile.mkdtemp(prefix="vmwrap-bench-start-", dir="/var/tmp"))
    tmp.chmod(0o755)
    try:
        appliance.build(IMAGE, "busybox", str(APPLIANCES), str(tmp / "catalog.toml"))
        img = Catalog.load(str(tmp / "catalog.toml")).images[IMAGE]
        cold, fast = site(tmp, False), site(tmp, True)
        work = tmp / "work"
        work.mkdir()
        work.chmod(0o777)
        job = tmp / "job.sh"
        job.write_text(f"#!/bin/sh\n#VMWRAP --image={IMAGE}\necho FIRST-OUTPUT\n")
        sleeper = tmp / "sleeper.sh"
        sleeper.write_text(f"#!/bin/sh\n#VMWRAP --image={IMAGE}\necho FIRST-OUTPUT; sleep 2\n")
        subprocess.run(VMWRAP + ["run", str(job), "--workdir", str(work)], env=cold, capture_output=True)
        sizes = {}
        for mem in (256, 512):
            t0 = time.perf_counter()
            r = subprocess.run(VMWRAP + ["snapshot", "prepare", IMAGE, "--memory", str(mem), "--json"], env=fast,
                               capture_output=True, text=True, check=True)
            import json

            got = json.loads(r.stdout)
            sizes[mem] = (got["bytes"], time.perf_counter() - t0)
        cpio = bare_initrd(tmp)
        bare_argv = ["qemu-system-x86_64", "-accel", "tcg", "-machine", "pc", "-m", "256", "-nographic",
                     "-no-reboot", "-kernel", img.kernel.source, "-initrd", str(cpio),
                     "-append", "console=ttyS0 quiet loglevel=1 panic=-1 mitigations=off acpi=noirq"]
        bare, cold_t, fast_t = [], [], []
        for _ in range(args.repeat):  # interleaved: load from other work hits all three alike
            bare.append(first_output(bare_argv, marker=b"FIRST-OUTPUT")[0])
            cold_t.append(first_output(VMWRAP + ["run", str(job), "--workdir", str(work)], env=cold,
                                       marker=b"FIRST-OUTPUT")[0])
            fast_t.append(first_output(VMWRAP + ["run", str(job), "--workdir", str(work)], env=fast,
                                       marker=b"FIRST-OUTPUT")[0])
        b, c, f = med(bare), med(cold_t), med(fast_t)
        print(f"first output (median of {args.repeat}): bare QEMU boot {b:.2f} s; vmwrap cold start {c:.2f} s "
              f"(ratio {c / b:.2f}); vmwrap snapshot start {f:.2f} s (ratio {f / b:.2f}, goal <= 0.5)")
        print(f"  all: bare {[round(x, 2) for x in bare]}, cold {[round(x, 2) for x in cold_t]}, "
              f"snapshot {[round(x, 2) for x in fast_t]}")
        rc = rss_of_job(cold, sleeper, work, tmp / "state")
        rf = rss_of_job(fast, sleeper, work, tmp / "state")
        print(f"host memory per job (QEMU RSS while the job runs, guest memory 256 MiB): cold boot {rc:.0f} MiB, "
              f"restored from snapshot {rf:.0f} MiB")
        for mem, (n, secs) in sizes.items():
            print(f"snapshot file, {mem} MiB guest, 1 CPU: {n / 2**20:.1f} MiB (prepared in {secs:.1f} s)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
