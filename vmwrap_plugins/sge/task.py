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
    from vmwrap import agent
    from vmwrap import config as config_mod
    from vmwrap.errors import NodeError

    settings = config_mod.load(None if config == "-" else config)
    try:   # no prolog ran here: the node agent boots this host's VM of the job for its first task
        agent.request(settings, "peer", job, timeout=PEER_START_TIMEOUT)
    except NodeError as e:
        print(f"vmwrap: {e}", file=sys.stderr)
        return 1
    return peer_task(settings, job, command)


PEER_START_TIMEOUT = 900.0   # s: the image may have to be fetched first, as in a prolog


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
