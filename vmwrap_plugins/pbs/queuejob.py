"""PBS Professional / OpenPBS `queuejob` hook (runs inside pbs_server for every qsub): the job's VM
request, checked before the job is queued.

Uses only what the PBS Hooks Guide documents for a queuejob event: `pbs.event()`, `e.job`,
`e.requestor` (the submitting user), `e.accept()` / `e.reject(message)` (each ends the hook),
`job.Variable_List` (`qsub -v`) and `job.Resource_List` (`qsub -l`, a custom string resource
`vmwrap_image`). A queuejob hook cannot see the job script (it runs before qsub sends it: seen on
OpenPBS 23.06), so `#VMWRAP` lines are the mom's to read; here only the native request is checked.
`e.reject("vmwrap: ...")` makes qsub print `qsub: vmwrap: ...` and exit 32 (seen).

A request over several chunks (`-l select=2:ncpus=2`, old-style `-l nodes=2:ppn=2`) is a multi-node
VM job: every host its chunks land on runs a VM of the job (vmwrap_plugins/pbs/mom.py).
"""

from __future__ import annotations

from vmwrap import directives
from vmwrap.config import Settings
from vmwrap.errors import UserError, VmwrapError
from vmwrap.request import interactive_refusal

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
    except VmwrapError as err:
        e.reject(f"vmwrap: {err}")
    e.accept()
