"""`vmwrap image import --kind disk`: whole-disk Linux images made without vmwrap, with their own kernel.

Bad input (small bookworm-derived disks, harness/disk_images.py): one specific line, nothing in the out dir or
the catalog. Then the real thing: a bookworm (GPT) and a trixie (MBR, zstd kernel, .ko.xz modules, virtio
built in) disk imported and a job run in each with `vmwrap run`, under the image's own kernel and python3.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from harness.disk_images import debian_disk, small_disk
from vmwrap.catalog import Catalog
from vmwrap.errors import ImageError
from vmwrap.imports.disk import import_disk


def _import(tmp_path: Path, source: Path, max_bytes: int | None = None):
    return import_disk(source, "site-os", tmp_path / "out", str(tmp_path / "images.toml"), max_bytes=max_bytes,
                       on_stage=lambda _s: None)


def _nothing_left(tmp_path: Path) -> None:
    assert not (tmp_path / "out").exists(), list((tmp_path / "out").rglob("*"))
    assert not (tmp_path / "images.toml").exists()


@pytest.mark.parametrize("variant, message", [
    ("nokernel", r"no kernel: needs /boot/vmlinuz-V \(or vmlinuz-V on a /boot partition\) with "
                 r"/lib/modules/V/modules\.dep \(vmlinuz versions found: none\)$"),
    ("novirtio", r"kernel 6\.1\.0-\S+ has no virtio_blk: neither a module \(modules\.dep\) nor built in"),
    ("unknownfs", r"no Linux root filesystem .* found: partition 1: unknown \(no filesystem signature\); "
                  r"partition 2: minix$"),
    ("truncated", r"damaged or truncated qcow2 \(qemu-img check: \d+ corruptions"),
    ("notimage", r"no Linux root filesystem .* found: whole disk: unknown \(no filesystem signature\)$"),
    ("backing", r"has a backing file \('/etc/passwd'\): import a standalone image$"),
    ("hostlink", r"no Linux root filesystem .* found: partition 1: unknown \(no filesystem signature\); "
                 r"partition 2: ext4$"),  # the link resolves inside the image, where there is nothing
    ("linkloop", r"partition 2: more than 16 symlinks resolving /etc/os-release$"),
])
def test_bad_input_is_one_line_and_leaves_nothing(tmp_path, variant, message):
    src = small_disk(variant)
    with pytest.raises(ImageError) as e:
        _import(tmp_path, src)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(src)), msg
    assert re.search(message, msg), msg
    _nothing_left(tmp_path)


def test_above_max_bytes_is_refused(tmp_path):
    src = small_disk("good")  # 13 MB of qcow2 file, 57 MiB virtual
    with pytest.raises(ImageError, match=r"image of \d+ bytes virtual, \d+ on disk: above the limit of 20000000$"):
        _import(tmp_path, src, max_bytes=20_000_000)
    _nothing_left(tmp_path)


@pytest.mark.parametrize("variant", ["mbr", "logical", "bare", "bootpart"])
def test_mbr_and_bare_filesystem_import(tmp_path, variant):
    """GPT is covered by the VM tests; an MBR disk (root primary or logical), a raw bare ext4 (no table) and
    a GPT disk whose kernel is on a separate /boot partition import the same way."""
    stages: list[str] = []
    img = import_disk(small_disk(variant), "site-os", tmp_path / "out", str(tmp_path / "images.toml"),
                      max_bytes=None, on_stage=stages.append)
    assert stages[0].startswith("check the image") and stages[-1] == "hash and register in the catalog"
    assert img.origin.startswith("disk Debian GNU/Linux 12 (bookworm) kernel 6.1.0-")
    assert Catalog.load(str(tmp_path / "images.toml")).images["site-os"].digest == img.digest
    assert Path(img.kernel.source).read_bytes()[:4] == b"\x7fELF"  # the PVH ELF, not the bzImage
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["site-os"]  # no temp dir left
    # These small disks list virtio_net's dependencies in modules.dep but do not carry them: the image
    # still imports (its jobs boot), only without a network driver.
    with open(img.initrd.source, "rb") as f:
        net = subprocess.run(["cpio", "-i", "--to-stdout", "--quiet", "etc/vmwrap-net-modules"], stdin=f,
                             capture_output=True).stdout
    assert net == b""


# --- real VMs: one import and one boot per release -------------------------------------------------

JOB = """#!/bin/sh
#VMWRAP --image={image}
python3 -c '
import platform, sys
fields = dict(l.rstrip().split("=", 1) for l in open("/etc/os-release") if "=" in l)
print("codename", fields["VERSION_CODENAME"], "python", sys.version_info[0])
print("kernel", platform.release())
sys.exit(7)
'
"""


@pytest.fixture(scope="module")
def imported(tmp_path_factory, appliance, virt_type):
    """A site whose catalog holds the bookworm and trixie disks, imported once for the module."""
    from tests.conftest import Site

    base = tmp_path_factory.mktemp("import-disk")
    base.chmod(0o755)
    site = Site(base, None, virt_type)
    images = {}
    for suite in ("bookworm", "trixie"):
        images[suite] = import_disk(debian_disk(suite), suite, base / "images", str(site.catalog),
                                    max_bytes=4 << 30, on_stage=lambda _s: None)
    return site, images


@pytest.mark.vm
@pytest.mark.parametrize("suite", ["bookworm", "trixie"])
def test_job_runs_on_the_images_own_kernel_and_python(imported, workdir, suite):
    site, images = imported
    # trixie ships .ko.xz (bookworm plain .ko): the initrd holds them decompressed, signatures stripped
    # (busybox insmod reads xz but not zstd, and checking signatures costs boot time under TCG).
    with open(images[suite].initrd.source, "rb") as f:
        names = subprocess.run(["cpio", "-t", "--quiet"], stdin=f, capture_output=True, text=True).stdout.split()
    mods = [n for n in names if n.startswith("lib/modules/") and ".ko" in n]
    assert len(mods) >= 5 and all(n.endswith(".ko") for n in mods), mods
    r = site.run(JOB.format(image=suite), workdir, timeout=300)
    assert r.returncode == 7, r.stderr
    kernel = images[suite].origin.rsplit(" ", 1)[1]
    assert r.stdout.decode().split("\n") == [f"codename {suite} python 3", f"kernel {kernel}", ""]
    assert site.leftovers() == []


def test_cli_import_disk(tmp_path):
    """Through `vmwrap image import --kind disk`: a bad disk is one stderr line and no catalog; a good one lands."""
    import subprocess as sp

    from tests.conftest import VMWRAP, Site

    site = Site(tmp_path, None, "tcg", appliance_dir=str(tmp_path / "appliances"))
    bad = sp.run([*VMWRAP, "image", "import", "--kind", "disk", str(small_disk("notimage")), "--name", "x"],
                 capture_output=True, text=True, env=site.env())
    assert bad.returncode == 1 and len(bad.stderr.splitlines()) == 1, bad.stderr
    assert "whole disk: unknown (no filesystem signature)" in bad.stderr
    assert not site.catalog.exists() and list((tmp_path / "appliances").iterdir()) == []
    # On a terminal the admin sees each stage (stderr only); the result line goes to stdout.
    from harness.terminal import run_on_pty

    code, out, err = run_on_pty([*VMWRAP, "image", "import", "--kind", "disk", str(small_disk("mbr")), "--name",
                                 "site-os", "--user", "alice"], env=site.env(), timeout=120)
    text = err.decode(errors="replace")
    assert code == 0 and out.startswith("imported site-os (disk Debian GNU/Linux 12") and "\x1b" not in out, (out, text)
    assert "import site-os" in text and "initrd" in text and "register" in text, text
    good = sp.run([*VMWRAP, "image", "import", "--kind", "disk", str(small_disk("mbr")), "--name", "site-os",
                   "--user", "alice", "--quiet"], capture_output=True, text=True, env=site.env())
    assert good.returncode == 0 and good.stderr == "", good.stderr
    img = Catalog.load(str(site.catalog)).images["site-os"]
    assert img.users == ["alice"] and img.origin.startswith("disk Debian GNU/Linux 12 (bookworm) kernel 6.1.0-")
    assert sorted(p.name for p in (tmp_path / "appliances").iterdir()) == ["site-os"]
    # restricted to alice: its imported files are root's alone (the cache grants them to alice's jobs)
    d = tmp_path / "appliances" / "site-os"
    assert d.stat().st_mode & 0o777 == 0o700
    assert all(f.stat().st_mode & 0o077 == 0 for f in d.iterdir()), [oct(f.stat().st_mode) for f in d.iterdir()]


def test_fifo_is_refused_without_hanging(tmp_path):
    fifo = tmp_path / "disk.qcow2"
    os.mkfifo(fifo)
    with pytest.raises(ImageError, match=r"disk\.qcow2: not a regular file$"):
        _import(tmp_path, fifo)
    _nothing_left(tmp_path)


def test_failed_reimport_keeps_the_image_a_new_one_replaces_it(tmp_path):
    first = _import(tmp_path, small_disk("mbr"))
    before = {p.name: p.read_bytes() for p in (tmp_path / "out" / "site-os").iterdir()}
    catalog = (tmp_path / "images.toml").read_text()
    with pytest.raises(ImageError, match="no kernel"):
        _import(tmp_path, small_disk("nokernel"))
    assert {p.name: p.read_bytes() for p in (tmp_path / "out" / "site-os").iterdir()} == before
    (tmp_path / "not-a-catalog").mkdir()  # registering fails last, after the new files were moved in
    with pytest.raises(ImageError, match=r"small-bare-v1\.raw: .*Is a directory"):
        import_disk(small_disk("bare"), "site-os", tmp_path / "out", str(tmp_path / "not-a-catalog"),
                    max_bytes=None, on_stage=lambda _s: None)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out" / "site-os").iterdir()} == before
    assert (tmp_path / "images.toml").read_text() == catalog
    again = _import(tmp_path, small_disk("bare"))  # another filesystem (mkfs run): another digest
    assert again.digest != first.digest
    assert Catalog.load(str(tmp_path / "images.toml")).images["site-os"].digest == again.digest
    assert (tmp_path / "images.toml").read_text().count("[images.site-os]") == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["site-os"]
