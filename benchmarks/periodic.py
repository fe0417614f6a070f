"""Periodic checkpoints (vmwrap/periodic.py): how long each one stops the guest, and what they cost a job.

One run, side by side, a 256 MiB guest with most of its memory filled (non-zero pages) running a
fixed CPU-bound loop in its shell:
  plain:     the job alone
  periodic:  the same job with a live checkpoint into the store every --every seconds
interleaved over --rounds rounds (plain, periodic, plain, ...); reported: the job's runtime (host
clock from hand-over to its exit) and the ratio, and per checkpoint the guest's pause (suspend to
resume: the guest is stopped that long), the memory write within it and the whole save with sealing.

usage: /opt/vmwrap/venv/bin/python benchmarks/periodic.py [--memory 256] [--every 5] [--rounds 2]
       [--loops 150000] [--store DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vmwrap import checkpoint, config, domain, launcher, payload, periodic  # noqa: E402
from vmwrap.catalog import Catalog, register  # noqa: E402
from vmwrap.job import Job  # noqa: E402

APPLIANCES = Path(os.environ.get("VMWRAP_APPLIANCE_DIR", "/var/cache/vmwrap/appliances"))


def script(mem_mib: int, loops: int) -> str:
    fill = int(mem_mib * 0.6)
    return (f"#!/bin/sh\n#VMWRAP --image=busybox --memory={mem_mib}M\n"
            "mkdir -p /mnt/r && mount -t tmpfs -o size=95% none /mnt/r\n"
            f"yes 0123456789abcdefghijklmnopqrstuvwxyz | head -c {fill * 1048576} > /mnt/r/fill\n"
            "echo filled\n"
            f"i=0; while [ $i -lt {loops} ]; do i=$((i+1)); done; echo done\n")


def run_one(settings, store: checkpoint.Store, work: Path, mem_mib: int, loops: int, every: float | None,
            tag: str) -> dict:
    """Boot, fill, then time the loop (from 'filled' to the exit); with `every`, checkpoint meanwhile."""
    job_id = f"bench-periodic-{tag}"
    launcher.teardown(job_id, settings)
    store.delete(job_id)
    text = script(mem_mib, loops)
    job = Job(job_id, "bench", "root", 0, 0, str(work), text, memory_mib=mem_mib)
    lx = launcher.Launcher(job, settings)
    lx.prepare()
    lx.boot()
    out = os.open(work / f"{tag}.out", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    att = payload.Attachment(lx.run_dir, job_id, out, out, conn=lx.conn)
    att.start(text, {"PATH": "/bin:/usr/bin"}, [])
    saves: list[dict] = []
    failures: list[str] = []
    stop = threading.Event()
    marks: dict[str, float] = {}

    def watch():
        while b"filled" not in (lx.run_dir / "stdout").read_bytes():
            if stop.wait(0.05):
                return
        marks["filled"] = time.monotonic()
        if every is None:
            return
        conn = domain.connect(settings.libvirt_uri)
        try:
            while not stop.wait(every):
                try:
                    saves.append(periodic.save(job_id, lx.run_dir, store, conn, 0))
                except Exception as e:  # noqa: BLE001 (reported, the run goes on)
                    if not stop.is_set():
                        failures.append(str(e))
        finally:
            conn.close()

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    rc = att.stream()
    end = time.monotonic()
    stop.set()
    t.join(60)
    os.close(out)
    launcher.teardown(job_id, settings)
    store.delete(job_id)
    if rc != 0 or "filled" not in marks:
        raise SystemExit(f"{tag}: the job failed (exit {rc}): {(work / f'{tag}.out').read_text()[-500:]}")
    return {"runtime": end - marks["filled"], "saves": saves, "failures": failures}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--memory", type=int, default=256)
    ap.add_argument("--every", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--loops", type=int, default=150000, help="iterations of the guest's shell loop")
    ap.add_argument("--store", default="/var/tmp/vmwrap-bench-periodic", help="checkpoint store")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="vmwrap-bench-periodic-", dir="/var/tmp"))
    os.chmod(tmp, 0o755)
    rows: dict[str, list[dict]] = {"plain": [], "periodic": []}
    try:
        cat = Catalog.load(str(APPLIANCES / "test-catalog.toml"))
        img = next(iter(cat.images.values()))
        img.name = "busybox"
        register(str(tmp / "images.toml"), img)
        cfg = tmp / "vmwrap.toml"
        cfg.write_text(config.render({
            "catalog": str(tmp / "images.toml"), "cache_dir": str(tmp / "cache"), "state_dir": str(tmp / "state"),
            "accel": os.environ.get("VMWRAP_BENCH_ACCEL", "tcg"), "checkpoint_dir": a.store,
            "checkpoint_key_file": str(tmp / "checkpoint.key"), "checkpoint_min_every_s": 1.0}))
        settings = config.load(str(cfg))
        store = checkpoint.Store(a.store, checkpoint.keygen(settings.checkpoint_key_file))
        (store.root / checkpoint.STAMP).unlink(missing_ok=True)  # a scratch store: each run has a new key
        checkpoint.init_store(store.root, store.key_file)  # `vmwrap checkpoints init`
        work = tmp / "work"
        work.mkdir()
        for i in range(a.rounds):
            order = ("plain", "periodic") if i % 2 == 0 else ("periodic", "plain")
            for kind in order:
                rows[kind].append(run_one(settings, store, work, a.memory, a.loops,
                                          a.every if kind == "periodic" else None, f"{kind}{i}"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(a.store, ignore_errors=True)
    plain = statistics.median(r["runtime"] for r in rows["plain"])
    per = statistics.median(r["runtime"] for r in rows["periodic"])
    saves = [s for r in rows["periodic"] for s in r["saves"]]
    fails = [f for r in rows["periodic"] for f in r["failures"]]
    print(f"{a.memory} MiB guest (60 % filled), checkpoint every {a.every:g} s, {a.rounds} interleaved rounds, "
          f"accel {settings.accel}")
    print(f"  job runtime: plain {plain:.2f} s, with periodic checkpoints {per:.2f} s: ratio {per / plain:.3f} "
          f"({len(saves)} checkpoints, {len(fails)} failed)")
    if saves:
        def med(k: str) -> float:
            return statistics.median(s[k] for s in saves)
        print(f"  per checkpoint (median of {len(saves)}): guest paused {med('pause_s') * 1e3:.0f} ms "
              f"(max {max(s['pause_s'] for s in saves) * 1e3:.0f} ms; memory write {med('memory_s') * 1e3:.0f} ms), "
              f"sealing after resume {med('seal_s'):.2f} s, whole save {med('total_s'):.2f} s, "
              f"image {med('memory_bytes') / 2**20:.0f} MiB")
    for f in fails[:3]:
        print(f"  failed: {f}")


if __name__ == "__main__":
    main()
