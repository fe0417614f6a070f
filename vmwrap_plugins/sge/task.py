"""One `qrsh -inherit` task started from inside a vmwrap job's VM, as qrsh_starter runs it on one of the
job's hosts (vmwrap_plugins/sge/steps.py made its command line: every word shell-inert).

On the master's host the job's payload serves the task (vmwrap.steps.task_main: the VM's shim runs the
command); on another host of the job that host's VM of the job runs it (vmwrap.steps.peer_task).
argv: SOCKET TOKEN JOB MASTER COMMAND (MASTER: execd's spool on the master's host; COMMAND: the guest's,
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
    if on_master_host(dict(os.environ), master):
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


def on_master_host(env: dict[str, str], master: str) -> bool:
    """Whether this task runs on the master's host: execd's spool here (from the task's dir, as execd
    set it) is the one the master named (its own); host names may be spelt otherwise (host_aliases:
    this cell's first host is `vm` to qmaster and `localhost` to its execd). A master whose spool did
    not read so names its host."""
    from .hooks import execd_spool

    spool = execd_spool(env.get("SGE_JOB_SPOOL_DIR", ""))
    if master.startswith("/"):
        return spool == master
    return (os.path.basename(env.get("SGE_JOB_SPOOL_DIR", "")).partition(".")[2] or socket.gethostname()) == master


PEER_START_TIMEOUT = 900.0   # s: the image may have to be fetched first, as in a prolog


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
