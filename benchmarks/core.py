"""Core benchmarks, measured side by side in one run; prints ratios.

  overlay: qcow2 overlay creation on a 1 GiB vs a 10 GiB base      (goal <= 1.2)
  boot:    `vmwrap run` start -> first output vs a bare QEMU boot of the same kernel (goal <= 1.3)
  cache:   cold-cache vs warm-cache job start
  cpu:     the same CPU-bound script bare vs in the VM (TCG here: expect a large factor)

usage: /opt/vmwrap/venv/bin/python benchmarks/core.py [--repeat N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vmwrap import overlay  # noqa: E402
from vmwrap.catalog import Catalog  # noqa: E402

APPLIANCES = Path(os.environ.get("VMWRAP_APPLIANCE_DIR", "/var/cache/vmwrap/appliances"))
CPU_LOOP = "awk 'BEGIN{for(i=0;i<2000000;i++)s+=i*2; print s}'"


def med(xs):
    return statistics.median(xs)


def bench_overlay(tmp: Path, repeat: int):
    out = {}
    for gib in (1, 10):
        base = tmp / f"base{gib}.raw"
        subprocess.run(["fallocate", "-l", f"{gib}G", str(base)], check=True)  # really allocated, not sparse
        times = []
        for i in range(repeat):
            ov = tmp / f"ov{gib}-{i}.qcow2"
            t0 = time.perf_counter()
            overlay.create(base, ov, "raw")
            times.append(time.perf_counter() - t0)
            ov.unlink()
        base.unlink()
        out[gib] = med(times)
    return out


def site(tmp: Path, cache: Path) -> dict:
    cfg = tmp / f"vmwrap-{cache.name}.toml"
    cfg.write_text(
        f'catalog = "{tmp / "catalog.toml"}"\ncache_dir = "{cache}"\n'
        f'state_dir = "{tmp / "state"}"\naccel = "{os.environ.get("VMWRAP_BENCH_ACCEL", "tcg")}"\n'
    )
    return dict(os.environ, VMWRAP_CONFIG=str(cfg))


def first_output(argv, env=None, marker=b"") -> tuple[float, float, bytes]:
    """Seconds to the first output byte (or marker) and to process exit."""
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, env=env)
    buf = b""
    t_first = None
    while True:
        chunk = os.read(p.stdout.fileno(), 65536)
        if not chunk:
            break
        buf += chunk
        if t_first is None and marker in buf and buf:
            t_first = time.perf_counter() - t0
    p.wait()
    return t_first or float("nan"), time.perf_counter() - t0, buf


def bare_initrd(tmp: Path) -> Path:
    root = tmp / "bare"
    (root / "bin").mkdir(parents=True)
    shutil.copy2("/bin/busybox", root / "bin" / "busybox")
    (root / "init").write_text("#!/bin/busybox sh\n/bin/busybox echo FIRST-OUTPUT\n/bin/busybox poweroff -f\n")
    (root / "init").chmod(0o755)
    files = subprocess.run(["find", ".", "-print0"], cwd=root, capture_output=True, check=True).stdout
    dest = tmp / "bare.cpio"
    with open(dest, "wb") as f:
        subprocess.run(["cpio", "--null", "-o", "-H", "newc", "--quiet"], cwd=root, input=files, stdout=f, check=True)
    return dest


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    from vmwrap import appliance

    tmp = Path(tempfile.mkdtemp(prefix="vmwrap-bench-", dir="/var/tmp"))
    tmp.chmod(0o755)
    appliance.build("vmwrap-bench-disk", "busybox", str(APPLIANCES), str(tmp / "catalog.toml"))
    appliance.build("vmwrap-bench-initramfs", "initramfs", str(APPLIANCES), str(tmp / "catalog.toml"))
    img = Catalog.load(str(tmp / "catalog.toml")).images["vmwrap-bench-disk"]
    try:
        ov = bench_overlay(tmp, args.repeat)
        print(f"overlay create: 1 GiB base {ov[1] * 1000:.1f} ms, 10 GiB base {ov[10] * 1000:.1f} ms, "
              f"ratio 10G/1G = {ov[10] / ov[1]:.2f} (goal <= 1.2)")

        cpio = bare_initrd(tmp)
        bare_argv = ["qemu-system-x86_64", "-accel", "tcg", "-machine", "pc", "-m", "256", "-nographic",
                     "-no-reboot", "-kernel", img.kernel.source, "-initrd", str(cpio),
                     "-append", "console=ttyS0 quiet loglevel=1 panic=-1 mitigations=off acpi=noirq"]
        work = tmp / "work"
        work.mkdir()
        work.chmod(0o777)
        job = tmp / "job.sh"
        job.write_text("#!/bin/sh\n#VMWRAP --image=vmwrap-bench-disk\necho FIRST-OUTPUT\n")
        job_nodisk = tmp / "job-nodisk.sh"
        job_nodisk.write_text("#!/bin/sh\n#VMWRAP --image=vmwrap-bench-initramfs\necho FIRST-OUTPUT\n")
        cpu_job = tmp / "cpu.sh"
        cpu_job.write_text(f"#!/bin/sh\n#VMWRAP --image=vmwrap-bench-disk\n{CPU_LOOP}\n")
        warm = site(tmp, tmp / "cache-warm")
        for j in (job, job_nodisk):
            subprocess.run(["vmwrap", "run", str(j), "--workdir", str(work)], env=warm, capture_output=True)

        bare, vm, vm_nodisk, cold, warm_t, cpu_bare, cpu_vm = [], [], [], [], [], [], []
        for i in range(args.repeat):
            bare.append(first_output(bare_argv, marker=b"FIRST-OUTPUT")[0])
            vm.append(first_output(["vmwrap", "run", str(job), "--workdir", str(work)], env=warm,
                                   marker=b"FIRST-OUTPUT")[0])
            vm_nodisk.append(first_output(["vmwrap", "run", str(job_nodisk), "--workdir", str(work)], env=warm,
                                          marker=b"FIRST-OUTPUT")[0])
            cold_env = site(tmp, tmp / f"cache-cold-{i}")
            cold.append(first_output(["vmwrap", "run", str(job), "--workdir", str(work)], env=cold_env,
                                     marker=b"FIRST-OUTPUT")[0])
            warm_t.append(first_output(["vmwrap", "run", str(job), "--workdir", str(work)], env=warm,
                                       marker=b"FIRST-OUTPUT")[0])
            shutil.rmtree(tmp / f"cache-cold-{i}", ignore_errors=True)
            t0 = time.perf_counter()
            subprocess.run(["busybox", "sh", "-c", CPU_LOOP], capture_output=True, check=True)
            cpu_bare.append(time.perf_counter() - t0)
            r = first_output(["vmwrap", "run", str(cpu_job), "--workdir", str(work)], env=warm)
            cpu_vm.append(r[1])
        print(f"first output: bare QEMU boot {med(bare):.2f} s; vmwrap run, initramfs appliance "
              f"{med(vm_nodisk):.2f} s, ratio = {med(vm_nodisk) / med(bare):.2f} (goal <= 1.3); "
              f"with a root disk (overlay, ext4) {med(vm):.2f} s, ratio = {med(vm) / med(bare):.2f}")
        print(f"job start: cold cache {med(cold):.2f} s, warm cache {med(warm_t):.2f} s, "
              f"ratio cold/warm = {med(cold) / med(warm_t):.2f} "
              f"(appliance {sum(a.size for a in img.artifacts().values()) / 2**20:.0f} MiB from local disk)")
        print(f"cpu-bound script: bare {med(cpu_bare):.2f} s, in VM (whole job incl. boot) {med(cpu_vm):.2f} s, "
              f"ratio = {med(cpu_vm) / med(cpu_bare):.1f} (TCG software emulation; KVM would be near 1)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
