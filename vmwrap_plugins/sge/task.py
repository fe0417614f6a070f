"""One `qrsh -inherit` task started from inside a vmwrap job's VM, as qrsh_starter runs it on one of the
job's hosts (vmwrap_plugins/sge/steps.py made its command line: every word shell-inert).

On the master's host the job's payload serves the task (vmwrap.steps.task_main: the VM's shim runs the
command); on another host of the job that host's VM of the job runs it (vmwrap.steps.peer_task).
argv: SOCKET TOKEN JOB MASTER CONFIG COMMAND (MASTER: execd's name of the master's host; CONFIG: the
payload's --config, '-' for the default; COMMAND: the guest's, encoded).
"""

from __future__ import annotations

import os
import sys

from vmwrap.errors import UserError
from vmwrap.steps import peer_task, task_main

from .steps import decode_command


def main(argv: list[str]) -> int:
    if len(argv) != 6:
        print("usage: python -m vmwrap_plugins.sge.task SOCKET TOKEN JOB MASTER CONFIG COMMAND", file=sys.stderr)
        return 2
    sock, token, job, master, config, word = argv
    if os.environ.get("HOSTNAME", master) == master:
        return task_main([sock, token])
    try:
        command = decode_command(word)
    except UserError as e:
        print(f"vmwrap: {e}", file=sys.stderr)
        return 2
    from vmwrap import config as config_mod

    # Not yet: this host's VM of the job is booted by its node agent for the first task (issue 19,
    # notes/GE_TIGHT_PLAN.md step 4); until then only a host where it runs already serves the task.
    return peer_task(config_mod.load(None if config == "-" else config), job, command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
