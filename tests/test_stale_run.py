"""A run of a job that is no longer its current one never touches the job's checkpoint.

A node cut off from its scheduler (not dead) keeps running its copy of the job while the scheduler
restarts it elsewhere from its last checkpoint (Slurm: the node DOWN, the job requeued; Grid Engine:
reschedule_unknown). The old copy's periodic checkpoints would replace the new run's with older
work, its epilog's save likewise, and its end would delete the checkpoint the new run relies on.
Each start writes its token into the store's `.ran` marker; a save or an end from another token is
refused (`stale_run` in the ledger)."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from test_checkpoint import new_store, stage
from vmwrap import checkpoint, domain, launcher, lifecycle, periodic, rundir
from vmwrap.ledger import Ledger
from vmwrap.config import Settings


def run_dir(tmp_path: Path, run: str | None) -> Path:
    d = tmp_path / "run"
    d.mkdir()
    (d / rundir.JOB).write_text(json.dumps({"job_id": "77", "restarts": 0}))
    if run:
        (d / rundir.RUN).write_text(run)
    return d


def test_the_current_run_commits_a_stale_one_cannot(tmp_path):
    store = new_store(tmp_path)
    store.mark_ran("77", "new")
    store.commit(stage(store, "77", memory=b"new run"), "77", run="new")
    with pytest.raises(checkpoint.StaleRunError, match="started again elsewhere"):
        store.commit(stage(store, "77", memory=b"old run"), "77", run="old")
    assert (store.dir("77") / "memory.save").read_bytes() == b"new run"
    store.commit(stage(store, "77", memory=b"unknown"), "77")   # a run of a vmwrap before tokens
    assert store.current_run("77") == "new"


def test_a_start_replaces_the_marker_and_its_time(tmp_path):
    store = new_store(tmp_path)
    store.mark_ran("77", "a")
    first = (store.root / "77.ran").stat().st_mtime_ns
    store.mark_ran("77", "b")
    assert store.current_run("77") == "b" and (store.root / "77.ran").stat().st_mtime_ns >= first
    assert store.jobs() == {"77"}   # no temporary left beside it
    store.delete("77")
    assert store.current_run("77") is None


def test_a_stale_runs_save_keeps_the_checkpoint(tmp_path):
    """checkpoint.save drops the job's checkpoint when a save fails; not when the run is stale."""
    store = new_store(tmp_path)
    store.commit(stage(store, "77"), "77")
    store.mark_ran("77", "new")
    d = run_dir(tmp_path, "old")
    with pytest.raises(checkpoint.StaleRunError):
        checkpoint.save("77", d, store, conn=None, restarts=1)
    with pytest.raises(checkpoint.StaleRunError):
        periodic.save("77", d, store, conn=None, restarts=0)
    assert store.exists("77")


def ended_run(tmp_path: Path, monkeypatch, current: str, mine: str | None):
    """A store holding job 77's checkpoint with `current` as its run, and a run dir on this node whose
    run has token `mine` (None: it never became current); libvirt answers without a VM."""
    store = new_store(tmp_path)
    store.commit(stage(store, "77"), "77")
    store.mark_ran("77", current)
    s = Settings(state_dir=str(tmp_path / "state"), checkpoint_dir=str(store.root),
                 checkpoint_key_file=store.key_file)
    d = rundir.path(s, "77")
    d.mkdir(parents=True)
    (d / rundir.JOB).write_text(json.dumps({"job_id": "77", "restarts": 1}))
    if mine:
        (d / rundir.RUN).write_text(mine)
    monkeypatch.setattr(domain, "connect", lambda uri: SimpleNamespace(close=lambda: None))
    return store, s


def test_a_stale_runs_epilog_neither_saves_nor_deletes(tmp_path, monkeypatch):
    store, s = ended_run(tmp_path, monkeypatch, current="new", mine="old")
    torn = []
    monkeypatch.setattr(domain, "is_gone", lambda conn, name: False)
    monkeypatch.setattr(launcher, "teardown", lambda job_id, *a, **k: torn.append(job_id))
    monkeypatch.setattr(checkpoint, "save", lambda *a, **k: pytest.fail("a stale run saved"))
    for requeued in (True, False):
        out = lifecycle.end(s, "77", requeued=requeued, restarts=1, scheduler="slurm")
        assert out.verdict is lifecycle.Verdict.RUN
        assert store.exists("77") and store.lost_reason("77") is None
    assert torn == ["77", "77"]
    events = [e["event"] for e in Ledger(s.ledger_path).events("77")]
    assert events == ["stale_run", "stale_run"], events


def test_a_run_that_never_became_current_ends_as_before(tmp_path, monkeypatch):
    """A restart whose restore failed (a lost checkpoint, policy fail) marked itself current first:
    its end deletes the checkpoint as any ended job's. One that failed even before has no token and
    is nobody's stale copy either."""
    store, s = ended_run(tmp_path, monkeypatch, current="old", mine=None)
    monkeypatch.setattr(launcher, "teardown", lambda *a, **k: None)
    out = lifecycle.end(s, "77", requeued=False, restarts=1, scheduler="slurm")
    assert out.verdict is lifecycle.Verdict.RUN and not store.exists("77")
    assert "stale_run" not in [e["event"] for e in Ledger(s.ledger_path).events("77")]


def test_a_stale_runs_periodic_checkpoint_stops_its_vm(tmp_path, monkeypatch):
    """The old copy on a cut-off node asks for its periodic checkpoint: refused, and its VM is stopped
    there and then (it would write on into the work dir the new run writes), the checkpoint kept."""
    store, s = ended_run(tmp_path, monkeypatch, current="new", mine="old")
    monkeypatch.setattr(periodic, "_last", {})  # the agent's rate limit: this is the job's first
    stopped = []
    monkeypatch.setattr(domain, "destroy", lambda conn, name: stopped.append(name) or True)
    reply = periodic.handle(s, SimpleNamespace(), "77", peer_uid=1234)
    assert reply["stale"] is True and reply["saved"] is False and "started again elsewhere" in reply["error"]
    assert stopped == [rundir.domain_name("77")]
    assert store.exists("77") and store.current_run("77") == "new"
    events = Ledger(s.ledger_path).events("77")
    assert [(e["event"], e["detail"].get("stopped")) for e in events] == [("stale_run", True)], events


def test_the_current_runs_failed_checkpoint_leaves_its_vm_running(tmp_path, monkeypatch):
    """Only staleness stops a VM: any other failed periodic save lets the job run on."""
    store, s = ended_run(tmp_path, monkeypatch, current="mine", mine="mine")
    monkeypatch.setattr(periodic, "_last", {})
    monkeypatch.setattr(domain, "destroy", lambda conn, name: pytest.fail("a current run's VM was stopped"))
    reply = periodic.handle(s, SimpleNamespace(), "77", peer_uid=1234)
    assert reply["saved"] is False and not reply.get("stale"), reply
    assert [e["event"] for e in Ledger(s.ledger_path).events("77")] == ["checkpoint_failed"]
