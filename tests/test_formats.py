"""Versioned on-disk formats across upgrades (issue 24): a ledger from before versioning is migrated
with its history, a newer one is refused; a checkpoint of another format is refused naming both
formats, not reported as forged. No VM."""

from __future__ import annotations

import hashlib
import hmac
import json
import sqlite3

import pytest

from vmwrap import __version__, checkpoint, ledger
from vmwrap.errors import CheckpointError, NodeError


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
