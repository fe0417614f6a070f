"""qsub throughput with vmwrap's client JSV vs without, on the real local Grid Engine cell, one run.

200 submissions each (held jobs, deleted afterwards): no JSV, the client JSV (sge_request
`-jsv`, sees the script) and the server JSV (jsv_url, one process in sge_qmaster), in rotating batches of 20 so that drift
hits both sides alike. Goal (issue 7): ratio >= 0.9.

usage: /opt/vmwrap/venv/bin/python benchmarks/sge.py [--n 200]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness.sge_cell import CELL, SGE_ROOT, Cell  # noqa: E402
from vmwrap.catalog import Catalog, register  # noqa: E402
from vmwrap.config import render  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--user", default="vmwrapuser")
    a = ap.parse_args()
    base = Path("/var/tmp/vmwrap-bench-sge")
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    base.chmod(0o755)
    cat = Catalog.load("/var/cache/vmwrap/appliances/test-catalog.toml")
    img = next(iter(cat.images.values()))
    img.name = "busybox"
    register(str(base / "images.toml"), img)
    (base / "vmwrap.toml").write_text(render({"catalog": str(base / "images.toml"), "state_dir": str(base / "state")}))
    cell = Cell(base, str(base / "vmwrap.toml"))
    cell.start()
    work = base / "work"
    work.mkdir()
    shutil.chown(work, a.user)
    script = work / "job.sh"
    script.write_text("#!/bin/sh\n#VMWRAP --image=busybox --memory=256M\necho hi\n")
    shutil.chown(script, a.user)
    request = SGE_ROOT / CELL / "common" / "sge_request"
    with_jsv = request.read_text()
    env = dict(os.environ, SGE_ROOT=str(SGE_ROOT), SGE_CELL=CELL)
    modes = ("client", "server", "bare")
    times = dict.fromkeys(modes, 0.0)
    counts = dict.fromkeys(modes, 0)
    try:
        for batch in range(a.n // 20 * 3):
            mode = modes[batch % 3]
            request.write_text(with_jsv if mode == "client" else "")
            cell.set_server_jsv(base / "hooks" / "sge-jsv" if mode == "server" else None)
            t0 = time.perf_counter()
            for _ in range(20):
                r = subprocess.run(["runuser", "-u", a.user, "--", "env", f"SGE_ROOT={SGE_ROOT}", f"SGE_CELL={CELL}",
                                    "qsub", "-h", "-cwd", "-q", "vmwrap.q", str(script)],
                                   cwd=work, env=env, capture_output=True, text=True)
                if r.returncode != 0:
                    raise SystemExit(f"qsub failed ({mode}): {r.stderr}")
            times[mode] += time.perf_counter() - t0
            counts[mode] += 20
    finally:
        request.write_text(with_jsv)
        cell.set_server_jsv(None)
        subprocess.run(["qdel", "-u", a.user], env=env, capture_output=True)
    rate = {m: counts[m] / times[m] for m in modes}
    print(f"qsub x{counts['bare']} without a JSV:                {rate['bare']:.1f}/s ({1000 / rate['bare']:.0f} ms each)")
    for m in ("client", "server"):
        print(f"qsub x{counts[m]} with vmwrap's {m} JSV:{' ' * (7 - len(m))}     {rate[m]:.1f}/s "
              f"({1000 / rate[m]:.0f} ms each) | ratio {rate[m] / rate['bare']:.2f} (goal >= 0.9)")


if __name__ == "__main__":
    main()
