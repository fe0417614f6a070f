"""`srun` inside a vmwrap job's VM, Slurm's side: the guest's srun argv as a checked host srun command.

The argv comes from the guest (hostile): only options whose meaning stays inside this job's
allocation are passed on, each value checked against a strict pattern; options naming host files,
host programs or other jobs (--output, --prolog, --jobid, --bcast, --pty...) are refused with a message
naming them. `-N` and `-w` spread a multi-node job's step over its VMs (srun itself keeps a step
inside its job's nodes), as MPI launchers do (OpenMPI's starts its daemons with `srun --nodelist=...
--cpu-bind=none`). The command and its arguments never reach the host: the task
(vmwrap.steps) has the guest run them. See vmwrap/steps.py for the whole path.
"""

from __future__ import annotations

import os
import re

from vmwrap.errors import UserError

from .commands import SLURM_BIN

SRUN = os.path.join(SLURM_BIN, "srun")

COUNT = re.compile(r"[1-9][0-9]{0,5}")
PATTERNS = {
    "ntasks": COUNT, "cpus-per-task": COUNT, "ntasks-per-node": COUNT,
    "nodes": re.compile(r"[1-9][0-9]{0,5}(-[1-9][0-9]{0,5})?"),
    "job-name": re.compile(r"[A-Za-z0-9._+-]{1,64}"),
    "time": re.compile(r"[0-9][0-9:-]{0,15}"),
    "mem": re.compile(r"[0-9]{1,9}[KMGT]?"), "mem-per-cpu": re.compile(r"[0-9]{1,9}[KMGT]?"),
    "wait": re.compile(r"[0-9]{1,6}"),
    "nodelist": re.compile(r"[A-Za-z0-9][A-Za-z0-9_.,\[\]-]{0,1023}"),   # a host list, never a file
    "cpu-bind": re.compile(r"[a-z_]{1,20}(,[a-z_]{1,20}){0,4}"),
    "mpi": re.compile(r"none"),
}
ALIASES = {"cpu_bind": "cpu-bind"}
FLAGS = {"label", "unbuffered", "quiet", "verbose", "exclusive", "overlap", "exact", "disable-status",
         "kill-on-bad-exit", "overcommit"}
SHORT = {"n": "ntasks", "c": "cpus-per-task", "N": "nodes", "w": "nodelist", "J": "job-name", "t": "time", "W": "wait",
         "l": "label", "u": "unbuffered", "Q": "quiet", "v": "verbose", "X": "disable-status", "K": "kill-on-bad-exit",
         "O": "overcommit"}
ARGV_MAX = 1024


def srun_command(argv: list[str], task: list[str]) -> tuple[int, list[str]]:
    """(index of the command in `argv`, the host srun argv running `task` as the step's tasks)."""
    if len(argv) > ARGV_MAX:
        raise UserError(f"more than {ARGV_MAX} arguments")
    opts: list[str] = []
    named = False
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--":
            i += 1
            break
        if not a.startswith("-") or a == "-":
            break
        if a.startswith("--"):
            name, eq, value = a[2:].partition("=")
            name = ALIASES.get(name, name)
        else:
            name, eq, value = SHORT.get(a[1:2], "?" + a[:2]), "", a[2:]
            eq = "=" if value else ""
        if name in FLAGS and not eq:
            opts.append(f"--{name}")
        elif name in PATTERNS:
            if not eq:
                i += 1
                if i >= len(argv):
                    raise UserError(f"option {a!r} needs a value")
                value = argv[i]
            if not PATTERNS[name].fullmatch(value):
                raise UserError(f"invalid value {value[:80]!r} for --{name}")
            opts.append(f"--{name}={value}")
            named |= name == "job-name"
        else:
            raise UserError(f"srun option {a[:80]!r} is not supported inside a vmwrap VM (supported: "
                            + " ".join(f"--{n}" for n in sorted(FLAGS | set(PATTERNS))) + ")")
        i += 1
    if i >= len(argv):
        raise UserError("no command given to execute")
    if not named:  # as bare: the step is named after its program (sacct's JobName)
        base = re.sub(r"[^A-Za-z0-9._+-]", "_", os.path.basename(argv[i]))[:64] or "step"
        opts.append(f"--job-name={base}")
    return i, [SRUN, *opts, "--", *task]
