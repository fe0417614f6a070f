"""PBS Professional / OpenPBS `queuejob` hook (runs inside pbs_server for every qsub): the job's VM
request, checked before the job is queued.

Uses only what the PBS Hooks Guide documents for a queuejob event: `pbs.event()`, `e.job`,
`e.requestor` (the submitting user), `e.accept()` / `e.reject(message)` (each ends the hook),
`job.Variable_List` (`qsub -v`) and `job.Resource_List` (`qsub -l`, a custom string resource
`vmwrap_image`). A queuejob hook cannot see the job script (it runs before qsub sends it: seen on
OpenPBS 23.06), so `#VMWRAP` lines are the mom's to read; here only the native request is checked.
`e.reject("vmwrap: ...")` makes qsub print `qsub: vmwrap: ...` and exit 32 (seen).

A VM job is one VM on one node: a native request with more than one chunk (`-l select=2:ncpus=1`,
`-l select=1:ncpus=2+1:ncpus=2`, whatever its `place`) or more than one node in the old syntax
(`-l nodes=2`, `-l nodes=1:ppn=4+1:ppn=4`) is rejected. The hook sees them as qsub sent them: it
runs (src/server/req_quejob.c, process_hooks) before the server turns `nodes` into `select` and
`place` (set_select_and_place, src/server/svr_jobfunc.c).
"""

from __future__ import annotations

from vmwrap import directives
from vmwrap.config import Settings
from vmwrap.errors import UserError, VmwrapError
from vmwrap.request import interactive_refusal, one_node

VARIABLE = "VMWRAP_IMAGE"     # qsub -v VMWRAP_IMAGE=NAME
RESOURCE = "vmwrap_image"     # qsub -l vmwrap_image=NAME (qmgr: create resource vmwrap_image type=string)


def _get(mapping, key: str) -> str | None:
    try:
        v = mapping[key]
    except (KeyError, TypeError):
        return None
    return None if v is None else str(v)


def native_image(job) -> str | None:
    """The image named by -v or -l (UserError if they disagree or one is not an image name)."""
    var = _get(job.Variable_List, VARIABLE)
    res = _get(job.Resource_List, RESOURCE)
    for v in (var, res):
        if v is not None:
            directives.check_image_name(v)
    if var and res and var != res:
        raise UserError(f"-v {VARIABLE}={var} but -l {RESOURCE}={res}")
    return var or res


def _leading_count(part: str) -> int:
    """A chunk's (or node spec part's) leading number, 1 without one; a number too long to be meant
    counts as a million."""
    digits = part.lstrip()[:8]
    n = len(digits) - len(digits.lstrip("0123456789"))
    return 1 if n == 0 else (int(digits[:n]) if n <= 6 else 10 ** 6)


def select_chunks(select: str) -> int:
    """Chunks in a select spec: per `+`-separated chunk its leading count, 1 by default
    (parse_chunk_r, src/lib/Libifl/grunt_parse.c)."""
    return sum(_leading_count(c) for c in select.split("+"))


def old_nodes(spec: str) -> int:
    """Nodes in an old-style `nodes=` spec (ctnodes, src/server/resc_attr.c): per `+`-separated part
    its leading number unless a letter follows it (a host name), else 1."""
    total = 0
    for part in spec.split("+"):
        p = part.lstrip()
        digits = p[:len(p) - len(p.lstrip("0123456789"))]
        total += _leading_count(p) if digits and not p[len(digits):len(digits) + 1].isalpha() else 1
    return total


def check_one_node(job) -> None:
    """UserError (the shared multi-node reason) when the job's native request spans chunks or nodes."""
    select = _get(job.Resource_List, "select")
    if select is not None:
        n = select_chunks(select)
        one_node(n, f"-l select asks for {n} chunks",
                 "ask for one chunk with the VM's CPUs and memory: -l select=1:ncpus=N:mem=M")
    nodes = _get(job.Resource_List, "nodes")
    if nodes is not None:
        n = old_nodes(nodes)
        one_node(n, f"-l nodes asks for {n} nodes", "ask for one node: -l select=1:ncpus=N (or -l nodes=1:ppn=N)")


def interactive(job) -> bool:
    """Whether the job is `qsub -I`: its `interactive` attribute (a long: qsub's port for the session;
    unset for batch jobs)."""
    v = getattr(job, "interactive", None)
    return v is not None and v is not False and str(v).strip().lower() not in ("", "0", "false")


def check(settings: Settings, pbs) -> None:
    """The hook's body: accept, or reject with `vmwrap: <reason>`."""
    e = pbs.event()
    try:
        image = native_image(e.job)
        if image is not None:
            import pwd

            from vmwrap.catalog import Catalog

            user = str(e.requestor)
            try:
                gid = pwd.getpwnam(user).pw_gid
            except KeyError:
                gid = None
            Catalog.load(settings.catalog).resolve(image, user, gid)
            if interactive(e.job):  # the session would start on the node, beside the VM
                raise UserError(interactive_refusal("qsub -I", "PBS", "as a batch job"))
            check_one_node(e.job)
    except VmwrapError as err:
        e.reject(f"vmwrap: {err}")
    e.accept()
