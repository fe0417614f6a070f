"""One `pbs_tmrsh` task started from inside a vmwrap job's VM, as pbs_mom spawns it on one of the job's
hosts (vmwrap_plugins/pbs/steps.py made its command line; execjob_launch added this host's config).

The mom starts a TM task as the job's user in its home, stdin /dev/null, its output to the job's
output through the primary host's demux, with PBS_NODENUM the host's place in the job (0: the
primary execution host) (OpenPBS src/resmom/start_exec.c start_process). On the primary host the
job's payload serves the task (vmwrap.steps.task_main: the VM's shim runs the command); on another
host that host's VM of the job, which its own execjob_begin booted, runs it (vmwrap.steps.peer_task).
argv: SOCKET TOKEN JOB -- COMMAND...
"""

from __future__ import annotations

import os
import sys

from vmwrap.steps import peer_task, task_main


def main(settings, argv: list[str]) -> int:
    if len(argv) < 5 or argv[3] != "--":
        print("usage: vmwrap pbs task SOCKET TOKEN JOB -- COMMAND...", file=sys.stderr)
        return 2
    sock, token, job, command = argv[0], argv[1], argv[2], argv[4:]
    # the mom's PBS_NODENUM (pbs_tmrsh hands tm_spawn no environment); a task of the user's own with
    # another only reaches a socket it has no token for, or a VM of the user's job, as the user
    if os.environ.get("PBS_NODENUM") == "0":
        return task_main([sock, token])
    from vmwrap.job import Job
    from vmwrap.errors import UserError

    try:
        Job.check_id(job)
    except UserError as e:
        print(f"vmwrap: {e}", file=sys.stderr)
        return 2
    return peer_task(settings, job, command)
