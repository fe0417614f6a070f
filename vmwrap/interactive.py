"""An interactive job that is a VM (`salloc --container=IMAGE`): the job's payload keeps the VM's job
running while the caller's terminal is a `vmwrap shell` session in it; the session's end is the job's.

Why this shape: the payload already does everything a job's VM needs from its user's side (the start
signal, the job's environment, steps inside the VM, its end), and `vmwrap shell` already gives a real
terminal in the VM; an interactive job is the two together, with nothing to run but the shell."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable

from . import payload, rundir, shell
from .config import Settings
from .errors import VmwrapError

# The job's "script": it only keeps the job running until the session ends (then it is terminated).
HOLD = "#!/bin/sh\n# vmwrap: an interactive job; its terminal is a vmwrap shell session\nwhile :; do sleep 86400; done\n"


class _PayloadEnded(Exception):
    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


def _exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def session(settings: Settings, job_id: str, environment: dict[str, str],
            steps: Callable | None = None) -> int:
    """Run the job's payload (in a child) and a shell session in its VM on this process's terminal;
    returns the session's exit status, or the payload's when the job ended first (e.g. its VM failed:
    the payload has printed why)."""
    run_dir = rundir.path(settings, job_id)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the payload: stdin is not the terminal's (the session owns it)
        rc = payload.EXIT_NODE
        try:
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            rc = payload.attach(run_dir, job_id, HOLD, environment, grace=settings.grace_seconds,
                                settings=settings, steps=steps)
        except BaseException:  # a bug of ours: said, not swallowed by os._exit
            import traceback

            traceback.print_exc()
        finally:
            os._exit(rc)

    def reaped(_sig, _frame):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            raise _PayloadEnded(_exit_code(status))

    signal.signal(signal.SIGCHLD, reaped)
    try:
        reaped(signal.SIGCHLD, None)  # a payload that ended before the handler was there
        status = shell.run(settings, job_id)
    except _PayloadEnded as ended:
        return ended.code
    except VmwrapError as e:  # no session at all: the payload says why, if it can
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        code = _wait(pid, 5.0)
        if code is not None:
            return code
        sys.stderr.write(f"vmwrap: error: {e}\n")
        _stop(pid, settings.grace_seconds)
        return shell.LOST
    finally:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    _stop(pid, settings.grace_seconds)
    return status


def _wait(pid: int, seconds: float) -> int | None:
    """The payload's exit code once it ended, or None if it still runs after `seconds`."""
    end = time.monotonic() + seconds
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return _exit_code(status)
        if time.monotonic() >= end:
            return None
        time.sleep(0.05)


def _stop(pid: int, grace: float) -> None:
    """End the payload (it ends the VM's job); killed if it outlives the grace period."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    if _wait(pid, grace + 10) is None:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
