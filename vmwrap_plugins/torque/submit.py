"""Torque's SUBMITFILTER (torque.cfg): qsub runs it as the submitter, in the submit directory, as
`/bin/sh -c "FILTER 'arg' 'arg' ... >tmpfile"` with qsub's own arguments and the job script on stdin
(src/cmds/qsub_functions.c, get_script). Its stdout becomes the job script qsub then reads `#PBS`
lines from; its stderr reaches the user. Exit 255 makes qsub print "qsub: Your job has been
administratively rejected by the queueing system." and exit 1; another non-zero status "qsub: submit
filter returned an error code, aborting job submission." (Admin Guide, appendix J, torque.cfg).

A VM request is `#VMWRAP --image=NAME` in the script's leading comments or the native
`qsub -v VMWRAP_IMAGE=NAME` (also as `#PBS -v`). The filter checks it against the catalog and the
user's rights, then rewrites the script: the leading comment block stays (qsub reads `#PBS` there),
and the job becomes the vmwrap payload fed the original script through a quoted here-document, which
every Bourne shell reads the same way whether pbs_mom passes the script on stdin or as a file.
Bypassing the filter gains nothing: the prologue (root) checks the request again.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shlex

from vmwrap import directives
from vmwrap.config import Settings
from vmwrap.errors import UserError, VmwrapError
from vmwrap.request import interactive_refusal, one_node
from vmwrap.resources import HOOKS

from .jobs import WRAPPED, marker, node_count

REJECT = 255             # qsub: "administratively rejected"
NATIVE = "VMWRAP_IMAGE"  # qsub -v VMWRAP_IMAGE=NAME
SCRIPT_MAX = 16 << 20


def _variables(value: str) -> dict[str, str]:
    """`-v A=b,C,D=e`: Torque's variable list (a name without '=' takes qsub's own value)."""
    out = {}
    for item in value.split(","):
        k, _, v = item.partition("=")
        out[k.strip()] = v
    return out


def requested_variables(argv: list[str], script: str) -> list[str]:
    """Every VMWRAP_IMAGE given with -v, on qsub's command line or in a `#PBS -v` line."""
    found = []
    args = list(argv)
    for _, line in directives.leading_comment_block(script):
        if line.startswith("#PBS"):
            args += shlex.split(line[4:], comments=False, posix=True) if _splittable(line) else line[4:].split()
    i = 0
    while i < len(args):
        a = args[i]
        val = None
        if a == "-v" and i + 1 < len(args):
            val = args[i + 1]
            i += 1
        elif a.startswith("-v") and len(a) > 2:
            val = a[2:]
        if val is not None:
            vs = _variables(val)
            if NATIVE in vs:
                found.append(vs[NATIVE])
        i += 1
    return found


# qsub's getopt string (Torque 6.1, src/cmds/qsub_functions.c GETOPT_ARGS): the options that take a value.
# glibc's getopt permutes, so an option after the script path is still an option.
_WITH_VALUE = set("aAbcCdDeFiJjkKlLmMNoPpqrSTtuvWw")


def _options(args: list[str]):
    """(option letter, value) of qsub-style arguments, as getopt reads them (`-lnodes=2`, `-l nodes=2`,
    `-Vl nodes=2`; `--` ends the options)."""
    i = 0
    while i < len(args):
        a = args[i]
        i += 1
        if a == "--":
            return
        if not a.startswith("-") or a == "-" or a.startswith("--"):
            continue
        for k, c in enumerate(a[1:], 1):
            if c in _WITH_VALUE:
                if k + 1 < len(a):
                    yield c, a[k + 1:]
                elif i < len(args):
                    yield c, args[i]
                    i += 1
                break
            yield c, ""


def _values(argv: list[str], script: str, letter: str):
    """Every value of option `letter` as qsub takes them: `#PBS` lines of the leading comments
    first, then the command line (a later value wins where they conflict)."""
    sources = [shlex.split(line[4:]) if _splittable(line) else line[4:].split()
               for _, line in directives.leading_comment_block(script) if line.startswith("#PBS")]
    for args in sources + [list(argv)]:
        for opt, val in _options(args):
            if opt == letter:
                yield val


def resource_list(argv: list[str], script: str) -> dict[str, str]:
    """The job's `-l` resources as qsub takes them (the command line overrides `#PBS -l` lines)."""
    out: dict[str, str] = {}
    for val in _values(argv, script, "l"):
        for item in val.split(","):
            k, _, v = item.partition("=")
            out[k.strip()] = v.strip()
    return out


def task_count(argv: list[str], script: str) -> int:
    """Tasks of the job's `-L` requests (Torque 6's NUMA-aware syntax, `-L tasks=N:lprocs=M:...`, one
    request per -L, each of N tasks; `tasks` defaults to 1), #PBS lines and command line together."""
    total = 0
    for val in _values(argv, script, "L"):
        fields = dict(f.partition("=")[::2] for f in val.split(":"))
        total += node_count(fields["tasks"]) if fields.get("tasks") else 1
    return total


def _splittable(line: str) -> bool:
    try:
        shlex.split(line)
        return True
    except ValueError:
        return False


def shell_option(argv: list[str], script: str) -> bool:
    """Whether the job names its shell (-S) on the command line or in a #PBS line."""
    if any(a == "-S" or a.startswith("-S") for a in argv):
        return True
    return any(line.startswith("#PBS") and "-S" in line[4:].split()
               for _, line in directives.leading_comment_block(script))


def one_node_resources(resources: dict[str, str]) -> None:
    """UserError (multi_node_refusal) when a `-l` resource list may put the job on several nodes: at
    qsub (the filter) and again in the prologue (pbs_mom's list, after any `qalter -l`)."""
    fix = "ask for one node with its processors: -l nodes=1:ppn=N"
    nodes = resources.get("nodes")
    if nodes is not None:
        n = node_count(nodes)
        one_node(n, f"-l nodes asks for {n} nodes", fix)
    procs = resources.get("procs")
    if procs is not None:
        # procs=N: N processors "from one or more qualified nodes" (Torque's own words): the scheduler
        # may spread them, so only one is certain to be one node.
        n = node_count(procs)
        one_node(n, f"-l procs={n} lets Torque take its processors from several nodes", fix)


def check(settings: Settings, argv: list[str], script: str, user: str, gid: int) -> str | None:
    """The image the job asks for (None: no VM); UserError with the reason for a request to refuse."""
    if "\0" in script:
        raise UserError("the job script contains NUL bytes")
    if any(marker(line) for _, line in directives.leading_comment_block(script)):
        raise UserError(f"the script contains {WRAPPED}, which vmwrap reserves for scripts it wrapped")
    req = directives.parse(script)
    native = None
    for v in requested_variables(argv, script):
        directives.check_image_name(v)
        if native is not None and v != native:
            raise UserError(f"-v {NATIVE} is given twice, as {native!r} and {v!r}")
        native = v
    if req.image and native and req.image != native:
        raise UserError(f"the script asks for image {req.image!r} but -v {NATIVE}={native}")
    image = req.image or native
    if image is None:
        if any(x is not None for x in (req.memory_mib, req.cpus, req.on_lost_checkpoint)):
            raise UserError("#VMWRAP options without an image: add --image=NAME (or qsub -v VMWRAP_IMAGE=NAME)")
        return None
    from vmwrap.catalog import Catalog

    Catalog.load(settings.catalog).resolve(image, user, gid, memory_mib=req.memory_mib, cpus=req.cpus)
    if any(True for _ in _values(argv, script, "I")):  # the session would start on the node, beside the VM
        raise UserError(interactive_refusal("qsub -I", "Torque", "as a batch job"))
    one_node_resources(resource_list(argv, script))
    tasks = task_count(argv, script)
    one_node(tasks, f"-L asks for {tasks} tasks, which Torque may place on several nodes",
             "ask for one task with its processors: -L tasks=1:lprocs=N")
    return image


def rewrite(script: str, image: str, argv: list[str], config_path: str | None) -> str:
    """The job script qsub submits: the original's leading comments (its #PBS lines), the image when
    it came from -v, the mark, and the payload reading the original from a here-document."""
    lines = script.splitlines(keepends=True)
    head: list[str] = []
    for ln in lines:
        s = ln.strip()
        if s == "" or s.startswith("#"):
            head.append(ln if ln.endswith("\n") else ln + "\n")
            continue
        break
    if directives.parse(script).image is None:
        head.append(f"#VMWRAP --image={image}\n")
    if not shell_option(argv, script):
        head.append("#PBS -S /bin/sh\n")  # the wrapper is Bourne shell (the job's own runs in the VM)
    body = script if script.endswith("\n") or not script else script + "\n"
    present = {ln.rstrip("\n") for ln in lines}
    while (end := f"VMWRAP_SCRIPT_{secrets.token_hex(8)}") in present:
        pass
    cmd = [str(HOOKS / "torque-job")] + (["--config", config_path] if config_path else [])
    return ("".join(head) + WRAPPED + "\n"
            + f"exec {' '.join(shlex.quote(c) for c in cmd)} \"$@\" <<'{end}'\n" + body + end + "\n")


def run(settings: Settings, argv: list[str], stdin, stdout, stderr, config_path: str | None) -> int:
    """The filter itself (the submitter's process): exit 0 with the script on stdout, or REJECT."""
    raw = stdin.buffer.read(SCRIPT_MAX + 1) if hasattr(stdin, "buffer") else stdin.read(SCRIPT_MAX + 1)
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "surrogateescape")
    if len(raw) > SCRIPT_MAX:
        stderr.write(f"vmwrap: the job script is larger than {SCRIPT_MAX >> 20} MiB\n")
        return REJECT
    me = pwd.getpwuid(os.getuid())
    try:
        image = check(settings, argv, raw, me.pw_name, os.getgid())
    except VmwrapError as e:
        stderr.write(f"vmwrap: {e}\n")
        stderr.flush()
        return REJECT
    out = raw if image is None else rewrite(raw, image, argv, config_path)
    if hasattr(stdout, "buffer"):
        stdout.buffer.write(out.encode("utf-8", "surrogateescape"))
    else:
        stdout.write(out)
    stdout.flush()
    return 0
