"""The Debian package (scripts/build-deb.sh) installed with apt into a throwaway bookworm root.

The .deb is built once per content of the tracked files (cached under /var/cache/vmwrap/deb/). The root
is a cached debootstrap tree holding the package's Depends (installed from the Debian mirror, so a
Depends name bookworm lacks fails here), mounted under an overlay: the test writes only the upper dir,
and what the package leaves behind after `apt-get purge` is exactly what is left in it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT
from harness.test_images import debian_root
from vmwrap import services

VENV = "/opt/vmwrap/venv"
SITE = f"{VENV}/lib/python3.11/site-packages"
# dpkg/apt bookkeeping and logs, which any install and purge changes.
BOOKKEEPING = re.compile(r"^(var/lib/dpkg|var/lib/apt|var/cache/apt|var/cache/debconf|var/log|var/cache/ldconfig"
                         r"|etc/ld\.so\.cache|tmp|run|root)(/|$)")


@pytest.fixture(scope="module")
def deb() -> Path:
    r = subprocess.run(["bash", str(ROOT / "scripts" / "build-deb.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return Path(r.stdout.split()[-1])


def _depends(deb: Path) -> tuple[str, ...]:
    field = subprocess.run(["dpkg-deb", "-f", str(deb), "Depends"], capture_output=True, text=True, check=True).stdout
    return tuple(sorted(re.sub(r"\(.*?\)", "", d).split("|")[0].strip() for d in field.split(",")))


@pytest.fixture
def chroot(deb, tmp_path):
    base = debian_root("bookworm", _depends(deb))
    upper, work, root = tmp_path / "upper", tmp_path / "work", tmp_path / "root"
    for d in (upper, work, root):
        d.mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={base},upperdir={upper},workdir={work}",
                    str(root)], check=True)
    try:
        subprocess.run(["mount", "-t", "proc", "proc", str(root / "proc")], check=True)
        try:
            yield root, upper
        finally:
            subprocess.run(["umount", "-l", str(root / "proc")], check=False)
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False)


def _in(root: Path, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["/usr/sbin/chroot", str(root), *argv], capture_output=True, text=True, timeout=300,
                       env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive",
                            "HOME": "/root"})
    if check:
        assert r.returncode == 0, (argv, r.stdout[-2000:], r.stderr[-2000:])
    return r


def _left(upper: Path) -> list[str]:
    """Files the test added or changed in the root, bookkeeping aside."""
    out = []
    for dirpath, dirnames, filenames in os.walk(upper):
        rel = os.path.relpath(dirpath, upper)
        for n in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            p = os.path.normpath(os.path.join(rel, n))
            st = os.lstat(os.path.join(dirpath, n))
            if BOOKKEEPING.match(p) or (st.st_mode & 0o170000 == 0o020000 and st.st_rdev == 0):  # whiteout: removed
                continue
            out.append(p)
    return sorted(out)


def test_install_run_purge(deb, chroot):
    root, upper = chroot
    (root / "tmp" / deb.name).write_bytes(deb.read_bytes())
    _in(root, "apt-get", "install", "-y", "--no-install-recommends", f"/tmp/{deb.name}")
    # Installing over itself runs the upgrade path (prerm upgrade drops the byte code, postinst compiles).
    _in(root, "dpkg", "-i", f"/tmp/{deb.name}")
    (root / "tmp" / deb.name).unlink()

    assert _in(root, "vmwrap", "--version").stdout == "vmwrap, version 0.1.0\n"
    # doctor runs from the package (no libvirtd here: checks fail, exit 1, still one JSON document)
    r = _in(root, "vmwrap", "doctor", "--json", check=False)
    assert r.returncode in (0, 1), r.stderr
    doc = json.loads(r.stdout)
    assert doc["checks"] and all({"status", "name", "detail"} <= set(c) for c in doc["checks"]), doc

    # The units run the package's interpreter, the daemons vmwrap knows, and nothing is enabled.
    units = sorted((root / "lib/systemd/system").glob("vmwrap-*.service"))
    assert [u.name for u in units] == sorted(f"vmwrap-{n}.service" for n in services.DAEMONS)
    for u in units:
        exec_start = next(line for line in u.read_text().splitlines() if line.startswith("ExecStart="))
        py = exec_start.split("=", 1)[1].split()[0]
        assert py == f"{VENV}/bin/python" and os.access(root / py.lstrip("/"), os.X_OK), exec_start
    assert not list((root / "etc/systemd/system").rglob("vmwrap-*"))
    status = json.loads(_in(root, "vmwrap", "daemons", "status", "--json").stdout)
    assert sorted(d["name"] for d in status) == sorted(services.DAEMONS)

    # Guest sources and hooks where the package's vmwrap finds them; the hooks' interpreter is there.
    paths = _in(root, f"{VENV}/bin/python", "-I", "-c",
                "from vmwrap.resources import TEMPLATES, HOOKS; print(TEMPLATES); print(HOOKS)").stdout.split()
    assert paths == [f"{SITE}/vmwrap/templates", f"{SITE}/vmwrap/hooks"]
    for f in ("guest/init.sh", "guest/vmwrap-exec.c", "guest/vmwrap-relay.c", "domain.xml.j2"):
        assert (root / paths[0].lstrip("/") / f).is_file(), f
    prolog = root / paths[1].lstrip("/") / "slurm-prolog"
    assert os.access(prolog, os.X_OK) and f"exec {VENV}/bin/python -I -m vmwrap.cli" in prolog.read_text()
    (root / "etc/vmwrap/images.toml").write_text("")  # as `vmwrap image add` would start it
    r = _in(root, "vmwrap", "config", "render", "sge")
    assert f"root@{paths[1]}/sge-prolog $job_owner" in r.stdout, r.stdout
    # Slurm's wrapped batch steps run the package's vmwrap (`config render`'s default follows the install).
    _in(root, "vmwrap", "config", "render", "slurm", "--lua-out", "/tmp/job_submit.lua")
    assert 'local VMWRAP_CMD = "/usr/bin/vmwrap"' in (root / "tmp/job_submit.lua").read_text()
    (root / "tmp/job_submit.lua").unlink()
    # A hook runs the package's vmwrap: Grid Engine's JSV refuses an image the catalog lacks.
    (root / "tmp/job.sh").write_text("#!/bin/sh\n#VMWRAP --image=nonesuch\necho hi\n")
    r = subprocess.run(["/usr/sbin/chroot", str(root), f"{paths[1]}/sge-jsv"], capture_output=True, text=True, timeout=60,
                       input="START\nPARAM CMDNAME /tmp/job.sh\nBEGIN\nQUIT\n", env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 0 and r.stdout.startswith("STARTED\n"), (r.stdout, r.stderr)
    assert "RESULT STATE REJECT vmwrap: " in r.stdout and "nonesuch" in r.stdout, r.stdout
    (root / "tmp/job.sh").unlink()

    # The config is a conffile; purge takes everything the package and its use made.
    conffiles = (root / "var/lib/dpkg/info/vmwrap.conffiles").read_text().split()
    assert conffiles == ["/etc/vmwrap/vmwrap.toml"]
    _in(root, "vmwrap", "checkpoints", "keygen")
    _in(root, "apt-get", "purge", "-y", "vmwrap")
    assert _left(upper) == []
