"""A job's VM request resolved against the catalog, its allocation and this node: what will boot.

Resolving has no side effects (no fetch, no files): the prolog, `vmwrap run` and the tests call it
alike. How big a VM is follows vmwrap/sizing.py, the rule the gap planner uses too."""

from __future__ import annotations

import os
from dataclasses import dataclass

from . import directives, sizing
from .catalog import Catalog, Image
from .config import Settings
from .errors import UserError
from .job import Job


ONE_NODE = "a vmwrap job runs in one VM on one node"


def multi_node_refusal(asked: str, fix: str) -> str:
    """Why a VM request for more than one node is refused, in the same words on every scheduler:
    `asked` is what the job asked for in its scheduler's terms ("asked for 2 nodes", "-l select=2:..."),
    `fix` what to submit instead ("submit with -N 1"). Slurm's job_submit.lua says the same."""
    return f"multi-node jobs are not supported yet ({asked}): {ONE_NODE}; {fix}"


def interactive_refusal(command: str, scheduler: str, submit: str, where: str = "node") -> str:
    """Why an interactive job asking for an image is refused where the scheduler's session would start
    beside the VM, in the same words on every scheduler: `command` is how it was asked ("qsub -I"),
    `submit` how to submit the work instead ("with qsub"), `where` the host the job runs on."""
    return (f"interactive jobs ({command}) cannot run in a VM under {scheduler} yet: submit the work {submit}; "
            f"`vmwrap shell JOBID` on its {where} then opens a shell in its VM")


def one_node(nodes: int, asked: str, fix: str) -> None:
    """The rule: a VM job spans one node (UserError with multi_node_refusal otherwise)."""
    if nodes > 1:
        raise UserError(multi_node_refusal(asked, fix))


@dataclass
class VmRequest:
    """The validated request: which image, how many CPUs, how much memory."""

    image: Image
    cpus: int
    memory_mib: int


def resolve(job: Job, settings: Settings, catalog: Catalog) -> VmRequest:
    """Merge directives, scheduler allocation, image and site defaults; refuse what cannot fit.

    Whichever source sizes the VM's memory (sizing.memory_mib), it may not exceed the scheduler's
    allocation (job.memory_mib, filled by the scheduler plugin from what the scheduler itself granted)
    nor the site's max_memory_mib: a VM never holds more memory than its job was given, whatever the
    job's own request says."""
    req = directives.parse(job.script)
    name = req.image or job.image
    if not name:
        raise UserError("no image requested: add '#VMWRAP --image=NAME' to the job script")
    image = catalog.resolve(name, job.user, job.gid, memory_mib=req.memory_mib, cpus=req.cpus)
    cpus = sizing.cpus(req.cpus, job.cpus, image, settings)
    mem, what = sizing.memory_mib(req.memory_mib, image, settings)
    if job.cpus and req.cpus and req.cpus > job.cpus:
        raise UserError(f"--cpus={req.cpus} is more than the job's allocation of {job.cpus} CPUs")
    if job.memory_mib is not None and mem > job.memory_mib:
        hint = "" if req.memory_mib else "; ask the scheduler for more memory or '#VMWRAP --memory=' less"
        raise UserError(f"{what} is more than the job's allocation of {job.memory_mib}M{hint}")
    if settings.max_memory_mib and mem > settings.max_memory_mib:
        raise UserError(f"{what} is more than this site's limit of {settings.max_memory_mib}M per VM")
    ncpu = os.cpu_count() or 1
    if cpus > ncpu:
        raise UserError(f"the job asks for {cpus} CPUs; this node has {ncpu}")
    total = sizing.host_memory_mib()
    if mem > total:
        raise UserError(f"the job asks for {mem}M of memory; this node has {total}M")
    if mem < sizing.MIN_MEMORY_MIB:
        raise UserError(f"{mem}M of memory is too little to boot a guest (minimum {sizing.MIN_MEMORY_MIB}M)")
    return VmRequest(image, cpus, mem)


def on_lost_checkpoint(job: Job) -> str | None:
    """The job's --on-lost-checkpoint: its script's directive, else what its scheduler carried."""
    return directives.parse(job.script).on_lost_checkpoint or job.on_lost_checkpoint
