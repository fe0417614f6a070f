"""The checkpoint store's identity stamp (`vmwrap checkpoints init`): a node tells this site's shared
store from the empty local directory it has at that path when the storage is not mounted, and from
another site's store. Pure: no VM, no scheduler (the prolog's decision runs with a stand-in launcher)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from vmwrap import checkpoint, launcher, lifecycle
from vmwrap.config import Settings
from vmwrap.errors import NodeError
from vmwrap.job import Job


@pytest.fixture
def key(tmp_path) -> Path:
    return checkpoint.keygen(tmp_path / "site.key")


def test_init_creates_a_private_store_whose_stamp_verifies(tmp_path, key):
    root = tmp_path / "shared" / "store"
    what, stamp = checkpoint.init_store(root, key)
    assert what == "created" and stamp == root / checkpoint.STAMP
    st = root.stat()
    assert (st.st_uid, oct(st.st_mode & 0o777)) == (0, "0o700")
    assert stamp.stat().st_uid == 0 and not stamp.stat().st_mode & 0o022
    body = json.loads(stamp.read_text())
    assert len(body["store_id"]) == 32 and body["created"] > 0
    assert checkpoint.Store(root, key).check_identity()["store_id"] == body["store_id"]
    assert [p.name for p in root.iterdir()] == [checkpoint.STAMP]  # no temporaries left


def test_init_twice_is_a_no_op_that_says_so(tmp_path, key):
    root = tmp_path / "store"
    checkpoint.init_store(root, key)
    before = (root / checkpoint.STAMP).read_bytes()
    assert checkpoint.init_store(root, key)[0] == "already"
    assert (root / checkpoint.STAMP).read_bytes() == before


def test_init_adopts_an_older_vmwraps_store_and_keeps_its_checkpoints(tmp_path, key):
    """The upgrade path: a store written before stamps existed keeps what it holds."""
    root = tmp_path / "store"
    root.mkdir(mode=0o700)
    (root / "41.ran").touch()
    (root / "42").mkdir()
    (root / "42" / "manifest.json").write_text("{}")
    assert checkpoint.init_store(root, key)[0] == "adopted"
    assert (root / "41.ran").exists() and (root / "42" / "manifest.json").read_text() == "{}"
    checkpoint.Store(root, key).check_identity()


def test_init_refuses_another_sites_store(tmp_path, key):
    root = tmp_path / "store"
    checkpoint.init_store(root, checkpoint.keygen(tmp_path / "other.key"))
    with pytest.raises(NodeError, match="belongs to another site or was initialised with another checkpoint key"):
        checkpoint.init_store(root, key)


def test_init_needs_the_sites_key_first(tmp_path):
    with pytest.raises(NodeError, match="checkpoint key .* does not exist"):
        checkpoint.init_store(tmp_path / "store", tmp_path / "missing.key")
    assert not (tmp_path / "store").exists()


def test_store_operations_never_create_a_missing_store(tmp_path, key):
    """Where the shared storage is not mounted, nothing of a job may land on the node's own disk."""
    root = tmp_path / "mnt" / "store"
    store = checkpoint.Store(root, key)
    for use in (lambda: store.mark_ran("5"), lambda: store.staging("5"), lambda: store.manifest("5")):
        with pytest.raises(checkpoint.StoreUnverified, match=f"checkpoint store {root} does not exist: shared "
                                                             "storage not mounted on this node"):
            use()
    store.mark_lost("5", "why")
    store.record_rate(10, 1.0)
    with pytest.raises(OSError):
        store.set_deadline("5", 1.0)
    assert not (tmp_path / "mnt").exists()


def test_an_unstamped_store_is_refused_with_what_to_do(tmp_path, key):
    root = tmp_path / "store"
    root.mkdir(mode=0o700)  # the empty mount point of storage that is not mounted
    store = checkpoint.Store(root, key)
    for use in (lambda: store.mark_ran("5"), lambda: store.staging("5"), lambda: store.manifest("5")):
        with pytest.raises(NodeError, match=rf"{root} has no \.vmwrap-store stamp: shared storage not mounted on "
                                            r"this node, or never initialised \(`vmwrap checkpoints init`, once per"):
            use()
    store.mark_lost("5", "why")
    assert list(root.iterdir()) == []  # nothing written into the mount point


def test_a_stamp_made_with_another_key_is_refused(tmp_path, key):
    root = tmp_path / "store"
    checkpoint.init_store(root, checkpoint.keygen(tmp_path / "other.key"))
    with pytest.raises(NodeError, match=rf"{root} belongs to another site .* does not verify with {key}"):
        checkpoint.Store(root, key).mark_ran("5")
    assert not (root / "5.ran").exists()


def test_a_stamp_is_never_followed_through_a_link(tmp_path, key):
    real = tmp_path / "real"
    checkpoint.init_store(real, key)
    root = tmp_path / "store"
    root.mkdir(mode=0o700)
    (root / checkpoint.STAMP).symlink_to(real / checkpoint.STAMP)
    with pytest.raises(NodeError, match="stamp .* is unusable.*symlink"):
        checkpoint.Store(root, key).check_identity()


def test_a_stamp_is_read_with_a_size_cap(tmp_path, key):
    root = tmp_path / "store"
    checkpoint.init_store(root, key)
    p = root / checkpoint.STAMP
    body = json.loads(p.read_text())
    body["pad"] = "x" * checkpoint.STAMP_MAX
    p.write_text(json.dumps(body))
    with pytest.raises(NodeError, match=f"larger than {checkpoint.STAMP_MAX} bytes"):
        checkpoint.Store(root, key).check_identity()


def test_a_stamp_others_can_write_is_refused(tmp_path, key):
    root = tmp_path / "store"
    checkpoint.init_store(root, key)
    (root / checkpoint.STAMP).chmod(0o666)
    with pytest.raises(NodeError, match="stamp .* must be owned by root and writable only by root"):
        checkpoint.Store(root, key).check_identity()


class _Launcher:
    """launcher.Launcher without a VM: what the prolog asked of it."""
    calls: list[str] = []
    checkpoint = True
    run_token = "run-1"

    def __init__(self, job, settings):
        self.job = job
        self.run_dir = Path(settings.state_dir) / "run"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.on_lost_checkpoint = "fail"
        self.request = SimpleNamespace(image=SimpleNamespace(checkpoint=_Launcher.checkpoint, name="busybox",
                                                             digest="d"))
        self.ledger = SimpleNamespace(record=lambda *a, **k: None)

    def prepare(self):
        _Launcher.calls.append("prepare")

    def restore(self, store):
        _Launcher.calls.append("restore")
        return {}

    def boot(self):
        _Launcher.calls.append("boot")

    def notice(self, text):
        _Launcher.calls.append(f"notice {text}")


@pytest.fixture
def prolog(tmp_path, key, monkeypatch):
    _Launcher.calls = []
    _Launcher.checkpoint = True
    monkeypatch.setattr(launcher, "Launcher", _Launcher)
    monkeypatch.setattr(launcher, "teardown", lambda *a, **k: None)
    good = tmp_path / "shared"
    checkpoint.init_store(good, key)
    local = tmp_path / "unmounted"
    local.mkdir(mode=0o700)

    def start(root: Path, restarts: int) -> lifecycle.Outcome:
        s = Settings(state_dir=str(tmp_path / "state"), checkpoint_dir=str(root), checkpoint_key_file=str(key))
        job = Job("77", "slurm", "root", 0, 0, str(tmp_path), "", image="busybox", restart_count=restarts)
        return lifecycle.start(s, "77", lambda: job, "slurm")
    return SimpleNamespace(start=start, good=good, local=local)


def test_a_restart_on_a_node_without_the_shared_store_is_the_nodes_fault_not_a_fresh_start(prolog):
    """Issue 20: the job ran (its `.ran` is in the shared store) and was requeued onto a node where the
    store's path is an empty local directory: it must not start again from the beginning there."""
    assert prolog.start(prolog.good, 0).verdict is lifecycle.Verdict.RUN
    assert (prolog.good / "77.ran").exists()
    _Launcher.calls = []
    out = prolog.start(prolog.local, 1)
    assert out.verdict is lifecycle.Verdict.NODE_FAULT, out
    assert f"checkpoint store {prolog.local} has no .vmwrap-store stamp" in out.reason
    assert "boot" not in _Launcher.calls and "restore" not in _Launcher.calls, _Launcher.calls
    assert list(prolog.local.iterdir()) == []
    out = prolog.start(prolog.good, 1)  # where the store is, the job continues from its checkpoint
    assert out.verdict is lifecycle.Verdict.RUN and _Launcher.calls[-1] == "restore", _Launcher.calls


def test_a_first_start_on_a_node_without_the_shared_store_is_refused_too(prolog):
    """Booting there would leave its `.ran` on the node's own disk: a later restart elsewhere would
    find none and start the job again from the beginning."""
    out = prolog.start(prolog.local, 0)
    assert out.verdict is lifecycle.Verdict.NODE_FAULT and "boot" not in _Launcher.calls, (out, _Launcher.calls)


def test_a_store_of_another_site_is_the_nodes_fault(prolog, tmp_path):
    foreign = tmp_path / "foreign"
    checkpoint.init_store(foreign, checkpoint.keygen(tmp_path / "other.key"))
    out = prolog.start(foreign, 1)
    assert out.verdict is lifecycle.Verdict.NODE_FAULT and "belongs to another site" in out.reason, out
    assert "boot" not in _Launcher.calls


def test_jobs_whose_image_may_not_be_saved_do_not_need_the_store(prolog):
    _Launcher.checkpoint = False
    out = prolog.start(prolog.local, 0)
    assert out.verdict is lifecycle.Verdict.RUN and _Launcher.calls == ["prepare", "boot"], (out, _Launcher.calls)
    assert list(prolog.local.iterdir()) == []


def test_a_site_that_never_saves_does_not_need_the_store(tmp_path, key, monkeypatch):
    _Launcher.calls = []
    _Launcher.checkpoint = True
    monkeypatch.setattr(launcher, "Launcher", _Launcher)
    monkeypatch.setattr(launcher, "teardown", lambda *a, **k: None)
    s = Settings(state_dir=str(tmp_path / "state"), checkpoint_dir=str(tmp_path / "none"),
                 checkpoint_key_file=str(key), workdir_share="virtio-9p")
    job = Job("78", "slurm", "root", 0, 0, str(tmp_path), "", image="busybox", restart_count=1)
    out = lifecycle.start(s, "78", lambda: job, "slurm")
    assert out.verdict is lifecycle.Verdict.RUN and _Launcher.calls == ["prepare", "boot"], out
    assert not (tmp_path / "none").exists()


def test_doctor_fails_a_store_that_is_not_this_sites(tmp_path, key):
    from vmwrap import hostcheck

    (tmp_path / "empty").mkdir(mode=0o700)
    level, msg = hostcheck.store_identity(str(tmp_path / "empty"), str(key))
    assert level == "FAIL" and "vmwrap checkpoints init" in msg
    checkpoint.init_store(tmp_path / "good", key)
    assert hostcheck.store_identity(str(tmp_path / "good"), str(key))[0] == "ok"
    assert not os.path.exists(tmp_path / "missing")


def test_the_planner_requeues_without_a_deadline_where_the_store_is_missing_and_creates_nothing(tmp_path):
    """The gap planner (head node) writes a save's deadline into the store: where the store is not
    mounted it must not create it on the host's disk, nor stop freeing the node for the reservation."""
    from vmwrap.plan import Action
    from vmwrap.planner import Planner

    vacated = []
    sched = SimpleNamespace(name="slurm", vacate=vacated.append)
    s = Settings(state_dir=str(tmp_path / "state"), checkpoint_dir=str(tmp_path / "mnt" / "store"))
    Planner(sched, s)._apply(Action("requeue", "9", "a reservation needs the node"), 1000.0)
    assert vacated == ["9"] and not (tmp_path / "mnt").exists()
