"""Slurm benchmarks on a local 3-node cluster, measured side by side in one run.

  submit: sbatch throughput, 200 submissions with vmwrap's job_submit.lua vs without (goal ratio >= 0.9);
          blocks of 50 alternate between the two configurations (scontrol reconfigure) to cancel drift.
  start:  from the prolog's start to the script running in the guest, broken into
          prolog (validate, cache, overlay, createXML), boot (guest kernel to agent ready) and
          launch (agent ready to the job's script started: Slurm launching the batch step + attach).

usage: /opt/vmwrap/venv/bin/python benchmarks/slurm.py [--submissions 200] [--jobs 5]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.slurm_cluster import Cluster  # noqa: E402
from vmwrap.ledger import Ledger  # noqa: E402

USER = "vmwrapuser"


def submit_block(c: Cluster, work: Path, n: int, vm: bool) -> float:
    script = work / ("vm.sh" if vm else "bare.sh")
    t0 = time.perf_counter()
    for _ in range(n):
        r = c.run("sbatch", "--hold", "--parsable", "-D", str(work), str(script), user=USER)
        assert r.returncode == 0, r.stderr
    return time.perf_counter() - t0


def set_filter(c: Cluster, on: bool) -> None:
    text = c.conf.read_text()
    text = text.replace("#JobSubmitPlugins=lua", "JobSubmitPlugins=lua") if on else \
        text.replace("\nJobSubmitPlugins=lua", "\n#JobSubmitPlugins=lua")
    c.conf.write_text(text)
    c.run("scontrol", "reconfigure", check=True)
    time.sleep(1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--submissions", type=int, default=200)
    ap.add_argument("--jobs", type=int, default=5)
    a = ap.parse_args()
    base = Path("/var/tmp/vmwrap-bench-slurm")
    c = Cluster.for_site(base)
    c.start()
    try:
        work = c.user_dir(USER)
        (work / "vm.sh").write_text("#!/bin/sh\n#VMWRAP --image=busybox\necho hi\n")
        (work / "bare.sh").write_text("#!/bin/sh\necho hi\n")
        block = 50
        with_f, without_f = [], []
        for i in range(max(1, a.submissions // block)):
            set_filter(c, False)
            without_f.append(submit_block(c, work, block, vm=True))
            set_filter(c, True)
            with_f.append(submit_block(c, work, block, vm=True))
        c.run("scancel", "-u", USER)
        n = block * len(with_f)
        rate_with, rate_without = n / sum(with_f), n / sum(without_f)
        print(f"sbatch throughput over {n} submissions each: with vmwrap filter {rate_with:.1f}/s, "
              f"without {rate_without:.1f}/s, ratio = {rate_with / rate_without:.2f} (goal >= 0.9)")

        time.sleep(2)
        jobs = []
        for _ in range(a.jobs):
            r = c.run("sbatch", "--parsable", "-D", str(work), str(work / "vm.sh"), user=USER)
            job = r.stdout.strip()
            c.wait_state(job, {"COMPLETED", "FAILED"}, timeout=180)
            jobs.append(job)
        time.sleep(1)
        rows = []
        for job in jobs:
            for node in ("c1", "c2", "c3"):
                ev = {e["event"]: e for e in Ledger(c.node_dir(node) / "state" / "ledger.sqlite").events(job)}
                if "prepare" in ev and "created" in ev and "exited" in ev:
                    d = ev["exited"]["detail"]
                    rows.append((ev["created"]["ts"] - ev["prepare"]["ts"], d["ready"], d["started"] - d["ready"]))
        prolog, boot, launch = (statistics.median(x) for x in zip(*rows))
        total = prolog + boot + launch
        print(f"job start to script running in the guest (median of {len(rows)} jobs): {total:.2f} s = "
              f"prolog {prolog:.2f} s + boot {boot:.2f} s (guest kernel to agent ready) + "
              f"launch {launch:.2f} s (agent ready to script started); QEMU start before the guest kernel "
              f"is not in 'boot'")
    finally:
        c.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
