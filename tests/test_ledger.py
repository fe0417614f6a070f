"""The node's ledger under concurrent hooks: a prolog, an agent and a daemon open it at the same moment."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from vmwrap.ledger import Ledger

# One hook per process (processes, not forks of the test's threaded worker), opening the round's new
# ledger at the same instant.
HOOK = """
import sys, time
from vmwrap.ledger import Ledger
base, start, rounds = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
for r in range(rounds):
    while time.time() < start + r * 0.1:
        pass
    try:
        led = Ledger(f"{base}/ledger{r}.sqlite")
        led.record("1", "vmwrap-1", "prepare")
        led.close()
    except Exception as e:   # what the hook would have failed with
        print(f"round {r}: {e!r}")
"""


def test_hooks_opening_a_nodes_first_ledger_together_all_record(tmp_path):
    """A new ledger is switched to WAL by whoever comes first; SQLite answers the others SQLITE_BUSY
    without waiting. In CI that failed a job's prolog with 'database is locked'."""
    procs, rounds = 6, 40
    start = time.time() + 2.0      # every process imported and waiting
    hooks = [subprocess.Popen([sys.executable, "-c", HOOK, str(tmp_path), str(start), str(rounds)],
                              cwd=Path(__file__).parent.parent, stdout=subprocess.PIPE, text=True)
             for _ in range(procs)]
    errors = [ln for h in hooks for ln in h.communicate(timeout=120)[0].splitlines()]
    assert errors == []
    assert all(len(Ledger(tmp_path / f"ledger{r}.sqlite").events("1")) == procs for r in range(rounds))
