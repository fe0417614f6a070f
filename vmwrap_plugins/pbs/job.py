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

In the VM, `pbs_tmrsh HOST COMMAND...` (also at $PBS_EXEC/bin/pbs_tmrsh) runs COMMAND in HOST's VM
of the job through the host's own pbs_tmrsh (vmwrap_plugins/pbs/steps.py, task.py), and
$PBS_NODEFILE names a copy of the mom's.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path

from vmwrap import payload as payload_mod, rundir, safeio
from vmwrap.config import Settings
from vmwrap.errors import UserError
from vmwrap.job import validate_host_path
from vmwrap.payload import EXIT_NODE, attach

from .mom import DELETED, SCRIPT_MAX, job_id

STDIN_MAX = 16 << 20
NODEFILE_MAX = 1 << 20   # bytes of $PBS_NODEFILE read (a line per MPI process of the job)
# What a TM client needs besides PBS_JOBID (tm.c tm_init): with them a guest that reaches the host's
# loopback (a NAT image) could tm_spawn outside every VM, past the pbs_tmrsh checks
TM_CREDENTIALS = ("PBS_JOBCOOKIE", "PBS_MOMPORT")


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
    """`ARGS` from execjob_launch: `[--pbs-exec DIR]` (the mom's PBS_EXEC, where pbs_tmrsh is)."""
    pbs_id = os.environ.get("PBS_JOBID", "")
    pbs_exec = None
    try:
        if args[:1] == ["--pbs-exec"] and len(args) >= 2:
            pbs_exec, args = args[1].rstrip("/") or "/", args[2:]
            validate_host_path(pbs_exec, "PBS_EXEC")
        job_id(pbs_id)
        script = script_from_stdin(stdin.read(STDIN_MAX))
    except (UserError, OSError) as e:
        print(f"vmwrap: error: {e}", file=sys.stderr)
        return EXIT_NODE
    return run(settings, pbs_id, script, args, pbs_exec)


def node_hosts(data: bytes | None) -> list[str]:
    """The job's hosts, each once, in $PBS_NODEFILE's order (a line per MPI process; pbs_tmrsh takes
    the first line that is the host it is given)."""
    lines = (data or b"").decode("utf-8", "replace").splitlines()
    return list(dict.fromkeys(ln.strip() for ln in lines if ln.strip()))


def guest_view(run_dir: Path, jid: str, env: dict[str, str], pbs_exec: str | None):
    """(vmwrap.steps' Launch for pbs_tmrsh, the dirs the guest installs its pbs_tmrsh in besides its
    PATH): $PBS_NODEFILE in `env` (the guest's) names a copy of the mom's, read as the job's user,
    no link followed, PATH ends with $PBS_EXEC/bin, where the guest has its pbs_tmrsh, and the TM
    credentials are left out. No launcher without PBS_EXEC (the host's pbs_tmrsh is unknown)."""
    from vmwrap.resources import HOOKS

    from .mom import PAYLOAD
    from .steps import TASK, tmrsh_command

    for k in TM_CREDENTIALS:   # the guest reaches the host only through its checked pbs_tmrsh
        env.pop(k, None)
    data = None
    if env.get("PBS_NODEFILE"):
        try:
            data = safeio.read_capped(env["PBS_NODEFILE"], NODEFILE_MAX)
        except OSError as e:
            print(f"vmwrap: warning: cannot read the job's PBS_NODEFILE: {e.strerror}", file=sys.stderr)
        if data is not None:
            payload_mod.hand_over(run_dir, env, "PBS_NODEFILE", "pbs_nodefile", data)
    if pbs_exec is None:
        return None, ()
    hosts, tmrsh = node_hosts(data), f"{pbs_exec}/bin/pbs_tmrsh"
    # on the host the job's login shell has $PBS_EXEC/bin in PATH from PBS's /etc/profile.d/pbs.sh
    path = env.get("PATH", "")
    if f"{pbs_exec}/bin" not in path.split(":"):
        env["PATH"] = f"{path}:{pbs_exec}/bin" if path else f"{pbs_exec}/bin"

    def launch(argv: list[str], task: list[str]) -> tuple[int, list[str]]:
        # task: [python, -m, vmwrap.steps, SOCKET, TOKEN] as the step server runs it on this host
        return tmrsh_command(argv, [str(HOOKS / PAYLOAD), TASK, *task[3:5], jid], hosts, tmrsh)
    return launch, (f"{pbs_exec}/bin",)


def run(settings: Settings, pbs_id: str, script: str, args: list[str], pbs_exec: str | None = None) -> int:
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
    steps, shim_dirs = guest_view(run_dir, jid, env, pbs_exec)
    rc = attach(run_dir, jid, script, env, args, grace=settings.grace_seconds, settings=settings, requeued=requeued,
                steps=steps, steps_name="pbs_tmrsh", shim_dirs=shim_dirs)
    if (run_dir / HOLD).exists():
        return wait_saved(run_dir)
    return 128 + signal.SIGTERM if any(detached) else rc
