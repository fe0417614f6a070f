"""vmwrap installed from a built wheel (not editable, no source tree on sys.path) runs a VM job.

The wheel is built from a copy of the tracked files (no stale build/ dir), installed into a fresh
venv with `--no-deps`; its dependencies (libvirt-python needs libvirt's headers to build, so no
offline install) are linked from the venv running the tests. The job runs from / with a clean
environment, so nothing of /work/main can be imported.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, Site

pytestmark = pytest.mark.vm

DEPS = ("libvirt", "click", "jinja2", "markupsafe")


def _site_packages(python: Path) -> Path:
    out = subprocess.run([str(python), "-I", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True, cwd="/", env={"PATH": "/usr/bin:/bin"})
    return Path(out.stdout.strip())


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("wheel")
    src, dist, venv = base / "src", base / "dist", base / "venv"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for f in files:
        if f and not f.startswith(("tests/", "benchmarks/")) and (ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, src / f)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["wheel", "--no-deps", "-w", str(dist), str(src)], check=True, cwd="/", capture_output=True)
    (whl,) = dist.glob("vmwrap-*.whl")
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(venv)], check=True, cwd="/")
    target = _site_packages(venv / "bin" / "python")
    here = _site_packages(Path(sys.executable))
    for entry in here.iterdir():
        low = entry.name.lower()
        if any(low == d or low.startswith((d + ".", d + "-", d + "_", d + "mod", d + "aio")) for d in DEPS):
            (target / entry.name).symlink_to(entry)
    subprocess.run(pip + ["--python", str(venv / "bin" / "python"), "install", "--no-deps", "--no-index", str(whl)],
                   check=True, cwd="/", capture_output=True)
    return venv


def test_wheel_install_has_package_data(wheel_venv):
    py = wheel_venv / "bin" / "python"
    r = subprocess.run([str(py), "-I", "-c", "import vmwrap, vmwrap_plugins.slurm.render as r; from vmwrap import resources; "
                        "print(vmwrap.__file__); print(resources.TEMPLATES); print(resources.HOOKS); print(r.HOOKS)"],
                       capture_output=True, text=True, cwd="/", env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    pkg, templates, hooks, slurm_hooks = map(Path, r.stdout.split())
    site = _site_packages(py)
    assert pkg == site / "vmwrap" / "__init__.py"
    assert templates == site / "vmwrap" / "templates" and hooks == slurm_hooks == site / "vmwrap" / "hooks"
    for f in ("domain.xml.j2", "guest/init.sh", "guest/vmwrap-exec.c", "guest/vmwrap-relay.c", "slurm/job_submit.lua.j2"):
        assert (templates / f).is_file(), f
    # pip byte-compiles pbs-queuejob.py into __pycache__; only the hooks themselves must match.
    installed = [p for p in hooks.iterdir() if p.name != "__pycache__"]
    assert sorted(p.name for p in installed) == sorted(p.name for p in (ROOT / "vmwrap" / "hooks").iterdir()
                                                        if p.name != "__pycache__")
    for h in installed:  # pip keeps the executable bit the wheel recorded (a PBS hook is read by qmgr, not run)
        assert bool(os.stat(h).st_mode & stat.S_IXUSR) == bool(os.stat(ROOT / "vmwrap" / "hooks" / h.name).st_mode & stat.S_IXUSR), h
    # Top-level names are vmwrap's own; the test clusters stay in the repository.
    tops = {p.name for p in site.iterdir() if not p.name.endswith((".dist-info", ".pth")) and p.name != "__pycache__"}
    assert {"vmwrap", "vmwrap_plugins"} <= tops and not tops & {"plugins", "harness"}, tops
    assert not list(site.glob("vmwrap_plugins/*/local*.py"))


def _procs_with(*needles: str) -> list[list[str]]:
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                argv = (d / "cmdline").read_bytes().decode(errors="replace").split("\0")
            except OSError:
                continue
            if all(any(n in a for a in argv) for n in needles):
                found.append(argv)
    return found


def test_job_runs_from_the_wheel(wheel_venv, appliance, virt_type, tmp_path, workdir):
    site = Site(tmp_path, appliance, virt_type)
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/sh\n#VMWRAP --image=busybox\necho from-wheel > out.txt; sleep 3; echo hello; exit 7\n")
    env = {"PATH": "/usr/bin:/bin", "VMWRAP_CONFIG": str(site.config), "HOME": "/root"}
    start = time.monotonic()
    proc = subprocess.Popen([str(wheel_venv / "bin" / "vmwrap"), "run", str(script), "--workdir", str(workdir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/", env=env)
    # The helpers the job starts (work dir server, limit watcher) run the installed package too.
    helpers = {"vmwrap.ninep": [], "vmwrap.limits": []}
    while proc.poll() is None and time.monotonic() - start < 120 and not all(helpers.values()):
        for mod in helpers:
            helpers[mod] = helpers[mod] or _procs_with(mod, str(tmp_path))  # its run dir or work dir
        time.sleep(0.2)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 7, err.decode()
    assert out == b"hello\n"
    assert (workdir / "out.txt").read_text() == "from-wheel\n"
    for mod, argvs in helpers.items():
        assert argvs, f"{mod} never ran"
        assert argvs[0][0] == str(wheel_venv / "bin" / "python") or Path(argvs[0][0]).parent == wheel_venv / "bin", argvs
        assert not any(str(ROOT) in a for a in argvs[0]), argvs
    assert not site.leftovers()


def test_hooks_installed_from_the_wheel_run_its_interpreter(wheel_venv, appliance, virt_type, tmp_path):
    """`vmwrap hooks install DIR` from the wheel's venv binds every hook to that venv's Python; the
    installed Grid Engine JSV (a root-owned hook that needs no daemon) then answers qsub's protocol
    from the wheel's package, not /opt/vmwrap/venv's."""
    site = Site(tmp_path, appliance, virt_type)
    hooks = tmp_path / "hooks"
    env = {"PATH": "/usr/bin:/bin", "HOME": "/root"}
    r = subprocess.run([str(wheel_venv / "bin" / "vmwrap"), "hooks", "install", str(hooks)],
                       capture_output=True, text=True, cwd="/", env=env)
    assert r.returncode == 0, r.stderr
    py = str(wheel_venv / "bin" / "python")
    for h in hooks.iterdir():
        text = h.read_text()
        assert "/opt/vmwrap/venv" not in text, h
        assert h.name == "condor-wrapper" or py in text or str(_site_packages(Path(py))) in text, h
    assert f"exec {py} -I -m vmwrap.cli" in (hooks / "sge-jsv").read_text()
    good, bad = tmp_path / "good.sh", tmp_path / "bad.sh"
    good.write_text("#!/bin/sh\n#VMWRAP --image=busybox\necho hi\n")
    bad.write_text("#!/bin/sh\n#VMWRAP --image=nonesuch\necho hi\n")
    proc = subprocess.Popen([str(hooks / "sge-jsv"), "--config", str(site.config)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/", env=env)
    try:
        proc.stdin.write("START\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "STARTED\n", proc.stderr.read() if proc.poll() is not None else ""
        argv = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode().split("\0")[:-1]
        assert argv == [py, "-I", "-m", "vmwrap.cli", "--config", str(site.config), "sge", "jsv"], argv
        answers = []
        for script in (good, bad):
            proc.stdin.write(f"PARAM CMDNAME {script}\nBEGIN\n")
            proc.stdin.flush()
            while not (line := proc.stdout.readline()).startswith("RESULT"):
                answers.append(line)
            answers.append(line)
        proc.stdin.write("QUIT\n")
        proc.stdin.flush()
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "PARAM ac vmwrap_image=busybox\n" in answers and "RESULT STATE CORRECT\n" in answers, answers
    assert answers[-1].startswith("RESULT STATE REJECT vmwrap: ") and "nonesuch" in answers[-1], answers
