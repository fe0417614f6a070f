"""The parity corpus: ordinary batch scripts, each run bare and with `#VMWRAP` on the same cluster in
the same run, and what a user or accounting sees of both (issue 23; docs/parity.md).

A case's script is written the way users write them. `{VMWRAP}` marks where the directive line goes
(at the top when absent); the bare twin gets a plain comment there, so line numbers stay the same.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

DIRECTIVE = "#VMWRAP --image=busybox"


@dataclass(frozen=True)
class Case:
    name: str
    body: str                                    # the script after its #! line
    args: tuple[str, ...] = ()                   # sbatch options
    script_args: tuple[str, ...] = ()            # the script's own arguments
    out: str = "slurm-%j.out"                    # the output file pattern (-o), relative to the work dir
    err: str | None = None                       # -e pattern, if the case splits the streams
    cancel_after: str | None = None              # scancel once this text is in the output file
    before: dict[str, bytes] = field(default_factory=dict)  # files put in the work dir first
    array: int = 0                               # number of array tasks (--array=1-N)
    depends: bool = False                        # --dependency=afterok on a job submitted first
    dir_name: str = ""                           # a work dir name of its own (spaces, non-ASCII)
    timeout: float = 400

    def script(self, vm: bool) -> str:
        line = DIRECTIVE if vm else "# (bare twin)"
        body = self.body if "{VMWRAP}" in self.body else "{VMWRAP}\n" + self.body
        return "#!/bin/sh\n" + body.replace("{VMWRAP}", line)


BIN = "dd if=/dev/zero bs=1024 count=64 2>/dev/null | tr '\\000' '\\377'"

CORPUS: tuple[Case, ...] = (
    Case("exit-0", "echo hello\n"),
    Case("exit-1", "echo out; echo err >&2; exit 1\n"),
    Case("exit-42", "echo before\nexit 42\n"),
    Case("exit-255", "exit 255\n"),
    Case("last-command-fails", "echo a\nfalse\n"),
    Case("kill-term-self", "echo going\nkill -TERM $$\necho never\n"),
    Case("kill-kill-self", "echo going\nkill -KILL $$\necho never\n"),
    Case("kill-segv-self", "kill -SEGV $$\n"),
    Case("exec-exit-5", "exec sh -c 'echo from exec; exit 5'\n"),
    Case("trap-on-exit", "trap 'echo trapped $?' EXIT\nexit 3\n"),
    Case("stderr-only", "echo only-err >&2\n"),
    Case("split-streams", "echo to-out; echo to-err >&2; echo again\n", args=("-o", "o-%j.txt", "-e", "e-%j.txt"),
         out="o-%j.txt", err="e-%j.txt"),
    Case("big-output", "seq 1 200000\nseq 1 50000 >&2\n"),
    Case("binary-output", BIN + "\n"),
    Case("non-utf8", "printf '\\377\\376caf\\351\\n\\000nul\\n'\n"),
    Case("no-trailing-newline", "printf 'no newline'\n"),
    Case("long-line", "printf '%6000s|\\n' x\n"),
    Case("args-with-spaces-and-quotes", 'for a in "$@"; do echo "[$a]"; done\necho "n=$#"\n',
         script_args=("a b", 'c"d', "e'f", "", "$HOME", "*")),
    Case("export-with-spaces-and-equals", 'echo "[$FOO]"; echo "[$BAR]"\n',
         args=("--export=ALL,FOO=x y=z,BAR=",)),
    Case("scheduler-variables", 'echo "$SLURM_JOB_NAME" "$SLURM_NNODES" "$SLURM_NTASKS" "$SLURM_CPUS_ON_NODE"\n'
         '[ -n "$SLURM_JOB_ID" ] && echo has-job-id\n[ "$SLURM_SUBMIT_DIR" = "$PWD" ] && echo in-submit-dir\n',
         args=("-J", "parity vars")),
    Case("job-name-with-spaces", 'echo "[$SLURM_JOB_NAME]"\n', args=("-J", "my job é")),
    Case("stdin-is-empty", 'if read line; then echo "got:$line"; else echo eof; fi\n'),
    Case("umask", "umask\n"),
    Case("files-and-modes", "echo data > f1\nchmod 640 f1\nmkdir -p d/e\nchmod 750 d\nprintf x > d/e/g\n"
         "ln -s f1 link\n: > empty\nchmod 600 empty\nls -ln f1 | cut -c1-10\n"),
    Case("cd-and-write", "mkdir sub && cd sub && pwd | sed 's|.*/||' && echo in-sub > here\n"),
    Case("workdir-with-space-and-non-ascii", "pwd | sed 's|.*/||'\necho ok > 'file é'\n",
         dir_name="work dir é"),
    Case("sbatch-line-after-vmwrap", "{VMWRAP}\n#SBATCH -J late-name\necho \"$SLURM_JOB_NAME\"\n"),
    Case("open-mode-append", "echo appended\n", args=("--open-mode=append", "-o", "log.txt"), out="log.txt",
         before={"log.txt": b"old line\n"}),
    Case("interleaved-streams", "for i in 1 2 3 4 5 6 7 8; do echo out$i; echo err$i >&2; done\n"),
    Case("background-and-wait", "(sleep 1; echo from-bg) &\nwait\necho done\n"),
    Case("pipeline-status", "echo x | grep -q y\necho rc=$?\n"),
    Case("here-document", "cat <<EOF\nline one\n  indented \\$dollar\nEOF\n"),
    Case("array-tasks", 'echo "task $SLURM_ARRAY_TASK_ID of $SLURM_ARRAY_TASK_COUNT"\n',
         args=("-o", "arr-%a.txt"), out="arr-%a.txt", array=3),
    Case("dependency", "echo after-dependency\n", depends=True),
    Case("time-limit", "echo started\nsleep 600\necho never\n", args=("-t", "1")),
    Case("scancel-while-running", "echo started\nsleep 600\necho never\n", cancel_after="started"),
)


def files(root: Path, skip: set[str]) -> dict[str, tuple]:
    """Every file a job left in its work dir: kind, mode, owner and content digest (not times)."""
    seen = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            rel = str(p.relative_to(root))
            if rel in skip:
                continue
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                what = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                what = ("dir",)
            else:
                what = ("file", hashlib.sha256(p.read_bytes()).hexdigest()[:16])
            seen[rel] = what + (oct(stat.S_IMODE(st.st_mode)), st.st_uid, st.st_gid)
    return seen
