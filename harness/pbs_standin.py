"""A `pbs` module for PBS hook code in tests: only what the PBS Hooks Guide documents for the events
vmwrap uses (not shipped; no PBS server can be installed here). `e.accept()` and `e.reject(msg)` end
the hook as in pbs_server (a SystemExit the server catches); the outcome is what qsub would print:
a rejection `qsub: <msg>` with exit status 32 (seen on OpenPBS 23.06)."""

from __future__ import annotations

import runpy
import sys
import types

QUEUEJOB = 1
QSUB_REJECT_STATUS = 32


class _Accepted(SystemExit):
    pass


class _Rejected(SystemExit):
    def __init__(self, msg: str):
        super().__init__(1)
        self.msg = msg


class Job:
    def __init__(self, variables: dict[str, str] | None = None, resources: dict[str, str] | None = None):
        self.Variable_List = dict(variables or {})
        self.Resource_List = dict(resources or {})


class Event:
    def __init__(self, type_: int, job: Job, requestor: str):
        self.type = type_
        self.job = job
        self.requestor = requestor

    def accept(self, *_):
        raise _Accepted(0)

    def reject(self, msg: str = ""):
        raise _Rejected(msg)


def module(event: Event) -> types.ModuleType:
    m = types.ModuleType("pbs")
    m.QUEUEJOB = QUEUEJOB
    m.event = lambda: event
    return m


def qsub(hook, event: Event) -> tuple[int, str]:
    """Run a queuejob hook (a callable taking the `pbs` module, or a hook file) for `event`:
    (qsub's exit status, what it prints on stderr)."""
    pbs = module(event)
    saved = sys.modules.get("pbs")
    sys.modules["pbs"] = pbs
    try:
        if callable(hook):
            hook(pbs)
        else:
            runpy.run_path(str(hook), run_name="__main__")
        return 0, ""    # a hook that neither accepts nor rejects accepts
    except _Accepted:
        return 0, ""
    except _Rejected as r:
        return QSUB_REJECT_STATUS, f"qsub: {r.msg}\n"
    finally:
        if saved is None:
            sys.modules.pop("pbs", None)
        else:
            sys.modules["pbs"] = saved
