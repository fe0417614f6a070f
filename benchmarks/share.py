"""Work dir share inside the guest: vmwrap's 9P server over virtio-serial (saveable, the default)
vs QEMU's virtio-9p (not saveable), side by side in one run; times measured in the guest.

  write: 64 MiB sequential (dd bs=64k) | read: the same file back | files: create+stat 200 small files

usage: /opt/vmwrap/venv/bin/python benchmarks/share.py
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vmwrap.catalog import Catalog, register  # noqa: E402
from vmwrap.config import render  # noqa: E402

SCRIPT = r"""#!/bin/sh
#VMWRAP --image=busybox
t() { read -r u _ < /proc/uptime; echo "$u"; }
a=$(t); dd if=/dev/zero of=big bs=65536 count=1024 2>/dev/null; sync; b=$(t)
echo 3 > /proc/sys/vm/drop_caches 2>/dev/null; cat big > /dev/null; c=$(t)
mkdir small; i=0; while [ $i -lt 200 ]; do echo $i > small/f$i; i=$((i+1)); done; ls -l small > /dev/null; d=$(t)
echo "write $a $b read $b $c files $c $d"
"""


USER = pwd.getpwnam("nobody")


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="vmwrap-bench-share-", dir="/var/tmp"))
    os.chmod(tmp, 0o755)
    cat = Catalog.load("/var/cache/vmwrap/appliances/test-catalog.toml")
    img = next(iter(cat.images.values()))
    img.name = "busybox"
    register(str(tmp / "images.toml"), img)
    (tmp / "job.sh").write_text(SCRIPT)
    res = {}
    try:
        for mode in ("serial", "virtio-9p", "serial", "virtio-9p"):
            cfg = tmp / f"{mode}.toml"
            cfg.write_text(render({"catalog": str(tmp / "images.toml"), "cache_dir": str(tmp / "cache"),
                                   "state_dir": str(tmp / "state"), "workdir_share": mode,
                                   "accel": os.environ.get("VMWRAP_BENCH_ACCEL", "tcg")}))
            work = tmp / f"work-{mode}"
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir()
            # As an ordinary user, like a real job: its QEMU (virtio-9p) and 9P server run as that user.
            os.chown(work, USER.pw_uid, USER.pw_gid)
            r = subprocess.run(["vmwrap", "--config", str(cfg), "run", str(tmp / "job.sh"), "--workdir", str(work),
                                "--user", USER.pw_name],
                               capture_output=True, text=True, timeout=600)
            f = r.stdout.split()
            if r.returncode != 0 or len(f) != 9:
                raise SystemExit(f"{mode}: {r.stdout} {r.stderr}")
            times = {f[0]: float(f[2]) - float(f[1]), f[3]: float(f[5]) - float(f[4]), f[6]: float(f[8]) - float(f[7])}
            res.setdefault(mode, []).append(times)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    best = {m: {k: min(t[k] for t in ts) for k in ts[0]} for m, ts in res.items()}
    s, v = best["serial"], best["virtio-9p"]
    print(f"{'':8} {'vmwrap 9P (serial)':>20} {'virtio-9p':>12} {'ratio':>7}   (guest seconds, best of 2)")
    for k, what in (("write", "64 MiB write"), ("read", "64 MiB read"), ("files", "200 files")):
        print(f"{what:<14} {s[k]:12.2f} s {v[k]:10.2f} s {s[k] / v[k]:7.2f}x")
    print(f"throughput: write {64 / s['write']:.0f} vs {64 / v['write']:.0f} MiB/s, "
          f"read {64 / s['read']:.0f} vs {64 / v['read']:.0f} MiB/s")


if __name__ == "__main__":
    main()
