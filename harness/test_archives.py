"""The test images' packed forms: a Debian bookworm root with python3 (a cached debootstrap tree made
without vmwrap, harness/test_images.py) packed four ways by harness/oci_images.py — an OCI layout
(2 layers, the second with a whiteout and an image-only tool), a classic docker save, a SIF and a rootfs
tarball — built once per machine under /var/cache/vmwrap/test-images (tests and benchmarks share them).
"""

from __future__ import annotations

import fcntl
import hashlib
import shutil
import subprocess
from pathlib import Path

from harness import oci_images as oi
from harness.test_images import CACHE, debian_root

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("oci", "docker-archive", "sif", "tarball")
ENV = ["FOO=bar", "PATH=/opt/imgbin:/usr/local/bin:/usr/bin:/bin"]
TOOL = b"#!/bin/sh\necho 'image tool on the image PATH'\n"
LAYOUT = 1  # bump when archives() packs differently


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


def host_c_program(d: Path) -> Path:
    """A small C program built on the host in `d` (dynamic, against bookworm's glibc like the test images')."""
    (d / "hello.c").write_text('#include <stdio.h>\nint main(void) { printf("hello from C %d\\n", 42); return 0; }\n')
    subprocess.run(["gcc", "-O2", "-o", str(d / "hello"), str(d / "hello.c")], check=True)
    return d / "hello"
