"""Admin commands: image add/list/verify/remove, cache list/fetch/evict/gc (no VMs needed)."""

import os
import subprocess
import sys

import pytest

from vmwrap.cache import Cache
from vmwrap.config import render


@pytest.fixture
def admin(tmp_path):
    cfg = tmp_path / "vmwrap.toml"
    cfg.write_text(render({"catalog": str(tmp_path / "images.toml"), "cache_dir": str(tmp_path / "cache"),
                           "state_dir": str(tmp_path / "state"), "cache_max_bytes": 10 << 20}))
    for name in ("k", "i", "d"):
        (tmp_path / name).write_bytes(os.urandom(4096))

    def vmwrap(*args, ok=True):
        r = subprocess.run([sys.executable, "-m", "vmwrap.cli", "--config", str(cfg), *args],
                           capture_output=True, text=True)
        if ok:
            assert r.returncode == 0, r.stdout + r.stderr
        return r
    vmwrap.tmp = tmp_path
    vmwrap.cache = lambda: Cache(tmp_path / "cache", 10 << 20)
    return vmwrap


def test_image_add_list_verify_remove(admin):
    t = admin.tmp
    admin("image", "add", "deb", "--kernel", str(t / "k"), "--initrd", str(t / "i"), "--disk", str(t / "d"),
          "--memory", "512M", "--user", "alice", "--description", "test image")
    assert "deb" in admin("image", "list").stdout and "alice" in admin("image", "list").stdout
    assert admin("image", "verify").stdout.count("ok  ") == 3
    with open(t / "d", "r+b") as f:
        f.write(b"corrupt")
    r = admin("image", "verify", "deb", ok=False)
    assert r.returncode == 1 and "FAIL deb.disk: mismatch" in r.stdout
    admin("image", "remove", "deb")
    assert "deb" not in admin("image", "list").stdout
    r = admin("image", "remove", "deb", ok=False)
    assert r.returncode != 0 and "no image 'deb'" in r.stderr


def test_image_add_sets_the_network_policy_and_list_shows_it(admin):
    t = admin.tmp
    admin("image", "add", "net", "--kernel", str(t / "k"), "--initrd", str(t / "i"), "--network", "nat")
    admin("image", "add", "off", "--kernel", str(t / "k"), "--initrd", str(t / "i"))
    rows = {ln.split()[0]: ln for ln in admin("image", "list").stdout.splitlines()[1:]}
    assert rows["net"].split()[3] == "nat" and rows["off"].split()[3] == "-"
    r = admin("image", "add", "x", "--kernel", str(t / "k"), "--initrd", str(t / "i"), "--network", "bridge", ok=False)
    assert r.returncode != 0 and "'bridge' is not one of 'none', 'nat'" in r.stderr


def test_image_add_refuses_bad_names(admin):
    t = admin.tmp
    r = admin("image", "add", "../x", "--kernel", str(t / "k"), "--initrd", str(t / "i"), ok=False)
    assert r.returncode != 0 and "invalid image name '../x'" in r.stderr


def test_images_is_a_hidden_deprecated_alias_of_image(admin):
    t = admin.tmp
    r = admin("images", "add", "old", "--kernel", str(t / "k"), "--initrd", str(t / "i"))
    assert "deprecated" in r.stderr
    assert "old" in admin("image", "list").stdout
    help_text = admin("--help").stdout
    assert "image " in help_text and "images" not in help_text


def test_cache_fetch_list_evict_gc(admin):
    t = admin.tmp
    admin("image", "add", "a", "--kernel", str(t / "k"), "--initrd", str(t / "i"))
    assert "fetched 4096 bytes" in admin("cache", "fetch", "a").stdout
    assert admin("cache", "fetch", "a").stdout.count("hit") == 2
    listing = admin("cache", "list").stdout
    assert "a.kernel" in listing and "a.initrd" in listing and "2 blobs" in listing
    c = admin.cache()
    sha = next(e.sha256 for e in c.entries())
    c.pin(sha, "job42")
    assert "job42" in admin("cache", "list").stdout
    r = admin("cache", "evict", "a", ok=False)
    assert r.returncode != 0 and "pinned by running or suspended jobs" in r.stderr
    c.unpin_job("job42")
    admin("cache", "evict", "a")
    assert c.entries() == []
    admin("cache", "fetch", "a")
    admin("image", "remove", "a")
    (t / "cache" / "tmp" / f"{'f' * 64}.999999.part").write_bytes(b"half")  # a crashed fetch
    out = admin("cache", "gc").stdout
    assert "removed 3 item(s)" in out
    assert c.entries() == [] and os.listdir(t / "cache" / "tmp") == []


def test_checkpoints_list_verify_delete(tmp_path):
    from test_checkpoint import new_store, stage

    store = new_store(tmp_path)
    store.commit(stage(store, "77"), "77")
    store.mark_lost("78", "saving its VM on c2 failed: No space left on device")
    cfg = tmp_path / "vmwrap.toml"
    cfg.write_text(render({"checkpoint_dir": str(store.root), "checkpoint_key_file": store.key_file,
                           "state_dir": str(tmp_path / "state")}))

    def vmwrap(*args):
        return subprocess.run([sys.executable, "-m", "vmwrap.cli", "--config", str(cfg), *args],
                              capture_output=True, text=True)

    out = vmwrap("checkpoints").stdout
    assert out.splitlines()[1].startswith("77 ") and "busybox" in out
    assert "78: lost: saving its VM on c2 failed: No space left on device" in out
    assert "intact" in vmwrap("checkpoints", "verify", "77").stdout
    (store.dir("77") / "share.json").write_text("tampered")
    r = vmwrap("checkpoints", "verify", "77")
    assert r.returncode == 1 and "share.json is corrupt" in r.stderr
    r = vmwrap("checkpoints", "delete", "../77")
    assert r.returncode == 1 and "invalid job id" in r.stderr
    assert "77: deleted" in vmwrap("checkpoints", "delete", "77").stdout
    assert not store.exists("77")
