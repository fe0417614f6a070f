"""One `qrsh -inherit` task started from inside a vmwrap job's VM, as qrsh_starter runs it on one of the
job's hosts (vmwrap_plugins/sge/steps.py made its command line: every word shell-inert).

On the master's host the job's payload serves the task (vmwrap.steps.task_main: the VM's shim runs the
command); on another host of the job that host's VM of the job runs it (vmwrap.steps.peer_task).
argv: SOCKET TOKEN JOB MASTER COMMAND (MASTER: execd's spool on the master's host; COMMAND: the guest's,
encoded). This host's config: $VMWRAP_CONFIG as this host's starter set it from its own command line.
"""

from __future__ import annotations

import os
import random
import socket
import sys
import time

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
    from vmwrap import config as config_mod
    from vmwrap.errors import NodeError

    settings = config_mod.load()
    try:   # no prolog ran here: the node agent boots this host's VM of the job for its first task
        start_peer(settings, job)
    except NodeError as e:
        print(f"vmwrap: {e}", file=sys.stderr)
        return 1
    return peer_task(settings, job, command)


def start_peer(settings, job: str) -> None:
    """Have this host's agent boot (or find) the job's VM here. A job's tasks may all start at once, more
    than the agent serves a user at a time (vmwrap.agent.MAX_CLIENTS_PER_UID, the others waiting for the
    boot): a task the agent turned away as busy asks again, until PEER_START_TIMEOUT."""
    from vmwrap import agent

    deadline = time.monotonic() + PEER_START_TIMEOUT
    delay = PEER_RETRY_FIRST
    while True:
        try:
            agent.request(settings, "peer", job, timeout=max(1.0, deadline - time.monotonic()))
            return
        except agent.Busy:
            if time.monotonic() + delay >= deadline:
                raise
        time.sleep(delay * random.uniform(0.5, 1.0))   # tasks turned away together come back apart
        delay = min(delay * 2, PEER_RETRY_MAX)


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
PEER_RETRY_FIRST, PEER_RETRY_MAX = 0.2, 5.0   # s between asks of a busy agent: doubling, at most


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
