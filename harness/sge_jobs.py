"""What Grid Engine VM-job test modules share: a module's cell (node agents per host, the test
appliance in its catalog) and a job dir per test."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from harness.host_share import destroy_vms_under, keep_logs
from harness.polling import jobdir  # noqa: F401 (re-exported)
from harness.sge_cell import Cell
from vmwrap.catalog import register


@contextmanager
def module_cell(name: str, appliance, virt_type: str, *, hosts: int = 1, queue: dict | None = None,
                shared_jobnet: bool = False, images=(), **site) -> Iterator[Cell]:
    """A fresh cell under /var/tmp/vmwrap-NAME-PID of `hosts` execution hosts offering the test
    appliance (and `images`); afterwards the test user's jobs are deleted, the cell stopped, and any
    job VM it left destroyed."""
    base = Path(f"/var/tmp/vmwrap-{name}-{os.getpid()}")
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    base.chmod(0o755)
    for img in (appliance, *images):
        register(str(base / "images.toml"), img)
    c = Cell(base, site_config={"catalog": str(base / "images.toml"), "accel": virt_type, "grace_seconds": 5.0,
                                **site}, hosts=hosts, queue=queue, shared_jobnet=shared_jobnet)
    c.start()
    try:
        yield c
    finally:
        c.run("qdel", "-u", "vmwrapuser")
        c.stop()
        destroy_vms_under(base)
        keep_logs(base, f"sge-{name}")
        shutil.rmtree(base, ignore_errors=True)


@contextmanager
def fresh_jobdir(cell, user) -> Iterator[Path]:
    """A fresh work dir for one test; afterwards every host's queue instance is enabled again (a test
    that put one in error state, as a node fault does, leaves the next test a working cell)."""
    yield jobdir(cell, user)
    for h in cell.hosts:
        cell.run("qmod", "-e", f"vmwrap.q@{h}")


def running_host(cell, job: str) -> str | None:
    """The host whose vmwrap.q instance runs the job now (qstat's queue column), else None."""
    for ln in cell.run("qstat", "-u", "*", "-s", "r").stdout.splitlines():
        f = ln.split()
        if f and f[0] == job and "r" in f[4]:
            return next((x.split("@", 1)[1] for x in f if x.startswith("vmwrap.q@")), None)
    return None
