"""Save/restore and pause/resume of a job's VM, measured side by side with dd in one run.

For a 256 MiB and a 1 GiB guest whose memory is mostly filled (non-zero pages: QEMU skips zero
pages, which would flatter the save), report:
  save:     libvirt save of the paused VM      vs dd of the same number of bytes to the same disk
  checkpoint: save + overlay/streams copy + fsync + SHA-256 seal  vs dd ... conv=fdatasync
  sha256:   hashing left after the save (issue 21: the files are hashed as they are written, the save
            image by a thread following libvirt; "read back" counts bytes hashed in a pass of their own)
  restore:  verify + restore                    (and restore alone)
  pause/resume latency (median of 10)
Goal (issue 4): save throughput >= 80 % of dd.

usage: /opt/vmwrap/venv/bin/python benchmarks/checkpoint.py [--sizes 256,1024] [--store DIR]
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

from vmwrap import checkpoint, config, domain, launcher, payload  # noqa: E402
from vmwrap.catalog import Catalog, register  # noqa: E402
from vmwrap.job import Job  # noqa: E402

APPLIANCES = Path(os.environ.get("VMWRAP_APPLIANCE_DIR", "/var/cache/vmwrap/appliances"))


def fill_script(mib: int) -> str:
    # Runs as root in the guest: a tmpfs filled with non-zero text pages, then idle.
    return ("#!/bin/sh\n#VMWRAP --image=busybox\nmkdir -p /mnt/r && mount -t tmpfs -o size=95% none /mnt/r\n"
            f"yes 0123456789abcdefghijklmnopqrstuvwxyz | head -c {mib * 1048576} > /mnt/r/fill\n"
            "echo filled; i=0; while :; do i=$((i+1)); sleep 1; done\n")


def dd(path: Path, nbytes: int, sync: bool) -> float:
    args = ["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={max(1, nbytes >> 20)}", "status=none"]
    if sync:
        args.append("conv=fdatasync")
    subprocess.run(["sync"])
    t0 = time.perf_counter()
    subprocess.run(args, check=True)
    dt = time.perf_counter() - t0
    path.unlink()
    return dt


def one(settings, mem_mib: int, work: Path, store: checkpoint.Store) -> dict:
    fill = int(mem_mib * 0.6)
    # the VM's size is a request; the allocation (memory_mib) is only its ceiling (vmwrap.request.resolve)
    script = fill_script(fill).replace("--image=busybox", f"--image=busybox --memory={mem_mib}M", 1)
    job_id = f"bench-ckpt-{mem_mib}"
    launcher.teardown(job_id, settings)
    store.delete(job_id)
    job = Job(job_id, "bench", "root", 0, 0, str(work), script, memory_mib=mem_mib)
    lx = launcher.Launcher(job, settings)
    lx.prepare()
    lx.boot()
    att = payload.Attachment(lx.run_dir, job_id, conn=lx.conn)
    att.start(script, {"PATH": "/bin:/usr/bin"}, [])
    end = time.monotonic() + 180
    while b"filled" not in (lx.run_dir / "stdout").read_bytes():
        if time.monotonic() > end:
            raise SystemExit(f"the {mem_mib} MiB guest did not fill its memory: {(lx.run_dir / 'stderr').read_text()}")
        time.sleep(0.2)
    err = (lx.run_dir / "stderr").read_text()
    if err.strip():
        print(f"guest stderr ({mem_mib} MiB): {err.strip()}", file=sys.stderr)
    dom = lx.conn.lookupByName(job.domain_name)
    pauses, resumes = [], []
    for _ in range(10):
        t0 = time.perf_counter()
        dom.suspend()
        t1 = time.perf_counter()
        dom.resume()
        pauses.append(t1 - t0)
        resumes.append(time.perf_counter() - t1)
    rounds = []
    nbytes = 0  # the save image's size, known after the first save
    for i in range(3):  # save, restore, save...: medians; dd before or after the save, alternately
        row = {}
        if i % 2:
            subprocess.run(["sync"])
            row["dd_sync"] = dd(store.root / "dd.bin", nbytes, sync=True)
        subprocess.run(["sync"])
        info = checkpoint.save(job_id, lx.run_dir, store, lx.conn, 1)
        launcher.teardown(job_id, settings)
        nbytes = info["memory_bytes"]
        row.update(save=info["save_s"], fsync=info["fsync_s"], hash=info["hash_s"], quiesce=info["quiesce_s"],
                   checkpoint=info["total_s"], reread=info["reread_bytes"])
        if not i % 2:
            subprocess.run(["sync"])
            row["dd_sync"] = dd(store.root / "dd.bin", nbytes, sync=True)
        row["dd"] = dd(store.root / "dd.bin", nbytes, sync=False)
        job2 = Job(job_id, "bench", "root", 0, 0, str(work), script, memory_mib=mem_mib, restart_count=1)
        lx = launcher.Launcher(job2, settings)
        lx.prepare()
        subprocess.run(["sync"])
        r = lx.restore(store)
        row.update(restore=r["restore_s"], verify=r["verify_s"])
        row["alive"] = not domain.is_gone(lx.conn, job.domain_name)
        rounds.append(row)
    launcher.teardown(job_id, settings)
    store.delete(job_id)
    m = {k: statistics.median(r[k] for r in rounds) for k in rounds[0] if k != "alive"}
    return {"mem": mem_mib, "bytes": nbytes, "pause": statistics.median(pauses),
            "resume": statistics.median(resumes), "alive": all(r["alive"] for r in rounds), **m}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="256,1024")
    ap.add_argument("--store", default="/var/tmp/vmwrap-bench-checkpoints",
                    help="checkpoint store (put it on the disk you want to measure)")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="vmwrap-bench-ckpt-", dir="/var/tmp"))
    os.chmod(tmp, 0o755)
    try:
        cat = Catalog.load(str(APPLIANCES / "test-catalog.toml"))
        img = next(iter(cat.images.values()))
        img.name = "busybox"
        register(str(tmp / "images.toml"), img)
        cfg = tmp / "vmwrap.toml"
        cfg.write_text(config.render({
            "catalog": str(tmp / "images.toml"), "cache_dir": str(tmp / "cache"), "state_dir": str(tmp / "state"),
            "accel": os.environ.get("VMWRAP_BENCH_ACCEL", "tcg"), "checkpoint_dir": a.store,
            "checkpoint_key_file": str(tmp / "checkpoint.key")}))
        settings = config.load(str(cfg))
        store = checkpoint.Store(a.store, checkpoint.keygen(settings.checkpoint_key_file))
        (store.root / checkpoint.STAMP).unlink(missing_ok=True)  # a scratch store: each run has a new key
        checkpoint.init_store(store.root, store.key_file)  # `vmwrap checkpoints init`
        work = tmp / "work"
        work.mkdir()
        rows = [one(settings, int(m), work, store) for m in a.sizes.split(",")]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    mb = 1e6
    print(f"checkpoint store: {a.store}")
    for r in rows:
        n = r["bytes"]
        print(f"\n{r['mem']} MiB guest: save image {n / 2**20:.0f} MiB (medians of 3 save/restore rounds)")
        print(f"  pause {r['pause'] * 1e3:.1f} ms, resume {r['resume'] * 1e3:.1f} ms (median of 10)")
        disk = r["save"] + r["fsync"]
        print(f"  save to disk (libvirt save + fsync) {disk:.2f} s = {n / disk / mb:5.0f} MB/s | dd conv=fdatasync "
              f"{r['dd_sync']:.2f} s = {n / r['dd_sync'] / mb:5.0f} MB/s | ratio {r['dd_sync'] / disk:.2f} (goal >= 0.80)")
        print(f"  into page cache: libvirt save {r['save']:.2f} s vs dd {r['dd']:.2f} s | ratio {r['dd'] / r['save']:.2f}")
        print(f"  whole checkpoint {r['checkpoint']:.2f} s (quiesce {r['quiesce']:.2f} s, sha256 after the save "
              f"{r['hash']:.2f} s, {r['reread'] / 2**20:.0f} MiB read back to hash) "
              f"| ratio to dd conv=fdatasync {r['dd_sync'] / r['checkpoint']:.2f}")
        print(f"  restore {r['restore']:.2f} s + verify {r['verify']:.2f} s; guest running after restore: {r['alive']}")


if __name__ == "__main__":
    main()
