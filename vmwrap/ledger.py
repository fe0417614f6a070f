"""Node-local SQLite record of every VM's life: accounting and `vmwrap ps` read it.

The schema is versioned (SQLite's user_version): opening a ledger applies the MIGRATIONS it lacks, in
one transaction, so an upgraded node keeps its history; a ledger newer than this vmwrap (a downgrade)
is refused with the reason instead of being written in a shape its readers do not expect."""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import time
from pathlib import Path

from .errors import NodeError

EVENTS = ("prepare", "created", "booted", "started", "paused", "resumed", "saved", "restored", "exited",
          "destroyed", "failed", "cache_hit", "cache_miss", "prestage", "save_failed", "plan",
          "detached", "wrapper_gone", "pause_failed", "resume_failed", "reconciled", "drained",
          "checkpointed", "checkpoint_failed", "stale_run", "shell")


# MIGRATIONS[n] takes a ledger from schema n-1 to n. 1: the events table (ledgers from before versioning
# have it already and are at user_version 0: IF NOT EXISTS makes that step a no-op for them).
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: ("CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY, ts REAL NOT NULL, job_id TEXT NOT NULL,"
        " domain TEXT NOT NULL, event TEXT NOT NULL, detail TEXT NOT NULL DEFAULT '{}')",
        "CREATE INDEX IF NOT EXISTS events_job ON events(job_id)"),
}
SCHEMA = max(MIGRATIONS)
OPEN_TIMEOUT = 30.0   # s: how long a hook waits for the ledger others are writing


class Ledger:
    def __init__(self, path: str | os.PathLike):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + OPEN_TIMEOUT
        while True:
            self.db = sqlite3.connect(str(path), timeout=OPEN_TIMEOUT, isolation_level=None)
            try:
                self.db.execute("PRAGMA journal_mode=WAL")
                self._migrate(str(path))
                return
            except sqlite3.OperationalError as e:
                # Switching a new ledger to WAL, or opening one while its last user cleans up, answers
                # SQLITE_BUSY at once, without SQLite's busy handler: two hooks opening a node's first
                # ledger together failed a job ("database is locked"). Wait as SQLite would.
                self.db.close()
                if getattr(e, "sqlite_errorcode", 0) & 0xff != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def _migrate(self, path: str) -> None:
        have = self.db.execute("PRAGMA user_version").fetchone()[0]
        if have == SCHEMA or (have < SCHEMA and not os.access(path, os.W_OK)):
            return  # current; or a reader (`vmwrap ps` as a user): root's next write migrates it
        self.db.execute("BEGIN IMMEDIATE")  # one process migrates; the others wait, then see it done
        try:
            have = self.db.execute("PRAGMA user_version").fetchone()[0]
            if have > SCHEMA:
                raise NodeError(f"ledger {path} has schema {have}, newer than this vmwrap's {SCHEMA} "
                                "(vmwrap was downgraded): reinstall the newer vmwrap or move the ledger aside")
            for n in range(have + 1, SCHEMA + 1):
                for sql in MIGRATIONS[n]:
                    self.db.execute(sql)
            self.db.execute(f"PRAGMA user_version = {SCHEMA}")
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def record(self, job_id: str, domain: str, event: str, **detail) -> None:
        if event not in EVENTS:
            raise ValueError(f"unknown ledger event {event}")
        try:
            self.db.execute(
                "INSERT INTO events (ts, job_id, domain, event, detail) VALUES (?,?,?,?,?)",
                (time.time(), job_id, domain, event, json.dumps(detail, sort_keys=True)),
            )
        except sqlite3.OperationalError as e:
            # A full state disk loses this record, not the job or the node (prologs record first).
            if getattr(e, "sqlite_errorcode", None) != sqlite3.SQLITE_FULL:
                raise
            print(f"vmwrap: ledger full, {event} of job {job_id} not recorded: {e}", file=sys.stderr)

    def events(self, job_id: str | None = None) -> list[dict]:
        q = "SELECT ts, job_id, domain, event, detail FROM events"
        args: tuple = ()
        if job_id is not None:
            q += " WHERE job_id = ?"
            args = (job_id,)
        rows = self.db.execute(q + " ORDER BY id", args).fetchall()
        return [dict(ts=r[0], job_id=r[1], domain=r[2], event=r[3], detail=json.loads(r[4])) for r in rows]

    def last_events(self) -> dict[str, dict]:
        """Latest event per job, for `vmwrap ps`."""
        rows = self.db.execute(
            "SELECT ts, job_id, domain, event, detail FROM events WHERE id IN (SELECT MAX(id) FROM events GROUP BY job_id)"
        ).fetchall()
        return {r[1]: dict(ts=r[0], job_id=r[1], domain=r[2], event=r[3], detail=json.loads(r[4])) for r in rows}

    def provenance(self) -> dict[str, dict]:
        """Per job, the image its VM last booted or was restored from: {image, digest, origin}.
        Records from before provenance was kept (older ledgers) give None for what they lack."""
        rows = self.db.execute(
            "SELECT job_id, detail FROM events WHERE id IN (SELECT MAX(id) FROM events"
            " WHERE event IN ('created', 'restored') GROUP BY job_id)"
        ).fetchall()
        out = {}
        for job, raw in rows:
            d = json.loads(raw)
            out[job] = {k: d.get(k) for k in ("image", "digest", "origin")}
        return out

    def close(self) -> None:
        self.db.close()
