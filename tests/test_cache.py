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
    with open(blob, "r+b") as f:
        f.write(b"x")
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
