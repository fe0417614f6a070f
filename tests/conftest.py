"""Fixtures: a real libvirtd, the real busybox appliance, and a private vmwrap site per test."""

from __future__ import annotations

import functools
import os
import re
import pwd
import subprocess
import sys
from pathlib import Path

import pytest

from harness.host_share import host_lock

ROOT = Path(__file__).resolve().parent.parent
APPLIANCES = Path(os.environ.get("VMWRAP_APPLIANCE_DIR", "/var/cache/vmwrap/appliances"))
TEST_USER = "vmwrapuser"
VMWRAP = [sys.executable, "-m", "vmwrap.cli"]


@pytest.fixture(scope="session")
def libvirtd():
    with host_lock():  # both xdist workers start their sessions at once
        subprocess.run(["bash", str(ROOT / "scripts" / "start-libvirtd.sh")], check=True)
    return "qemu:///system"


def cached_appliance(name: str, kind: str, inputs: list[Path], packages: list[str] | None = None):
    """Appliance `name` (kind, Debian packages) built once per machine under APPLIANCES with its own
    catalog, rebuilt only when what goes into it changed: the guest agent, its builder, `inputs`, the
    packages. Under a lock: a rebuild rewrites the initrd in place, which would break a VM test of another
    pytest session that is booting it at the same moment ("checksum mismatch")."""
    import fcntl
    import hashlib

    from vmwrap import appliance as builder
    from vmwrap.catalog import Catalog

    APPLIANCES.mkdir(parents=True, exist_ok=True)
    cat_path = APPLIANCES / ("test-catalog.toml" if name == "vmwrap-test" else f"{name}-catalog.toml")
    h = hashlib.sha256(",".join(packages or []).encode() + b"\0")
    for f in sorted((ROOT / "vmwrap" / "templates" / "guest").iterdir()) + [ROOT / "vmwrap" / "appliance.py", *inputs]:
        h.update(f.name.encode() + b"\0" + f.read_bytes())   # the kernel is fetched once per machine, never changes
    key = h.hexdigest()
    stamp = APPLIANCES / name / ".inputs"
    with open(APPLIANCES / ".test-appliance.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        img = None
        if stamp.exists() and stamp.read_text() == key:
            try:
                img = Catalog.load(str(cat_path)).images.get(name)
            except Exception:
                img = None
            if img is not None and not all(Path(a.source).is_file() and Path(a.source).stat().st_size == a.size
                                           for a in (img.kernel, img.initrd, img.disk) if a is not None):
                img = None
        if img is None:
            stamp.unlink(missing_ok=True)
            img = builder.build(name, kind, str(APPLIANCES), str(cat_path), packages=packages)
            stamp.write_text(key)
    return img


@pytest.fixture(scope="session")
def appliance(libvirtd):
    """The busybox appliance's catalog entry (built once per machine, outside the repository)."""
    from vmwrap import appliance as builder

    img = cached_appliance("vmwrap-test", "busybox", [Path(builder.BUSYBOX)])
    img.name = "busybox"
    return img


@pytest.fixture(scope="session")
def mpi_appliance(appliance):
    """A Debian appliance with OpenMPI (openmpi-bin), built once per machine beside the test appliance
    (its .debs cached there too), rebuilt when the guest agent or its builder changed."""
    img = cached_appliance("vmwrap-mpi", "debootstrap", [], packages=["openmpi-bin"])
    img.name = "mpi"
    return img


@pytest.fixture(scope="session")
def virt_type(appliance, tmp_path_factory):
    """Probe KVM once per session; every test site then states the verdict explicitly."""
    from vmwrap import accel
    from vmwrap.config import Settings

    s = Settings(state_dir=str(tmp_path_factory.mktemp("accel")))
    vt = accel.choose(s, appliance.kernel.source, appliance.initrd.source, appliance.kernel.sha256)
    return "kvm" if vt == "kvm" else "tcg"


@pytest.fixture(scope="session")
def test_user():
    with host_lock():
        try:
            pw = pwd.getpwnam(TEST_USER)
        except KeyError:
            subprocess.run(["useradd", "-m", "-u", "1234", "-U", TEST_USER], check=True)
            pw = pwd.getpwnam(TEST_USER)
    return pw


class Site:
    """A private vmwrap installation: config, catalog, cache and state under one temp dir."""

    def __init__(self, base: Path, appliance, virt_type: str, **settings):
        self.base = base
        self.catalog = base / "images.toml"
        self.config = base / "vmwrap.toml"
        self.state = base / "state"
        self.cache = base / "cache"
        from vmwrap.catalog import register

        if appliance is not None:
            register(str(self.catalog), appliance)
        lines = {
            "catalog": str(self.catalog), "cache_dir": str(self.cache), "state_dir": str(self.state),
            "appliance_dir": str(APPLIANCES), "accel": virt_type, "grace_seconds": 5.0,
        }
        if "checkpoint_dir" not in settings:  # a checkpoint store of its own, set up as the admin guide says
            from vmwrap import checkpoint

            key = base / "checkpoint.key"
            if not key.exists():
                checkpoint.keygen(key)
            checkpoint.init_store(base / "checkpoints", key)
            lines.update(checkpoint_dir=str(base / "checkpoints"), checkpoint_key_file=str(key))
        lines.update(settings)
        from vmwrap.config import render

        self.config.write_text(render(lines))

    def env(self, **extra) -> dict:
        env = dict(os.environ, VMWRAP_CONFIG=str(self.config), PYTHONPATH=str(ROOT))
        env.update(extra)
        return env

    def settings(self):
        from vmwrap import config

        return config.load(str(self.config))

    def run(self, script: str, workdir: Path, *args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
        path = self.base / f"job-{os.urandom(3).hex()}.sh"
        path.write_text(script)
        return subprocess.run(VMWRAP + ["run", str(path), "--workdir", str(workdir), *args],
                              capture_output=True, env=self.env(), timeout=timeout, **kw)

    def popen(self, script: str, workdir: Path, *args: str, **kw) -> subprocess.Popen:
        path = self.base / f"job-{os.urandom(3).hex()}.sh"
        path.write_text(script)
        return subprocess.Popen(VMWRAP + ["run", str(path), "--workdir", str(workdir), *args],
                                env=self.env(), **kw)

    def domains(self) -> list[str]:
        """This site's VMs only (their files are under its state dir): other sessions' VMs on the same
        libvirtd are neither this test's leftovers nor its to destroy."""
        r = subprocess.run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"], capture_output=True, text=True)
        own = []
        for n in r.stdout.split():
            if not n.startswith("vmwrap-") or "kvmprobe" in n:
                continue
            xml = subprocess.run(["virsh", "-c", "qemu:///system", "dumpxml", n], capture_output=True, text=True).stdout
            if str(self.state) + "/" in xml:
                own.append(n)
        return own

    def leftovers(self) -> list[str]:
        """Per-job files and VMs that should be gone after a job ended."""
        out = []
        jobs = self.state / "jobs"
        if jobs.exists():
            out += [str(p) for p in jobs.iterdir()]
        out += self.domains()
        pins = self.cache / "pins"
        if pins.exists():
            out += [str(p) for d in pins.iterdir() for p in d.iterdir()]
        return out


@pytest.fixture
def site(tmp_path, appliance, virt_type):
    s = Site(tmp_path, appliance, virt_type)
    yield s
    for left in s.domains():
        subprocess.run(["virsh", "-c", "qemu:///system", "destroy", left], capture_output=True)


@pytest.fixture
def workdir(tmp_path):
    d = tmp_path / "work dir"  # a space on purpose: every VM test covers it
    d.mkdir()
    d.chmod(0o777)
    os.chmod(tmp_path, 0o755)
    # The job's user must reach its work dir on the host, as it would to run bare (the work dir server
    # runs as that user): let everyone traverse pytest's private base dirs.
    for parent in tmp_path.parents:
        if parent == Path("/tmp") or parent == parent.parent:
            break
        os.chmod(parent, os.stat(parent).st_mode | 0o111)
    return d


# Wall time per test module (setup + call + teardown of its tests), printed at the end of the run:
# CI's budget is spent per module (one cluster each), and --durations only shows single phases.
_MODULE_SECONDS: dict[str, float] = {}


def pytest_runtest_logreport(report) -> None:
    module = report.nodeid.split("::", 1)[0]
    _MODULE_SECONDS[module] = _MODULE_SECONDS.get(module, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter) -> None:
    if not _MODULE_SECONDS:
        return
    terminalreporter.section("seconds per test module (slowest 25)")
    ranked = sorted(_MODULE_SECONDS.items(), key=lambda kv: kv[1], reverse=True)
    for module, s in ranked[:25]:
        terminalreporter.write_line(f"{s:8.1f}s  {module}")
    terminalreporter.write_line(f"{sum(_MODULE_SECONDS.values()):8.1f}s  all {len(_MODULE_SECONDS)} modules")


# Three pytest-xdist workers share this host (scripts/test.sh). A module's tests stay on one worker (its
# module-scoped cluster starts once); every module using one of the host's singletons (Grid Engine's
# one cell under /var/lib/gridengine, the HTCondor root's mounts) runs on the same worker, one after
# another. Tests marked `exclusive` disturb every VM on the host (a libvirtd restart, a second libvirtd,
# CPU hogs, the VM slice's weight) or hold a deadline another worker's load would move (the gap planner's save before
# a reservation): the script runs them afterwards, alone. (xdist's own `--dist loadgroup` does not
# group under pytest 9: it renames items through an attribute pytest 9 no longer reads.)
SINGLETONS = {"harness.sge_cell": "gridengine", "harness.sge_jobs": "gridengine", "harness.condor_pool": "htcondor"}


@functools.cache
def host_singleton(module_path: str) -> str | None:
    """The singleton a test module's harness imports use (read from its source: the controller that
    schedules modules collects nothing itself)."""
    try:
        text = (ROOT / module_path).read_text()
    except OSError:
        return None
    return next((group for name, group in SINGLETONS.items()
                 if re.search(rf"^\s*(from {re.escape(name)} import|import {re.escape(name)})", text, re.M)), None)


@pytest.hookimpl(optionalhook=True)  # an xdist hook: pytest without xdist must still load this file
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return host_singleton(module) or module

    return ModuleScheduling(config, log)
