"""Image import benchmarks, measured side by side in one run; prints the numbers and ratios.

  import: `import_disk` time per GB for a whole-disk Debian image (bookworm + build-essential, GPT, qcow2,
          made without vmwrap by harness/disk_images.py and cached), and for each archive kind (OCI layout,
          docker save, SIF, rootfs tarball) of the tests' bookworm + python3 root (harness/test_archives.py)
  start:  `vmwrap run` start -> first output with that imported Debian image (its own kernel 6.1) vs the busybox
          appliance, interleaved runs, warm cache                                     (goal <= 1.2);
          the imported trixie test disk (kernel 6.12) alongside, for information

usage: /opt/vmwrap/venv/bin/python benchmarks/images.py [--repeat N]   (run alone: VMs under the heavy lock)
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.core import APPLIANCES, first_output, site  # noqa: E402
from harness.disk_images import debian_disk  # noqa: E402
from vmwrap import appliance  # noqa: E402
from harness.test_archives import KINDS, archives  # noqa: E402
from vmwrap.cli.image_import import _importer  # noqa: E402
from vmwrap.imports.disk import import_disk  # noqa: E402

EXTRA = ("build-essential",)  # makes the Debian disk >= 1 GB


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    t0 = time.perf_counter()
    src = debian_disk("bookworm", EXTRA)
    made = time.perf_counter() - t0
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", "-f", "qcow2", str(src)],
                                     capture_output=True, check=True, text=True).stdout)
    vsize, data = info["virtual-size"], info["actual-size"]
    tmp = Path(tempfile.mkdtemp(prefix="vmwrap-bench-images-", dir="/var/tmp"))
    tmp.chmod(0o755)
    catalog = tmp / "catalog.toml"
    try:
        imports = []
        for i in range(args.repeat):
            t = time.perf_counter()
            img = import_disk(src, "debian-disk", tmp / "images", str(catalog), max_bytes=None,
                              on_stage=lambda _s: None)
            imports.append(time.perf_counter() - t)
        med = statistics.median(imports)
        print(f"import --kind disk: {src.name} (test disk made in {made:.0f} s, cached), {vsize / 1e9:.2f} GB "
              f"virtual, {data / 1e9:.2f} GB qcow2 data; median of {args.repeat}: {med:.1f} s = "
              f"{med / (vsize / 1e9):.1f} s per virtual GB, {med / (data / 1e9):.1f} s per GB of data "
              f"(all: {', '.join(f'{x:.1f}' for x in imports)} s)")
        print(f"  imported: {img.origin}; disk {img.disk.size / 1e9:.2f} GB qcow2, kernel "
              f"{Path(img.kernel.source).name} {img.kernel.size / 2**20:.0f} MiB, initrd {img.initrd.size / 2**20:.1f} MiB")

        (tmp / "arch").mkdir()
        (tmp / "arch" / ".kernel").symlink_to(APPLIANCES / ".kernel")  # vmwrap's cached Debian kernel
        packed = {kind: (sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir()
                         else path.stat().st_size) for kind, path in archives().items()}
        took: dict[str, list[float]] = {kind: [] for kind in packed}
        for i in range(args.repeat):
            for kind, path in archives().items():  # interleaved: every kind sees the same I/O load
                t = time.perf_counter()
                img = _importer(kind)(path, f"arch-{kind}", tmp / "arch", str(tmp / "arch.toml"), max_bytes=None,
                                      on_stage=lambda _s: None)
                took[kind].append(time.perf_counter() - t)
        for kind, size in packed.items():
            med = statistics.median(took[kind])
            print(f"import --kind {kind}: {size / 1e6:.0f} MB packed -> {img.disk.size / 1e6:.0f} MB qcow2 root; "
                  f"median of {args.repeat}: {med:.1f} s = {med / (size / 1e9):.1f} s per packed GB "
                  f"(all: {', '.join(f'{x:.1f}' for x in took[kind])} s)")
        assert set(KINDS) == set(archives())

        import_disk(debian_disk("trixie"), "trixie-disk", tmp / "images", str(catalog), max_bytes=None,
                    on_stage=lambda _s: None)
        appliance.build("vmwrap-bench-disk", "busybox", str(APPLIANCES), str(catalog))
        env = site(tmp, tmp / "cache")
        work = tmp / "work"
        work.mkdir()
        work.chmod(0o777)
        jobs = {}
        for name in ("debian-disk", "vmwrap-bench-disk", "trixie-disk"):
            jobs[name] = tmp / f"{name}.sh"
            jobs[name].write_text(f"#!/bin/sh\n#VMWRAP --image={name}\necho FIRST-OUTPUT\n")
            r = subprocess.run(["vmwrap", "run", str(jobs[name]), "--workdir", str(work)], env=env,
                               capture_output=True)  # warms the cache
            if r.returncode != 0 or b"FIRST-OUTPUT" not in r.stdout:
                raise SystemExit(f"{name}: job failed: {r.stderr.decode()[-500:]}")
        times: dict[str, list[float]] = {n: [] for n in jobs}
        for _ in range(args.repeat):
            for name, job in jobs.items():  # interleaved: both see the same machine load
                times[name].append(first_output(["vmwrap", "run", str(job), "--workdir", str(work)], env=env,
                                                marker=b"FIRST-OUTPUT")[0])
        deb, bb = statistics.median(times["debian-disk"]), statistics.median(times["vmwrap-bench-disk"])
        print(f"job start -> first output (warm cache, median of {args.repeat}): imported Debian disk "
              f"{deb:.2f} s, busybox appliance {bb:.2f} s, ratio = {deb / bb:.2f} (goal <= 1.2); imported "
              f"trixie disk {statistics.median(times['trixie-disk']):.2f} s; "
              f"runs: { {k: [round(x, 2) for x in v] for k, v in times.items()} }")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
