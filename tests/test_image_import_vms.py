"""Imported images boot and run jobs (real QEMU guests): a Debian bookworm root with python3 (a cached
debootstrap tree made without vmwrap, harness/test_images.py) packed four ways by harness/oci_images.py —
an OCI layout (2 layers, the second with a whiteout and an image-only tool), a classic docker save, a SIF
and a rootfs tarball — each imported once per module with `vmwrap image import`, then one `vmwrap run`
job per image: a python3 script and a C program built on the host run from the work dir, the exit code
is the job's, and an OCI image's Env is the job's default (FOO) with the image's PATH. The packed
archives are cached under /var/cache/vmwrap/test-images (built once per machine).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import APPLIANCES, VMWRAP, Site
from harness.test_archives import ENV, KINDS, archives

IMPORT_SECONDS: dict[str, float] = {}


@pytest.fixture(scope="module")
def imported(tmp_path_factory, appliance, virt_type):
    """A site whose catalog holds the four imports (imp-oci, imp-docker-archive, imp-sif, imp-tarball)."""
    src = archives()
    base = tmp_path_factory.mktemp("imports")
    for d in (base, *base.parents):  # QEMU runs as the job's user: it must reach the site's cache
        if d == Path("/tmp"):
            break
        d.chmod(d.stat().st_mode | 0o111)
    out = base / "appliances"
    out.mkdir()
    (out / ".kernel").symlink_to(APPLIANCES / ".kernel")  # the machine's cached Debian kernel
    site = Site(base, appliance, virt_type, appliance_dir=str(out))
    for kind in KINDS:
        t0 = time.monotonic()
        r = subprocess.run(VMWRAP + ["image", "import", "--kind", kind, str(src[kind]), "--name", f"imp-{kind}",
                                     "--quiet"], capture_output=True, text=True, env=site.env(), timeout=900)
        IMPORT_SECONDS[kind] = time.monotonic() - t0
        assert r.returncode == 0, (kind, r.stdout, r.stderr)
        # the tree's /dev nodes: skipped, and the admin is told once even without a terminal
        assert r.stderr.count("note: ") == 1 and "device nodes and FIFOs skipped" in r.stderr, (kind, r.stderr)
    yield site
    for left in site.domains():
        subprocess.run(["virsh", "-c", "qemu:///system", "destroy", left], capture_output=True)


@pytest.fixture(scope="module")
def c_program(tmp_path_factory) -> Path:
    from harness.test_archives import host_c_program

    return host_c_program(tmp_path_factory.mktemp("cprog"))


JOB = """#!/bin/sh
#VMWRAP --image=imp-{kind} --memory=512M
echo "FOO=[$FOO] HOME=[$HOME]"
echo "PATH=$PATH"
command -v imgtool >/dev/null && imgtool
python3 hello.py
./hello
test -e /etc/motd && echo "motd present" || echo "motd whited out"
exit 7
"""


@pytest.mark.parametrize("kind", KINDS)
def test_an_imported_image_runs_a_job(imported, workdir, c_program, kind):
    (workdir / "hello.py").write_text("import sys\nprint('python', sys.version_info[:2], 'in', __file__)\n")
    shutil.copy2(c_program, workdir / "hello")
    t0 = time.monotonic()
    r = imported.run(JOB.format(kind=kind), workdir, timeout=300)
    out, err = r.stdout.decode(), r.stderr.decode()
    print(f"{kind}: import {IMPORT_SECONDS.get(kind, 0):.1f}s, job {time.monotonic() - t0:.1f}s")
    assert r.returncode == 7, (out, err)
    assert "python (3, 11) in" in out and "hello from C 42" in out and "motd whited out" in out, (out, err)
    assert "HOME=[" + str(Path.home()) + "]" in out  # the job's own variables are there
    if kind in ("oci", "docker-archive"):  # the config's Env: FOO a default, PATH the image's
        assert "FOO=[bar]" in out and f"PATH={ENV[1][5:]}\n" in out, out
        assert "image tool on the image PATH" in out
    else:  # SIF and tarballs carry no environment: the job's own PATH
        assert "FOO=[]" in out and "image tool" not in out, out
    assert imported.leftovers() == []
