"""What Slurm VM-job test modules share: a module's cluster, a job dir per test, submitting, waiting."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from harness.host_share import keep_logs
from harness.polling import jobdir, values, wait_for  # noqa: F401 (re-exported: the Slurm modules import them from here)
from harness.slurm_cluster import Cluster
from vmwrap.catalog import register

FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}


@contextmanager
def module_cluster(name: str, appliance, virt_type: str, *, images=(), accounting: bool = False,
                   **site) -> Iterator[Cluster]:
    """A fresh 3-node cluster under /var/tmp/vmwrap-NAME-PID offering the test appliance (and `images`,
    more catalog entries); `accounting`: with slurmdbd, so that sacct answers."""
    base = Path(f"/var/tmp/vmwrap-{name}-{os.getpid()}")
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    base.chmod(0o755)
    for img in (appliance, *images):
        register(str(base / "images.toml"), img)
    c = Cluster(base, {"catalog": str(base / "images.toml"), "accel": virt_type, "grace_seconds": 5.0, **site},
                accounting=accounting)
    c.start()
    try:
        yield c
    finally:
        c.stop()
        keep_logs(base, f"slurm-{name}")
        shutil.rmtree(base, ignore_errors=True)


def submit(cluster: Cluster, d: Path, script: str, *args: str) -> str:
    r = cluster.sbatch(script, *args, user="vmwrapuser", cwd=d)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]

