"""HTCondor glue: the adapter (vmwrap.adapter.Scheduler) and the job's payload side.

HTCondor runs nothing as root per job on the execute node: USER_JOB_WRAPPER and the starter's job
hooks run as the job's user, possibly in a chroot. So the root part of a job's life happens in the
node's bridge (bridge.py), which a wrapper asks over a Unix socket; this module translates HTCondor's
facts (the schedd's job ad) into the core's Job and runs the payload side as the job's user.
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import re
import sys
from pathlib import Path

from vmwrap import directives, jobnet, payload, rundir, safeio
from vmwrap.config import Settings
from vmwrap.errors import NodeError, UserError
from vmwrap.job import Job

from .facts import node_job_id, split_node_id

NAME = "condor"
PAYLOAD_MAX = 1 << 20   # bytes of argv + environment a wrapper hands over
SCRIPT_MAX = 1 << 16    # bytes of the executable's head the wrapper hands over for its #VMWRAP lines
HOLD_PREFIX = "vmwrap: "
CACHED_ATTR = "VmwrapCachedImages"
CACHED_MAX = 4000       # characters of the advertised list (the probe refuses a longer line)
log = logging.getLogger("vmwrap.condor")


def _whole(v, what: str, top: int) -> int | None:
    """A request number from the job ad (int or float), None when unset; UserError otherwise."""
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v < 1 or v > top:
        raise UserError(f"the job's {what} is not a number from 1 to {top}: {str(v)[:40]!r}")
    return int(v)


def _given(ad: dict, what: str):
    """What the slot gave the job (the shadow's CpusProvisioned/MemoryProvisioned), else what it
    asked for: request_memory's default is derived from the executable's size (1 MiB for a script)."""
    v = ad.get(f"{what}Provisioned")
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else ad.get(f"Request{what}")


def _restarts(ad: dict) -> int:
    """Earlier runs of the job: the schedd counts a shadow (JobRunCount) before the starter runs the
    wrapper; NumJobStarts is counted only once the job has started, maybe after the bridge asked."""
    for key in ("JobRunCount", "NumJobStarts"):
        v = ad.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v - 1
    return 0


PARALLEL = 11           # JobUniverse of universe = parallel
SLOT_NAME = re.compile(r"^[A-Za-z0-9_]{1,64}$")
REMOTE_HOSTS_MAX = 1 << 16   # characters of a parallel job's RemoteHosts (refused whole above it, never cut)


def remote_hosts(ad: dict) -> list[str]:
    """A parallel job's slots in node order (the schedd's RemoteHosts: node 0 first, as the dedicated
    scheduler numbers them; condor_ssh_to_job relies on the same order)."""
    v = ad.get("RemoteHosts")
    hosts = [h.strip() for h in v.split(",")] if isinstance(v, str) and len(v) <= REMOTE_HOSTS_MAX else []
    if not hosts or not all(h.count("@") >= 1 and h.rpartition("@")[2] for h in hosts):
        raise NodeError(f"the schedd gives parallel job {ad.get('ClusterId')}.{ad.get('ProcId')} no node list "
                        f"(RemoteHosts {str(v)[:80]!r})")
    return hosts


def find_node(ad: dict, slot: str, local, claimed) -> int:
    """This starter's node of a parallel job: the place in RemoteHosts of `slot` (from the root-owned
    starter's command line) on one of this host's startds (`local(name)`). Two nodes may have the same
    slot name on one host (two startds); only then does the starter's _CONDOR_PROCNO (`claimed`, from
    the wrapper) pick among them: what the job's user could change there picks only among its own nodes."""
    if not SLOT_NAME.match(slot or ""):
        raise NodeError(f"the job's condor_starter names no slot (-a {str(slot)[:40]!r})")
    hosts = remote_hosts(ad)
    mine = [k for k, h in enumerate(hosts) if h.startswith(slot + "@") and local(h)]
    if len(mine) == 1:
        return mine[0]
    if not mine:
        raise UserError(f"parallel job {ad.get('ClusterId')}.{ad.get('ProcId')} has no node in slot {slot} of "
                        "this host")
    if isinstance(claimed, str) and re.fullmatch(r"[0-9]{1,6}", claimed) and int(claimed) in mine:
        return int(claimed)
    raise UserError(f"parallel job {ad.get('ClusterId')}.{ad.get('ProcId')}: _CONDOR_PROCNO {str(claimed)[:12]!r} "
                    f"is none of its nodes in slot {slot} here ({', '.join(map(str, mine))})")


def parallel_plan(ad: dict, node: int) -> jobnet.Plan:
    """The job network of a parallel job's VMs: nodes named node0..nodeN-1 (HTCondor's $(Node); two may
    share a host name), each at its slot's host."""
    job = f"{ad.get('ClusterId')}.{ad.get('ProcId')}"
    hosts = [h.rpartition("@")[2] for h in remote_hosts(ad)]
    names = tuple(f"node{k}" for k in range(len(hosts)))
    jobnet.check_nodes(job, hosts)   # before asking the resolver about any of them
    unique = list(dict.fromkeys(hosts))   # several nodes per machine: each machine asked once
    addr = dict(zip(unique, jobnet.resolve(unique, f"parallel job {job}'s RemoteHosts")))
    return jobnet.Plan(job, names, tuple(addr[h] for h in hosts), node, peers_run_script=True)


def job_from_ad(ad: dict, uid: int, work_dir: str, script: str = "", node: int | None = None) -> Job | None:
    """The core's Job from the schedd's ad of a running job and the head of its executable (its
    `#VMWRAP` lines, read by the wrapper as the job's user). None: it asked for no VM. `node`: a
    parallel job's node here, whose VM joins the others on the job's network."""
    image = ad.get("VmwrapImage")
    if image is not None:
        if not isinstance(image, str):
            raise UserError(f"VmwrapImage must be a string (+VmwrapImage = \"NAME\"), not {str(image)[:40]}")
        directives.check_image_name(image)
    req = directives.parse(script)  # the core parses it again when it sizes the VM; a bad line holds now
    if image is None and req.image is None:
        return None
    if image is not None and req.image is not None and image != req.image:
        raise UserError(f"+VmwrapImage = \"{image}\" but the executable says #VMWRAP --image={req.image}: "
                        "ask for one image")
    cluster, proc = ad.get("ClusterId"), ad.get("ProcId")
    pw = pwd.getpwuid(uid)
    restarts = _restarts(ad)
    plan = parallel_plan(ad, node) if node is not None else None
    return Job(job_id=node_job_id(f"{cluster}.{proc}", node or 0), nodes=plan, scheduler=NAME, user=pw.pw_name,
               uid=uid, gid=pw.pw_gid, work_dir=work_dir, script=script, cpus=_whole(_given(ad, "Cpus"), "request_cpus", 4096),
               memory_mib=_whole(_given(ad, "Memory"), "request_memory (MiB)", 1 << 24),
               image=image or req.image, restart_count=restarts,
               groups=[g for g in os.getgrouplist(pw.pw_name, pw.pw_gid) if g != pw.pw_gid])


def fault_path(socket: str) -> Path:
    """Where the bridge records a node fault: next to its socket, in a root-owned dir the startd's
    STARTD_CRON probe (`condor-wrapper --fault-ad`) reads from inside the chroot too."""
    return Path(str(socket) + ".fault")


def cached_path(socket: str) -> Path:
    """Where the node's prestager writes the images its cache holds, for the same probe."""
    return Path(str(socket) + ".cached")


def cached_ad(images: list[str]) -> str:
    """`VmwrapCachedImages = "+a+b+"`: validated names only (a bad one is left out and logged), at
    most CACHED_MAX characters. The submit transform's Rank looks a job's image up in it."""
    value = "+"
    for name in sorted(set(images)):
        try:
            directives.check_image_name(name)
        except UserError as e:
            log.warning("not advertised as cached: %s", e)
            continue
        if len(value) + len(name) + 1 > CACHED_MAX:
            log.warning("%s: the cached images do not fit into %d characters; advertised up to %r (exclusive)",
                        CACHED_ATTR, CACHED_MAX, name)
            break
        value += name + "+"
    return f'{CACHED_ATTR} = "{value}"'


def classad_string(text: str) -> str:
    """A ClassAd string literal of one line of text (quotes and backslashes escaped)."""
    line = " ".join(str(text).split())[:900]
    return '"' + line.replace("\\", "\\\\").replace('"', '\\"') + '"'


class HTCondor:
    """vmwrap.adapter.Scheduler for HTCondor. Node hooks get their facts from the bridge, which
    verified them with the schedd (`env` here is the bridge's {"VMWRAP_CONDOR_JOB": id} only).
    `vacated`: the bridge saw the job vacated (not removed or held), so the epilog saves the VM."""

    name = NAME
    root_env: tuple[str, ...] = ()

    def __init__(self, job: Job | None = None, error: Exception | None = None, fault_file: Path | None = None,
                 schedd=None, cached_file: Path | None = None):
        self._job, self._error = job, error
        self.fault_file = fault_file
        self.cached_file = cached_file
        self.schedd = schedd
        self.vacated = False
        # A restored VM needs its work dir at the same path: only a job that runs in its initialdir
        # (no file transfer, shared storage) has that on its next match; a sandbox is new each time.
        self.saveable = job is not None and bool(job.work_dir)

    def job_id(self, env) -> str:
        return env["VMWRAP_CONDOR_JOB"]

    def job(self, env) -> Job | None:
        if self._error is not None:
            raise self._error
        return self._job

    def requeue_state(self, settings: Settings, env) -> tuple[bool, int]:
        from vmwrap import lifecycle

        return self.vacated, lifecycle.started_as(settings, self.job_id(env)) or 0

    def take_out(self, env, reason: str) -> None:
        """The startd stops matching VM jobs: its STARTD_CRON probe publishes VmwrapFault from this
        file (the transform's Requirements and START exclude such a node) until an admin removes it."""
        print(f"vmwrap condor: {reason}", file=sys.stderr, flush=True)
        if self.fault_file is None:
            return
        tmp = self.fault_file.with_name(f".{self.fault_file.name}.{os.getpid()}")
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(f"VmwrapFault = {classad_string(hold_reason(reason))}\n")
        os.replace(tmp, self.fault_file)

    def still_queued(self):
        """For checkpoint GC: a job the schedd may still run. Schedd unreachable: keep everything."""
        if self.schedd is None:
            return lambda j: True
        try:
            have = self.schedd.job_ids()
        except Exception:  # noqa: BLE001 (NodeError, or the bindings' own kinds)
            return lambda j: True
        def queued(j: str) -> bool:   # a parallel job's node K (C.P.K) lives as long as its job C.P
            try:
                return split_node_id(j)[0] in have
            except UserError:
                return j in have
        return queued

    def planned_starts(self) -> list[dict] | None:
        """HTCondor plans no start times: the schedd's idle VM jobs stand in, each on the startds
        whose ads it matches, all due now and kept in the negotiator's order by a millisecond apart
        (the prestager serves the earliest first). Image names come from users' ads (condor_qedit
        can change them after submit): a job with a bad one is left out, logged. No schedd: None."""
        import time

        if self.schedd is None:
            return None
        now, out = time.time(), []
        for ad in self.schedd.idle_vm_jobs():
            cluster, proc, image = ad.get("ClusterId"), ad.get("ProcId"), ad.get("VmwrapImage")
            if not all(type(v) is int and 0 <= v < 1 << 31 for v in (cluster, proc)):
                log.warning("idle job left out of prestaging: not a job id: %.80r.%.80r", cluster, proc)
                continue
            try:
                if not isinstance(image, str):
                    raise UserError(f"VmwrapImage is not a string: {str(image)[:40]!r}")
                directives.check_image_name(image)
            except UserError as e:
                log.warning("job %d.%d: not prestaged: %s", cluster, proc, e)
                continue
            out.append({"job": f"{cluster}.{proc}", "image": image, "start": now + len(out) / 1000,
                        "nodes": [n for n in ad.get("startds", ()) if isinstance(n, str)]})
        return out

    def publish_cached(self, node: str, images: list[str]) -> None:
        """One ClassAd line (root's file, replaced whole) the startd's probe publishes: one file per
        execute node, so `node` is not needed."""
        if self.cached_file is None:
            return
        line = cached_ad(images) + "\n"
        if safeio.read_capped(self.cached_file, CACHED_MAX + 100) == line.encode():
            return
        tmp = self.cached_file.with_name(f".{self.cached_file.name}.{os.getpid()}")
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(line)
        os.replace(tmp, self.cached_file)

    def reservations(self):
        return None

    def queue(self, settings: Settings, now: float):
        return []

    def plan_timing(self):
        raise NotImplementedError("HTCondor has no gap planner yet")

    def set_time_limit(self, job: str, seconds: float) -> None:
        raise RuntimeError("HTCondor has no gap planner yet")

    def vacate(self, job: str) -> None:
        raise RuntimeError("vacate through vmwrap is not implemented for HTCondor yet")

    def render_config(self, settings: Settings, **options) -> str:
        from .render import render_condor

        return render_condor(settings, **{k: v for k, v in options.items() if k in ("socket", "wrapper")})


def payload_argv(argv: list[str]) -> tuple[str, list[str]]:
    """A script executable runs as itself in the guest; a binary one runs its command line."""
    head = b""
    try:
        with open(argv[0], "rb") as f:
            head = f.read(1 << 20)
    except OSError:
        pass
    if not head or head.startswith(b"\x7fELF") or b"\0" in head[:4096]:
        return '#!/bin/sh\nexec "$@"\n', list(argv)
    return head.decode("utf-8", "surrogateescape"), list(argv[1:])


def _vacating(control_fd: int | None):
    """The bridge writes `vacate` to the control pipe before it passes the starter's SIGTERM on
    when the schedd still runs the job (a vacate, not condor_rm or condor_hold)."""
    seen = []

    def ask() -> bool:
        if control_fd is None or seen:
            return bool(seen)
        try:
            os.set_blocking(control_fd, False)
            data = os.read(control_fd, 64)
        except (BlockingIOError, OSError):
            data = b""
        if b"vacate" in data:
            seen.append(True)
        return bool(seen)

    return ask


def attach(settings: Settings, job_id: str, payload_fd: int, control_fd: int | None = None) -> int:
    """The job's payload, as the job's user (the bridge started this with the wrapper's stdin,
    stdout and stderr): hand argv and environment to the waiting VM, stream its output back. On a
    vacate it detaches and leaves the VM to the bridge's epilog, which saves it."""
    split_node_id(job_id)
    with os.fdopen(payload_fd, "rb") as f:
        raw = f.read(PAYLOAD_MAX + 1)
    if len(raw) > PAYLOAD_MAX:
        print("vmwrap: the job's arguments and environment are too large", file=sys.stderr)
        return payload.EXIT_USER
    req = json.loads(raw)
    argv, env = req["argv"], req["env"]
    script, args = payload_argv(argv)
    return payload.attach(rundir.path(settings, job_id), job_id, script, env, args,
                          grace=settings.grace_seconds, settings=settings, requeued=_vacating(control_fd))


def hold_reason(text: str) -> str:
    """HoldReason for a vmwrap failure: one line, `vmwrap: ` first."""
    line = " ".join(str(text).split())[:900]
    return line if line.startswith(HOLD_PREFIX) else HOLD_PREFIX + line


def wrapper_path() -> Path:
    from vmwrap.resources import HOOKS

    return HOOKS / "condor-wrapper"
