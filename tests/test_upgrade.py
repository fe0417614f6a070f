"""Upgrading vmwrap under running jobs (issue 24), on real Slurm with real VMs.

The cluster's hooks and batch step first run an older vmwrap, installed from its wheel (commit
UPGRADE_FROM, the last one before versioned formats; override with $VMWRAP_UPGRADE_FROM): one job is
running, another was saved by the old epilog. Then the site upgrades as the admin guide says
(`vmwrap hooks install DIR` from the new install, the `vmwrap` the batch steps call switched): the
running job is ended by the new epilog on the run dir the old prolog made, and the saved job is
restored by the new prolog from the old checkpoint and counts on, every value once. The nodes'
ledgers, created by the old code, are migrated by the new one with their history.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from harness.slurm_cluster import NODES, Cluster
from harness.slurm_jobs import FINAL, jobdir, submit, values, wait_for
from test_wheel import DEPS, _site_packages
from vmwrap import domain, ledger
from vmwrap.catalog import register

pytestmark = pytest.mark.vm
UPGRADE_FROM = os.environ.get("VMWRAP_UPGRADE_FROM", "197af17")
N = 16
COUNTER = ("#!/bin/sh\n#VMWRAP --image=busybox\n"
           f"i=0; while [ $i -lt {N} ]; do i=$((i+1)); echo n=$i; sleep 1; done\n")
NEW = Path(sys.executable).parent  # this checkout's install


def _old_venv(base: Path) -> Path:
    """vmwrap at UPGRADE_FROM from its own wheel, its dependencies linked from the running venv."""
    src, dist, venv = base / "old-src", base / "old-dist", base / "old-venv"
    if subprocess.run(["git", "cat-file", "-e", f"{UPGRADE_FROM}^{{commit}}"], cwd=ROOT).returncode != 0:
        pytest.skip(f"commit {UPGRADE_FROM} is not in this clone (shallow?): nothing to upgrade from")
    src.mkdir()
    archive = subprocess.run(["git", "archive", UPGRADE_FROM], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", "wheel", "--no-deps", "-w",
                    str(dist), str(src)], check=True, cwd="/", capture_output=True)
    (whl,) = dist.glob("vmwrap-*.whl")
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(venv)], check=True, cwd="/")
    target, here = _site_packages(venv / "bin" / "python"), _site_packages(Path(sys.executable))
    for entry in here.iterdir():
        low = entry.name.lower()
        if any(low == d or low.startswith((d + ".", d + "-", d + "_", d + "mod", d + "aio")) for d in DEPS + ("rich",)):
            (target / entry.name).symlink_to(entry)
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", "--python",
                    str(venv / "bin" / "python"), "install", "--no-deps", "--no-index", str(whl)],
                   check=True, cwd="/", capture_output=True)
    shutil.rmtree(src)
    return venv


class _Site(Cluster):
    """The test cluster with its hooks from `vmwrap hooks install HOOKS` and batch steps calling BIN;
    its checkpoint store as the old vmwrap made it (no identity stamp)."""

    stamp_store = False

    def __init__(self, base: Path, site: dict, hooks: Path, vmwrap_bin: Path):
        super().__init__(base, site)
        self.hooks, self.vmwrap_bin = hooks, vmwrap_bin

    def write_config(self) -> None:
        super().write_config()
        for kind in ("prolog", "epilog"):
            (self.base / "hooks" / kind).write_text(f"#!/bin/sh\nexec {self.hooks}/slurm-{kind} --config '{self.vmwrap_config}'\n")

    def render_lua(self, **kw):
        return super().render_lua(vmwrap=str(self.vmwrap_bin), **kw)


def _install(venv_bin: Path, hooks: Path, vmwrap_bin: Path) -> None:
    r = subprocess.run([str(venv_bin / "vmwrap"), "hooks", "install", str(hooks)], capture_output=True, text=True,
                       cwd="/", env={"PATH": "/usr/bin:/bin", "HOME": "/root"})
    assert r.returncode == 0, r.stderr
    tmp = vmwrap_bin.with_name(".vmwrap.new")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(venv_bin / "vmwrap")
    os.rename(tmp, vmwrap_bin)


@pytest.fixture(scope="module")
def site(appliance, virt_type, test_user):
    base = Path(f"/var/tmp/vmwrap-upgrade-{os.getpid()}")
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    base.chmod(0o755)
    old = _old_venv(base)
    hooks, vmwrap_bin = base / "hooks-installed", base / "bin" / "vmwrap"
    vmwrap_bin.parent.mkdir()
    _install(old / "bin", hooks, vmwrap_bin)
    register(str(base / "images.toml"), appliance)
    c = _Site(base, {"catalog": str(base / "images.toml"), "accel": virt_type, "grace_seconds": 5.0}, hooks, vmwrap_bin)
    c.start()
    try:
        yield c, old
    finally:
        c.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_jobs_survive_an_upgrade(site, test_user):
    cluster, old = site
    assert f"{old}/bin/python" in (cluster.hooks / "slurm-prolog").read_text()
    d_run, d_saved = jobdir(cluster, test_user), jobdir(cluster, test_user)
    running = submit(cluster, d_run, "#!/bin/sh\n#VMWRAP --image=busybox\necho before; sleep 25; echo after; exit 3\n")
    saved = submit(cluster, d_saved, COUNTER, "-p", "requeue")
    out_saved, out_run = d_saved / f"slurm-{saved}.out", d_run / f"slurm-{running}.out"
    wait_for(lambda: out_saved.exists() and len(values(out_saved.read_text())) >= 4, "the counter to count to 4")
    wait_for(lambda: out_run.exists() and "before" in out_run.read_text(), "the other job to start")

    # The old epilog saves the counter's VM (its manifest has no "vmwrap" key: the old format).
    assert cluster.run("scontrol", "requeue", saved).returncode == 0
    manifest = cluster.base / "checkpoints" / saved / "manifest.json"
    wait_for(manifest.exists, "the old epilog's checkpoint", timeout=60)
    assert '"vmwrap"' not in manifest.read_text()

    # The upgrade, as the admin guide says: the new `vmwrap checkpoints init` adopts the old store
    # (its checkpoints stay), then the hooks are switched.
    store = cluster.base / "checkpoints"
    assert not (store / ".vmwrap-store").exists()
    r = subprocess.run([str(NEW / "vmwrap"), "--config", str(cluster.base / "vmwrap-c1.toml"), "checkpoints", "init"],
                       capture_output=True, text=True, cwd="/", env={"PATH": "/usr/bin:/bin", "HOME": "/root"})
    assert r.returncode == 0 and f"adopted the existing checkpoint store {store}" in r.stdout, (r.stdout, r.stderr)
    assert manifest.exists()
    _install(NEW, cluster.hooks, cluster.vmwrap_bin)
    assert f"{NEW}/python" in (cluster.hooks / "slurm-prolog").read_text()

    info = cluster.wait_state(running, FINAL, timeout=120)  # ended by the new epilog
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "3:0", info
    assert out_run.read_text() == "before\nafter\n"
    info = cluster.wait_state(saved, FINAL, timeout=180)    # restored by the new prolog
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", info
    assert values(out_saved.read_text()) == list(range(1, N + 1)), out_saved.read_text()

    events: dict[str, list[str]] = {}
    for n in NODES:
        path = cluster.node_dir(n) / "state" / "ledger.sqlite"
        if path.exists():
            led = ledger.Ledger(path)
            assert led.db.execute("PRAGMA user_version").fetchone()[0] == ledger.SCHEMA
            for job in (running, saved):
                events.setdefault(job, []).extend(e["event"] for e in led.events(job))
    assert {"created", "saved", "restored", "destroyed"} <= set(events[saved]), events
    assert {"created", "destroyed"} <= set(events[running]), events
    conn = domain.connect("qemu:///system")
    assert not {f"vmwrap-{running}", f"vmwrap-{saved}"} & {d.name() for d in conn.listAllDomains()}
