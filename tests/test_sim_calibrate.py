"""`vmwrap simulate --calibrate-from LEDGER`: the site's own boot, save, restore, transfer rates."""

import json
import sqlite3

from click.testing import CliRunner

from vmwrap.cli import main
from vmwrap.sim.calibrate import CalibrationError, calibrate
from vmwrap.sim.engine import Cluster

import pytest


def ledger(path, events):
    """A ledger file as vmwrap.ledger writes it: (ts, job, event, detail) rows."""
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE events (id INTEGER PRIMARY KEY, ts REAL NOT NULL, job_id TEXT NOT NULL,"
               " domain TEXT NOT NULL, event TEXT NOT NULL, detail TEXT NOT NULL DEFAULT '{}')")
    for ts, job, ev, d in events:
        db.execute("INSERT INTO events (ts, job_id, domain, event, detail) VALUES (?,?,?,?,?)",
                   (ts, job, f"vmwrap-{job}", ev, json.dumps(d)))
    db.commit()
    db.close()
    return path


SITE = [
    (100, "1", "prepare", {}), (140, "1", "cache_miss", {"bytes": 2_000_000_000}),    # 50 MB/s
    (141, "1", "created", {}), (153, "1", "booted", {"guest_uptime": "9.1"}),         # 12 s
    (500, "1", "saved", {"memory_bytes": 1_000_000_000, "total_s": 4.0}),             # 250 MB/s
    (900, "1", "prepare", {}), (901, "1", "cache_hit", {"bytes": 0}),
    (905, "1", "restored", {"restore_s": 4.5, "total_s": 5.0}),                        # 200 MB/s
    (960, "1", "exited", {}), (963, "1", "destroyed", {}),                             # 3 s down
]


def test_rates_come_from_the_ledger(tmp_path):
    cal = calibrate([ledger(tmp_path / "a.db", SITE)])
    assert cal.boot_s == 15 and cal.save_mb_s == 250 and cal.restore_mb_s == 200
    assert cal.transfer_mb_s == 50
    c = cal.apply(Cluster())
    assert (c.boot_s, c.suspend_mb_s, c.restore_mb_s, c.bandwidth_mb_s) == (15, 250, 200, 50)


def test_cli_uses_the_ledger_and_explicit_options_win(tmp_path):
    p = ledger(tmp_path / "a.db", SITE)
    args = ["simulate", "--synthetic", "--jobs", "30", "--nodes", "8", "--ar-nodes", "2-4",
            "--configs", "vm+reuse-skewed", "--format", "json", "--calibrate-from", str(p)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "save 250.0 MB/s (1 events)" in r.stderr and "image transfer 50.0 MB/s" in r.stderr
    slow = CliRunner().invoke(main, args + ["--bandwidth", "1"])
    assert json.loads(r.stdout)[1]["end_s"] < json.loads(slow.stdout)[1]["end_s"]


@pytest.mark.parametrize("content, why", [
    (b"", "no boot, save, restore or image-transfer events"),
    (b"this is not sqlite at all, just text" * 10, "not a vmwrap ledger"),
])
def test_an_empty_or_malformed_ledger_is_named(tmp_path, content, why):
    p = tmp_path / "site.db"
    if content:
        p.write_bytes(content)
    else:
        ledger(p, [(1, "1", "prepare", {})])
    r = CliRunner().invoke(main, ["simulate", "--synthetic", "--calibrate-from", str(p)])
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert str(p) in r.output and why in r.output, r.output
    with pytest.raises(CalibrationError):
        calibrate([tmp_path / "missing.db"])
