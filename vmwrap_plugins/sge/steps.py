"""`qrsh -inherit` inside a vmwrap job's VM, Grid Engine's side: the guest's argv as a checked host
qrsh command (vmwrap.steps' `Launch`, as vmwrap_plugins/slurm/steps.py is for srun).

MPI launchers start their daemons on a tightly integrated job's other hosts with `qrsh -inherit
[-nostdin] [-V] HOST COMMAND...` (OpenMPI's gridengine launcher, MPICH's hydra). The argv comes from
the guest (hostile): HOST must be one of the job's own hosts, and the options are the few whose
meaning stays inside the job. The command never reaches a host shell: qrsh_starter runs what it is
given through the user's login shell (`$SHELL -c "ARGS JOINED BY SPACES"`), so the host argv holds
only checked words and the guest's command travels as one base64 word, which the task
(vmwrap_plugins.sge.task, on the slave host) decodes and has that host's VM of the job run. In the VM
the command runs as qrsh_starter runs it bare: `/bin/sh -c "WORDS JOINED"`, or the words as they
are with -noshell.
"""

from __future__ import annotations

import base64
import re

from vmwrap.errors import UserError

QRSH = "/usr/bin/qrsh"
FLAGS = {"-nostdin", "-noshell", "-V", "-verbose"}
SHELL = "/bin/sh"   # the guest's: the user's login shell there is unknown (qrsh_starter's fallback)
ARGV_MAX = 1024
ENCODED_MAX = 96 << 10          # qrsh's own command line limit is far above this; the guest's is not
_SAFE = re.compile(r"[A-Za-z0-9_./:=@%+,-]{1,4096}")   # a word no shell splits or expands


def encode_command(command: list[str]) -> str:
    """The guest's command as one shell-inert word (its arguments NUL-separated, base64)."""
    raw = b"\0".join(a.encode("utf-8", "surrogateescape") for a in command)
    word = base64.b64encode(raw).decode()
    if len(word) > ENCODED_MAX:
        raise UserError(f"the command is longer than {ENCODED_MAX * 3 // 4} bytes")
    return word


def decode_command(word: str) -> list[str]:
    try:
        raw = base64.b64decode(word.encode(), validate=True)
    except (ValueError, UnicodeEncodeError):
        raise UserError("the task's command is not what the job's qrsh sent") from None
    return [a.decode("utf-8", "surrogateescape") for a in raw.split(b"\0")]


def qrsh_command(argv: list[str], task: list[str], hosts: list[str]) -> tuple[int, list[str]]:
    """(index of the command in `argv`, the host argv running `task` (checked words: the task program
    and its arguments) on the host the guest's `qrsh -inherit ... HOST COMMAND...` names, with COMMAND
    appended encoded)."""
    if len(argv) > ARGV_MAX:
        raise UserError(f"more than {ARGV_MAX} arguments")
    if "-inherit" not in argv[:1]:
        raise UserError("only `qrsh -inherit HOST COMMAND` runs inside a vmwrap VM (a task on one of the "
                        "job's hosts); submit other work with qsub")
    opts, i = [], 1
    while i < len(argv) and argv[i].startswith("-"):
        if argv[i] not in FLAGS:
            raise UserError(f"qrsh option {argv[i][:80]!r} is not supported inside a vmwrap VM (supported: "
                            "-inherit " + " ".join(sorted(FLAGS)) + ")")
        if argv[i] == "-nostdin":
            opts.append("-nostdin")
        i += 1
    if i >= len(argv):
        raise UserError("no host given to run on")
    host = argv[i]
    if host not in hosts:
        raise UserError(f"host {host[:80]!r} is not one of this job's hosts ({' '.join(hosts[:8])})")
    if i + 1 >= len(argv):
        raise UserError("no command given to execute")
    for w in task:
        if not _SAFE.fullmatch(w):
            raise UserError(f"internal: task word {w[:40]!r} is not shell-inert")
    return i + 1, [QRSH, "-inherit", *opts, host, *task, encode_command(task_command(argv[1:i], argv[i + 1:]))]


def task_command(options: list[str], words: list[str]) -> list[str]:
    """What qrsh_starter runs for the words after HOST: the user's shell with them joined by single
    blanks (MPI launchers send shell syntax: Open MPI's "( test ! -r ./.profile || ...; orted ... )"),
    or with -noshell the words as they are (the guest's shim does the same for its own host's tasks)."""
    return list(words) if "-noshell" in options else [SHELL, "-c", " ".join(words)]
