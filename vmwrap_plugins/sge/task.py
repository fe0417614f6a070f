"""One `qrsh -inherit` task started from inside a vmwrap job's VM, as qrsh_starter runs it on one of the
job's hosts (vmwrap_plugins/sge/steps.py made its command line: every word shell-inert).

On the master's host the job's payload serves the task (vmwrap.steps.task_main: the VM's shim runs the
command); on another host of the job that host's VM of the job runs it (vmwrap.steps.peer_task).
argv: SOCKET TOKEN JOB MASTER COMMAND (MASTER: execd's name of the master's host; COMMAND: the guest's,
encoded). This host's config: $VMWRAP_CONFIG as this host's starter set it from its own command line.
"""

from __future__ import annotations

import os
import socket
import sys

from vmwrap.errors import UserError
from vmwrap.steps import peer_task, task_main

from .steps import decode_command


def main(argv: list[str]) -> int:
    if len(argv) != 5:
        print("usage: python -m vmwrap_plugins.sge.task SOCKET TOKEN JOB MASTER COMMAND", file=sys.stderr)
        return 2
    sock, token, job, master, word = argv
    if this_host(os.environ) == master:
        return task_main([sock, token])
    try:
        command = decode_command(word)
    except UserError as e:
        print(f"vmwrap: {e}", file=sys.stderr)
        return 2
    from vmwrap import agent
    from vmwrap import config as config_mod
    from vmwrap.errors import NodeError

    settings = config_mod.load()
    try:   # no prolog ran here: the node agent boots this host's VM of the job for its first task
        agent.request(settings, "peer", job, timeout=PEER_START_TIMEOUT)
    except NodeError as e:
        print(f"vmwrap: {e}", file=sys.stderr)
        return 1
    return peer_task(settings, job, command)


def this_host(env: dict[str, str]) -> str:
    """execd's name of the host this task runs on: the last part of its task dir
    (`.../active_jobs/JOB.1/<pe task>.<host>`), the name GE wrote in the pe_hostfile the master was
    compared by. GE sets no HOSTNAME for a task; the system's own name may be another spelling."""
    pe_task, dot, host = os.path.basename(env.get("SGE_JOB_SPOOL_DIR", "")).partition(".")
    if pe_task.isdigit() and dot and host:
        return host
    return socket.gethostname()


PEER_START_TIMEOUT = 900.0   # s: the image may have to be fetched first, as in a prolog


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
