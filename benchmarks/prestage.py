"""Cold vs prestaged job start on the local Slurm cluster, images served over HTTP at 10 MB/s
(the HPDC 2008 paper's network), measured in one run.

  cold:      c1 idle, image not cached anywhere: the prolog fetches it before booting.
  prestaged: c2 busy until the job's planned start; the prestage agent fetches the image meanwhile.
Reports the prolog time (prepare -> VM created) and the bytes fetched at start for both, and their ratio.

usage: /opt/vmwrap/venv/bin/python benchmarks/prestage.py [--rate-mb 10]
"""

from __future__ import annotations

import argparse
import dataclasses
import http.server
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.slurm_cluster import Cluster  # noqa: E402
from vmwrap import config  # noqa: E402
from vmwrap.catalog import Artifact, Catalog  # noqa: E402
from vmwrap.ledger import Ledger  # noqa: E402


def serve(files: dict[str, Path], rate: float) -> str:
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            p = files.get(self.path)
            if p is None:
                self.send_error(404)
                return
            data = p.read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            t0, chunk = time.monotonic(), 256 * 1024
            for i in range(0, len(data), chunk):
                self.wfile.write(data[i:i + chunk])
                ahead = (i + chunk) / rate - (time.monotonic() - t0)
                if ahead > 0:
                    time.sleep(ahead)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{srv.server_address[1]}"


def over_http(img, url: str, files: dict):
    arts = {}
    for key, a in img.artifacts().items():
        files[f"/{img.name}/{key}"] = Path(a.source)
        arts[key] = Artifact(f"{url}/{img.name}/{key}", a.sha256, a.size, a.format)
    return dataclasses.replace(img, **arts)


def prolog_time(c: Cluster, node: str, job: str) -> tuple[float, int]:
    ev = {e["event"]: e for e in Ledger(c.node_dir(node) / "state" / "ledger.sqlite").events(job)}
    moved = sum(e["detail"]["bytes"] for e in Ledger(c.node_dir(node) / "state" / "ledger.sqlite").events(job)
                if e["event"] in ("cache_hit", "cache_miss"))
    return ev["created"]["ts"] - ev["prepare"]["ts"], moved


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate-mb", type=float, default=10.0)
    a = ap.parse_args()
    img = Catalog.load(config.load().catalog).images["busybox"]
    files: dict[str, Path] = {}
    url = serve(files, a.rate_mb * 1e6)
    c = Cluster.for_site(Path("/var/tmp/vmwrap-bench-prestage"), images=[over_http(img, url, files)], prestage=True)
    c.start()
    try:
        work = c.user_dir("vmwrapuser")
        job = "#!/bin/sh\n#VMWRAP --image=busybox\necho hi\n"
        cold = c.sbatch(job, "-w", "c1", "-t", "1", user="vmwrapuser", cwd=work).stdout.strip()
        c.wait_state(cold, {"COMPLETED", "FAILED"}, 300)
        blocker = c.sbatch("#!/bin/sh\nsleep 25\n", "-w", "c2", "--exclusive", "-t", "1", user="vmwrapuser",
                           cwd=work).stdout.strip()
        time.sleep(1)
        warm = c.sbatch(job, "-w", "c2", "--exclusive", "-t", "1", user="vmwrapuser", cwd=work).stdout.strip()
        c.wait_state(warm, {"COMPLETED", "FAILED"}, 300)
        tc, bc = prolog_time(c, "c1", cold)
        tw, bw = prolog_time(c, "c2", warm)
        size = sum(x.size for x in img.artifacts().values())
        print(f"image {size / 1e6:.0f} MB over HTTP at {a.rate_mb:.0f} MB/s")
        print(f"cold start: prolog {tc:.2f} s, {bc / 1e6:.1f} MB fetched at start")
        print(f"prestaged start: prolog {tw:.2f} s, {bw / 1e6:.1f} MB fetched at start")
        print(f"ratio cold/prestaged prolog time = {tc / tw:.1f}")
        _ = blocker
    finally:
        c.stop()


if __name__ == "__main__":
    main()
