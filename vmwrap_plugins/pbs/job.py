"""The PBS job's payload (the job's user): what execjob_launch put in place of the login shell.

pbs_mom execs it as the job's user, in the home directory, with the login shell's stdin and output
(start_exec.c): on a default build (SHELL_INVOKE=1) stdin carries one line, the path of the spooled
script `PBS_HOME/mom_priv/jobs/<ID>.SC` (chowned to the user, `[`/`]` escaped with a backslash, after
`cd DIR;` with sandbox=PRIVATE); built with --disable-shell-pipe it is the script itself. The script
runs in the VM the execjob_begin hook booted; our stdout/stderr are the job's .o/.e and our exit
status is the job's. `qsig -s suspend` stops this process (SIGSTOP) and execjob_postsuspend pauses
the VM; qdel's SIGTERM (after execjob_preterm marked the run dir) asks the guest's job to stop;
qrerun's SIGTERM (no such mark) detaches, and execjob_end saves the VM for the next run; qhold's
checkpoint_abort action marks the run dir, we detach and leave once it saved the VM. After qrls the
restart action (root, then the job's user) restores the VM and runs `run` in place of this payload.
"""

from __future__ import annotations

import os
import re
import signal
import sys

from vmwrap import rundir, safeio
from vmwrap.config import Settings
from vmwrap.errors import UserError
from vmwrap.payload import EXIT_NODE, attach

from .mom import DELETED, SCRIPT_MAX, job_id

STDIN_MAX = 16 << 20


def script_from_stdin(data: bytes) -> str:
    """The job script: the file stdin names (SHELL_INVOKE=1), else stdin itself."""
    text = data.decode("utf-8", "surrogateescape")
    line = text.strip()
    if "\n" not in line:
        line = re.sub(r"^cd [^;\n]*;", "", line).replace("\\[", "[").replace("\\]", "]")
        if line.startswith("/") and line.endswith(".SC") and "/mom_priv/jobs/" in line:
            raw = safeio.read_capped(line, SCRIPT_MAX)
            if raw is None:
                raise UserError(f"cannot read the job script {line[:200]}")
            return raw.decode("utf-8", "surrogateescape")
    return text


def payload(settings: Settings, stdin, args: list[str]) -> int:
    pbs_id = os.environ.get("PBS_JOBID", "")
    try:
        job_id(pbs_id)
        script = script_from_stdin(stdin.read(STDIN_MAX))
    except (UserError, OSError) as e:
        print(f"vmwrap: error: {e}", file=sys.stderr)
        return EXIT_NODE
    return run(settings, pbs_id, script, args)


def run(settings: Settings, pbs_id: str, script: str, args: list[str]) -> int:
    """Attach to the job's VM (booted by execjob_begin, or restored by the restart action)."""
    from .action import HOLD, wait_saved, watch_hold

    try:
        jid = job_id(pbs_id)
    except UserError as e:
        print(f"vmwrap: error: {e}", file=sys.stderr)
        return EXIT_NODE
    run_dir = rundir.path(settings, jid)
    if not run_dir.exists():
        print(f"vmwrap: error: job {pbs_id} has no VM on this node: is vmwrap's execjob_begin hook enabled?",
              file=sys.stderr)
        return EXIT_NODE
    env = {k: v for k, v in os.environ.items() if k != "VMWRAP_CONFIG"}
    # A SIGTERM without execjob_preterm's mark is qrerun's (or a limit's, or `qsig -s TERM`): detach
    # and leave the VM to execjob_end, which saves it for a rerun and destroys it otherwise; the job
    # then ends as killed by SIGTERM (a rerun's status is the mom's JOB_EXEC_RERUN all the same).
    # qhold: the checkpoint_abort action marks the run dir (HOLD), we signal ourselves, detach the
    # same way and leave once it saved the VM.
    detached: list[bool] = []

    def requeued() -> bool:
        detached.append(not (run_dir / DELETED).exists())
        return detached[-1]

    watch_hold(run_dir)
    rc = attach(run_dir, jid, script, env, args, grace=settings.grace_seconds, settings=settings, requeued=requeued)
    if (run_dir / HOLD).exists():
        return wait_saved(run_dir)
    return 128 + signal.SIGTERM if any(detached) else rc
