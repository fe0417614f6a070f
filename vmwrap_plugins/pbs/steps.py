"""`pbs_tmrsh` inside a vmwrap job's VM, PBS's side: the guest's argv as a checked host pbs_tmrsh
command (vmwrap.steps' `Launch`, as vmwrap_plugins/sge/steps.py is for `qrsh -inherit`).

pbs_tmrsh is PBS's rsh for MPI launchers (their rsh agent; docs/multinode.md): `pbs_tmrsh [-n]
[-l USER] HOST [-n] [-l USER] COMMAND...` spawns COMMAND's words through the TM interface on the
job's host HOST (the first line of $PBS_NODEFILE that is HOST), as the job's user, with no shell, and
exits with the task's exit value (OpenPBS src/cmds/pbs_tmrsh.c). The argv comes from the guest
(hostile): HOST must be one of the job's own hosts, -l may only name the job's user (pbs_tmrsh's own
rule), and the host argv holds no word of the guest's before the task program's own words. The task
(`vmwrap pbs task`, through vmwrap/hooks/pbs-job) runs the command in that host's VM of the job.
"""

from __future__ import annotations

import os
import pwd

from vmwrap.errors import UserError

ARGV_MAX = 1024
TASK = "task"    # the payload script's first word for a task (vmwrap/hooks/pbs-job)


def _options(argv: list[str], i: int) -> int:
    """The index after pbs_tmrsh's -n / -l USER options from argv[i] (pbs_tmrsh.c:218-244)."""
    me = pwd.getpwuid(os.getuid()).pw_name
    while i < len(argv) and argv[i].startswith("-"):
        a = argv[i]
        if a == "-n":
            i += 1
        elif a.startswith("-l"):
            user = a[2:] or (argv[i + 1] if i + 1 < len(argv) else "")
            if user != me:
                raise UserError(f"-l {user[:40]!r}: a task runs as the job's user ({me}) only")
            i += 1 if a[2:] else 2
        else:
            raise UserError(f"option {a[:40]!r} is not one of pbs_tmrsh's (-n, -l USER)")
    return i


def tmrsh_command(argv: list[str], task: list[str], hosts: list[str], tmrsh: str) -> tuple[int, list[str]]:
    """(index of the command in `argv`, the host argv: PBS's pbs_tmrsh running `task` (the payload
    script's task words) on the job's host that the guest's `pbs_tmrsh ... HOST COMMAND...` names,
    then COMMAND's words as they are: pbs_tmrsh hands its argv to tm_spawn, no shell reads them)."""
    if len(argv) > ARGV_MAX:
        raise UserError(f"more than {ARGV_MAX} arguments")
    i = _options(argv, 0)
    if i >= len(argv):
        raise UserError("no host given to run on (usage: pbs_tmrsh [-n] [-l user] host command...)")
    host = argv[i]
    if host not in hosts:
        raise UserError(f"host {host[:80]!r} is not one of this job's hosts ({' '.join(hosts[:8])})")
    i = _options(argv, i + 1)
    if i >= len(argv):
        raise UserError("no command given to execute")
    return i, [tmrsh, host, *task, "--", *argv[i:]]
