"""The node's ledger under concurrent hooks: a prolog, an agent and a daemon open it at the same moment."""

from __future__ import annotations

import multiprocessing
import time

from vmwrap.ledger import Ledger


def _open_and_record(args: tuple[str, float]) -> str | None:
    path, at = args
    while time.time() < at:
        pass
    try:
        led = Ledger(path)
        led.record("1", "vmwrap-1", "prepare")
        led.close()
    except Exception as e:   # what the hook would have failed with
        return repr(e)
    return None


def test_hooks_opening_a_nodes_first_ledger_together_all_record(tmp_path):
    """A new ledger is switched to WAL by whoever comes first; SQLite answers the others SQLITE_BUSY
    without waiting. In CI that failed a job's prolog with 'database is locked'."""
    procs, rounds = 6, 40
    errors = []
    with multiprocessing.get_context("fork").Pool(procs) as pool:
        for r in range(rounds):
            path = str(tmp_path / f"ledger{r}.sqlite")
            at = time.time() + 0.05
            errors += [e for e in pool.map(_open_and_record, [(path, at)] * procs) if e]
    assert errors == []
    assert all(len(Ledger(tmp_path / f"ledger{r}.sqlite").events("1")) == procs for r in range(rounds))
