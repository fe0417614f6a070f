"""A `pbs` module for PBS hook code in tests, and a pbs_mom that calls the mom hooks (not shipped; no
PBS server can be installed from the registries here).

The module has only the documented hook API vmwrap uses. Its source, OpenPBS (github.com/openpbs/
openpbs): the event/job/vnode objects and accept/reject in src/modules/python/pbs/v1/_svr_types.py
(_event.accept/reject raise SystemExit and end the hook; job.rerun(), job.in_ms_mom(); the launch
event's progname/argv/env are the only writable event parameters), the constants in
src/lib/Libpython/module_pbs_v1.c (EXECJOB_* = HOOK_EVENT_EXECJOB_* of src/include/hook.h:101-113,
ND_OFFLINE = INUSE_OFFLINE of src/include/pbs_nodes.h:281), `pbs_conf` and `hook_config_filename`
(_svr_types.py:68-79: the imported hook configuration file, PBS_HOOK_CONFIG_FILE), `get_local_nodename()`
(_svr_types.py:102), `logjobmsg` (used by the shipped cgroups hook, src/hooks/cgroups/pbs_cgroups.PY).

What a reject means is the mom's, from src/resmom (see MomResult.outcome)."""

from __future__ import annotations

import json
import os
import pwd
import grp
import runpy
import shutil
import signal
import subprocess
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

from harness.host_share import worker

QUEUEJOB = 1
# src/include/hook.h:101-113 (module_pbs_v1.c:440-464 exports them under these names).
EXECJOB_BEGIN = 0x40
EXECJOB_PROLOGUE = 0x80
EXECJOB_EPILOGUE = 0x100
EXECJOB_END = 0x200
EXECJOB_PRETERM = 0x400
EXECJOB_LAUNCH = 0x800
EXECJOB_ABORT = 0x40000
EXECJOB_POSTSUSPEND = 0x80000
EXECJOB_PRERESUME = 0x100000
ND_OFFLINE = 0x01                # INUSE_OFFLINE (pbs_nodes.h:281; module_pbs_v1.c:474)
QSUB_REJECT_STATUS = 32


class _Accepted(SystemExit):
    pass


class _Rejected(SystemExit):
    def __init__(self, msg: str):
        super().__init__(255)    # _svr_types.py: reject(emsg, ecode=255)
        self.msg = msg


class Job:
    def __init__(self, variables: dict[str, str] | None = None, resources: dict[str, str] | None = None,
                 id: str = "", euser: str = "", egroup: str = "", ms: bool = True, run_count: int | None = None,
                 Exit_status: int | None = None, exec_host: str | None = None, interactive: int | None = None,
                 exec_vnode: str | None = None):
        self.Variable_List = dict(variables or {})
        self.interactive = interactive      # `qsub -I`: the job attribute `interactive` (a long, qsub's port)
        # The hosts the server ran the job on, `host/N*C+host2/N*C` (str of pbs.exec_host; set at run)
        self.exec_host = exec_host
        self.exec_vnode = exec_vnode        # `(vnode:ncpus=N:mem=M)+(...)`, a group per chunk (set at run)
        self.run_count = run_count          # the server's count of starts (job attribute run_count)
        self.Exit_status = Exit_status      # set for execjob_end/epilogue (mom_hook_func.c:3669-3677)
        self.Resource_List = dict(resources or {})
        self.id = id
        self.euser = euser
        self.egroup = egroup
        self._msmom = ms
        self._rerun = False
        self._checkpointed = False   # the job's JOB_SVFLG_CHKPT (mom_hook_func.c:1099)

    def in_ms_mom(self) -> bool:
        return self._msmom

    def rerun(self) -> None:
        self._rerun = True

    def is_checkpointed(self) -> bool:
        return self._checkpointed


@dataclass
class Vnode:
    name: str
    state: int = 0
    comment: str = ""


class Event:
    def __init__(self, type_: int, job: Job, requestor: str = "", *, progname: str | None = None,
                 argv: list[str] | None = None, env: dict[str, str] | None = None,
                 vnode_list: dict[str, Vnode] | None = None):
        self.type = type_
        self.job = job
        self.requestor = requestor
        self.progname = progname
        self.argv = list(argv or [])
        self.env = dict(env or {})
        self.vnode_list = dict(vnode_list or {})

    def accept(self, *_):
        raise _Accepted(0)

    def reject(self, msg: str = ""):
        raise _Rejected(msg)


def module(event: Event, *, nodename: str = "node1", pbs_home: str = "/var/spool/pbs",
           hook_config: str | None = None, log: list[str] | None = None, pbs_exec: str = "/opt/pbs") -> types.ModuleType:
    m = types.ModuleType("pbs")
    for name, value in globals().items():
        if name.startswith("EXECJOB_") or name in ("QUEUEJOB", "ND_OFFLINE"):
            setattr(m, name, value)
    m.event = lambda: event
    m.get_local_nodename = lambda: nodename
    m.pbs_conf = {"PBS_HOME": pbs_home, "PBS_EXEC": pbs_exec}
    m.hook_config_filename = hook_config
    m.logjobmsg = lambda jobid, msg: (log if log is not None else []).append(f"{jobid};{msg}")
    return m


def _run(hook, pbs) -> tuple[bool, str]:
    """(accepted, reject message) of running `hook` (a callable taking the module, or a hook file)."""
    saved = sys.modules.get("pbs")
    sys.modules["pbs"] = pbs
    try:
        if callable(hook):
            hook(pbs)
        else:
            runpy.run_path(str(hook), run_name="__main__")
        return True, ""     # a hook that neither accepts nor rejects accepts
    except _Accepted:
        return True, ""
    except _Rejected as r:
        return False, r.msg
    finally:
        if saved is None:
            sys.modules.pop("pbs", None)
        else:
            sys.modules["pbs"] = saved


def qsub(hook, event: Event) -> tuple[int, str]:
    """Run a queuejob hook for `event`: (qsub's exit status, what it prints on stderr); a rejection
    is `qsub: <msg>` with exit status 32 (seen on OpenPBS 23.06)."""
    ok, msg = _run(hook, module(event))
    return (0, "") if ok else (QSUB_REJECT_STATUS, f"qsub: {msg}\n")


@dataclass
class MomResult:
    accepted: bool
    message: str
    event: Event
    log: list[str] = field(default_factory=list)

    @property
    def outcome(self) -> str:
        """What pbs_mom does with the hook's verdict (OpenPBS src/resmom):
        begin reject: the job is purged on the mom and the server requeues it (req_quejob.c);
        launch reject: the job is deleted, or requeued after job.rerun() (start_exec.c,
        JOB_EXEC_FAILHOOK_DELETE / _RERUN); postsuspend reject: logged, the job stays suspended
        (requests.c:1356); preresume reject: the job is not resumed (requests.c:1689);
        end/abort: logged only (mom_comm.c)."""
        if self.accepted:
            return "accepted"
        t = self.event.type
        if t == EXECJOB_BEGIN:
            return "requeued"
        if t == EXECJOB_LAUNCH:
            return "requeued" if self.event.job._rerun else "deleted"
        if t == EXECJOB_PRERESUME:
            return "not resumed"
        return "logged"


def mom_hook(hook, event: Event, *, nodename: str = "node1", pbs_home: str = "/var/spool/pbs",
             hook_config: str | None = None, pbs_exec: str = "/opt/pbs") -> MomResult:
    """Run a mom hook (a file as `qmgr import hook` installs it) for `event` as pbs_mom does."""
    event.vnode_list.setdefault(nodename, Vnode(nodename))
    log: list[str] = []
    ok, msg = _run(hook, module(event, nodename=nodename, pbs_home=pbs_home, hook_config=hook_config, log=log,
                                pbs_exec=pbs_exec))
    return MomResult(ok, msg, event, log)


# --- a pbs_mom running real jobs through the hooks -----------------------------------------------------

JOB_EXEC_RERUN = -11      # src/include/job.h:941
JOB_EXEC_CHKP = -12       # src/include/job.h:942: checkpointed and killed



@dataclass
class MomAction:
    timeout: int
    script: str
    args: list[str]


def parse_mom_config(text: str) -> tuple[dict[str, MomAction], bool]:
    """`$action NAME TIMEOUT !SCRIPT ARGS...` lines as add_mom_action reads them (mom_main.c:1468:
    a known name, a number, `!` and an absolute script path, whitespace-separated args) and
    `$restart_transmogrify` (set_boolean); other lines and comments are skipped."""
    actions, transmogrify = {}, False
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if words[:1] == ["$restart_transmogrify"]:
            transmogrify = words[1].lower() in ("true", "1", "yes", "on")
        if words[:1] != ["$action"]:
            continue
        name, tout, script, *args = words[1:]
        if name not in ("terminate", "checkpoint", "checkpoint_abort", "restart", "multinodebusy") \
                or not tout.isdigit() or not script.startswith("!/"):
            raise ValueError(f"pbs_mom rejects the config line {line!r}")
        actions[name] = MomAction(int(tout), script[1:], args)
    return actions, transmogrify
KILL_DELAY = 2.0          # qdel: SIGTERM, then SIGKILL kill_delay later (queue attribute, default 10 s)


@dataclass
class PbsJob:
    seq: int
    server: str
    name: str
    user: pwd.struct_passwd
    script: str
    workdir: str
    variables: dict[str, str] = field(default_factory=dict)
    resources: dict[str, str] = field(default_factory=dict)
    state: str = "Q"
    exit_status: int | None = None
    run_count: int = 0
    rerun: bool = False
    checkpointed: bool = False   # the server's JOB_SVFLG_CHKPT: the next start restarts from it
    exec_host: str | None = None  # None: this mom alone (`<mom>/0*<ncpus>`)
    exec_vnode: str | None = None
    sisters: list = field(default_factory=list)   # the moms of the job's other hosts (exec_host's order)
    cookie: str = field(default_factory=lambda: os.urandom(16).hex())   # PBS_JOBCOOKIE
    spool: dict[str, bytes] = field(default_factory=dict)   # .OU/.ER the server keeps over a rerun
    history: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.seq}.{self.server}"


class Mom:
    """pbs_mom on one host, at the points where it runs vmwrap's hook (begin, launch, end,
    postsuspend, preresume) and the job's first process. Default build (SHELL_INVOKE=1,
    start_exec.c:3269-3318): the login shell's stdin is one line, the path of
    PBS_HOME/mom_priv/jobs/<ID>.SC chowned to the user; the process starts in the user's home
    with the job's environment; output to PBS_HOME/spool/<ID>.OU/.ER, delivered as NAME.o<SEQ>."""

    def __init__(self, base: Path, name: str, hook: Path, hook_config: Path, server: str = "pbssrv",
                 config: str = "", checkpoint_path: Path | None = None, pbs_exec: Path | None = None):
        self.name, self.hook, self.hook_config, self.server = name, hook, hook_config, server
        self.pbs_exec = str(pbs_exec or "/opt/pbs")    # pbs.conf's PBS_EXEC (where pbs_tmrsh is)
        self.actions, self.transmogrify = parse_mom_config(config)   # mom_priv/config
        self.home = Path(base) / name / "pbs"
        # `$checkpoint_path` (mom_main.c:3227), default PBS_HOME/checkpoint
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path else self.home / "checkpoint"
        self.jobs = self.home / "mom_priv" / "jobs"
        self.spool = self.home / "spool"
        for d, mode in ((self.home, 0o755), (self.home / "mom_priv", 0o751), (self.jobs, 0o751), (self.spool, 0o1777),
                        (self.home / "aux", 0o755), (self.checkpoint_path, 0o700)):
            d.mkdir(parents=True, exist_ok=True)
            d.chmod(mode)
        self.vnode = Vnode(name)
        self.procs: dict[str, subprocess.Popen] = {}
        self.seq = 200 + 10_000 * worker()  # VMs are named by job id host-wide: see harness.host_share

    def job(self, user: pwd.struct_passwd, script: str, workdir: Path, name: str = "STDIN",
            variables: dict | None = None, resources: dict | None = None, exec_host: str | None = None,
            sisters: list | None = None, exec_vnode: str | None = None) -> PbsJob:
        """A job for this mom as its primary execution host; with `sisters` (their moms) one chunk on
        each of the job's hosts, this one first, unless `exec_host`/`exec_vnode` say otherwise."""
        self.seq += 1
        resources = dict(resources or {})
        if sisters and exec_host is None:
            n, mem = resources.get("ncpus", "1"), resources.get("mem")
            exec_host = "+".join(f"{m.name}/0*{n}" for m in [self, *sisters])
            exec_vnode = "+".join(f"({m.name}:ncpus={n}{':mem=' + mem if mem else ''})" for m in [self, *sisters])
        return PbsJob(self.seq, self.server, name, user, script, str(workdir),
                      {"PBS_O_WORKDIR": str(workdir), **(variables or {})}, resources,
                      exec_host=exec_host, exec_vnode=exec_vnode, sisters=list(sisters or []))

    def _event(self, type_: int, job: PbsJob, ms: bool = True, **kw) -> MomResult:
        j = Job(job.variables, job.resources, id=job.id, euser=job.user.pw_name, ms=ms,
                egroup=grp.getgrgid(job.user.pw_gid).gr_name, run_count=job.run_count,
                Exit_status=kw.pop("exit_status", None),
                exec_host=job.exec_host or f"{self.name}/0*{job.resources.get('ncpus', 1)}",
                exec_vnode=job.exec_vnode or f"({self.name}:ncpus={job.resources.get('ncpus', 1)})")
        j._checkpointed = job.checkpointed
        r = mom_hook(self.hook, Event(type_, j, vnode_list={self.name: self.vnode}, **kw), nodename=self.name,
                     pbs_home=str(self.home), hook_config=str(self.hook_config), pbs_exec=self.pbs_exec)
        job.history.append(f"{type_:#x} {r.outcome} {r.message}".strip())
        return r

    def _env(self, job: PbsJob) -> dict[str, str]:
        """The top shell's (start_exec.c:3492-3551): its task is 1 ("%u"), its node 0."""
        pw = job.user
        return {"HOME": pw.pw_dir, "LOGNAME": pw.pw_name, "USER": pw.pw_name, "SHELL": "/bin/sh",
                "PATH": "/bin:/usr/bin", "PBS_JOBID": job.id, "PBS_JOBNAME": job.name,
                "PBS_ENVIRONMENT": "PBS_BATCH", "PBS_O_WORKDIR": job.workdir, "PBS_QUEUE": "workq",
                "PBS_NODEFILE": str(self.nodefile(job)), "PBS_NODENUM": "0", "PBS_TASKNUM": "1",
                "PBS_JOBCOOKIE": job.cookie, "PBS_MOMPORT": "15003",
                **{k: v for k, v in job.variables.items() if not k.startswith("PBS_")}}

    def nodefile(self, job: PbsJob) -> Path:
        """PBS_HOME/aux/<ID> (0644, start_exec.c:1863-1906): a line per MPI process (one per chunk by
        default), its host's name, in chunk order; written on every mom of the job."""
        path = self.home / "aux" / job.id
        hosts = [c.split("/", 1)[0] for c in (job.exec_host or f"{self.name}/0").split("+")]
        path.write_text("".join(h + "\n" for h in hosts))
        path.chmod(0o644)
        return path

    def start(self, job: PbsJob) -> str:
        """Spool the script, execjob_begin, execjob_launch, exec the (possibly rewritten) program; a
        checkpointed job restarts instead (begin, then the restart action)."""
        if not job.checkpointed:
            job.run_count += 1  # the server counts every start it sends to a mom but a restart (req_runjob.c:1021)
        job.rerun = False
        sc = self.jobs / f"{job.id}.SC"
        sc.write_text(job.script)
        sc.chmod(0o700)
        r = self._event(EXECJOB_BEGIN, job)
        if not r.accepted:
            job.state = "Q"
            return r.outcome
        for k, sister in enumerate(job.sisters):   # IM_JOIN_JOB: the nodefile, then execjob_begin (mom_comm.c:3134, 3188)
            sister.nodefile(job)
            r = sister._event(EXECJOB_BEGIN, job, ms=False)
            if not r.accepted:   # the join failed: the job is aborted on the moms that have it, and requeued
                for m in job.sisters[:k]:
                    m._event(EXECJOB_ABORT, job, ms=False)
                self._event(EXECJOB_ABORT, job)
                job.state = "Q"
                return r.outcome
        if job.checkpointed:
            return self._restart(job)
        os.chown(sc, job.user.pw_uid, job.user.pw_gid)       # start_exec.c:3283
        r = self._event(EXECJOB_LAUNCH, job, progname="/bin/sh", argv=["-sh"], env=self._env(job))
        if not r.accepted:
            return r.outcome
        ev = r.event
        self._open_spool(job)   # appended to: TM tasks' output arrives there too (demux)
        out = open(self.spool / f"{job.id}.OU", "ab")
        err = open(self.spool / f"{job.id}.ER", "ab")
        rfd, wfd = os.pipe()
        os.write(wfd, f"{sc}\n".encode())
        os.close(wfd)
        p = subprocess.Popen(ev.argv or [ev.progname], executable=ev.progname, stdin=rfd, stdout=out, stderr=err,
                             cwd=job.user.pw_dir if os.path.isdir(job.user.pw_dir) else "/", env=ev.env or self._env(job),
                             user=job.user.pw_uid, group=job.user.pw_gid,
                             extra_groups=os.getgrouplist(job.user.pw_name, job.user.pw_gid), start_new_session=True)
        os.close(rfd)
        out.close()
        err.close()
        self.procs[job.id] = p
        job.state = "R"
        return "running"

    def _open_spool(self, job: PbsJob) -> None:
        for key in ("OU", "ER"):
            f = self.spool / f"{job.id}.{key}"
            f.write_bytes(job.spool.pop(key, b""))
            os.chown(f, job.user.pw_uid, job.user.pw_gid)

    # --- checkpoint / restart through `$action` scripts (src/resmom/requests.c, mom_main.c) ------------

    def _action_env(self, job: PbsJob, sid: int) -> dict[str, str]:
        """do_mom_action_script's whole environment (mom_main.c:2323-2370)."""
        pw = job.user
        nodefile = self.home / "aux" / job.id
        nodefile.write_text(self.name + "\n")
        return {"UID": str(pw.pw_uid), "GID": str(pw.pw_gid), "HOME": pw.pw_dir, "LOGNAME": pw.pw_name,
                "PBS_JOBNAME": job.name, "PBS_JOBID": job.id, "PBS_QUEUE": "workq", "SHELL": "/bin/sh",
                "USER": pw.pw_name, "PBS_JOBCOOKIE": "0" * 32, "PBS_NODENUM": "0", "PBS_TASKNUM": "1",
                "PBS_MOMPORT": "15003", "PBS_NODEFILE": str(nodefile), "PBS_SID": str(sid), "PBS_JOBDIR": pw.pw_dir}

    def _action_argv(self, a: MomAction, job: PbsJob, sid: int, path: Path) -> list[str]:
        """`%` keywords as do_mom_action_script expands them (mom_main.c:2233-2266)."""
        keys = {"jobid": job.id, "sid": str(sid), "taskid": "1", "uid": str(job.user.pw_uid),
                "gid": str(job.user.pw_gid), "login": job.user.pw_name, "owner": f"{job.user.pw_name}@submithost",
                "globid": "NULL", "auxid": "NULL", "path": str(path)}
        return [a.script] + [keys[x[1:]] if x.startswith("%") else x for x in a.args]

    def _check_script(self, a: MomAction) -> None:
        """mom_main.c:2180-2189: root's, group id <= 10, executable by its owner, not writable by others."""
        st = os.stat(a.script)
        if st.st_uid != 0 or st.st_gid > 10 or not st.st_mode & 0o100 or st.st_mode & 0o002:
            raise PermissionError(f"action script {a.script} cannot be executed due to permissions")

    def qhold(self, job: PbsJob) -> str:
        """qhold of a running job (Checkpoint not 'n', req_holdjob.c:215): the mom runs
        checkpoint_abort as root, fds 0-2 closed, SIGKILLed after its timeout, waited for
        (requests.c:3608, mom_main.c:2410-2496), for the task with %path =
        <checkpoint_path>/<ID>.CK/<TASK> in a fresh 0755 directory; exit 0: an empty file marks
        the checkpoint if the script made none, execjob_end runs (exit status JOB_EXEC_CHKP,
        requests.c:3836-3851 and 3999), the job's processes end (the script's duty: 'abort') and the
        server holds the job with its checkpoint flag (req_jobobit.c:1796). A failure: the hold
        is refused, the job runs on (req_holdjob.c post_hold). Returns 'held' or why not."""
        a = self.actions.get("checkpoint_abort")
        if a is None:
            return "not supported"   # PBSE_NOSUP: only the hold type is set
        self._check_script(a)
        ck = self.checkpoint_path / f"{job.id}.CK"
        shutil.rmtree(ck, ignore_errors=True)
        ck.mkdir(mode=0o755)
        path = ck / f"{1:08X}"   # task_fmt "/%8.8X" of the first task
        sid = self.procs[job.id].pid

        def close_std():
            for fd in (0, 1, 2):
                os.close(fd)

        home = job.user.pw_dir if os.path.isdir(job.user.pw_dir) else "/"   # requests.c:3574-3590
        p = subprocess.Popen(self._action_argv(a, job, sid, path), executable=a.script, cwd=home,
                             env=self._action_env(job, sid), preexec_fn=close_std)
        try:
            rc = p.wait(timeout=a.timeout or None)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            rc = -9
        if rc != 0:
            shutil.rmtree(ck, ignore_errors=True)
            return f"checkpoint failed (exit {rc})"
        if not path.exists():
            path.touch(mode=0o600)
        self._event(EXECJOB_END, job, exit_status=JOB_EXEC_CHKP)
        p = self.procs.pop(job.id)
        p.wait(timeout=60)
        job.exit_status, job.state, job.checkpointed = JOB_EXEC_CHKP, "H", True
        return "held"

    def hand_over_output(self, job: PbsJob) -> None:
        """A checkpoint restarted on another mom (migratable: the server recovers the output and
        checkpoint files and hands them to the next mom, req_jobobit.c:1703-1713)."""
        for key in ("OU", "ER"):
            f = self.spool / f"{job.id}.{key}"
            job.spool[key] = f.read_bytes()
            f.unlink()

    def _restart(self, job: PbsJob) -> str:
        """The restart path: no execjob_launch; for the task whose checkpoint file exists the restart
        action runs (requests.c:4177-4196); with $restart_transmogrify it is root's, in a session of
        its own, and becomes the job's task (mom_main.c:2279, 2338-2360): its exit status is the job's."""
        a = self.actions.get("restart")
        path = self.checkpoint_path / f"{job.id}.CK" / f"{1:08X}"
        if a is None or not self.transmogrify or not path.exists():
            job.state = "Q"
            return "restart failed"      # JOB_EXEC_BADRESRT: the server reruns it
        self._check_script(a)
        self._open_spool(job)
        p = subprocess.Popen(self._action_argv(a, job, 0, path), executable=a.script,
                             cwd=job.user.pw_dir if os.path.isdir(job.user.pw_dir) else "/",
                             env=self._action_env(job, 0), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
        self.procs[job.id] = p
        job.state, job.checkpointed = "R", False
        return "running"

    def spool_out(self, job: PbsJob) -> str:
        p = self.spool / f"{job.id}.OU"
        return p.read_text(errors="replace") if p.exists() else ""

    def signal_session(self, job: PbsJob, sig: int) -> None:
        try:
            os.killpg(self.procs[job.id].pid, sig)
        except ProcessLookupError:
            pass

    def wait(self, job: PbsJob, timeout: float = 180) -> int:
        """The job's end: its exit status (256 + signal when killed: PBS's JOB_EXEC_... convention for
        a signalled job), execjob_end, then the output delivered to PBS_O_WORKDIR."""
        p = self.procs.pop(job.id)
        rc = p.wait(timeout=timeout)
        job.exit_status = rc if rc >= 0 else 256 - rc
        if job.rerun:   # requests.c:1983 JOB_EXEC_RERUN, kept over the task's status (catch_child.c:491)
            job.exit_status = JOB_EXEC_RERUN
        for sister in job.sisters:   # IM_DELETE_JOB: execjob_end there (mom_comm.c:3650)
            sister._event(EXECJOB_END, job, ms=False, exit_status=job.exit_status)
        self._event(EXECJOB_END, job, exit_status=job.exit_status)
        if job.rerun:   # the mom sends the output files to the server for safe keeping and deletes
            job.state = "Q"  # hers; the next run's mom gets them back (server/req_jobobit.c:785-860)
            for key in ("OU", "ER"):
                f = self.spool / f"{job.id}.{key}"
                job.spool[key] = f.read_bytes()
                f.unlink()
            return job.exit_status
        job.state = "F"
        for key, letter in (("OU", "o"), ("ER", "e")):
            src = self.spool / f"{job.id}.{key}"
            dst = Path(job.workdir) / f"{job.name}.{letter}{job.seq}"
            subprocess.run(["/bin/cp", str(src), str(dst)], user=job.user.pw_uid, group=job.user.pw_gid, check=True)
            src.unlink()
        (self.jobs / f"{job.id}.SC").unlink(missing_ok=True)
        return job.exit_status

    def qdel(self, job: PbsJob) -> None:
        """execjob_preterm (qdel only: requests.c:1958-1972), then SIGTERM to the session, SIGKILL
        kill_delay later (terminate_job)."""
        self._event(EXECJOB_PRETERM, job)
        self._terminate(job)

    def qrerun(self, job: PbsJob) -> None:
        """qrerun: the mom's exit status becomes JOB_EXEC_RERUN, then the same SIGTERM/SIGKILL as
        qdel, with no hook before it (requests.c:1981-1996)."""
        job.rerun = True
        self._terminate(job)

    def _terminate(self, job: PbsJob) -> None:
        self.signal_session(job, signal.SIGCONT)
        self.signal_session(job, signal.SIGTERM)
        try:
            self.procs[job.id].wait(timeout=KILL_DELAY)
        except subprocess.TimeoutExpired:
            self.signal_session(job, signal.SIGKILL)

    def suspend(self, job: PbsJob) -> MomResult:
        """qsig -s suspend: suspend_signal (SIGSTOP, mom_main.c:4023) to the job's tasks, then
        execjob_postsuspend (requests.c:1356)."""
        self.signal_session(job, signal.SIGSTOP)
        job.state = "S"
        return self._event(EXECJOB_POSTSUSPEND, job)

    def resume(self, job: PbsJob) -> MomResult:
        """qsig -s resume: execjob_preresume first; a reject leaves the job suspended (requests.c:1689)."""
        r = self._event(EXECJOB_PRERESUME, job)
        if r.accepted:
            self.signal_session(job, signal.SIGCONT)
            job.state = "R"
        return r


def output(job: PbsJob) -> tuple[str, str]:
    return tuple((Path(job.workdir) / f"{job.name}.{x}{job.seq}").read_text(errors="replace") for x in "oe")


def wait_for(cond, what: str, timeout: float = 120.0, every: float = 0.2):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def site_dirs(base: Path, user: pwd.struct_passwd, fresh: bool = False) -> Path:
    """A test's dir (0755: moms and jobs reach into it) and the job's work dir in it (the user's)."""
    if fresh:
        shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True, exist_ok=True)
    base.chmod(0o755)
    work = base / "work"
    work.mkdir(exist_ok=True)
    os.chown(work, user.pw_uid, user.pw_gid)
    return work


def node_agent(cfg: Path, state_dir: Path) -> subprocess.Popen:
    """vmwrap's node agent of a mom's host (root), with that host's config; up once it listens."""
    agent = subprocess.Popen([sys.executable, "-m", "vmwrap.cli", "--config", str(cfg), "agent"],
                             start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: (Path(state_dir) / "agent.sock").exists(), "the node agent", 30)
    return agent


def clean_up(base: Path, moms: list, agents: list[subprocess.Popen]) -> None:
    """After a test's moms: their jobs' sessions (a failed test's job, perhaps stopped by a suspend),
    the node agents, every VM whose run dir is under `base` (a sister's is JOB@K), then `base`."""
    for mom in moms:
        for p in mom.procs.values():
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for a in agents:
        a.kill()
        a.wait()
    for d in Path(base).glob("**/state/jobs/*"):
        for dom in (f"vmwrap-{d.name}", f"vmwrap-{d.name}@1"):
            subprocess.run(["virsh", "-c", "qemu:///system", "destroy", dom], capture_output=True)
    shutil.rmtree(base, ignore_errors=True)


def hook_config(path: Path, vmwrap_config: Path) -> Path:
    """The hook's configuration file (`qmgr import hook NAME application/x-config default FILE`)."""
    path.write_text(json.dumps({"config": str(vmwrap_config)}))
    return path


def qstat_command(path: Path, jobs: dict[str, str], reachable: bool = True) -> Path:
    """A qstat answering `qstat -x -f ID` as OpenPBS's does (src/cmds/qstat.c): `job_state = X` for a
    job the server knows (history included), else `qstat: Unknown Job Id ID` (prt_job_err,
    msg_unkjobid) and exit(PBSE_UNKJOBID) = 15001 & 0xff = 153; an unreachable server: exit 1."""
    path.write_text(f"""#!{sys.executable}
import sys
jobs, reachable = {jobs!r}, {reachable!r}
if not reachable:
    print("Connection refused\\nqstat: cannot connect to server pbssrv (errno=111)", file=sys.stderr)
    sys.exit(1)
jid = sys.argv[-1]
if jid not in jobs:
    print("qstat: Unknown Job Id " + jid, file=sys.stderr)
    sys.exit(15001 & 0xff)
print("Job Id: " + jid)
print("    job_state = " + jobs[jid])
""")
    path.chmod(0o755)
    return path


# --- the TM interface: pbs_tmrsh spawning a task on one of a job's moms -----------------------------

TMRSH = '''#!/usr/bin/python3 -I
# pbs_tmrsh as OpenPBS's (src/cmds/pbs_tmrsh.c): [-n] [-l user] host [-n] [-l user] command...; -l
# must be the caller; needs PBS_ENVIRONMENT, PBS_JOBID, PBS_NODEFILE (and tm_init's PBS_JOBCOOKIE);
# the task goes to the node of the first nodefile line that is `host`; its argv is the command, no
# environment sent (envp NULL); exits with the task's exit value, 255 on its own errors.
import json, os, pwd, socket, sys
SOCK = %r
args, me = sys.argv[1:], pwd.getpwuid(os.getuid()).pw_name
def die(msg):
    print("pbs_tmrsh: " + msg, file=sys.stderr)
    sys.exit(255)
def opts(i):
    while i < len(args) and args[i].startswith("-"):
        a = args[i]
        if a == "-n":
            i += 1
        elif a.startswith("-l"):
            user = a[2:] or (args[i + 1] if i + 1 < len(args) else "")
            if user != me:
                die("%%s: bad user" %% user)
            i += 1 if a[2:] else 2
        else:
            die("usage: pbs_tmrsh [-n][-l username] host [-n][-l username] command [args...]")
    return i
if len(args) < 2:
    die("usage: pbs_tmrsh [-n][-l username] host [-n][-l username] command [args...]")
i = opts(0)
host = args[i] if i < len(args) else die("no host")
i = opts(i + 1)
if i >= len(args):
    die("usage: pbs_tmrsh [-n][-l username] host [-n][-l username] command [args...]")
for v in ("PBS_ENVIRONMENT", "PBS_JOBID", "PBS_NODEFILE", "PBS_JOBCOOKIE"):
    if not os.environ.get(v):
        die("%%s not set" %% v)
lines = [ln.strip() for ln in open(os.environ["PBS_NODEFILE"])]
if host not in lines:
    die('host "%%s" is not a node in job <%%s>' %% (host, os.environ["PBS_JOBID"]))
s = socket.socket(socket.AF_UNIX)
s.connect(SOCK)
s.sendall(json.dumps({"job": os.environ["PBS_JOBID"], "cookie": os.environ["PBS_JOBCOOKIE"],
                      "line": lines.index(host), "argv": args[i:]}).encode() + b"\\n")
reply = b""
while not reply.endswith(b"\\n"):
    chunk = s.recv(4096)
    if not chunk:
        die("lost the mom")
    reply += chunk
reply = json.loads(reply)
if "error" in reply:
    die(reply["error"])
sys.exit(reply["exit"] & 0xff)
'''


class Tm:
    """The moms' TM interface as pbs_tmrsh reaches it (root, a thread of the test): tm_spawn on the
    mom of a job's node runs execjob_launch there (start_process, start_exec.c:5002: progname =
    argv[0], argv, the task's environment), then the task as the job's user in its home, stdin
    /dev/null, its output appended to the job's .OU/.ER on the primary mom (demux), and answers its
    exit value (WEXITSTATUS, or 0x100 + the signal). The task's environment (start_exec.c:4855-4951):
    the mom's pbs_environment file (PATH=/bin:/usr/bin), the job's Variable_List, HOME, PBS_JOBNAME,
    PBS_JOBID, PBS_QUEUE, PBS_JOBCOOKIE, PBS_NODENUM (the host's place in the job), PBS_TASKNUM
    ("%8.8X"), PBS_MOMPORT, PBS_ENVIRONMENT, ENVIRONMENT, then the spawner's envp (pbs_tmrsh sends
    none); no SHELL, USER or LOGNAME. Not as PBS: HOST is matched to nodefile lines as a string (the
    real host_match also tries the resolver and the domain), and the TM port is a unix socket."""

    def __init__(self, base: Path):
        import socket
        import threading

        self.sock_path = Path(base) / "tm.sock"
        self.sock_path.unlink(missing_ok=True)
        self.jobs: dict[str, PbsJob] = {}
        self.moms: dict[str, Mom] = {}
        self.tasks = 1
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(str(self.sock_path))
        self.sock_path.chmod(0o777)
        self.sock.listen(64)
        threading.Thread(target=self._serve, daemon=True).start()

    def install(self, pbs_exec: Path) -> Path:
        """PBS_EXEC/bin/pbs_tmrsh talking to this interface."""
        (Path(pbs_exec) / "bin").mkdir(parents=True, exist_ok=True)
        for d in (Path(pbs_exec), Path(pbs_exec) / "bin"):
            d.chmod(0o755)
        tool = Path(pbs_exec) / "bin" / "pbs_tmrsh"
        tool.write_text(TMRSH % str(self.sock_path))
        tool.chmod(0o755)
        return tool

    def add(self, job: PbsJob, ms: Mom) -> None:
        self.jobs[job.id] = job
        self.moms[job.id] = ms

    def close(self) -> None:
        self.sock.close()

    def _serve(self) -> None:
        import threading

        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._spawn, args=(conn,), daemon=True).start()

    def _spawn(self, conn) -> None:
        with conn:
            data = b""
            while not data.endswith(b"\n") and len(data) < 1 << 20:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            req = json.loads(data)
            job = self.jobs.get(req["job"])
            if job is None or req["cookie"] != job.cookie:
                conn.sendall(b'{"error": "tm_init failed"}\n')
                return
            ms = self.moms[job.id]
            hosts = [c.split("/", 1)[0] for c in job.exec_host.split("+")]
            node = list(dict.fromkeys(hosts)).index(hosts[req["line"]])
            mom = [ms, *job.sisters][node]
            self.tasks += 1
            pw = job.user
            env = {"PATH": "/bin:/usr/bin", **job.variables, "HOME": pw.pw_dir, "PBS_JOBNAME": job.name,
                   "PBS_JOBID": job.id, "PBS_QUEUE": "workq", "PBS_JOBCOOKIE": job.cookie, "PBS_NODENUM": str(node),
                   "PBS_TASKNUM": f"{self.tasks:08X}", "PBS_MOMPORT": "15003", "PBS_ENVIRONMENT": "PBS_BATCH",
                   "ENVIRONMENT": "BATCH"}
            argv = list(req["argv"])
            r = mom._event(EXECJOB_LAUNCH, job, ms=node == 0, progname=argv[0], argv=argv, env=env)
            if not r.accepted:   # JOB_EXEC_FAILHOOK_DELETE (start_exec.c:5007)
                conn.sendall(json.dumps({"error": f"tm_spawn failed: {r.message}"}).encode() + b"\n")
                return
            ev = r.event
            with open(ms.spool / f"{job.id}.OU", "ab") as out, open(ms.spool / f"{job.id}.ER", "ab") as err:
                try:
                    p = subprocess.Popen(ev.argv, executable=ev.progname, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=err, env=ev.env,
                                         cwd=pw.pw_dir if os.path.isdir(pw.pw_dir) else "/", user=pw.pw_uid,
                                         group=pw.pw_gid, extra_groups=os.getgrouplist(pw.pw_name, pw.pw_gid),
                                         start_new_session=True)
                except OSError as e:
                    conn.sendall(json.dumps({"error": f"tm_spawn failed: {e}"}).encode() + b"\n")
                    return
            rc = p.wait()
            conn.sendall(json.dumps({"exit": rc if rc >= 0 else 0x100 - rc}).encode() + b"\n")
