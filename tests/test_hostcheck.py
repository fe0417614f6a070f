"""Host checks behind `vmwrap doctor` that need no libvirt: here, whether the checkpoint store is
storage of its own or a directory on the node's own disk (an unmounted mount point)."""

from __future__ import annotations

import subprocess

import pytest

from vmwrap import hostcheck


def test_a_store_on_the_nodes_own_file_system_is_flagged(tmp_path):
    (tmp_path / "store").mkdir()
    (tmp_path / "state").mkdir()
    level, msg = hostcheck.shared_store(str(tmp_path / "store"), [str(tmp_path / "state")])
    assert level == "WARN" and f"same file system as {tmp_path / 'state'}" in msg and "mounted?" in msg


def test_a_missing_store_is_flagged_before_anything_creates_it(tmp_path):
    level, msg = hostcheck.shared_store(str(tmp_path / "nfs" / "store"), [str(tmp_path)])
    assert level == "WARN" and "No such file" in msg and "mounted?" in msg
    assert not (tmp_path / "nfs").exists()


@pytest.fixture
def mounted_store(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "vmwrap-test-store", str(store)]).returncode:
        pytest.skip("cannot mount a tmpfs here (not root?)")
    yield store
    subprocess.run(["umount", str(store)], check=True)


def test_a_mounted_store_passes(mounted_store, tmp_path):
    (tmp_path / "state").mkdir()
    level, msg = hostcheck.shared_store(str(mounted_store), [str(tmp_path / "state")])
    assert level == "ok", msg
