"""Slurm glue: translate slurmd's prolog/epilog environment and the batch step into core calls."""

from __future__ import annotations

import os
import pwd
import re
import subprocess
import sys
import time
from pathlib import Path

from vmwrap import jobnet, lifecycle, payload, rundir, wire
from vmwrap.config import Settings
from vmwrap.errors import UserError, VmwrapError
from vmwrap.job import Job

from .commands import SCONTROL, SQUEUE
from .steps import srun_command

# What the root prolog/epilog keep of slurmd's environment (vmwrap.rootenv drops everything else);
# slurmd sets these itself. SLURM_CONF: the slurm.conf scontrol must read to drain this node.
ROOT_ENV = ("SLURM_JOB_ID", "SLURM_JOB_USER", "SLURM_JOB_UID", "SLURM_JOB_GID", "SLURM_JOB_WORK_DIR",
            "SLURM_JOB_CPUS_PER_NODE", "SLURM_JOB_RESTART_COUNT", "SLURM_JOB_COMMENT", "SLURM_JOB_PARTITION",
            "SLURMD_NODENAME", "SLURM_SCRIPT_CONTEXT", "SLURM_JOB_EXIT_CODE", "SLURM_JOB_EXIT_CODE2",
            "SLURM_JOB_DERIVED_EC", "SLURM_CONF", "SLURM_JOB_NODELIST", "SLURM_NODELIST")

# job_submit.lua puts it above the user's script; the batch step runs what follows it.
MARKER = "#VMWRAP-ORIGINAL-SCRIPT"


def _clip(s: str, n: int = 80) -> str:
    return repr(s[:n]) + (f"... ({len(s)} characters)" if len(s) > n else "")


_CPUS_PER_NODE = re.compile(r"(\d{1,5})(?:\(x\d{1,5}\))?(?:,.*)?", re.S)


def allocated_cpus(value: str | None) -> int | None:
    """SLURM_JOB_CPUS_PER_NODE looks like '2', '2(x3)' or '4,2(x2)': this node's count is the first.
    None when it is missing or not of that form."""
    m = _CPUS_PER_NODE.fullmatch(value or "")
    return int(m.group(1)) if m else None


def _env_int(env: dict[str, str], name: str, digits: int, default: int | None = None) -> int:
    v = env.get(name) or ""
    if not v and default is not None:
        return default
    if not re.fullmatch(rf"\d{{1,{digits}}}", v):
        raise UserError(f"{name}={_clip(v)} from slurmd is not a number of at most {digits} digits")
    return int(v)


# A memory size as scontrol prints it: 512M, 1.50G, 3000M (MiB unless a unit says otherwise).
_SIZE = r"(\d{1,12})(?:\.(\d{1,6}))?([KMGTP]?)"
_MIB = {"": 1, "K": 1 / 1024, "M": 1, "G": 1024, "T": 1024**2, "P": 1024**3}
_MEM_NODE = re.compile(r"(?:^|\s)MinMemoryNode=" + _SIZE + r"(?=\s|$)")
_MEM_CPU = re.compile(r"(?:^|\s)MinMemoryCPU=" + _SIZE + r"(?=\s|$)")
_TRES = re.compile(r"(?:^|\s)(?:Alloc)?TRES=(\S{0,1000})")
_TRES_MEM = re.compile(r"(?:^|,)mem=" + _SIZE + r"(?=,|$)")


def _size_mib(m: re.Match) -> int:
    return int(float(f"{m.group(1)}.{m.group(2) or 0}") * _MIB[m.group(3)])


def allocated_memory_mib(show_job: str, cpus: int | None) -> int | None:
    """The memory Slurm allocated the job on this node, in MiB, from `scontrol show job -o` output;
    None when the job has none (Slurm without memory as a consumable resource).

    MinMemoryNode (0: the whole node, then TRES says how much), MinMemoryCPU x this node's CPUs and
    the mem of TRES/AllocTRES (the whole job's: at least this node's) are each a ceiling, so the least
    is taken. Users write other fields of that line (JobName, Comment, WorkDir may hold spaces and
    'MinMemoryNode=...'): a forged field can only lower the least, never raise it."""
    found = [v for v in (_size_mib(m) for m in _MEM_NODE.finditer(show_job)) if v > 0]
    if cpus:
        found += [v * cpus for v in (_size_mib(m) for m in _MEM_CPU.finditer(show_job)) if v > 0]
    for t in _TRES.finditer(show_job):
        found += [v for v in (_size_mib(m) for m in _TRES_MEM.finditer(t.group(1))) if v > 0]
    return min(found) if found else None


def slurm_job(job_id: str) -> str:
    """`scontrol show job -o ID` (root, by absolute path). Slurm unreachable fails the job, not the
    node: the ceiling of its VM's memory cannot be known without it."""
    last = ""
    for attempt in range(3):
        try:
            r = subprocess.run([SCONTROL, "show", "job", "-o", job_id], capture_output=True, text=True,
                               errors="replace", timeout=30)
            if r.returncode == 0 and f"JobId={job_id} " in r.stdout:
                return r.stdout
            last = (r.stderr or r.stdout).strip()[:200]
        except (OSError, subprocess.TimeoutExpired) as e:
            last = str(e)
        time.sleep(1 + attempt)
    raise VmwrapError(f"cannot read job {job_id}'s memory allocation from Slurm (scontrol show job: {last})")


def _directives(req: wire.Accepted) -> str:
    """The request from the comment as the #VMWRAP lines vmwrap.request.resolve() reads: the one strict
    parser checks them again, and resolve() weighs them against the allocation like any script's."""
    opts = ([f"--memory={req.memory_mib}M"] if req.memory_mib else []) + ([f"--cpus={req.cpus}"] if req.cpus else [])
    return f"#!/bin/sh\n#VMWRAP {' '.join(opts)}\n" if opts else ""


_NUM_NODES = re.compile(r"(?:^|\s)NumNodes=(\d{1,6})")


def job_from_env(env: dict[str, str], show_job=slurm_job) -> tuple[Job, wire.Accepted] | None:
    """The job as the core sees it: request from the comment, CPUs and memory from Slurm's allocation
    on this node (ceilings vmwrap.request.resolve() enforces). `show_job(id)` returns `scontrol show job -o`."""
    req = wire.decode(env.get("SLURM_JOB_COMMENT", ""))
    if req is None:
        return None
    job_id = env.get("SLURM_JOB_ID", "")
    Job.check_id(job_id)
    user = env.get("SLURM_JOB_USER", "")
    uid, gid = _env_int(env, "SLURM_JOB_UID", 10), _env_int(env, "SLURM_JOB_GID", 10)
    alloc = allocated_cpus(env.get("SLURM_JOB_CPUS_PER_NODE", ""))
    if req.cpus and alloc and req.cpus > alloc:
        raise UserError(f"--cpus={req.cpus} is more than the {alloc} CPUs Slurm allocated on this node")
    shown = show_job(job_id)
    # Slurm's node list (slurmd's, not the job record's, whose user-written fields could forge one)
    # says where the job's VMs are; NumNodes only cross-checks it.
    names = node_list(env)
    counted = max([int(n) for n in _NUM_NODES.findall(shown)] or [1])
    if counted > 1 and len(names) < 2:
        raise VmwrapError(f"job {job_id} has {counted} nodes but slurmd gave no node list (SLURM_JOB_NODELIST)")
    plan = None
    if len(names) > 1:
        node = env.get("SLURMD_NODENAME", "")
        if node not in names:
            raise VmwrapError(f"this node ({_clip(node)}) is not in job {job_id}'s node list")
        plan = jobnet.Plan(job_id, tuple(names), tuple(node_addresses(names)), names.index(node))
    memory = allocated_memory_mib(shown, alloc)
    work_dir = env.get("SLURM_JOB_WORK_DIR") or pwd.getpwuid(uid).pw_dir
    job = Job(job_id=job_id, scheduler="slurm", user=user, uid=uid, gid=gid,
              work_dir=work_dir, script=_directives(req), cpus=alloc, memory_mib=memory, image=req.image,
              restart_count=_env_int(env, "SLURM_JOB_RESTART_COUNT", 6, default=0),
              on_lost_checkpoint=req.on_lost_checkpoint,
              groups=[g for g in os.getgrouplist(user, gid) if g != gid], nodes=plan)
    return job, req


_HOSTLIST = re.compile(r"[A-Za-z0-9_.,\[\]-]{1,4000}")


def node_list(env) -> list[str]:
    """The job's nodes in order (`scontrol show hostnames $SLURM_JOB_NODELIST`; slurmd 22.05 names it
    SLURM_NODELIST only); [] without a list."""
    value = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or ""
    if not value:
        return []
    if not _HOSTLIST.fullmatch(value) or value.startswith("-"):
        raise VmwrapError(f"SLURM_JOB_NODELIST={_clip(value)} from slurmd is not a host list")
    if _NODE.fullmatch(value):
        return [value]   # one node: nothing to expand (every one-node job's epilog asks)
    r = subprocess.run([SCONTROL, "show", "hostnames", value], capture_output=True, text=True, timeout=30)
    names = r.stdout.split()
    if r.returncode != 0 or not names:
        raise VmwrapError(f"cannot expand job node list {_clip(value)}: {r.stderr.strip()[:200]}")
    for n in names:
        _check_node(n)
    return names


_NODE_ADDR = re.compile(r"^NodeName=(\S+) .*?\bNodeAddr=(\S+)", re.M)


def node_addresses(names: list[str]) -> list[str]:
    """Each node's host address (its NodeAddr, resolved), for the job network's tunnels. What Slurm
    cannot tell now, or another node's address that does not resolve, fails the job: this node is fine."""
    import ipaddress
    import socket

    r = subprocess.run([SCONTROL, "show", "node", "-o", ",".join(names)], capture_output=True, text=True,
                       errors="replace", timeout=30)
    found = dict(_NODE_ADDR.findall(r.stdout))
    out = []
    for n in names:
        addr = found.get(n)
        if addr is None:
            raise VmwrapError(f"cannot read node {n}'s address from Slurm (scontrol show node: {r.stderr.strip()[:200]})")
        try:
            ipaddress.ip_address(addr)
        except ValueError:
            try:
                addr = socket.gethostbyname(addr)
            except OSError as e:
                raise VmwrapError(f"node {n}'s address {_clip(addr)} does not resolve: {e}") from None
        out.append(addr)
    return out


_NODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _check_node(node: str) -> None:
    """A node name goes to scontrol/squeue as one argument: a plain host name, never a list or option."""
    if not _NODE.fullmatch(node or ""):
        raise VmwrapError(f"invalid Slurm node name {node[:80]!r}")


class Slurm:
    """vmwrap.adapter.Scheduler for Slurm: what slurmd's prolog/epilog environment and slurmctld say."""

    name = "slurm"
    title = "Slurm"
    root_env = ROOT_ENV

    def job_id(self, env) -> str:
        return env.get("SLURM_JOB_ID", "")

    def job(self, env) -> Job | None:
        parsed = job_from_env(dict(env))
        return parsed[0] if parsed else None

    def node_index(self, env) -> int | None:
        """This node's place in a multi-node job (its VM's name); None for a one-node job or no list."""
        try:
            names = node_list(env)
        except VmwrapError:
            return None
        node = env.get("SLURMD_NODENAME", "")
        return names.index(node) if len(names) > 1 and node in names else None

    def requeue_state(self, settings: Settings, env) -> tuple[bool, int]:
        """Slurm counts restarts: more than when the VM started here means requeued or preempted."""
        v = env.get("SLURM_JOB_RESTART_COUNT") or "0"
        restarts = int(v) if re.fullmatch(r"\d{1,6}", v) else 0
        return lifecycle.requeued(settings, self.job_id(env), restarts), restarts

    def take_out(self, env, reason: str) -> None:
        node = env.get("SLURMD_NODENAME")
        if node and os.path.exists(SCONTROL):
            subprocess.run([SCONTROL, "update", f"nodename={node}", "state=drain", f"reason={reason[:200]}"],
                           capture_output=True, timeout=30)

    def record_provenance(self, env, image: str, digest: str) -> None:
        """The image the VM really booted, in the job's AdminComment (`sacct -o AdminComment`). Only
        root and Slurm operators can set that field; both values are checked here, not trusted."""
        from vmwrap.directives import check_image_name

        job_id = self.job_id(env)
        Job.check_id(job_id)
        check_image_name(image)
        if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
            raise VmwrapError(f"not an image digest: {digest[:80]!r}")
        r = subprocess.run([SCONTROL, "update", f"JobId={job_id}", f"AdminComment=vmwrap image={image} digest={digest}"],
                           capture_output=True, text=True, errors="replace", timeout=30)
        if r.returncode != 0:
            raise VmwrapError(f"scontrol update AdminComment: {(r.stderr or r.stdout).strip()[:200]}")

    def still_queued(self):
        r = subprocess.run([SQUEUE, "-h", "-a", "-t", "all", "-o", "%i %T"], capture_output=True, text=True,
                           timeout=60)
        if r.returncode != 0:
            return lambda j: True  # slurmctld unreachable: keep everything
        states = dict(line.split(None, 1) for line in r.stdout.splitlines() if " " in line)
        return lambda j: states.get(j, "").strip() not in FINAL | {""}

    def planned_starts(self) -> list[dict] | None:
        from .prestage import pending

        return pending()

    def publish_cached(self, node: str, images: list[str]) -> None:
        from .prestage import publish

        publish(node, images)

    # the gap planner (vmwrap.planner): Slurm's facts and actions live in planner.py
    def reservations(self):
        from . import planner

        return planner.current_reservations()

    def queue(self, settings: Settings, now: float):
        from . import planner

        return planner.queue(settings, now)

    def plan_timing(self):
        from . import planner

        return planner.timing()

    def set_time_limit(self, job: str, seconds: float) -> None:
        from . import planner

        planner.set_time_limit(job, seconds)

    def vacate(self, job: str) -> None:
        from . import planner

        planner.requeue(job)

    # `vmwrap drain` (vmwrap.adapter.Drainable, vmwrap.drain)
    def node_jobs(self, node: str) -> dict[str, bool]:
        """Jobs on `node` by `squeue -w` (ids only: numbers); whether each has a VM from its comment
        in `squeue --json` (users write comments: a malformed one makes a job without a VM)."""
        import json

        from .commands import run
        from .planner import request

        _check_node(node)
        try:
            run("scontrol", "show", "node", "-o", node)
        except RuntimeError as e:
            raise VmwrapError(f"Slurm has no node {node!r} ({str(e)[:200]})") from None
        ids = {i for i in run("squeue", "-h", "-w", node, "-t", "RUNNING,SUSPENDED,COMPLETING", "-o", "%A").split()
               if re.fullmatch(r"\d{1,10}", i)}
        if not ids:
            return {}
        try:
            data = json.loads(run("squeue", "--json"))
        except ValueError as e:
            raise VmwrapError(f"squeue --json: not JSON: {e}") from None
        vm = {str(j.get("job_id")): request(str(j.get("job_id")), j.get("comment")) is not None
              for j in (data.get("jobs", []) if isinstance(data, dict) else []) if isinstance(j, dict)}
        return {i: vm.get(i, False) for i in ids}

    def pinned_jobs(self, node: str) -> set[str]:
        """Jobs on `node` that asked for it by name (`-w`/`--nodelist`, squeue's %n): requeued, they keep
        that request and wait for the node to come back."""
        from .commands import run

        _check_node(node)
        out = set()
        for line in run("squeue", "-h", "-w", node, "-t", "RUNNING,SUSPENDED,COMPLETING", "-o", "%A %n").splitlines():
            job, _, wanted = line.strip().partition(" ")
            if not re.fullmatch(r"\d{1,10}", job) or not wanted.strip() or wanted.strip() == "(null)":
                continue
            if node in run("scontrol", "show", "hostnames", wanted.strip()).split():
                out.add(job)
        return out

    def drain_node(self, node: str, reason: str) -> None:
        from .commands import run

        _check_node(node)
        try:
            run("scontrol", "update", f"nodename={node}", "state=drain", f"reason={reason[:200]}")
        except RuntimeError as e:
            raise VmwrapError(f"Slurm refused to drain {node}: {str(e)[:300]}") from None

    def render_config(self, settings: Settings, **options) -> str:
        from .render import render_config

        return render_config(settings, **options)


SLURM = Slurm()


def prolog(settings: Settings, env: dict[str, str]) -> int:
    """Boot the job's VM (vmwrap.lifecycle). Exit 0 runs the job, even one that is to fail (its batch
    step prints why); exit 1 only for a node fault, after draining the node with our reason (slurmd
    would drain it with its own, vaguer one)."""
    return 0 if lifecycle.prolog(SLURM, settings, env).ok else 1


def epilog(settings: Settings, env: dict[str, str]) -> int:
    """Save the VM of a requeued/preempted job, destroy it, clean up (vmwrap.lifecycle)."""
    out = lifecycle.epilog(SLURM, settings, env, node=env.get("SLURMD_NODENAME", ""),
                           slurm_exit=env.get("SLURM_JOB_EXIT_CODE2", "")[:32])
    return 0 if out.ok else 1


def step_launcher(job_id: str, config_path: str | None):
    """vmwrap.steps' Launch for this job: srun_command, whose tasks are this plugin's (vmwrap_plugins.slurm.task)
    so that a multi-node job's tasks on its other nodes run in those nodes' VMs; they get the command."""
    node = os.environ.get("SLURMD_NODENAME", "")

    def launch(argv: list[str], task: list[str]) -> tuple[int, list[str]]:
        ours = [task[0], "-m", "vmwrap_plugins.slurm.task", *task[3:], job_id, node, config_path or "", "--"]
        index, host = srun_command(argv, ours)
        return index, host + argv[index:]
    return launch


def attach(settings: Settings, script_path: str, args: list[str], config_path: str | None = None) -> int:
    """The batch step: runs as the job's user; the VM is already booting."""
    text = Path(script_path).read_text(encoding="utf-8", errors="surrogateescape")
    _, sep, original = text.partition(MARKER + "\n")
    if not sep:
        print("vmwrap: error: this batch script was not wrapped by vmwrap's job_submit.lua", file=sys.stderr)
        return payload.EXIT_NODE
    job_id = os.environ["SLURM_JOB_ID"]
    env = {k: v for k, v in os.environ.items() if k != "VMWRAP_CONFIG"}
    started_as = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    requeued = (lambda: restarts(job_id) > started_as) if settings.workdir_share == "serial" else None
    return payload.attach(rundir.path(settings, job_id), job_id, original, env, args, grace=settings.grace_seconds,
                          settings=settings, requeued=requeued, steps=step_launcher(job_id, config_path))


def interactive(settings: Settings, config_path: str | None = None) -> int:
    """salloc's interactive step (InteractiveStepOptions; the job's user, on the job's first node): a
    terminal in the job's VM when the job asked for an image, else the user's shell, as Slurm's default."""
    job_id = os.environ.get("SLURM_JOB_ID", "")
    Job.check_id(job_id)
    if not rundir.path(settings, job_id).is_dir():
        if os.environ.get("SLURM_CONTAINER"):  # asked for an image, yet no VM here: never a host shell instead
            print(f"vmwrap: error: job {job_id} asked for image {os.environ['SLURM_CONTAINER'][:64]!r} but has "
                  "no VM on this node (is vmwrap's prolog in slurm.conf?)", file=sys.stderr)
            return payload.EXIT_NODE
        shell = os.environ.get("SHELL") or pwd.getpwuid(os.getuid()).pw_shell or "/bin/sh"
        os.execvp(shell, [shell])
    from vmwrap.interactive import session

    env = {k: v for k, v in os.environ.items() if k != "VMWRAP_CONFIG"}
    return session(settings, job_id, env, steps=step_launcher(job_id, config_path))


def restarts(job_id: str) -> int:
    """Slurm's restart count of the job now (it grows the moment the job is requeued or preempted)."""
    try:
        r = subprocess.run([SCONTROL, "show", "job", "-o", job_id], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return -1
    m = re.search(r"\bRestarts=(\d{1,9})\b", r.stdout)  # bounded: a job name can say Restarts=<5000 digits>
    return int(m.group(1)) if m else -1


FINAL = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def checkpoint_gc(settings: Settings) -> list[str]:
    """Delete checkpoints of jobs that ended while they were not running (no epilog ran for them)."""
    return lifecycle.gc_checkpoints(settings, SLURM.still_queued())
