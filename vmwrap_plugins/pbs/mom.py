"""PBS Professional / OpenPBS mom hooks (root, on the execution host) translated into core calls.

The hook body pbs_mom runs (vmwrap/hooks/pbs-mom.py, in PBS's own Python) only copies facts out of
`pbs.event()` and hands them here as JSON on stdin, in a clean environment; it applies the reply
(accept, reject, offline the vnode, rewrite the launched program). Event semantics, from the OpenPBS
sources (github.com/openpbs/openpbs, src/resmom; the Hooks Guide says the same):

- execjob_begin (req_quejob.c, the mom receiving the job): boot the VM through vmwrap.lifecycle.
  A reject purges the job on the mom and the server requeues it: only for a node fault, which also
  sets this vnode offline (`vnode_list[...].state`). A user's mistake never does: the job runs and
  its payload prints why it fails (as under Slurm, Grid Engine and Torque).
- execjob_launch (start_exec.c, the job's first process, as root before the exec): a job with a VM
  gets the vmwrap payload (vmwrap/hooks/pbs-job) as `progname`/`argv` instead of the login shell; it
  runs as the job's user with the shell's stdin (the script's path, or the script) and output.
  A reject there deletes the job (JOB_EXEC_FAILHOOK_DELETE) unless job.rerun() was called.
- execjob_preterm (requests.c:1968, qdel only, before the SIGTERM): marks the run dir, so that
  the payload, on the SIGTERM that follows, ends the guest's job instead of detaching from it.
- execjob_end and execjob_abort (mom_comm.c): destroy the VM and its files; idempotent. After
  `qrerun` (the job's Exit_status is JOB_EXEC_RERUN, requests.c:1983, kept by catch_child.c:491)
  the VM is saved first, and the next run's execjob_begin (run_count > 1) restores it.
- qhold of a running job: the `$action checkpoint_abort` script saves the VM (vmwrap_plugins/pbs/
  action.py); execjob_end keeps that checkpoint; on qrls execjob_begin (the job is checkpointed, its
  run count unchanged) boots nothing and the `$action restart` script restores the VM and becomes
  the job.
- execjob_postsuspend / execjob_preresume (requests.c): `qsig -s suspend` stops the job's processes
  (SIGSTOP), then the hook pauses the whole VM; resume runs the hook (the VM resumes) before SIGCONT.
  A preresume reject leaves the job suspended.
"""

from __future__ import annotations

import json
import os
import pwd
import grp
import re
from pathlib import Path

from vmwrap import directives, jobnet, lifecycle, restart_record, rundir, safeio
from vmwrap.config import Settings
from vmwrap.errors import NodeError, UserError, VmwrapError
from vmwrap.job import Job

NAME = "pbs"
EVENTS = ("begin", "launch", "preterm", "end", "abort", "postsuspend", "preresume")
DELETED = "pbs-deleted"       # in a run dir: execjob_preterm saw a qdel (root's file)
LAUNCHED = "pbs-launched"     # in a run dir: execjob_launch made the job's top shell the payload (root's)
RERUN_STATUSES = {-11, -14}   # JOB_EXEC_RERUN, JOB_EXEC_RERUN_SIS_FAIL (src/include/job.h:941-944)
RESTART_SETTLE = 120.0        # s a rerun job's begin waits for its previous run's end to save the VM
FACTS_MAX = 1 << 20           # bytes of JSON the hook body may hand over
SCRIPT_MAX = 1 << 20          # bytes of the spooled job script root reads (directives are at its head)
PAYLOAD = "pbs-job"           # vmwrap/hooks/pbs-job: the program the launch hook substitutes

# `123.server`, `123[4].server` (an array subjob): sequence, index, server (qsub(1B), "Job Identifier").
_JOB_ID = re.compile(r"(\d{1,12})(?:\[(\d{1,9})\])?(?:\.([A-Za-z0-9][A-Za-z0-9.-]{0,252}))?")
# pbs_resources(7B) size: an integer with an optional k/m/g/t/p and b (bytes) or w (words) suffix.
_SIZE = re.compile(r"(\d{1,15})([kmgtp]?)([bw]?)", re.I)
_SHIFT = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50}


def job_id(pbs_id: str) -> str:
    """The core's id (file and domain name) for PBS's: `SEQ[-INDEX].SERVER-LABEL`, at most 64 chars."""
    m = _JOB_ID.fullmatch(pbs_id or "")
    if not m:
        raise UserError(f"{str(pbs_id)[:80]!r} is not a PBS job id (SEQ.SERVER or SEQ[INDEX].SERVER)")
    seq, idx, server = m.groups()
    jid = seq + (f"-{idx}" if idx else "")
    if server:
        jid += "." + server.split(".")[0][:64 - len(jid) - 1]
    return jid


def memory_mib(value: str | None) -> int | None:
    if value in (None, ""):
        return None
    m = _SIZE.fullmatch(str(value).strip())
    if not m:
        raise UserError(f"cannot read the job's memory request {str(value)[:40]!r} (PBS size: e.g. 512mb, 2gb)")
    n = int(m.group(1)) << _SHIFT[m.group(2).lower()]
    return (n * 8 if m.group(3).lower() == "w" else n) >> 20


def ncpus(value) -> int | None:
    v = str(value or "")
    return int(v) if re.fullmatch(r"[1-9]\d{0,4}", v) else None


def _str(facts: dict, key: str, limit: int = 4096) -> str:
    v = facts.get(key)
    if v is None:
        return ""
    if not isinstance(v, str) or len(v) > limit or "\0" in v:
        raise UserError(f"the hook's {key!r} is not a string of at most {limit} characters")
    return v


def _int(facts: dict, key: str) -> int:
    v = facts.get(key)
    if v in (None, ""):
        return 0
    if not re.fullmatch(r"-?\d{1,9}", str(v)):
        raise UserError(f"the hook's {key!r} is not a number")
    return int(v)


def spooled_script(pbs_home: str, pbs_id: str) -> str | None:
    """The job script as pbs_mom spooled it (`PBS_HOME/mom_priv/jobs/<ID>.SC`, start_exec.c), capped;
    None when it is not there as a plain file in a root-owned directory nobody else may write."""
    import stat

    if not pbs_home.startswith("/") or os.path.normpath(pbs_home) != pbs_home:
        return None
    d = os.path.join(pbs_home, "mom_priv", "jobs")
    try:
        st = os.lstat(d)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
            return None
        data = safeio.read_capped(os.path.join(d, f"{pbs_id}.SC"), SCRIPT_MAX)
    except OSError:
        return None
    return None if data is None else data.decode("utf-8", "surrogateescape")


def exec_chunks(exec_host) -> list[tuple[str, int]]:
    """(host, CPUs) of each chunk of the job's exec_host (`host/N*C+host2/N*C`, as the server set it at
    run; `*C` left out for one CPU)."""
    chunks = []
    for part in str(exec_host or "")[:65536].split("+"):
        host, _, rest = part.partition("/")
        host, count = host.strip()[:255], rest.partition("*")[2]
        if host:
            chunks.append((host, int(count) if re.fullmatch(r"[1-9]\d{0,4}", count) else 1))
    return chunks


def chunk_memory(exec_vnode) -> list[int | None]:
    """The memory (MiB) of each chunk of the job's exec_vnode (`(vn:ncpus=2:mem=1048576kb)+(vn2:...)`,
    a chunk over several vnodes `(vn1:mem=1gb+vn2:mem=1gb)`): the server writes exec_host and exec_vnode
    chunk by chunk, so the K-th of one is the K-th of the other. None for a chunk without mem."""
    out: list[int | None] = []
    for chunk in re.findall(r"\(([^()]*)\)", str(exec_vnode or "")[:65536]):
        total = None
        for m in re.finditer(r":mem=([^:+)]*)", chunk):
            total = (total or 0) + (memory_mib(m.group(1)) or 0)
        out.append(total)
    return out


def host_plan(facts: dict, jid: str) -> tuple[jobnet.Plan | None, int | None, int | None]:
    """(the job network's plan, this host's CPUs, this host's memory in MiB: None when its chunks say
    none), or (None, None, None) for a job on one host, sized by its request: a job whose chunks landed on several hosts gets one VM on each (every mom's execjob_begin
    boots its own), sized by the chunks on that host, joined as Slurm's multi-node jobs are. Every mom
    numbers the hosts alike: exec_host's order, the primary execution host first."""
    chunks = exec_chunks(facts.get("exec_host"))
    hosts = list(dict.fromkeys(h for h, _ in chunks))
    if len(hosts) <= 1:
        return None, None, None
    me = _str(facts, "node", 255)
    if me not in hosts:
        raise VmwrapError(f"this mom ({me[:80]!r}) is not one of job {jid}'s hosts ({' '.join(hosts[:4])})")
    jobnet.check_nodes(jid, hosts)   # before asking the resolver about any of them
    cpus = sum(n for h, n in chunks if h == me)
    memory = chunk_memory(facts.get("exec_vnode"))
    mine = [memory[k] if k < len(memory) else None for k, (h, _) in enumerate(chunks) if h == me]
    mem = None if None in mine else sum(mine)
    plan = jobnet.Plan(jid, tuple(hosts), tuple(jobnet.resolve(hosts, "the job's exec_host")), hosts.index(me))
    return plan, cpus, mem


def begin_job(facts: dict) -> Job | None:
    """The job in the core's terms; None when it asks for no VM (no -v/-l image, no #VMWRAP image)."""
    from .queuejob import RESOURCE, VARIABLE

    pbs_id = _str(facts, "job", 300)
    jid = job_id(pbs_id)
    resources = facts.get("resources") or {}
    variables = facts.get("variables") or {}
    if not isinstance(resources, dict) or not isinstance(variables, dict):
        raise UserError("the hook's resources/variables are not mappings")
    native = [str(v) for v in (variables.get(VARIABLE), resources.get(RESOURCE)) if v not in (None, "")]
    for v in native:
        directives.check_image_name(v)
    if len(set(native)) > 1:
        raise UserError(f"-v {VARIABLE}={native[0]} but -l {RESOURCE}={native[1]}")
    script = spooled_script(_str(facts, "pbs_home"), pbs_id) or ""
    if not native and not directives.parse(script).image:
        return None
    hosts = set(h for h, _ in exec_chunks(facts.get("exec_host")))
    if len(hosts) > 1 and not native:
        raise UserError(f"the job runs on {len(hosts)} hosts and names its image only in the script, which "
                        f"the other hosts never get: name it at qsub (-l {RESOURCE}=NAME or -v {VARIABLE}=NAME)")
    plan, host_cpus, host_mem = host_plan(facts, jid)
    try:
        pw = pwd.getpwnam(_str(facts, "euser", 64))
        gid = grp.getgrnam(_str(facts, "egroup", 64)).gr_gid
    except (KeyError, ValueError):
        raise UserError("unknown job user or group") from None
    if pw.pw_uid == 0:
        raise UserError("root's jobs do not run in VMs")
    work_dir = str(variables.get("PBS_O_WORKDIR") or pw.pw_dir)
    runs = _int(facts, "run_count")
    return Job(job_id=jid, scheduler=NAME, user=pw.pw_name, uid=pw.pw_uid, gid=gid, work_dir=work_dir,
               script=script, cpus=host_cpus or ncpus(resources.get("ncpus")),
               memory_mib=host_mem if plan else memory_mib(resources.get("mem")),
               image=native[0] if native else None, restart_count=max(runs - 1, 0),
               groups=[g for g in os.getgrouplist(pw.pw_name, gid) if g != gid], nodes=plan,
               # a requeued job's sister has no script to say whether it may start again: the primary
               # decides (its --on-lost-checkpoint); a VM here is torn down with the job if it does not
               on_lost_checkpoint="restart" if plan is not None and plan.index > 0 else None)


def handle(settings: Settings, event: str, facts: dict, config_path: str | None = None) -> dict:
    """One mom hook event: the reply the hook body applies (`reject`, `offline`, `progname`/`argv`,
    `log`). `config_path`: the settings file the hook named, handed on to the launched payload."""
    if event not in EVENTS:
        return {"reject": f"vmwrap: no such mom event {event[:40]!r}"}
    try:
        jid = job_id(_str(facts, "job", 300))
    except UserError as e:
        return {"log": f"vmwrap: {e}"}    # nothing of vmwrap's can exist under that name
    if event == "preterm" and not facts.get("ms", True):
        return {}                         # a sister's VM runs no payload to tell
    if event == "begin":
        from .action import held

        if facts.get("checkpointed") is True or held(settings, jid):
            return {"log": "vmwrap: restarting from qhold's checkpoint: the restart action restores the VM"}
        out = lifecycle.start(settings, jid, lambda: begin_job(facts), NAME, settle=RESTART_SETTLE)
        if out.verdict is lifecycle.Verdict.NODE_FAULT:
            return {"reject": f"vmwrap: {out.reason}", "offline": f"vmwrap: {out.reason}"}
        if not out.vm and rundir.path(settings, jid).exists():
            from vmwrap import launcher   # a crashed run's leftovers would make launch take it for a VM job

            launcher.teardown(jid, settings)
        return {"log": f"vmwrap: {out.verdict.value}{': ' + out.reason if out.reason else ''}"} if out.vm else {}
    if event == "launch":
        return _launch(settings, jid, facts, config_path)
    if event == "preterm":
        _mark_deleted(settings, jid)
        return {}
    if event in ("end", "abort"):
        from .action import held

        try:
            rerun, runs = _int(facts, "exit_status") in RERUN_STATUSES, _int(facts, "run_count")
        except UserError:
            rerun, runs = False, 0
        checkpointed = held(settings, jid)   # qhold: checkpoint_abort saved the VM, keep its checkpoint
        out = lifecycle.end(settings, jid, requeued=(rerun and event == "end") or checkpointed, restarts=runs,
                            scheduler=NAME)
        if out.facts.get("saved"):
            _record(settings, jid, _str(facts, "job", 300))
        elif not rerun and not checkpointed:
            record_path(settings, jid).unlink(missing_ok=True)   # its checkpoint was deleted with it
        if out.verdict is lifecycle.Verdict.NODE_FAULT:
            return {"offline": f"vmwrap: {out.reason}", "log": f"vmwrap: {out.reason}"}
        return {}
    return _pause(settings, jid, event == "postsuspend")


def _launch(settings: Settings, jid: str, facts: dict, config_path: str | None) -> dict:
    """execjob_launch runs for the job's top shell (on the primary execution host, first) and for every
    TM task (pbs_tmrsh, pbsdsh; on any host of the job, only once the job runs) (start_exec.c
    finish_exec, start_process). On the primary host the first launch of a VM job's run becomes the
    payload (LAUNCHED, root's, made at most once per run dir: never PBS_TASKNUM, which a task's
    spawner may set); every later one is a task and runs as spawned, vmwrap's own (`pbs-job task
    ...`, which the payload's pbs_tmrsh spawned) with this host's config."""
    from vmwrap.resources import HOOKS

    from .steps import TASK

    run_dir = rundir.path(settings, jid)
    if not (run_dir / rundir.JOB).exists() and not (run_dir / rundir.ERROR).exists():
        return {}                     # no VM job: the login shell (or task) runs as usual
    if facts.get("ms", True) and _first_launch(run_dir):
        pbs_exec = _str(facts, "pbs_exec", 1024)
        return {"progname": str(HOOKS / PAYLOAD),
                "argv": [PAYLOAD, *(["--config", config_path] if config_path else []),
                         *(["--pbs-exec", pbs_exec] if pbs_exec.startswith("/") else [])]}
    argv = facts.get("argv")
    if config_path and isinstance(argv, list) and argv[:2] == [str(HOOKS / PAYLOAD), TASK]:
        return {"argv_from": [str(HOOKS / PAYLOAD), "--config", config_path, TASK], "keep_after": 2}
    return {}


def _first_launch(run_dir: Path) -> bool:
    """Whether this is the run's first launch here: LAUNCHED made now, in the run dir root made at
    begin (a link in its place never counts as first)."""
    try:
        fd = os.open(run_dir / LAUNCHED, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    except OSError:
        return False
    os.close(fd)
    return True


def _record(settings: Settings, jid: str, pbs_id: str) -> None:
    """Beside a saved job's checkpoint (root's store), its PBS id: what `vmwrap pbs gc` asks qstat."""
    p = record_path(settings, jid)
    try:
        restart_record.write(p, {"job": pbs_id})
    except OSError:
        pass      # without it the GC keeps the checkpoint: never deletes what it cannot name


def record_path(settings: Settings, jid: str) -> Path:
    return restart_record.path(settings, jid, NAME)


QSTAT_UNKNOWN = 153           # exit(PBSE_UNKJOBID) = 15001 & 0xff (src/cmds/qstat.c:3348)


def ended(settings: Settings, qstat: str, jid: str) -> bool:
    """Whether the saved job `jid` ended for good: `qstat -x -f ID` prints `qstat: Unknown Job Id ID`
    and exits 153 (src/cmds/qstat.c:3114, prt_job_err; Liblog/pbs_messages.c msg_unkjobid) or shows
    it finished (`job_state = F`, job history). No record of its PBS id, an unreachable server, any
    other answer: not ended."""
    import subprocess

    try:
        raw = safeio.read_capped(record_path(settings, jid), 1 << 16)
        pbs_id = json.loads(raw)["job"] if raw is not None else None
        if not isinstance(pbs_id, str) or job_id(pbs_id) != jid:
            return False
        r = subprocess.run([qstat, "-x", "-f", pbs_id], capture_output=True, timeout=60, cwd="/",
                           env={"PATH": "/usr/bin:/bin"}, stdin=subprocess.DEVNULL)
    except (OSError, ValueError, KeyError, TypeError, UserError, subprocess.TimeoutExpired):
        return False
    out, err = r.stdout[:1 << 20].decode(errors="replace"), r.stderr[:4096].decode(errors="replace")
    if r.returncode == QSTAT_UNKNOWN and "Unknown Job Id" in err:
        return True
    return r.returncode == 0 and re.search(r"^\s*job_state = F\s*$", out, re.M) is not None


def _mark_deleted(settings: Settings, jid: str) -> None:
    run_dir = rundir.path(settings, jid)
    if not run_dir.is_dir() or run_dir.is_symlink():
        return
    try:
        fd = os.open(run_dir / DELETED, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        os.close(fd)
    except OSError:
        pass   # the payload then detaches on SIGTERM and execjob_end destroys the VM all the same


def _pause(settings: Settings, jid: str, pause: bool) -> dict:
    """Pause/resume the job's whole VM (libvirt, as root); a job without a VM here is left alone."""
    from vmwrap import domain

    if not rundir.path(settings, jid).exists():
        return {}
    what = "pause" if pause else "resume"
    try:
        conn = domain.connect(settings.libvirt_uri)
    except NodeError as e:
        return {"reject": f"vmwrap: cannot {what} the job's VM: {e}"}
    try:
        dom = domain.lookup(conn, rundir.domain_name(jid))
        if dom is None:
            return {}
        domain.set_paused(conn, rundir.domain_name(jid), dom, pause)
    except Exception as e:  # noqa: BLE001 (the scheduler learns why; the node stays up)
        return {"reject": f"vmwrap: cannot {what} the job's VM: {e}"}
    finally:
        conn.close()
    return {"log": f"vmwrap: VM {'paused' if pause else 'resumed'}"}


def main(settings: Settings, event: str, stdin, stdout, config_path: str | None = None) -> int:
    """`vmwrap pbs mom EVENT`: facts as JSON on stdin, the reply as JSON on stdout."""
    os.umask(0o022)
    raw = stdin.buffer.read(FACTS_MAX + 1)
    try:
        if len(raw) > FACTS_MAX:
            raise ValueError("more than 1 MiB")
        facts = json.loads(raw or b"{}")
        if not isinstance(facts, dict):
            raise ValueError("not an object")
    except ValueError as e:
        reply = {"reject": f"vmwrap: the hook's facts are not valid JSON ({e})"}
    else:
        reply = handle(settings, event, facts, config_path)
    stdout.write(json.dumps(reply) + "\n")
    stdout.flush()
    return 0


class PBS:
    """vmwrap.adapter.Scheduler for PBS Professional / OpenPBS (the mom side; no planner, no prestage)."""

    name = NAME
    root_env: tuple[str, ...] = ()

    def __init__(self, settings: Settings | None = None, qstat: str | None = None):
        self.settings = settings
        self.qstat = qstat        # `vmwrap pbs gc --qstat PATH`: PBS's qstat, by absolute path

    def job_id(self, env) -> str:
        return job_id(env["job"])

    def job(self, env) -> Job | None:
        return begin_job(env)

    def requeue_state(self, settings: Settings, env) -> tuple[bool, int]:
        return False, 0

    def take_out(self, env, reason: str) -> None:
        return None       # the hook body offlines the vnode from the reply

    def still_queued(self):
        """For the checkpoint GC: a rerun job deleted while queued never reaches a mom again."""
        if self.settings is None or not self.qstat:
            return lambda j: True
        settings, qstat = self.settings, self.qstat

        def still_queued(jid: str) -> bool:
            if not ended(settings, qstat, jid):
                return True
            record_path(settings, jid).unlink(missing_ok=True)   # the store deletes the checkpoint next
            return False

        return still_queued

    def planned_starts(self):
        return None

    def publish_cached(self, node: str, images: list[str]) -> None:
        return None

    def reservations(self):
        return None

    def queue(self, settings: Settings, now: float) -> list:
        return []

    def plan_timing(self):
        raise RuntimeError("the gap planner does not drive PBS")

    def set_time_limit(self, job: str, seconds: float) -> None:
        raise RuntimeError("the gap planner does not drive PBS")

    def vacate(self, job: str) -> None:
        raise RuntimeError("the gap planner does not drive PBS")

    def render_config(self, settings: Settings, **options) -> str:
        from .render import render_pbs

        return render_pbs(settings, node_config=options.get("node_config"))
