"""Grid Engine glue: the queue's prolog/epilog (root), starter_method, suspend/resume/terminate
methods and the checkpointing environment's migr_command (job owner) translated into core calls.
Exit codes follow GE's meaning: a prolog exit 0 runs the job, anything else but 99/100 puts the
queue instance in error (node fault only).

GE's facts about a job that leaves its host to run again (read in GE's sources, seen on 8.1.9):
`qmod -rj` makes qmaster put the task back in the pending list at once (qstat state `Rq`) and kill
the old run at that execd's next report (load_report_time), through the terminate_method; the epilog
then runs as usual. 8.1.9 does not hold the new run back until then (its scheduler tests the
deferral bit in the wrong field): it may start elsewhere while the old run still runs, hence
`restart_settle`. A checkpointing job migrates when it is suspended (`when` x) or its execd shuts
down (s): the shepherd runs migr_command, and once the job ended it leaves `checkpointed` in the
job's active_jobs dir (execd's, not the user's), which makes execd report the job as migrated and
qmaster reschedule it only then. execd sets RESTARTED and HOSTNAME in the job's environment after the
job's own variables: RESTARTED is 0 on a first start, 1 after a reschedule, 2 after a migration that
left a checkpoint (a flag, not a count).
"""

from __future__ import annotations

import os
import pwd
import re
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

from vmwrap import directives, lifecycle, payload, periodic, rundir, safeio, wire
from vmwrap.config import Settings
from vmwrap.errors import NodeError, UserError, VmwrapError
from vmwrap.job import Job
from vmwrap.request import interactive_refusal

CONTEXT = re.compile(r"^context:[ \t]+(.*)$", re.M)

# Root calls Grid Engine's binaries by absolute path with the cell's own SGE_ROOT/SGE_CELL (Debian's
# layout; /usr/bin/q* are its wrappers), never through the job's PATH or variables.
QSTAT = "/usr/bin/qstat"
SGE_ROOT = "/var/lib/gridengine"
SGE_CELL = "default"
ADMIN_USER = "sgeadmin"  # Debian's GE admin user: execd's spool belongs to it
# What the root prolog/epilog keep of their environment (execd sets these itself; `qsub -v` cannot
# override them, verified on 8.1.9). Everything else is the job's and is dropped (vmwrap.rootenv).
ROOT_ENV = ("JOB_ID", "SGE_TASK_ID", "JOB_SCRIPT", "NSLOTS", "SGE_JOB_SPOOL_DIR", "RESTARTED", "HOSTNAME", "PE")
ROOT_FIXED = {"SGE_ROOT": SGE_ROOT, "SGE_CELL": SGE_CELL}


def job_id(env: dict[str, str]) -> str:
    """GE's JOB_ID, with the task of an array job ('123.4'); ids are plain names for the core."""
    jid = env["JOB_ID"]
    task = env.get("SGE_TASK_ID", "undefined")
    return f"{jid}.{task}" if task not in ("", "undefined") else jid


def qstat_job(jid: str) -> str | None:
    """`qstat -j` of the job (its context and resource requests); None if qstat failed."""
    try:
        r = subprocess.run([QSTAT, "-j", jid.split(".")[0]], capture_output=True, text=True, timeout=30, cwd="/",
                           env={**os.environ, **ROOT_FIXED}, errors="replace")
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout if r.returncode == 0 else None


def context_image(jid: str) -> str | None:
    """The native way: `qsub -ac vmwrap_image=NAME` (wire.CONTEXT_IMAGE, validated by the JSV)."""
    return parse_context(qstat_job(jid) or "")


def parse_context(qstat: str) -> str | None:
    """The image from `qstat -j`'s context (wire.decode_context: `qalter -ac` can change it after the
    JSV checked it, so a bad or doubled value raises UserError)."""
    return wire.decode_context(kv for m in CONTEXT.finditer(qstat) for kv in m.group(1).split(","))


# Hard requests that bound a job's memory; each is per slot (GE multiplies it by the job's slots).
MEMORY_REQUESTS = ("h_vmem", "s_vmem", "mem_free", "virtual_free")
_GE_SIZE = re.compile(r"(0[xX][0-9a-fA-F]{1,13}|\d{1,15}(?:\.\d{1,6})?)([kKmMgGtT]?)")
_GE_UNIT = {"": 1, "k": 1000, "K": 1024, "m": 1000**2, "M": 1024**2, "g": 1000**3, "G": 1024**3,
            "t": 1000**4, "T": 1024**4}
_HARD = re.compile(r"^hard resource_list:[ \t]*(.*)$", re.M)


def memory_bytes(value: str) -> int | None:
    """A GE memory_specifier (sge_types(5): decimal, 0x hex or 0 octal, k/m/g/t x1000, K/M/G/T x1024)
    in bytes; None for INFINITY. Anything else raises UserError: the ceiling must not be guessed."""
    v = value.strip()
    if v.upper() in ("INFINITY", "INF"):
        return None
    m = _GE_SIZE.fullmatch(v)
    if not m:
        raise UserError(f"cannot read the job's memory request {v[:40]!r}")
    num = m.group(1)
    if num[:2].lower() == "0x":
        n: float = int(num, 16)
    elif len(num) > 1 and num[0] == "0" and num.isdigit() and set(num) <= set("01234567"):
        n = int(num, 8)  # octal is the smaller reading of such digits
    else:
        n = float(num)
    return int(n * _GE_UNIT[m.group(2)])


def requested_memory_mib(qstat: str, slots: int) -> int | None:
    """The least memory the job's hard requests grant it on this host, in MiB (per slot x slots);
    None when it asked for none. Several `hard resource_list:` lines (one forged in a variable's
    value?) can only lower it."""
    found = []
    for line in _HARD.findall(qstat):
        for item in line.split(","):
            k, sep, v = item.partition("=")
            if sep and k.strip() in MEMORY_REQUESTS:
                b = memory_bytes(v)
                if b is not None:
                    found.append(b * slots // 2**20)
    return min(found) if found else None


def slots(env: dict[str, str]) -> int:
    v = env.get("NSLOTS") or "1"
    if not re.fullmatch(r"\d{1,5}", v) or int(v) < 1:
        raise UserError(f"NSLOTS={v[:20]!r} from execd is not a slot count")
    return int(v)


def spooled_script(env: dict[str, str], owner_uid: int) -> str:
    """The job script as execd spooled it (root reads it for #VMWRAP lines), at most 1 MiB; "" for a
    binary job (JOB_SCRIPT is then the user's command) or anything else that is not the spooled copy:
    `<spool>/<host>/job_scripts/<JOB_ID>` next to SGE_JOB_SPOOL_DIR's `active_jobs`, in a directory
    the job's user cannot write, a regular file opened without following symlinks."""
    path, jid, spool = env.get("JOB_SCRIPT", ""), env.get("JOB_ID", ""), env.get("SGE_JOB_SPOOL_DIR", "")
    if not (jid.isdigit() and spool.startswith("/") and os.path.basename(os.path.dirname(spool)) == "active_jobs"):
        return ""
    expected = os.path.join(os.path.dirname(os.path.dirname(spool)), "job_scripts", jid)
    if path != expected or os.path.normpath(path) != path:
        return ""
    try:
        d = os.lstat(os.path.dirname(path))
        if not stat.S_ISDIR(d.st_mode) or d.st_uid == owner_uid or d.st_mode & 0o022:
            return ""
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return ""
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return ""
        return f.read(1 << 20).decode("utf-8", "surrogateescape")


def restarted(env) -> int:
    """execd's RESTARTED (0 first start, 1 rescheduled, 2 migrated with a checkpoint)."""
    v = env.get("RESTARTED") or "0"
    if not re.fullmatch(r"\d{1,3}", v):
        raise UserError(f"RESTARTED={v[:20]!r} from execd is not a number")
    return int(v)


def _active_dir(env) -> str | None:
    """SGE_JOB_SPOOL_DIR if it is execd's active_jobs/<job> dir, a directory only root or the GE
    admin user can write (never the job's user)."""
    spool = env.get("SGE_JOB_SPOOL_DIR", "")
    if not spool.startswith("/") or os.path.normpath(spool) != spool \
            or os.path.basename(os.path.dirname(spool)) != "active_jobs":
        return None
    try:
        st = os.lstat(spool)
        admin = pwd.getpwnam(ADMIN_USER).pw_uid
    except (OSError, KeyError):
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_mode & 0o022 or st.st_uid not in (0, admin):
        return None
    return spool


def migrated(env) -> bool:
    """The shepherd left `checkpointed` in the job's active dir: execd reports the job as migrated
    and qmaster runs it again (the shepherd keeps it only when it started the migr_command)."""
    spool = _active_dir(env)
    return spool is not None and os.path.lexists(os.path.join(spool, "checkpointed"))


# One line of plain `qstat -u '*'`: job-ID prior name user state date time [queue] slots [task ids].
# The name is the user's (it may hold spaces): the fields are read from the (last) date on.
_LINE = re.compile(r"^\s*(\d{1,12})\s+(.*\S)\s*$")
_DATE = re.compile(r"\d\d/\d\d/\d{4}")
_TIME = re.compile(r"\d\d:\d\d:\d\d")


def job_lines(qstat: str, jid: str) -> list[tuple[str, str, str]]:
    """(state, queue instance or '', task ids) of the job's lines in plain `qstat` output."""
    found = []
    for line in qstat.splitlines():
        m = _LINE.match(line)
        if not m or m.group(1) != jid:
            continue
        f = m.group(2).split()
        for i in range(len(f) - 1, 1, -1):  # the last date: a name cannot push it to the right
            if _DATE.fullmatch(f[i - 1]) and _TIME.fullmatch(f[i]):
                rest = f[i + 1:]
                queue = rest.pop(0) if rest and "@" in rest[0] else ""
                found.append((f[i - 2], queue, " ".join(rest[1:])))
                break
    return found


def _in_tasks(task: str, spec: str) -> bool:
    """Whether array task `task` is in qstat's task ids ('3', '1-10:1', '1,4,7')."""
    if not task.isdigit():
        return False
    n = int(task)
    for part in spec.split(","):
        m = re.fullmatch(r"(\d{1,9})(?:-(\d{1,9})(?::(\d{1,9}))?)?", part.strip())
        if m:
            lo, hi, step = int(m.group(1)), int(m.group(2) or m.group(1)), int(m.group(3) or 1)
            if lo <= n <= hi and (n - lo) % step == 0:
                return True
    return False


def moved(qstat: str, jid: str, host: str) -> bool:
    """From qmaster's `qstat` lines: the run on `host` is no longer the job's current one. The job
    (task) waits again (its state has q) or runs on another host's queue instance (qmod -rj)."""
    num, _, task = jid.partition(".")
    for state, queue, tasks in job_lines(qstat, num):
        if task and not _in_tasks(task, tasks):
            continue
        if "q" in state or (queue and queue.rpartition("@")[2] != host):
            return True
    return False


def rescheduled(jid: str, host: str) -> bool:
    """qmaster moved the job away from this run on `host` (see moved). qstat failing, or no host to
    compare with, answers False: the job then ends as usual."""
    if not host:
        return False
    try:
        r = subprocess.run([QSTAT, "-u", "*"], capture_output=True, text=True, timeout=30, cwd="/",
                           env={**os.environ, **ROOT_FIXED}, errors="replace")
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0 and moved(r.stdout[:1 << 24], jid, host)


def job_from_env(env: dict[str, str], owner: str) -> Job | None:
    pw = pwd.getpwnam(owner)
    script = spooled_script(env, pw.pw_uid)
    req = directives.parse(script)
    jid = job_id(env)
    qstat = qstat_job(jid)
    image = req.image or parse_context(qstat or "")
    if not image:
        return None
    if qstat is None:  # a job for a VM, but what it may use is unknown: fail it rather than guess
        raise VmwrapError(f"cannot read job {jid}'s resource requests with qstat -j")
    said = wire.decode_context_memory(kv for m in CONTEXT.finditer(qstat) for kv in m.group(1).split(","))
    if said is not None and said != req.memory_mib:  # the planner budgets the job's save by it
        raise UserError(f"the job's context says {wire.CONTEXT_MEMORY}={said} but its script asks for "
                        f"{f'--memory={req.memory_mib}M' if req.memory_mib else 'no --memory'}; "
                        f"`qalter -ac {wire.CONTEXT_MEMORY}=...` may not change it")
    plan, n = job_plan(env, jid)
    return Job(job_id=jid, scheduler="sge", user=owner, uid=pw.pw_uid, gid=pw.pw_gid, work_dir=os.getcwd(),
               script=script, cpus=n, memory_mib=requested_memory_mib(qstat, n), image=image,
               restart_count=restarted(env), nodes=plan,
               groups=[g for g in os.getgrouplist(owner, pw.pw_gid) if g != pw.pw_gid])


class GridEngine:
    """vmwrap.adapter.Scheduler for Grid Engine. The node is taken out by the prolog's exit code (GE
    puts the queue instance in error state)."""

    name = "sge"
    title = "Grid Engine"
    root_env = ROOT_ENV
    # qmod -rj: the old run ends at its execd's next report (load_report_time, 40 s by default) and its
    # epilog then saves the VM, while the restarted run may already be in its prolog (GE never kills a
    # prolog; a qdel meanwhile only keeps the job from starting): the lifecycle waits this long for
    # that checkpoint.
    restart_settle = 60.0

    def __init__(self, owner: str | None = None):
        self.owner = owner  # the prolog's $job_owner argument

    def job_id(self, env) -> str:
        return job_id(env)

    def job(self, env) -> Job | None:
        return job_from_env(dict(env), self.owner or "")

    def requeue_state(self, settings: Settings, env) -> tuple[bool, int]:
        """GE runs the job again after this epilog: it migrated (checkpointed), or qmaster already has
        it waiting again or running on another host (qmod -rj). GE keeps no restart count: one more
        than when the VM started."""
        before = lifecycle.started_as(settings, job_id(env)) or 0
        again = migrated(env) or rescheduled(job_id(env), env.get("HOSTNAME", ""))
        return again, before + 1 if again else before

    def peer_job(self, settings: Settings, pid: int, uid: int, job_id: str):
        """This host's VM of a job spanning hosts, for the job's first `qrsh -inherit` task here (no
        prolog runs on a slave host; the node agent boots it): `pid` must hold a group execd gave one
        of the job's tasks in that very run's dir on this host, run as `uid`, and `uid` must own the
        job; what the VM gets is qmaster's (this host's slots, the job's requests), never what the task
        says. Which task the caller is comes from its shepherd's dir, never its environment. The run is
        execd's dir of it and qmaster's start time; it runs while that dir does (and qmaster has it here:
        asked every 5 minutes)."""
        from vmwrap.adapter import PeerRun

        from . import facts, petask

        num, dot, task = job_id.partition(".")
        if not _JOB_NUM.fullmatch(num) or (dot and not _JOB_NUM.fullmatch(task)):
            raise UserError(f"{job_id[:40]!r} is not a Grid Engine job id")
        qstat = qstat_job(num)
        if qstat is None:
            raise VmwrapError(f"cannot read job {job_id}'s resource requests with qstat -j")
        array = re.search(r"^job-array tasks:", qstat, re.M) is not None
        if array != bool(dot):   # one name per run: 123 (no array) or 123.4 (array task 4)
            raise UserError(f"job {num} {'is' if array else 'is not'} an array job: "
                            f"{'name its task, ' + num + '.T' if array else 'its id is ' + num}")
        run_task = task or "1"
        found = petask.task_spool(pid, num, run_task)
        if found is None or petask.process_uids(pid) != {uid}:
            raise UserError(f"the caller is no task of job {job_id} on this host")
        spool, execd_host = found
        task_dir = petask.shepherd_dir(pid) or ""   # read again: it must still be the run's, and trusted
        run_dir = os.path.join(spool, petask.ACTIVE, f"{num}.{run_task}")
        if os.path.dirname(task_dir) != run_dir or not petask.trusted_path(task_dir) \
                or not petask.holds_group_of(pid, task_dir):
            raise UserError(f"the caller is no task of job {job_id} on this host")
        fields = {}
        for key, value in re.findall(r"^(owner|cwd|sge_o_home):[ \t]+(\S.*?)\s*$", qstat, re.M):
            fields.setdefault(key, value)   # the first: qstat's own line, before any of the job's values
        try:
            pw = pwd.getpwnam(fields.get("owner", ""))
        except KeyError:
            raise VmwrapError(f"job {job_id}'s owner {fields.get('owner', '')[:40]!r} is unknown here") from None
        if uid not in (0, pw.pw_uid):
            raise UserError(f"uid {uid} does not own job {job_id}")
        image = parse_context(qstat)
        if not image:
            raise UserError(f"job {job_id} asked for no VM")
        # the script (spooled on the master's host only) asked the memory; the JSV put it in the context
        said = wire.decode_context_memory(kv for m in CONTEXT.finditer(qstat) for kv in m.group(1).split(","))
        listed, started = facts.job_run(num, task or None)
        alloc = dict(listed)
        master = next(iter(alloc), None)
        me = {socket.gethostname().split(".")[0], execd_host.split(".")[0]}   # qmaster may spell it otherwise
        here = [h for h in alloc if h.split(".")[0] in me]
        if len(alloc) < 2 or not here or not started:
            raise UserError(f"job {job_id} does not span hosts with this one ({execd_host[:60]})")
        if here[0] == master:
            raise UserError(f"this is job {job_id}'s master host: its VM is the prolog's")
        hosts = job_hosts(master, list(alloc))
        from vmwrap import jobnet

        plan = jobnet.Plan(job_id, tuple(hosts), tuple(host_addresses(hosts)), hosts.index(here[0]))
        n = alloc[here[0]]
        job = Job(job_id=job_id, scheduler="sge", user=pw.pw_name, uid=pw.pw_uid, gid=pw.pw_gid,
                  work_dir=fields.get("cwd") or fields.get("sge_o_home") or pw.pw_dir,
                  script=f"#VMWRAP --memory={said}M\n" if said else "", cpus=n,
                  memory_mib=requested_memory_mib(qstat, n), image=image, nodes=plan,
                  groups=[g for g in os.getgrouplist(pw.pw_name, pw.pw_gid) if g != pw.pw_gid])
        path = run_dir   # trusted (task_spool)
        st = os.lstat(path)
        first = (st.st_dev, st.st_ino)
        looks = [0]

        def running() -> bool:
            try:
                st = os.lstat(path)   # a trusted path (task_spool): execd's alone, no link on the way
            except (FileNotFoundError, NotADirectoryError):
                return False
            if (st.st_dev, st.st_ino) != first:
                return False
            looks[0] += 1
            if looks[0] % PEER_QMASTER_EVERY == 0:   # and qmaster still runs this run here (raises when unsure)
                now, since = facts.job_run(num, task or None)
                return here[0] in dict(now) and since == started
            return True
        return PeerRun(job, f"{first[0]}:{first[1]}:{started}", running)

    def take_out(self, env, reason: str) -> None:
        print(f"vmwrap: {reason}", file=sys.stderr)  # execd logs it with the queue's error state

    # the daemon loops (vmwrap.daemons): GE's facts and actions live in facts.py
    def still_queued(self):
        from . import facts

        return facts.still_queued()

    def planned_starts(self) -> list[dict] | None:
        from . import facts

        return facts.pending()

    def publish_cached(self, node: str, images: list[str]) -> None:
        from . import facts

        facts.publish_cached(node, images)

    def reservations(self):
        from . import facts

        return facts.reservations()

    def queue(self, settings: Settings, now: float):
        from . import facts

        return facts.queue(settings, now)

    def plan_timing(self):
        from . import facts

        return facts.timing()

    def set_time_limit(self, job: str, seconds: float) -> None:
        from . import facts

        facts.set_time_limit(job, seconds)

    def vacate(self, job: str) -> None:
        from . import facts

        facts.reschedule(job)

    # `vmwrap drain` (vmwrap.adapter.Drainable, vmwrap.drain): GE's facts and actions in facts.py
    def node_jobs(self, node: str) -> dict[str, bool]:
        from . import facts

        try:
            return facts.host_jobs(node)
        except RuntimeError as e:
            raise VmwrapError(str(e)[:400]) from None

    def drain_node(self, node: str, reason: str) -> None:
        from . import facts

        try:
            facts.disable_host(node)
        except RuntimeError as e:
            raise VmwrapError(f"Grid Engine refused to disable {node}: {str(e)[:300]}") from None
        print(f"vmwrap: {node} disabled: {reason}", file=sys.stderr)  # GE keeps no reason for qmod -d

    def render_config(self, settings: Settings, **options) -> str:
        from .render import render_sge

        kw = {"hooks": options["hooks_dir"]} if options.get("hooks_dir") else {}
        return render_sge(**kw)  # the Slurm-only options (job_submit.lua) do not apply


def prolog(settings: Settings, env: dict[str, str], owner: str) -> int:
    """Boot the job's VM (vmwrap.lifecycle). Exit 0 runs the job, even one that is to fail (its
    starter prints why); exit 1 only for a node fault: GE puts the queue instance in error state."""
    return 0 if lifecycle.prolog(GridEngine(owner), settings, env).ok else 1


def epilog(settings: Settings, env: dict[str, str]) -> int:
    """Destroy the VM and clean up (vmwrap.lifecycle)."""
    return 0 if lifecycle.epilog(GridEngine(), settings, env).ok else 1


def starter(settings: Settings, argv: list[str], config_path: str | None = None) -> int:
    """starter_method (job owner): a job with a VM attaches to it; any other job runs as usual."""
    jid = job_id(os.environ)
    run_dir = rundir.path(settings, jid)
    if not argv:
        print("vmwrap sge starter: no job command", file=sys.stderr)
        return 2
    if os.environ.get("JOB_SCRIPT") == "QRSH" and argv[1:3] == ["-m", TASK_MODULE]:
        # a `qrsh -inherit` task the job's VM started, here or on another host: it runs as given and
        # asks this host's agent, named by this host's config (the master's path means nothing here)
        env = dict(os.environ)
        env.pop("VMWRAP_CONFIG", None)
        if config_path:
            env["VMWRAP_CONFIG"] = config_path
        os.execve(argv[0], argv, env)
    if not run_dir.exists() or os.environ.get("JOB_SCRIPT") == "QRSH":  # no VM, or a task of a job's own
        os.execvp(argv[0], argv)
    script, args = _payload(argv)
    env = {k: v for k, v in os.environ.items() if k != "VMWRAP_CONFIG"}
    marker = rundir.user_dir(run_dir) / MIGRATING
    # A SIGTERM that is GE moving the job (migr_command's marker, or qmod -rj: qmaster has it pending
    # or running elsewhere) leaves the VM running for the epilog to save; any other stops it in its VM.
    host = os.environ.get("HOSTNAME", "")  # execd's name for this host (set after the job's variables)
    again = (lambda: marker.exists() or rescheduled(jid, host)) if settings.workdir_share == "serial" else None
    shim_dirs = guest_view(run_dir, env)
    return payload.attach(run_dir, jid, script, env, args, grace=settings.grace_seconds, settings=settings,
                          requeued=again, steps=step_launcher(jid, env),
                          steps_name="qrsh", shim_dirs=shim_dirs)


TASK_MODULE = "vmwrap_plugins.sge.task"


def execd_spool(job_spool_dir: str) -> str | None:
    """This host's execd spool from a job's or task's SGE_JOB_SPOOL_DIR (`<spool>/active_jobs/JOB.T`,
    and `/<pe task>` under it for a task); None if it does not read so."""
    parts = job_spool_dir.split("/")
    if not job_spool_dir.startswith("/") or os.path.normpath(job_spool_dir) != job_spool_dir:
        return None
    for k in (-2, -3):
        if len(parts) > -k + 1 and parts[k] == "active_jobs":
            return "/".join(parts[:k])
    return None


def step_launcher(job_id: str, env: dict[str, str]):
    """vmwrap.steps' Launch for this job: the guest's `qrsh -inherit HOST CMD` as a host qrsh running
    vmwrap_plugins.sge.task on HOST (this host: the task reaches this VM's step service; another of the
    job's hosts: that host's VM of the job runs the command)."""
    from .steps import qrsh_command

    hosts = [h for h, _ in pe_allocation(env)] or [env.get("HOSTNAME", "")]
    # the master's host as its tasks can tell it: execd's spool there (<execd_spool_dir>/<host>, which
    # a task's SGE_JOB_SPOOL_DIR starts with); host names may be spelt otherwise (host_aliases)
    master = execd_spool(env.get("SGE_JOB_SPOOL_DIR", "")) or env.get("HOSTNAME", "")

    def launch(argv: list[str], task: list[str]) -> tuple[int, list[str]]:
        ours = [task[0], "-m", TASK_MODULE, *task[3:], job_id, master]
        return qrsh_command(argv, ours, hosts)
    return launch


def _payload(argv: list[str]) -> tuple[str, list[str]]:
    """A spooled job script runs as itself; a binary job (`qsub -b y cmd args`) runs its command line."""
    head = b""
    try:
        with open(argv[0], "rb") as f:
            head = f.read(1 << 20)
    except OSError:
        pass
    if not head or head.startswith(b"\x7fELF") or b"\0" in head[:4096]:
        return '#!/bin/sh\nexec "$@"\n', list(argv)
    return head.decode("utf-8", "surrogateescape"), argv[1:]


# In the run dir's hand-over dir (the job's user's): migr_command tells the job's starter that the
# SIGTERM which follows is a migration (GE's own `checkpointed` file appears only after the job ended).
MIGRATING = "migrating"


def method(settings: Settings, action: str, jid: str, pid: int) -> int:
    """suspend/resume/terminate_method and the checkpointing environment's migr_command (job owner).
    GE does not signal the job when a method is set."""
    env_jid = job_id(os.environ) if "JOB_ID" in os.environ else jid
    has_vm = rundir.path(settings, env_jid).exists()
    try:
        if action == "migrate":
            if has_vm:  # the starter detaches, the VM keeps running; the epilog saves it
                os.close(os.open(rundir.user_dir(rundir.path(settings, env_jid)) / MIGRATING,
                                 os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
            os.kill(pid, signal.SIGTERM)
            return 0
        if action in ("suspend", "resume") and has_vm:
            # The job's payload (the starter, $job_pid) pauses and resumes the VM through the node
            # agent, as Slurm's SIGTSTP/SIGCONT make it do: it retries a resume the agent could not do
            # (the agent restarts), which this method, run once by GE, could not.
            os.kill(pid, signal.SIGTSTP if action == "suspend" else signal.SIGCONT)
            return 0
        if action == "terminate":
            os.kill(pid, signal.SIGTERM)  # the attachment stops the job in its VM: TERM, grace, KILL
            return 0
        sig = signal.SIGSTOP if action == "suspend" else signal.SIGCONT
        os.killpg(os.getpgid(pid), sig)
        return 0
    except ProcessLookupError:
        return 0
    except (NodeError, UserError, OSError) as e:
        print(f"vmwrap sge {action}: job {env_jid}: {e}", file=sys.stderr)
        return 1


_CATALOG: dict[str, tuple[float, object]] = {}


def _catalog(path: str):
    """The catalog, re-read only when the file changed (a server JSV checks many jobs in one process)."""
    from vmwrap.catalog import Catalog

    try:
        mtime = os.stat(path).st_mtime_ns
    except OSError:
        mtime = -1
    hit = _CATALOG.get(path)
    if hit is None or hit[0] != mtime:
        hit = _CATALOG[path] = (mtime, Catalog.load(path))
    return hit[1]


PE_FIX = ("use one with control_slaves TRUE (a VM on each host, started by the job's qrsh -inherit tasks), "
          "or one whose allocation_rule is $pe_slots (all its slots on one host), or no -pe")
OPEN_MAX = 9999999   # what the JSV sees as pe_max for an open range (`-pe NAME 2-`)


def pe_refusal(pe: str, lo: str, hi: str, saved: str | None = None) -> str | None:
    """Why a VM job's `-pe NAME RANGE` cannot be run (None: it can). Only `$pe_slots`, or an integer
    rule N with at most N slots, keeps every slot on one host; `$fill_up` and `$round_robin` spread
    whatever one host cannot hold. A spread job gets a VM on each host: the master's from the prolog,
    the others' from its first `qrsh -inherit` task there, which needs control_slaves TRUE. Its VMs
    are never saved, so `saved` (how the job asked to be: "-ckpt vmwrap", ...) refuses it too."""
    if not (lo.isdigit() and hi.isdigit()) or len(lo) > 9 or len(hi) > 9:
        return f"-pe {pe[:64]} {lo[:12]}-{hi[:12]}: not a slot range"
    n_lo, n_hi = int(lo), int(hi)
    if n_hi <= 1:
        return None
    from . import facts

    try:
        pes = facts.pe_settings(pe)
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        return f"cannot tell where -pe {pe[:64]} puts its slots ({str(e)[:200]}); submit again later"
    spread = {n: p for n, p in sorted(pes.items())
              if not ((r := p.get("allocation_rule", "")) == "$pe_slots" or (r.isdigit() and n_hi <= int(r)))}
    if not spread:
        return None   # unknown PEs are qsub's to refuse
    slots = str(n_lo) if n_lo == n_hi else f"{n_lo}-" if n_hi >= OPEN_MAX else f"{n_lo}-{n_hi}"
    loose = {n: p for n, p in spread.items() if p.get("control_slaves", "").upper() != "TRUE"}
    if loose:
        which = ", ".join(f"{n} has allocation_rule {p.get('allocation_rule', '?')} and control_slaves "
                          f"{p.get('control_slaves', '?')}" for n, p in list(loose.items())[:3])
        return (f"-pe {pe} {slots} may get slots on several hosts ({which}), and a VM job spans hosts only "
                f"in a parallel environment with control_slaves TRUE; {PE_FIX}")
    if saved:
        return (f"-pe {pe} {slots} may get slots on several hosts, and the VMs of a job spanning hosts are "
                f"never saved: drop {saved}, or use a parallel environment whose allocation_rule is $pe_slots")
    return None


PE_HOSTFILE_MAX = 1 << 20   # bytes of execd's pe_hostfile read (a line per queue instance)


def _pe_hostfile(env: dict[str, str]) -> bytes | None:
    """execd's pe_hostfile in the job's active dir (never a path the job's environment names); None
    for a job without one."""
    spool = _active_dir(env)
    if spool is None:
        return None
    try:
        return safeio.read_capped(os.path.join(spool, "pe_hostfile"), PE_HOSTFILE_MAX)
    except OSError:
        return None


def pe_allocation(env: dict[str, str]) -> list[tuple[str, int]]:
    """(host, slots) of the job's parallel environment in execd's order (the master's host first),
    from execd's pe_hostfile; [] for a job without one. A host listed for several queues is summed."""
    data = _pe_hostfile(env)
    if data is None:
        return []
    alloc: dict[str, int] = {}
    for ln in data.decode(errors="replace").splitlines():
        f = ln.split()
        if len(f) >= 2 and re.fullmatch(r"\d{1,6}", f[1]):
            alloc[f[0]] = alloc.get(f[0], 0) + int(f[1])
        elif f:
            raise NodeError(f"execd's pe_hostfile has a line that is not 'HOST SLOTS ...': {ln[:100]!r}")
    return list(alloc.items())


def guest_view(run_dir: Path, env: dict[str, str]) -> tuple[str, ...]:
    """What a parallel job's tools look for in its VM as on the host: $PE_HOSTFILE names a copy of
    execd's, and qrsh is also $SGE_ROOT/bin/$ARC/qrsh (where Open MPI's gridengine support looks for
    it). Changes `env`; returns the dirs the guest installs its qrsh in besides its PATH."""
    data = _pe_hostfile(env) if env.get("PE_HOSTFILE") else None
    if data is not None:
        payload.hand_over(run_dir, env, "PE_HOSTFILE", "pe_hostfile", data)
    root, arc = env.get("SGE_ROOT", "").rstrip("/"), env.get("ARC", "").strip("/")
    return (f"{root}/bin/{arc}",) if root.startswith("/") and arc else ()


def host_addresses(hosts: list[str]) -> list[str]:
    from vmwrap import jobnet

    return jobnet.resolve(hosts, "the job's parallel environment")


_JOB_NUM = re.compile(r"[1-9][0-9]{0,9}")
PEER_QMASTER_EVERY = 150  # a slave VM's looks (2 s apart) between asking qmaster whether its job still runs here


def job_hosts(master: str | None, hosts: list[str]) -> list[str]:
    """The job's hosts in the one order every host computes alike (the job network gives node K the
    K-th address): the master's first, then the others by name. The master's prolog has them from
    pe_hostfile, a slave's agent from qstat, each in its own order."""
    return ([master] if master in hosts else []) + sorted(h for h in hosts if h != master)


def job_plan(env: dict[str, str], jid: str) -> tuple[object | None, int]:
    """(the job network's plan or None, this host's CPUs): a job whose PE spans hosts gets one VM on
    each (this one from the prolog on the master's host), joined as Slurm's multi-node jobs are."""
    alloc = pe_allocation(env)
    if len(alloc) <= 1:
        return None, slots(env)
    from vmwrap import jobnet

    hosts = [h for h, _ in alloc]
    pe = env.get("PE", "")
    from . import facts

    try:   # the JSV checked what qsub named; the PE may have changed since, or the cell have no JSV
        control = facts.pe_settings(pe).get(pe, {}).get("control_slaves", "") if pe else ""
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        raise VmwrapError(f"cannot read parallel environment {pe[:64]!r}'s control_slaves: {str(e)[:200]}") from None
    if control.upper() != "TRUE":
        raise UserError(f"the job's parallel environment {pe[:64] or '?'} gave it slots on {len(hosts)} hosts "
                        f"({' '.join(h[:80] for h in hosts[:4])}) and has control_slaves {control or '?'}: a VM job "
                        f"spans hosts only in one with control_slaves TRUE; {PE_FIX}")
    me = env.get("HOSTNAME", "")
    if me not in hosts:
        raise VmwrapError(f"this host ({me[:80]!r}) is not in job {jid}'s pe_hostfile ({' '.join(hosts[:4])})")
    hosts = job_hosts(me, hosts)   # this prolog runs on the master's host
    return jobnet.Plan(jid, tuple(hosts), tuple(host_addresses(hosts)), hosts.index(me)), dict(alloc)[me]


# The JSV's CLIENT of an interactive submission (jsv(1); qrsh sends `PARAM CLIENT qrsh`, seen on 8.1.9).
INTERACTIVE_CLIENTS = ("qrsh", "qlogin", "qsh")


def check_request(settings: Settings, params: dict[str, str], user: str, gid: int,
                  script_optional: bool = False) -> tuple[str | None, int | None, str | None]:
    """(image, memory MiB or None, None) for an acceptable request, (None, None, reason) to reject it. Reads the script body
    (the client JSV runs as the submitter, in qsub's directory) and the `-ac vmwrap_image=` context."""
    ctx = dict(kv.partition("=")[::2] for kv in params.get("ac", "").split(",") if kv)
    native = ctx.get(wire.CONTEXT_IMAGE) or None
    text = ""
    cmd = params.get("CMDNAME", "")
    if cmd and params.get("b", "n") != "y" and os.path.isfile(cmd):
        try:
            with open(cmd, encoding="utf-8", errors="surrogateescape") as f:
                text = f.read(1 << 20)
        except OSError as e:
            if not script_optional:  # a server JSV may not read users' files: the prolog checks it then
                return None, None, f"cannot read the job script {cmd}: {e.strerror}"
    try:
        req = directives.parse(text)
        periodic.check(req.checkpoint_every_s, settings)  # what Slurm's job_submit.lua refuses too
        if native is not None:
            directives.check_image_name(native)
        if req.image and native and req.image != native:
            return None, None, f"the script asks for image {req.image!r} but -ac {wire.CONTEXT_IMAGE}={native}"
        image = req.image or native
        if image is None:
            return None, None, None
        _catalog(settings.catalog).resolve(image, user, gid, memory_mib=req.memory_mib, cpus=req.cpus)
    except VmwrapError as e:
        return None, None, str(e)
    client = params.get("CLIENT", "")
    if client in INTERACTIVE_CLIENTS:  # the session would start on the host, beside the VM, not in it
        return None, None, interactive_refusal(client, "Grid Engine", "with qsub", "host")
    if params.get("pe_name"):
        ckpt = params.get("ckpt", "")
        saved = f"-ckpt {ckpt[:64]}" if ckpt and ckpt.upper() != "NONE" else \
            "#VMWRAP --checkpoint-every" if req.checkpoint_every_s else None
        why = pe_refusal(params["pe_name"], params.get("pe_min", "1"), params.get("pe_max", "1"), saved)
        if why:
            return None, None, why
    return image, req.memory_mib, None


def _names(resources: str) -> set[str]:
    return {kv.partition("=")[0].strip() for kv in resources.split(",") if kv.strip()}


def jsv_changes(params: dict[str, str], image: str, memory_mib: int | None = None) -> list[tuple[str, str]]:
    """The job parameters an accepted VM job gets: its image and its script's --memory as job context
    (read by the hooks and the daemons; a vmwrap_memory of the user's own is replaced), and a soft
    request for hosts holding the image (cache-aware placement, when the cell has the complex; a
    job that names it itself keeps its own)."""
    from . import facts

    out = []
    items = [kv for kv in params.get("ac", "").split(",") if kv]
    keep = [kv for kv in items if kv.partition("=")[0].strip() != wire.CONTEXT_MEMORY]
    if not any(kv.partition("=")[0].strip() == wire.CONTEXT_IMAGE for kv in keep):
        keep.append(f"{wire.CONTEXT_IMAGE}={image}")
    if memory_mib is not None:
        keep.append(wire.encode_context(image, memory_mib).split(",")[1])
    if keep != items:
        out.append(("ac", ",".join(keep)))
    soft = params.get("l_soft", "")
    if facts.CACHED not in _names(soft) | _names(params.get("l_hard", "")) and facts.cached_complex_defined():
        out.append(("l_soft", ",".join(x for x in (soft, facts.soft_request(image)) if x)))
    return out


def jsv(settings: Settings, inp, out) -> int:
    """Grid Engine's JSV line protocol (client JSV, run by qsub as the submitter)."""
    me = pwd.getpwuid(os.getuid())

    def say(line: str) -> None:
        out.write(line + "\n")
        out.flush()

    params: dict[str, str] = {}
    for raw in inp:
        parts = raw.rstrip("\n").split(" ", 2)
        cmd = parts[0]
        if cmd == "START":
            say("STARTED")
        elif cmd == "PARAM" and len(parts) >= 2:
            params[parts[1]] = parts[2] if len(parts) > 2 else ""
        elif cmd == "BEGIN":
            # A client JSV runs as the submitter; a server JSV (jsv_url, one long-lived process in
            # sge_qmaster) as the admin user, for everybody: then the job's USER param names them.
            user = params.get("USER") or me.pw_name
            try:
                pw = pwd.getpwnam(user)
            except KeyError:
                pw = me
            server = pw.pw_uid != me.pw_uid
            image, memory, reason = check_request(settings, params, pw.pw_name, pw.pw_gid, script_optional=server)
            if reason:
                say(f"RESULT STATE REJECT vmwrap: {reason}")
            else:
                changes = jsv_changes(params, image, memory) if image else []
                for name, value in changes:
                    say(f"PARAM {name} {value}")
                say("RESULT STATE CORRECT" if changes else "RESULT STATE ACCEPT")
            params = {}
        elif cmd == "QUIT":
            return 0
    return 0
