import hashlib
import multiprocessing as mp
import os
import subprocess

import pytest

from vmwrap.cache import Cache
from vmwrap.catalog import Artifact
from vmwrap.errors import ImageError, NodeError


def make(tmp_path, name: str, size: int) -> Artifact:
    p = tmp_path / name
    data = os.urandom(size)
    p.write_bytes(data)
    return Artifact(str(p), hashlib.sha256(data).hexdigest(), size)


def test_fetch_then_hit(tmp_path):
    art = make(tmp_path, "a", 4096)
    c = Cache(tmp_path / "c", 1 << 20)
    first, second = c.fetch(art), c.fetch(art)
    assert (first.hit, first.bytes_transferred) == (False, 4096)
    assert (second.hit, second.bytes_transferred) == (True, 0)
    assert first.path.name == art.sha256  # content-addressed
    assert oct(first.path.stat().st_mode & 0o777) == "0o400"  # read-only, root-only until published/restricted


def _fetch(args):
    root, art = args
    got = Cache(root, 1 << 30).fetch(art)
    return got.hit, got.bytes_transferred


def test_one_fetch_for_many_concurrent_jobs(tmp_path):
    art = make(tmp_path, "big", 64 << 20)
    root = tmp_path / "c"
    with mp.get_context("fork").Pool(8) as pool:
        results = pool.map(_fetch, [(root, art)] * 8)
    assert sorted(results) == [(False, 64 << 20)] + [(True, 0)] * 7
    assert os.listdir(root / "tmp") == []


def test_checksum_mismatch_leaves_nothing(tmp_path):
    art = make(tmp_path, "a", 1000)
    bad = Artifact(art.source, "0" * 64, art.size)
    c = Cache(tmp_path / "c", 1 << 20)
    with pytest.raises(ImageError, match="checksum mismatch .* expected sha256 0000"):
        c.fetch(bad)
    assert os.listdir(tmp_path / "c" / "blobs") == [] and os.listdir(tmp_path / "c" / "tmp") == []


def test_truncated_source(tmp_path):
    art = make(tmp_path, "a", 1000)
    with open(art.source, "r+b") as f:
        f.truncate(600)
    with pytest.raises(ImageError, match="truncated: 600 of 1000 bytes"):
        Cache(tmp_path / "c", 1 << 20).fetch(art)


def test_unreadable_source(tmp_path):
    art = Artifact(str(tmp_path / "missing"), "a" * 64, 10)
    with pytest.raises(ImageError, match="cannot read image source"):
        Cache(tmp_path / "c", 1 << 20).fetch(art)


def test_corrupt_cached_blob_is_detected_and_refetched(tmp_path):
    art = make(tmp_path, "a", 8192)
    c = Cache(tmp_path / "c", 1 << 20)
    blob = c.fetch(art).path
    blob.chmod(0o644)
    with open(blob, "r+b") as f:  # same size, different bytes
        f.write(b"corrupt!")
    again = c.fetch(art)
    assert not again.hit
    assert hashlib.sha256(again.path.read_bytes()).hexdigest() == art.sha256


def test_truncated_cached_blob_is_refetched(tmp_path):
    art = make(tmp_path, "a", 8192)
    c = Cache(tmp_path / "c", 1 << 20)
    blob = c.fetch(art).path
    blob.chmod(0o644)
    os.truncate(blob, 100)
    assert not c.fetch(art).hit


def test_verify_detects_silent_corruption(tmp_path):
    art = make(tmp_path, "a", 8192)
    c = Cache(tmp_path / "c", 1 << 20)
    blob = c.fetch(art).path
    st = blob.stat()
    blob.chmod(0o644)
    with open(blob, "r+b") as f:  # flip the first byte: writing a fixed one left random data as it was 1 time in 256
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 0xFF]))
    os.utime(blob, ns=(st.st_atime_ns, st.st_mtime_ns))  # even a forged stamp is caught by verify
    assert c.verify(art.sha256) is False
    assert not blob.exists()


def test_lru_eviction_respects_pins(tmp_path):
    a, b, d = (make(tmp_path, n, 400) for n in "abd")
    c = Cache(tmp_path / "c", 1000)
    c.fetch(a)
    c.pin(a.sha256, "job1")
    c.fetch(b)
    c.fetch(d)  # needs room: b is the LRU unpinned blob (a is older but pinned)
    have = {e.sha256 for e in c.entries()}
    assert have == {a.sha256, d.sha256}


def test_lru_order(tmp_path):
    a, b, d = (make(tmp_path, n, 400) for n in "abd")
    c = Cache(tmp_path / "c", 1000)
    c.fetch(a)
    c.fetch(b)
    c.fetch(a)  # a is now the most recently used
    c.fetch(d)
    assert {e.sha256 for e in c.entries()} == {a.sha256, d.sha256}


def test_cache_full_of_pinned_images(tmp_path):
    a, b = make(tmp_path, "a", 600), make(tmp_path, "b", 600)
    c = Cache(tmp_path / "c", 1000)
    c.fetch(a)
    c.pin(a.sha256, "job7")
    with pytest.raises(NodeError, match=r"image cache full: .* pinned: .*jobs job7"):
        c.fetch(b)
    assert os.listdir(tmp_path / "c" / "tmp") == []


def test_image_larger_than_bound(tmp_path):
    a = make(tmp_path, "a", 2000)
    with pytest.raises(NodeError, match="larger than the whole cache bound"):
        Cache(tmp_path / "c", 1000).fetch(a)


def test_evict_refuses_pinned(tmp_path):
    a = make(tmp_path, "a", 100)
    c = Cache(tmp_path / "c", 1000)
    c.fetch(a)
    c.pin(a.sha256, "j")
    assert c.evict(a.sha256) is False
    c.unpin_job("j")
    assert c.evict(a.sha256) is True


@pytest.fixture
def small_fs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount tmpfs: {r.stderr.decode()}")
    yield mnt
    subprocess.run(["umount", str(mnt)])


def test_disk_full_during_fetch(tmp_path, small_fs):
    art = make(tmp_path, "a", 3 << 20)
    c = Cache(small_fs, 1 << 30)
    with pytest.raises(NodeError, match="cache disk full while fetching"):
        c.fetch(art)
    assert os.listdir(small_fs / "tmp") == [] and os.listdir(small_fs / "blobs") == []


def _acl_uids(p) -> set[int] | None:
    """uids named in the file's POSIX access ACL; None without one."""
    import struct

    try:
        raw = os.getxattr(p, "system.posix_acl_access")
    except OSError:
        return None
    entries = [struct.unpack_from("<HHI", raw, 4 + 8 * i) for i in range((len(raw) - 4) // 8)]
    return {qid for tag, _perm, qid in entries if tag == 0x02}


def test_a_restricted_images_kernel_and_initrd_are_as_private_as_its_disk(tmp_path):
    """Only the disk of a restricted image was kept from other users: its kernel and initrd (which
    may hold what the site restricts the image for) were published 0444 to every user on the node."""
    from vmwrap.catalog import Image

    c = Cache(tmp_path / "c", 1 << 20)
    arts = {k: make(tmp_path, k, 4096 + i) for i, k in enumerate(("kernel", "initrd", "disk"))}
    img = Image("secret", "kernel", arts["kernel"], arts["initrd"], arts["disk"], users=["alice"])
    assert img.restricted
    for a in arts.values():
        c.pin(a.sha256, "j1", 1234)
        c.fetch(a)
    c.grant(img)
    for key, a in arts.items():
        mode = c.blob(a.sha256).stat().st_mode
        assert (mode & 0o007, _acl_uids(c.blob(a.sha256))) == (0, {1234}), key  # group bits: the ACL's mask
    c.unpin_job("j1")
    assert all(not _acl_uids(c.blob(a.sha256)) for a in arts.values())  # gone with the job

    for open_img in (Image("open", "kernel", arts["kernel"], arts["initrd"], arts["disk"]),
                     Image("all", "kernel", arts["kernel"], arts["initrd"], arts["disk"], users=["*"])):
        assert not open_img.restricted
        c.grant(open_img)
        assert all(c.blob(a.sha256).stat().st_mode & 0o777 == 0o444 for a in arts.values())
    assert Image("g", "kernel", arts["kernel"], arts["initrd"], groups=["staff"]).restricted


def test_the_kvm_probe_boots_its_own_copies_of_kernel_and_initrd(tmp_path, monkeypatch):
    """The probe's QEMU runs as libvirt-qemu, which a restricted image's cached kernel and initrd
    do not name: it gets copies it owns, so the verdict is not 'no KVM' for a file it cannot read."""
    import re

    import libvirt

    from vmwrap import accel, domain
    from vmwrap.config import Settings

    kernel, initrd = tmp_path / "k", tmp_path / "i"
    kernel.write_bytes(b"kernel bytes")
    initrd.write_bytes(b"initrd bytes")
    for p in (kernel, initrd):
        p.chmod(0o400)
    seen = {}

    class Conn:
        def createXML(self, xml, flags):
            for key in ("kernel", "initrd"):
                path = re.search(f"<{key}>([^<]+)</{key}>", xml).group(1)
                st = os.stat(path)
                seen[key] = (open(path, "rb").read(), st.st_uid, st.st_mode & 0o777)
                seen["uid"] = int(re.search(r"<label>\+(\d+):", xml).group(1))
            raise libvirt.libvirtError("enough")

        def close(self):
            pass
    monkeypatch.setattr(domain, "connect", lambda uri: Conn())
    ok, detail = accel.probe_kvm(Settings(state_dir=str(tmp_path / "state")), str(kernel), str(initrd))
    assert not ok and "KVM domain refused" in detail
    assert seen["kernel"] == (b"kernel bytes", seen["uid"], 0o400)
    assert seen["initrd"] == (b"initrd bytes", seen["uid"], 0o400)


def _fetch_bounded(args):
    root, bound, art = args
    try:
        got = Cache(root, bound).fetch(art)
        return "ok", got.hit, got.bytes_transferred
    except NodeError as e:
        return type(e).__name__, str(e)[:60], 0


def test_two_jobs_fetch_one_image_into_a_nearly_full_cache(tmp_path):
    """Fault matrix (issue 20): two jobs of one image start at once on a node whose cache has room only
    after evicting an older image. One fetch, both jobs get the image, the old one goes, nothing half
    written stays; when the old one is pinned by a running job instead, both fail with cache-full
    (a passing condition: the node is not drained) and the pinned image is untouched."""
    old, new = make(tmp_path, "old", 6 << 20), make(tmp_path, "new", 6 << 20)
    root, bound = tmp_path / "c", 10 << 20
    Cache(root, bound).fetch(old)
    with mp.get_context("fork").Pool(2) as pool:
        results = pool.map(_fetch_bounded, [(root, bound, new)] * 2)
    assert sorted(results) == [("ok", False, 6 << 20), ("ok", True, 0)], results
    assert {e.sha256 for e in Cache(root, bound).entries()} == {new.sha256}
    assert os.listdir(root / "tmp") == []

    c = Cache(root, bound)
    c.fetch(old)                      # evicts `new` (not pinned) ...
    c.pin(old.sha256, "job1")         # ... and a running job holds `old`
    with mp.get_context("fork").Pool(2) as pool:
        results = pool.map(_fetch_bounded, [(root, bound, new)] * 2)
    assert [r[0] for r in results] == ["CacheFullError"] * 2, results
    assert {e.sha256 for e in Cache(root, bound).entries()} == {old.sha256}
    assert os.listdir(root / "tmp") == []
