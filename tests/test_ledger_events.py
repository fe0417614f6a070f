"""Every event name the code records is one the ledger accepts: an unknown name raises in
Ledger.record, and callers that swallow errors (accounting only) would lose the record silently."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from vmwrap.ledger import EVENTS

ROOT = Path(__file__).resolve().parent.parent
NAME = re.compile(r"^[a-z]+(_[a-z]+)*$")


def _recorded() -> dict[str, str]:
    found = {}
    for f in sorted((ROOT / "vmwrap").rglob("*.py")) + sorted((ROOT / "vmwrap_plugins").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr in ("record", "_record"):
                for a in node.args:
                    if isinstance(a, ast.Constant) and isinstance(a.value, str) and NAME.match(a.value):
                        found[a.value] = f"{f.relative_to(ROOT)}:{node.lineno}"
                    elif isinstance(a, ast.JoinedStr):  # f"{op}_failed": each op it is called with
                        tail = "".join(v.value for v in a.values if isinstance(v, ast.Constant))
                        if tail == "_failed":
                            for op in ("pause", "resume"):
                                found[op + tail] = f"{f.relative_to(ROOT)}:{node.lineno}"
    return found


def test_every_recorded_event_is_known_to_the_ledger():
    recorded = _recorded()
    assert {"created", "exited", "detached", "wrapper_gone"} <= recorded.keys()  # the scan sees real calls
    unknown = {e: where for e, where in recorded.items() if e not in EVENTS}
    assert not unknown, unknown
