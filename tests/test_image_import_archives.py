"""`vmwrap image import` of OCI layouts, docker/podman saves, SIF files and rootfs tarballs: the bad-input
corpus (each a one-line error that leaves no appliance dir and no catalog entry), OCI layer semantics
(whiteouts, opaque dirs, never following links), and one whole import on synthetic archives (no VM:
tests/test_image_import_vms.py boots imported images). Archives are made by harness/oci_images.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from harness import oci_images as oi
from vmwrap import config
from vmwrap.cli import main
from vmwrap.errors import ImageError
from vmwrap.imports.layers import apply_layers

from conftest import APPLIANCES


@pytest.fixture(scope="session")
def kernel_cache(tmp_path_factory) -> Path:
    """The machine's cached Debian kernel (scripts/install-host.sh fetched it; else fetched once now)."""
    from vmwrap import appliance

    return appliance.cached_kernel(APPLIANCES, tmp_path_factory.mktemp("kernel"), lambda _s: None)


@pytest.fixture
def site_dir(tmp_path, kernel_cache):
    """A config whose appliance dir shares the machine's cached Debian kernel (never downloaded here)."""
    out = tmp_path / "appliances"
    out.mkdir()
    (out / ".kernel").symlink_to(kernel_cache)
    cfg = tmp_path / "vmwrap.toml"
    cfg.write_text(config.render({"catalog": str(tmp_path / "images.toml"), "appliance_dir": str(out),
                                  "state_dir": str(tmp_path / "state"), "cache_dir": str(tmp_path / "cache"),
                                  "image_import_max_size": "64M"}))
    return tmp_path


def run_import(site_dir: Path, kind: str, source: Path, name: str = "imp", *extra: str):
    return CliRunner().invoke(main, ["--config", str(site_dir / "vmwrap.toml"), "image", "import", "--kind", kind,
                                     str(source), "--name", name, "--quiet", *extra])


def left_behind(site_dir: Path) -> list[str]:
    """Anything an import left: files in the appliance dir besides the kernel link, a catalog."""
    out = [p.name for p in (site_dir / "appliances").iterdir() if p.name != ".kernel"]
    return out + (["images.toml"] if (site_dir / "images.toml").exists() else [])


def refused(site_dir: Path, kind: str, source: Path, *needles: str) -> str:
    r = run_import(site_dir, kind, source)
    print(r.stderr, end="")  # shown with -s: the corpus's messages
    assert r.exit_code == 1, (r.exit_code, r.stdout, r.stderr, r.exception)
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("Error: "), r.stderr
    for n in needles:
        assert n in r.stderr, r.stderr
    assert left_behind(site_dir) == []
    return r.stderr


def tarball(tmp_path: Path, entries, name: str = "root.tar.gz") -> Path:
    p = tmp_path / name
    p.write_bytes(oi.tar_bytes(entries))
    return p


BASE = [oi.entry("bin", "dir"), oi.entry("bin/sh", data=b"#!fake\n", mode=0o755), oi.entry("etc", "dir"),
        oi.entry("etc/passwd", data=b"root:x:0:0::/root:/bin/sh\n")]


# -- the bad-input corpus ------------------------------------------------------------------------

def test_bad_options_are_refused_before_reading(site_dir, tmp_path):
    r = run_import(site_dir, "tarball", tmp_path, "imp", "--memory", "2G", "--max-memory", "1G")
    assert (r.exit_code, r.stderr) == (1, "Error: --memory=2048M is more than --max-memory=1024M\n")
    assert left_behind(site_dir) == []


@pytest.mark.parametrize("kind,needle", [("oci", "not a tar archive"), ("docker-archive", "not a tar archive"),
                                         ("sif", "not a SIF file"), ("tarball", "not a valid tar layer")])
def test_a_file_that_is_no_image(site_dir, tmp_path, kind, needle):
    junk = tmp_path / "notes.txt"
    junk.write_text("these are my notes, not an image\n" * 40)
    refused(site_dir, kind, junk, str(junk), needle)


def test_an_oci_directory_without_a_layout(site_dir, tmp_path):
    (tmp_path / "empty-dir").mkdir()
    refused(site_dir, "oci", tmp_path / "empty-dir", "not an OCI image layout (no oci-layout file)")


def test_absolute_member_path(site_dir, tmp_path):
    refused(site_dir, "tarball", tarball(tmp_path, BASE + [oi.entry("/etc/cron.d/evil", data=b"x")]),
            "member '/etc/cron.d/evil' has an absolute path")


def test_dotdot_escape(site_dir, tmp_path):
    refused(site_dir, "tarball", tarball(tmp_path, BASE + [oi.entry("etc/../../../tmp/evil", data=b"x")]),
            "member 'etc/../../../tmp/evil' escapes the image root ('..')")


@pytest.mark.parametrize("target,why", [
    ("../../../etc/shadow", "escapes the image root"),
    ("/etc/shadow", "has an absolute path"),
    ("etc/nothing-here", "not a regular file already extracted"),
    ("bin", "not a regular file already extracted"),
])
def test_hard_link_must_name_an_extracted_file_inside(site_dir, tmp_path, target, why):
    refused(site_dir, "tarball", tarball(tmp_path, BASE + [oi.entry("etc/copy", "hardlink", target=target)]),
            "member 'etc/copy'", why)


def test_a_symlink_is_never_followed_while_extracting(site_dir, tmp_path):
    """Layer 1 makes etc -> a real host dir; layer 2 writes etc/x: refused, nothing written on the host."""
    outside = tmp_path / "somewhere"
    outside.mkdir()
    layout = tmp_path / "oci"
    oi.oci_layout(layout, [oi.tar_bytes([oi.entry("etc", "symlink", target=str(outside))]),
                           oi.tar_bytes([oi.entry("etc/x", data=b"owned\n")])])
    refused(site_dir, "oci", layout, "member 'etc/x' lies below 'etc', which is a symlink")
    assert list(outside.iterdir()) == []
    # The same through a relative link that climbs out.
    layout2 = tmp_path / "oci2"
    oi.oci_layout(layout2, [oi.tar_bytes([oi.entry("usr", "dir"),
                                          oi.entry("usr/lib", "symlink", target="../../../../../" + str(outside))]),
                            oi.tar_bytes([oi.entry("usr/lib/y", data=b"owned\n")])])
    refused(site_dir, "oci", layout2, "'usr/lib', which is a symlink")
    assert list(outside.iterdir()) == []


def test_a_corrupt_layer_is_a_digest_mismatch(site_dir, tmp_path):
    layout = tmp_path / "oci"
    oi.oci_layout(layout, [oi.tar_bytes(BASE), oi.tar_bytes([oi.entry("etc/motd", data=b"hello\n" * 100)])])
    manifest = json.loads((layout / "blobs/sha256" / json.loads((layout / "index.json").read_text())
                           ["manifests"][0]["digest"][7:]).read_text())
    bad = manifest["layers"][1]["digest"]
    blob = layout / "blobs/sha256" / bad[7:]
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    refused(site_dir, "oci", layout, f"layer {bad} digest mismatch")


def test_a_corrupt_layer_in_a_docker_save(site_dir, tmp_path):
    """Classic docker saves carry no layer digests but the config's diff_ids: checked against those."""
    arch = tmp_path / "img.tar"
    oi.docker_archive(arch, [oi.tar_bytes(BASE, compress=False)])
    data = bytearray(arch.read_bytes())
    i = data.index(b"root:x:0:0")
    data[i] = ord("R")
    arch.write_bytes(bytes(data))
    refused(site_dir, "docker-archive", arch, "layer sha256:", "digest mismatch")


def test_size_above_the_limit(site_dir, tmp_path):
    """image_import_max_size = 64M in this site: a 65 MiB file (highly compressible) is refused."""
    big = tarball(tmp_path, BASE + [oi.entry("data.bin", data=b"\0" * (65 << 20))])
    assert big.stat().st_size < 1 << 20
    refused(site_dir, "tarball", big, "image_import_max_size = 67108864 bytes")


def test_the_size_setting_is_checked_on_load(tmp_path):
    cfg = tmp_path / "vmwrap.toml"
    cfg.write_text('image_import_max_size = "lots"\n')
    with pytest.raises(Exception, match="image_import_max_size must be a size such as 20G"):
        config.load(str(cfg))


def _squashfs(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "os-release").write_text('NAME="sif test"\n')
    (tree / "payload").write_bytes(os.urandom(300_000))
    return oi.squashfs(tree, tmp_path / "part.sqfs")


def test_truncated_sif(site_dir, tmp_path):
    s = tmp_path / "img.sif"
    oi.sif(s, _squashfs(tmp_path))
    size = s.stat().st_size
    with open(s, "r+b") as f:
        f.truncate(size - 100_000)
    refused(site_dir, "sif", s, "truncated SIF (its squashfs partition ends at byte")
    with open(s, "r+b") as f:
        f.truncate(10_000)
    refused(site_dir, "sif", s, "truncated SIF (descriptor table ends at byte")


def test_sif_without_a_squashfs_partition(site_dir, tmp_path):
    s = tmp_path / "img.sif"
    oi.sif(s, _squashfs(tmp_path), fstype=2)  # ext3
    refused(site_dir, "sif", s, "no squashfs system partition in the SIF (it has: ext3)")


def test_sif_for_another_architecture(site_dir, tmp_path):
    s = tmp_path / "img.sif"
    oi.sif(s, _squashfs(tmp_path), arch=b"04\0")
    refused(site_dir, "sif", s, "architecture '04', not amd64")


def test_a_damaged_squashfs_partition(site_dir, tmp_path):
    part = _squashfs(tmp_path)
    data = bytearray(part.read_bytes())
    for i in range(200, len(data) - 200, 997):
        data[i] ^= 0x5A
    part.write_bytes(bytes(data))
    s = tmp_path / "img.sif"
    oi.sif(s, part)
    refused(site_dir, "sif", s, "squashfs partition cannot be read")


def test_links_inside_a_save_archive_stay_inside(site_dir, tmp_path):
    """Classic saves link a layer to its first copy: followed inside the archive, never out of it."""
    from vmwrap.imports.oci import _TarStore

    good = tmp_path / "good.tar"
    oi.docker_archive(good, [oi.tar_bytes(BASE, compress=False)], link_to="shared")
    store = _TarStore(good)
    layer = next(n for n in store.members if n.endswith("/layer.tar"))
    f, size = store.open(layer)
    assert store.members[layer].issym() and size == len(f.read()) > 0
    store.close()
    bad = tmp_path / "bad.tar"
    oi.docker_archive(bad, [oi.tar_bytes(BASE, compress=False)], link_to="shared", link_up="../../../")
    refused(site_dir, "docker-archive", bad, "links outside the archive")


def test_only_a_linux_amd64_image_is_taken(site_dir, tmp_path):
    layout = tmp_path / "oci"
    oi.oci_layout(layout, [oi.tar_bytes(BASE)], arch="arm64")
    refused(site_dir, "oci", layout, "no linux/amd64 image in the index (it has: linux/arm64)")


def test_bad_env_in_the_config(site_dir, tmp_path):
    layout = tmp_path / "oci"
    oi.oci_layout(layout, [oi.tar_bytes(BASE)], env=["GOOD=1", "BAD NAME=x"])
    refused(site_dir, "oci", layout, "config Env entry 'BAD NAME=x' is not NAME=value")


def test_an_overlong_member_name(site_dir, tmp_path):
    """Names beyond PATH_MAX would only cost memory and syscalls (every component is walked)."""
    deep = "/".join(["d" * 200] * 25) + "/f"
    refused(site_dir, "tarball", tarball(tmp_path, BASE + [oi.entry(deep, data=b"x")]),
            "has a name or link target longer than 4096 bytes")


def test_a_pax_header_bomb(site_dir, tmp_path):
    """A 10 MiB pax header would be read into memory by tarfile: refused before."""
    ti, _ = oi.entry("etc/big", data=b"x")
    ti.pax_headers = {"comment": "y" * (10 << 20)}
    refused(site_dir, "tarball", tarball(tmp_path, BASE + [(ti, b"x")]), "extended tar header")


# -- layer semantics -----------------------------------------------------------------------------

def test_whiteouts_and_opaque_dirs_follow_oci(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    notes = []
    l1 = oi.tar_bytes([oi.entry("etc", "dir"), oi.entry("etc/a", data=b"a"), oi.entry("etc/b", data=b"b"),
                       oi.entry("opt", "dir"), oi.entry("opt/old1", data=b"1"), oi.entry("opt/sub", "dir"),
                       oi.entry("opt/sub/old2", data=b"2"), oi.entry("var", "dir"), oi.entry("var/gone", "dir"),
                       oi.entry("var/gone/deep", data=b"d"), oi.entry("dev", "dir"), oi.entry("dev/null", "chardev"),
                       oi.entry("run", "dir"), oi.entry("run/fifo", "fifo"),
                       oi.entry("usr", "dir"), oi.entry("usr/bin", "dir"),
                       oi.entry("usr/bin/su", data=b"su", mode=0o4755, uid=0, gid=0),
                       oi.entry("home", "dir", uid=1234, gid=1235, mode=0o750),
                       oi.entry("home/f", data=b"mine", uid=1234, gid=1235, mode=0o600),
                       oi.entry("etc/hard", "hardlink", target="etc/a"),
                       oi.entry("srv", "dir"), oi.entry("srv/sub", "dir"), oi.entry("srv/sub/old", data=b"o")])
    l2 = oi.tar_bytes([oi.whiteout("etc/a"), oi.opaque("opt"), oi.entry("opt/new", data=b"n"),
                       oi.whiteout("var/gone"), oi.entry("etc/b", data=b"B2"),
                       # this layer's own file, then a whiteout of it: whiteouts hide lower layers only
                       oi.entry("etc/c", data=b"c"), oi.whiteout("etc/c"),
                       # a directory this layer wrote into, then whited out: only this layer's entries stay
                       oi.entry("srv/sub/new", data=b"n"), oi.whiteout("srv/sub")])
    l3 = oi.tar_bytes([oi.entry("etc/a", "symlink", target="/nonexistent/target"),
                       oi.entry("var/gone", data=b"now a file")])
    tally = apply_layers([("layer 1", _bytes(l1)), ("layer 2", _bytes(l2)), ("layer 3", _bytes(l3))],
                         root, "test", 1 << 20, on_note=notes.append)

    def names(d):
        return sorted(os.listdir(root / d))
    assert names("etc") == ["a", "b", "c", "hard"]
    assert os.readlink(root / "etc/a") == "/nonexistent/target"  # made verbatim, never resolved
    assert (root / "etc/b").read_bytes() == b"B2" and (root / "etc/c").read_bytes() == b"c"
    assert (root / "etc/hard").read_bytes() == b"a"  # the link survives its name's whiteout
    assert names("opt") == ["new"]  # opaque: layer 1's opt/old1 and opt/sub are gone
    assert names("srv/sub") == ["new"]
    assert (root / "var/gone").read_bytes() == b"now a file"
    assert names("dev") == [] and names("run") == []
    assert tally.skipped_special == 2 and len(notes) == 1 and notes[0].startswith("note: test: device nodes and "
                                                                                  "FIFOs skipped")
    st = os.stat(root / "usr/bin/su")
    assert oct(st.st_mode & 0o7777) == "0o4755"
    st = os.stat(root / "home/f")
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (1234, 1235, 0o600)
    assert os.stat(root / "home").st_mode & 0o777 == 0o750


def _bytes(data: bytes):
    import io
    return io.BytesIO(data)


def test_no_descriptor_is_left_open(tmp_path):
    """Good and refused members alike close every directory fd they opened (a layer has ~10^5 members)."""
    root = tmp_path / "root"
    root.mkdir()
    fds = len(os.listdir("/proc/self/fd"))
    layer = oi.tar_bytes(BASE + [oi.entry("etc/h1", "hardlink", target="etc/passwd"), oi.whiteout("etc/none"),
                                 oi.opaque("bin"), oi.entry("etc/link", "symlink", target="passwd")])
    apply_layers([("1", _bytes(layer))], root, "test", None)
    for bad in (oi.entry("etc/link/x", data=b"x"), oi.entry("etc/h2", "hardlink", target="etc/link"),
                oi.entry("etc/passwd/sub/h3", "hardlink", target="etc/h1")):
        with pytest.raises(ImageError):
            apply_layers([("2", _bytes(oi.tar_bytes([bad])))], root, "test", None)
    assert len(os.listdir("/proc/self/fd")) == fds


def test_a_member_over_a_lower_symlink_dir_entry_replaces_the_link(tmp_path):
    """A directory entry where a lower layer had a symlink replaces the link (as docker applies it), and
    what follows lands inside the new directory, never where the link pointed."""
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    root.mkdir()
    apply_layers([("1", _bytes(oi.tar_bytes([oi.entry("etc", "symlink", target=str(outside))]))),
                  ("2", _bytes(oi.tar_bytes([oi.entry("etc", "dir"), oi.entry("etc/x", data=b"in")])))],
                 root, "test", None)
    assert (root / "etc").is_dir() and not (root / "etc").is_symlink()
    assert (root / "etc/x").read_bytes() == b"in" and list(outside.iterdir()) == []


def test_gzip_layers_with_several_members_and_padding(tmp_path):
    """Two gzip members back to back (pigz, concatenated streams) and zero padding after the last one."""
    import gzip
    raw = oi.tar_bytes(BASE + [oi.entry("etc/big", data=os.urandom(300_000))], compress=False)
    layer = gzip.compress(raw[:100_000]) + gzip.compress(raw[100_000:]) + b"\0" * 4096
    from vmwrap.imports.layers import _Decompressed
    assert _Decompressed(_bytes(layer), "t", None).readall() == raw  # the whole stream, padding ignored
    root = tmp_path / "root"
    root.mkdir()
    apply_layers([("1", _bytes(layer))], root, "test", None)
    assert (root / "etc/big").stat().st_size == 300_000 and (root / "bin/sh").read_bytes() == b"#!fake\n"
    root2 = tmp_path / "root2"
    root2.mkdir()
    with pytest.raises(ImageError, match="truncated gzip stream"):
        apply_layers([("1", _bytes(layer[:150_000]))], root2, "test", None)


def test_zstd_layers_are_refused_clearly_without_the_module(tmp_path):
    try:
        import zstandard  # noqa: F401
        pytest.skip("zstandard installed: zstd layers are supported here")
    except ImportError:
        pass
    raw = oi.tar_bytes(BASE, compress=False)
    z = subprocess.run(["/usr/bin/zstd", "-q", "-c"], input=raw, capture_output=True, check=True).stdout
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(ImageError, match="zstd-compressed: not supported on this host"):
        apply_layers([("layer 1", _bytes(z))], root, "test", None)


# -- a whole import (no VM) ----------------------------------------------------------------------

def test_an_oci_import_registers_env_origin_and_an_ext4_root(site_dir, tmp_path):
    """Three layers, a linux/arm64 image listed first in the index: the amd64 one is imported; the
    catalog entry has the config's Env and origin 'oci <manifest digest>'; the ext4 root on the
    qcow2 holds layer 3's view with owners and modes; the admin's options are in the one entry."""
    layout = tmp_path / "oci"
    mdigest = oi.oci_layout(layout, [
        oi.tar_bytes(BASE + [oi.entry("opt", "dir"), oi.entry("opt/old", data=b"old"), oi.entry("dev", "dir"),
                             oi.entry("dev/null", "chardev"), oi.entry("dev/zero", "chardev")]),
        oi.tar_bytes([oi.opaque("opt"), oi.entry("opt/tool", data=b"#!/bin/sh\n", mode=0o4755, uid=7, gid=8)]),
        oi.tar_bytes([oi.whiteout("etc/passwd")], compress=False)],
        env=["FOO=bar", "PATH=/opt:/usr/bin:/bin"], other_platform=True)
    r = run_import(site_dir, "oci", layout, "imp", "--user", "alice", "--memory", "512M", "--max-memory", "1G",
                   "--no-checkpoint")
    assert r.exit_code == 0, (r.stdout, r.stderr, r.exception)
    assert f"imported imp (oci {mdigest})" in r.stdout
    assert r.stderr == (f"note: {layout}: device nodes and FIFOs skipped (the guest mounts its own /dev), "
                        "first: dev/null\n")
    entry = tomllib.loads((site_dir / "images.toml").read_text())["images"]["imp"]
    assert entry["origin"] == f"oci {mdigest}" and entry["env"] == {"FOO": "bar", "PATH": "/opt:/usr/bin:/bin"}
    assert entry["users"] == ["alice"] and entry["memory"] == "512M"
    assert entry["max_memory"] == "1024M" and entry["checkpoint"] is False
    assert sorted(os.listdir(site_dir / "appliances")) == [".kernel", "imp"]
    raw = tmp_path / "root.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", entry["disk"]["source"], str(raw)], check=True)
    ls = subprocess.run(["debugfs", "-R", "ls -l /opt", str(raw)], capture_output=True, text=True).stdout
    assert "tool" in ls and "old" not in ls
    stat = subprocess.run(["debugfs", "-R", "stat /opt/tool", str(raw)], capture_output=True, text=True).stdout
    assert "Mode:  04755" in stat and "User:     7" in stat and "Group:     8" in stat, stat
    etc = subprocess.run(["debugfs", "-R", "ls /etc", str(raw)], capture_output=True, text=True).stdout
    assert "passwd" not in etc


def test_an_oci_layout_inside_a_save_archive(site_dir, tmp_path):
    """What docker 25+ and `podman save --format oci-archive` write: an OCI layout in a tar."""
    layout = tmp_path / "oci"
    mdigest = oi.oci_layout(layout, [oi.tar_bytes(BASE)], env=["A=1"])
    arch = oi.tar_dir(layout, tmp_path / "saved.tar")
    for kind, name in (("docker-archive", "d"), ("oci", "o")):
        r = run_import(site_dir, kind, arch, name)
        assert r.exit_code == 0, (r.stdout, r.stderr, r.exception)
        entry = tomllib.loads((site_dir / "images.toml").read_text())["images"][name]
        assert entry["origin"] == f"oci {mdigest}" and entry["env"] == {"A": "1"}


def test_the_job_environment_goes_over_the_image_defaults_but_path_is_the_images(tmp_path):
    """payload.job_environment: the launcher's ctl/image-env under the job's variables; PATH the image's."""
    from vmwrap import rundir
    from vmwrap.payload import job_environment

    job = {"FOO": "job", "HOME": "/home/u", "PATH": "/host/bin"}
    assert job_environment(tmp_path, job) == job  # no image env (an older run dir): unchanged
    rundir.ctl(tmp_path).mkdir()
    (rundir.ctl(tmp_path) / rundir.CTL_IMAGE_ENV).write_bytes(b"FOO=image\0LANG=C.UTF-8\0PATH=/img/bin\0")
    assert job_environment(tmp_path, job) == {"FOO": "job", "HOME": "/home/u", "LANG": "C.UTF-8", "PATH": "/img/bin"}


def test_a_failed_reimport_keeps_the_image(site_dir, tmp_path):
    """Replacing an image: a bad archive changes nothing; a failure to register after the new files were
    moved in puts the old ones back (files byte for byte, catalog untouched)."""
    from vmwrap.imports.rootfs import import_tarball

    good = tarball(tmp_path, BASE, "good.tar.gz")
    r = run_import(site_dir, "tarball", good)
    assert r.exit_code == 0, (r.stdout, r.stderr, r.exception)
    img_dir, catalog = site_dir / "appliances" / "imp", site_dir / "images.toml"

    def snapshot():
        return {p.name: p.read_bytes() for p in img_dir.iterdir()}, catalog.read_bytes()
    before = snapshot()
    refused_line = run_import(site_dir, "tarball", tarball(tmp_path, [oi.entry("/abs", data=b"x")], "bad.tar.gz"))
    assert refused_line.exit_code == 1 and snapshot() == before
    not_a_catalog = tmp_path / "catalog-dir"
    not_a_catalog.mkdir()
    with pytest.raises(ImageError):
        import_tarball(tarball(tmp_path, BASE + [oi.entry("etc/new", data=b"n")], "new.tar.gz"), "imp",
                       site_dir / "appliances", str(not_a_catalog / "."), max_bytes=None, on_stage=lambda _s: None)
    assert snapshot() == before
    assert sorted(p.name for p in (site_dir / "appliances").iterdir()) == [".kernel", "imp"]


def test_an_import_killed_mid_way_leaves_nothing_the_next_one_does_not_remove(tmp_path):
    """A SIGKILLed import's `.import-*` dir (its flock gone with it) is removed by the next import, and the
    image it had moved aside goes back; a live import's (lock held by another process), a young one and a
    link are kept."""
    import sys
    import time

    from vmwrap.imports import publish

    out = tmp_path / "appliances"
    out.mkdir()
    old = time.time() - 3600

    def leftover(name: str) -> Path:
        d = out / name
        (d / "rootfs" / "etc").mkdir(parents=True)
        (d / "rootfs" / "etc" / "os-release").write_text("ID=x\n")
        os.utime(d, (old, old))
        return d

    leftover(".import-img-abcd1234")
    web = leftover(".import-web-zz_91111")
    (web / "replaced").mkdir()
    (web / "replaced" / "vmlinuz").write_text("the old image")
    os.utime(web, (old, old))
    live = leftover(".import-img-live0000")
    young = out / ".import-img-young000"
    young.mkdir()
    outside = tmp_path / "outside"
    (outside / "x").mkdir(parents=True)
    (out / ".import-evil-link0000").symlink_to(outside / "x")
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); "
                               "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()", str(live)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        assert publish.remove_stale(out) == [".import-img-abcd1234", ".import-web-zz_91111"]
    finally:
        holder.stdin.close()
        holder.wait(10)
    assert sorted(p.name for p in out.iterdir()) == [".import-evil-link0000", ".import-img-live0000",
                                                     ".import-img-young000", "web"]
    assert (out / "web" / "vmlinuz").read_text() == "the old image" and (outside / "x").is_dir()
    # An import's own scratch dir is locked while it runs: even when old, a concurrent import keeps it.
    with publish.scratch_dir(out, "new") as d:
        assert d.name.startswith(".import-new-") and d.is_dir()
        assert d.name not in publish.remove_stale(out, now=time.time() + 3600)
        assert d.is_dir()
    assert not d.exists()
    # Once their importers are gone (and the young one has aged), the others go too; the link stays.
    publish.remove_stale(out, now=time.time() + 3600)
    assert sorted(p.name for p in out.iterdir()) == [".import-evil-link0000", "web"]
