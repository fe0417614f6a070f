"""Imported images boot and run jobs (real QEMU guests): a Debian bookworm root with python3 (a cached
debootstrap tree made without vmwrap, harness/test_images.py) packed four ways by harness/oci_images.py —
an OCI layout (2 layers, the second with a whiteout and an image-only tool), a classic docker save, a SIF
and a rootfs tarball — each imported once per module with `vmwrap image import`, then one `vmwrap run`
job per image: a python3 script and a C program built on the host run from the work dir, the exit code
is the job's, and an OCI image's Env is the job's default (FOO) with the image's PATH. The packed
archives are cached under /var/cache/vmwrap/test-images (built once per machine).
"""

from __future__ import annotations

import fcntl
import hashlib
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import APPLIANCES, ROOT, VMWRAP, Site
from harness import oci_images as oi
from harness.test_images import CACHE, debian_root

KINDS = ("oci", "docker-archive", "sif", "tarball")
ENV = ["FOO=bar", "PATH=/opt/imgbin:/usr/local/bin:/usr/bin:/bin"]
TOOL = b"#!/bin/sh\necho 'image tool on the image PATH'\n"
LAYOUT = 1  # bump when archives() packs differently
IMPORT_SECONDS: dict[str, float] = {}


def _extra_layer() -> list:
    """What the second layer adds to the Debian tree: a tool only the image's PATH finds, and a
    whiteout of a file the first layer has."""
    return [oi.entry("opt/imgbin", "dir"), oi.entry("opt/imgbin/imgtool", data=TOOL, mode=0o755),
            oi.whiteout("etc/motd")]


def archives() -> dict[str, Path]:
    """The four packed forms of the test root, built once per machine (keyed by the tree and the packers)."""
    tree = debian_root("bookworm", ("python3-minimal",))
    key = hashlib.sha256(f"{tree.name} {ENV} {TOOL!r} {LAYOUT}".encode()
                         + (ROOT / "harness" / "oci_images.py").read_bytes()).hexdigest()[:12]
    d = CACHE / f"archives-{key}"
    out = {"oci": d / "oci", "docker-archive": d / "docker.tar", "sif": d / "image.sif",
           "tarball": d / "rootfs.tar.gz"}
    if (d / ".done").exists():
        return out
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f".archives-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (d / ".done").exists():
            return out
        shutil.rmtree(d, ignore_errors=True)
        work = d / "work"
        work.mkdir(parents=True)
        base = oi.tree_tar(tree, work / "base.tar.gz", compress=True)
        top = work / "top.tar"
        top.write_bytes(oi.tar_bytes(_extra_layer(), compress=False))
        oi.oci_layout(out["oci"], [base, top], ENV, ref="bookworm-python:test")
        oi.docker_archive(out["docker-archive"], [base, top], ENV, tag="bookworm-python:test")
        # SIF and tarball hold one tree: the Debian root with the second layer applied (a copy: the
        # cached tree is read-only).
        flat = work / "flat"
        subprocess.run(["cp", "-a", str(tree), str(flat)], check=True)
        (flat / "etc" / "motd").unlink()
        (flat / "opt" / "imgbin").mkdir(parents=True)
        (flat / "opt" / "imgbin" / "imgtool").write_bytes(TOOL)
        (flat / "opt" / "imgbin" / "imgtool").chmod(0o755)
        oi.sif(out["sif"], oi.squashfs(flat, work / "root.sqfs"))
        oi.tree_tar(flat, out["tarball"], compress=True)
        shutil.rmtree(work)
        (d / ".done").write_text(key + "\n")
    return out


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
    """A C program built on the host (dynamic, against bookworm's glibc like the image's)."""
    d = tmp_path_factory.mktemp("cprog")
    (d / "hello.c").write_text('#include <stdio.h>\nint main(void) { printf("hello from C %d\\n", 42); return 0; }\n')
    subprocess.run(["gcc", "-O2", "-o", str(d / "hello"), str(d / "hello.c")], check=True)
    return d / "hello"


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
