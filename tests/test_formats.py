"""Versioned on-disk formats across upgrades (issue 24): a ledger from before versioning is migrated
with its history, a newer one is refused; a checkpoint of another format is refused naming both
formats, not reported as forged; a run dir or a scheduler-carried request of a newer format fails
the job with both formats named, never the node. No VM."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import sqlite3

import pytest

from vmwrap import __version__, checkpoint, ledger, payload, rundir, wire
from vmwrap.errors import CheckpointError, NodeError, UserError


def test_ledger_from_before_versioning_is_migrated(tmp_path):
    path = tmp_path / "ledger.sqlite"
    db = sqlite3.connect(path)  # what vmwrap 0.1.0 before versioning created
    db.execute("CREATE TABLE events (id INTEGER PRIMARY KEY, ts REAL NOT NULL, job_id TEXT NOT NULL,"
               " domain TEXT NOT NULL, event TEXT NOT NULL, detail TEXT NOT NULL DEFAULT '{}')")
    db.execute("INSERT INTO events (ts, job_id, domain, event) VALUES (1.0, '7', 'vmwrap-7', 'created')")
    db.commit()
    db.close()
    led = ledger.Ledger(path)
    led.record("7", "vmwrap-7", "destroyed")
    assert [e["event"] for e in led.events("7")] == ["created", "destroyed"]
    led.close()
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == ledger.SCHEMA >= 1
    fresh = ledger.Ledger(tmp_path / "new.sqlite")
    assert fresh.db.execute("PRAGMA user_version").fetchone()[0] == ledger.SCHEMA


def test_newer_ledger_is_refused(tmp_path):
    path = tmp_path / "ledger.sqlite"
    ledger.Ledger(path).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {ledger.SCHEMA + 1}")
    db.commit()
    db.close()
    with pytest.raises(NodeError, match=rf"schema {ledger.SCHEMA + 1}, newer than this vmwrap's {ledger.SCHEMA}"):
        ledger.Ledger(path)


def _store(tmp_path, manifest: dict, sign_as: bytes | None = None) -> checkpoint.Store:
    key = tmp_path / "key"
    checkpoint.keygen(key)
    store = checkpoint.Store(tmp_path / "ck", key)
    d = tmp_path / "ck" / "42"
    d.mkdir(parents=True, mode=0o700)
    (tmp_path / "ck").chmod(0o700)
    checkpoint.init_store(tmp_path / "ck", key)  # an older vmwrap's store, adopted (the upgrade path)
    ctx = sign_as if sign_as is not None else checkpoint.MAC_CONTEXT
    mac = hmac.new(checkpoint.load_key(key), ctx + checkpoint._canonical(manifest), hashlib.sha256).hexdigest()
    (d / "manifest.json").write_text(json.dumps({**manifest, "mac": mac}))
    return store


def _manifest(version, **extra) -> dict:
    files = {f: {"bytes": 0, "sha256": hashlib.sha256(b"").hexdigest()} for f in checkpoint.FILES}
    return {"version": version, "job_id": "42", "created": 1.0, "node": "n1", "files": files, **extra}


def test_checkpoint_of_an_older_format_is_refused_with_the_reason(tmp_path):
    store = _store(tmp_path, _manifest(1), sign_as=b"vmwrap checkpoint manifest v1\0")
    with pytest.raises(CheckpointError) as e:
        store.manifest("42")
    assert str(e.value) == (f"the checkpoint of job 42 has format 1 (saved by vmwrap before 0.1.0); this vmwrap "
                            f"{__version__} restores format {checkpoint.VERSION} only")


def test_checkpoint_of_a_newer_format_names_its_vmwrap(tmp_path):
    store = _store(tmp_path, _manifest(checkpoint.VERSION + 1, vmwrap="9.9.9"))
    with pytest.raises(CheckpointError, match=rf"has format {checkpoint.VERSION + 1} \(saved by vmwrap 9.9.9\)"):
        store.manifest("42")


def test_current_format_restores_and_records_its_vmwrap(tmp_path):
    store = _store(tmp_path, _manifest(checkpoint.VERSION, vmwrap=__version__))
    assert store.manifest("42")["vmwrap"] == __version__


# -- the run dir (job.json's "format") ---------------------------------------------------------------

def _run_dir(tmp_path, meta: dict):
    d = tmp_path / "jobs" / "42"
    d.mkdir(parents=True)
    (d / rundir.JOB).write_text(json.dumps(meta))
    return d


def test_run_dir_records_its_format_and_reads_an_unversioned_one_as_format_1(tmp_path):
    meta = rundir.stamp({"job_id": "42", "restarts": 0})
    assert meta["format"] == rundir.FORMAT == 1 and meta["vmwrap"] == __version__
    assert rundir.read_job(_run_dir(tmp_path, meta), "42") == meta
    old = {"job_id": "42", "restarts": 0}  # what the prolog of a vmwrap before versioning wrote
    assert rundir.check(old, "42") is old
    assert rundir.read_job(tmp_path / "nonesuch", "42") is None


def test_run_dir_of_a_newer_vmwrap_fails_the_job_naming_both_formats(tmp_path, capfd):
    d = _run_dir(tmp_path, {"job_id": "42", "format": rundir.FORMAT + 1, "vmwrap": "9.9.9"})
    want = (f"the run dir of job 42 has format {rundir.FORMAT + 1} (written by vmwrap 9.9.9); this vmwrap "
            f"{__version__} reads formats up to {rundir.FORMAT}")
    with pytest.raises(rundir.FormatError, match=re.escape(want)) as e:
        rundir.read_job(d, "42")
    assert not isinstance(e.value, NodeError) and e.value.kind == "user"  # the job's failure, not the node's
    with pytest.raises(rundir.FormatError, match="has no valid format"):
        rundir.check({"format": "2"}, "42")
    # The job's payload (its batch step) says so and exits as for a job that cannot run, before any VM I/O.
    rc = payload.attach(d, "42", "true", {})
    assert rc == payload.EXIT_USER
    assert capfd.readouterr().err == f"vmwrap: error: {want}: run the job on a node with vmwrap 9.9.9 or newer\n"


# -- the request the scheduler carries (Slurm comment, Grid Engine context) ----------------------------

REQUEST = "image=busybox,memory=512,cpus=2,lost=restart"


def test_unversioned_request_is_format_1_and_is_what_is_written():
    a = wire.Accepted("busybox", 512, 2, "restart")
    assert wire.FORMAT == 1 and wire.encode(a) == "vmwrap:" + REQUEST  # nodes not yet upgraded read it
    assert wire.decode("vmwrap:" + REQUEST + " | mine") == a
    assert wire.decode("vmwrap:v=1," + REQUEST) == a
    assert wire.decode_context(["vmwrap_image=busybox", "vmwrap_format=1"]) == "busybox"


def test_request_of_a_newer_format_fails_the_job_naming_both_formats():
    body = f"vmwrap:v={wire.FORMAT + 1}," + REQUEST + ",gpus=1"
    with pytest.raises(wire.WireError) as e:
        wire.decode(body)
    assert str(e.value) == (f"the job's VM request (the job's comment) has format {wire.FORMAT + 1}, written by a "
                            f"newer vmwrap's submit filter; this node's vmwrap {__version__} reads formats up to "
                            f"{wire.FORMAT}: upgrade vmwrap on this node")
    assert isinstance(e.value, UserError) and not isinstance(e.value, NodeError)
    with pytest.raises(wire.WireError, match=rf"vmwrap_format=7\) has format 7.* reads formats up to {wire.FORMAT}"):
        wire.decode_context(["vmwrap_image=busybox", "vmwrap_format=7"])
    with pytest.raises(wire.WireError, match="is not a whole number"):
        wire.decode("vmwrap:v=x," + REQUEST)


def test_slurm_prolog_fails_the_job_not_the_node_on_a_newer_request(tmp_path):
    """Through the Slurm prolog's own reading of its environment: a user error (the job fails with the
    reason; lifecycle drains only on NodeError)."""
    from vmwrap_plugins.slurm import hooks

    env = {"SLURM_JOB_ID": "42", "SLURM_JOB_USER": "nobody", "SLURM_JOB_UID": "65534", "SLURM_JOB_GID": "65534",
           "SLURM_JOB_COMMENT": "vmwrap:v=2," + REQUEST}
    with pytest.raises(UserError, match="has format 2") as e:
        hooks.job_from_env(env, show_job=lambda _jid: {})
    assert not isinstance(e.value, NodeError)


def test_torques_wrapped_script_marker_is_versioned(tmp_path, monkeypatch):
    """Torque carries the request in the wrapped script: its marker line alone is format 1 (what the filter
    writes), ` v=N` a later one; a newer one fails the job naming both formats, never the node."""
    from vmwrap.config import Settings
    from vmwrap_plugins.torque import hooks, jobs, submit

    body = "#!/bin/sh\n#VMWRAP --image=busybox\n{}\nexec x\n"
    assert jobs.wrapped(body.format(jobs.WRAPPED)) and jobs.wrapped(body.format(jobs.WRAPPED + " v=1"))
    assert not jobs.wrapped(body.format("#VMWRAP-TORQUE-WRAPPEDX"))
    with pytest.raises(wire.WireError, match="is not one vmwrap wrote"):
        jobs.wrapped(body.format(jobs.WRAPPED + " gpus=1"))
    with pytest.raises(wire.WireError, match="is not a whole number"):
        jobs.wrapped(body.format(jobs.WRAPPED + " v=99999999999999999999"))
    with pytest.raises(UserError, match="reserves for scripts it wrapped"):  # users cannot forge any format
        submit.check(Settings(), [], body.format(jobs.WRAPPED + " v=1"), "u", 0)

    s = Settings(state_dir=str(tmp_path / "state"), checkpoint_dir=str(tmp_path / "ckpt"))
    monkeypatch.setattr(hooks, "take_out", lambda *a: pytest.fail("the node was taken out"))
    spool = tmp_path / "mom_priv" / "jobs"
    spool.mkdir(parents=True)
    spool.chmod(0o751)
    sc = spool / "7.srv.SC"
    sc.write_text(body.format(f"{jobs.WRAPPED} v={wire.FORMAT + 1}"))
    assert hooks.prologue(s, ["7.srv", "root", "root", "j", "nodes=1", "batch", "", str(sc)], {}) == 0
    err = (s.jobs_dir / "7.srv" / "error").read_text()
    assert err.startswith("user\n") and f"has format {wire.FORMAT + 1}" in err and \
        f"reads formats up to {wire.FORMAT}" in err, err
