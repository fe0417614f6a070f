"""The checkpoint store without a VM: atomic commit, verification, markers, garbage collection."""

from __future__ import annotations

import json

import pytest

from vmwrap import checkpoint
from vmwrap.errors import CheckpointError, UserError


def stage(store: checkpoint.Store, job: str, memory: bytes = b"RAM" * 1000):
    tmp = store.staging(job)
    for f in checkpoint.FILES:
        (tmp / f).write_bytes(b"")
    (tmp / "memory.save").write_bytes(memory)
    (tmp / "job.json").write_text(json.dumps({"restarts": 1, "image": "busybox"}))
    return tmp


def test_commit_then_verify_and_list(tmp_path):
    store = checkpoint.Store(tmp_path / "ck")
    tmp = stage(store, "42")
    assert store.list() == [] and not store.exists("42")  # a staged checkpoint is never visible
    store.commit(tmp, "42")
    assert store.exists("42") and not tmp.exists()
    assert store.verify("42")["files"]["memory.save"]["bytes"] == 3000
    [info] = store.list()
    assert (info.job_id, info.bytes, info.restarts, info.image) == ("42", 3000 + len('{"restarts": 1, "image": "busybox"}'), 1, "busybox")


def test_a_newer_checkpoint_replaces_the_older(tmp_path):
    store = checkpoint.Store(tmp_path)
    store.commit(stage(store, "7", b"old"), "7")
    store.commit(stage(store, "7", b"new"), "7")
    assert (store.dir("7") / "memory.save").read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["7"]  # no leftovers of the swap


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damage_is_detected(tmp_path, damage):
    store = checkpoint.Store(tmp_path)
    store.commit(stage(store, "9"), "9")
    f = store.dir("9") / "memory.save"
    if damage == "flip":
        data = bytearray(f.read_bytes())
        data[1500] ^= 1
        f.write_bytes(bytes(data))
    elif damage == "truncate":
        f.write_bytes(f.read_bytes()[:-1])
    else:
        f.unlink()
    with pytest.raises(CheckpointError, match="memory.save is (corrupt|missing)"):
        store.verify("9")


def test_missing_checkpoint_says_why(tmp_path):
    store = checkpoint.Store(tmp_path)
    with pytest.raises(CheckpointError, match="not saved when the job was requeued"):
        store.verify("5")
    store.mark_lost("5", "saving its VM on c2 failed: No space left on device")
    with pytest.raises(CheckpointError, match="No space left on device"):
        store.verify("5")


def test_job_ids_cannot_escape_the_store(tmp_path):
    store = checkpoint.Store(tmp_path / "ck")
    for bad in ("../etc", "a/b", "", ".hidden", "x" * 65):
        with pytest.raises(UserError):
            store.dir(bad)


def test_gc_keeps_queued_jobs_only(tmp_path):
    store = checkpoint.Store(tmp_path)
    store.commit(stage(store, "1"), "1")
    store.commit(stage(store, "2"), "2")
    store.mark_ran("3")
    store.mark_lost("3", "x")
    assert store.jobs() == {"1", "2", "3"}
    assert store.gc(lambda j: j == "2") == ["1", "3"]
    assert store.jobs() == {"2"}
