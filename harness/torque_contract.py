"""Torque's daemons as vmwrap's glue sees them: qsub's submit filter call, pbs_mom's prologue, job
launch, epilogue, qdel, qsig suspend/resume, qhold checkpoint and qrls restart (not shipped).

No Torque daemon can be installed here, so this plays pbs_server, pbs_mom and qsub exactly at the
points where they call vmwrap: same argv, environment, user, stdin, umask and time limit, and it
interprets exit codes the way they do. Every contract names its source: the Torque 6.1 Admin Guide
(appendix G "Prologue and epilogue scripts", appendix J "torque.cfg") and the 6.1-dev sources
(github.com/adaptivecomputing/torque: src/cmds/qsub_functions.c, src/resmom/prolog.c, start_exec.c,
checkpoint.c, requests.c), checked against a real Torque 6.1 build (../shared/README.md).
"""

from __future__ import annotations

import json
import os
import pwd
import grp
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness.host_share import worker

# qsub_functions.c (get_script): the filter's exit status -> what qsub prints; qsub then exits 1.
ADMIN_REJECT = "qsub: Your job has been administratively rejected by the queueing system.\n" \
               "qsub: There may be a more detailed explanation prior to this notice.\n"
FILTER_ERROR = "qsub: submit filter returned an error code, aborting job submission.\n"
# start_exec.c (handle_prologs) / Admin Guide appendix G: the prologue's exit status.
PROLOGUE_RUN, PROLOGUE_ABORT = 0, 1          # anything else (and a timeout, -4): the job is requeued
PELOG_PATH = "/bin:/usr/bin"                  # prolog.c: the only PATH a prologue gets
KILL_DELAY = 2.0                              # queue kill_delay default: SIGTERM, then SIGKILL
SUSPEND_STOP_AFTER = 5.0                      # requests.c (req_signaljob): SIGTSTP, SIGSTOP 5 s later


@dataclass
class TorqueJob:
    seq: int
    server: str
    name: str
    user: pwd.struct_passwd
    group: str
    script: str                 # as qsub submitted it (the filter's output)
    workdir: str                # PBS_O_WORKDIR: qsub's cwd
    resources: str              # the resource list as prolog.c's resc_to_string writes it
    variables: dict[str, str] = field(default_factory=dict)
    shell: str | None = None
    checkpoint: str = ""
    queue: str = "batch"
    account: str = ""
    state: str = "Q"
    exit_status: int | None = None
    checkpoint_name: str | None = None
    spool: dict[str, bytes] = field(default_factory=dict)   # .OU/.ER the server keeps while held
    history: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.seq}.{self.server}"


class Server:
    """pbs_server + qsub: job ids, the submit filter, the shared checkpoint dir."""

    def __init__(self, base: Path, submit_filter: Path, name: str = "torquesrv"):
        self.base = Path(base)
        self.filter = submit_filter
        self.name = name
        self.seq = 100 + 10_000 * worker()  # VMs are named by job id host-wide: see harness.host_share
        self.checkpoint_dir = self.base / "checkpoint"      # $remote_checkpoint_dirs: every mom sees it
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoint_dir.chmod(0o755)
        self.jobs: dict[str, TorqueJob] = {}
        self.reachable = True

    # --- qstat -f ID, as a root daemon on a node calls it -----------------------------------------------
    def qstat_command(self) -> Path:
        """A qstat answering `qstat -f ID` from the server's jobs as of the last `sync()`: the job's
        `job_state = X` line, or for a job the server does not know `qstat: Unknown Job Id Error ID`
        with exit status 153 (src/cmds/qstat.c: exit(any_failed), PBSE_UNKJOBID = 15001; the message
        from src/include/pbs_error_db.h). An unreachable server: `cannot connect`, exit status 1."""
        path = self.base / "qstat"
        path.write_text(f"""#!{sys.executable}
import json, sys
state = json.load(open({str(self.base / "server-jobs.json")!r}))
if not state["reachable"]:
    print("qstat: cannot connect to server {self.name} (errno=111) Connection refused", file=sys.stderr)
    sys.exit(1)
jid = sys.argv[-1]
if jid not in state["jobs"]:
    print("qstat: Unknown Job Id Error " + jid, file=sys.stderr)
    sys.exit(15001 & 0xff)
print("Job Id: " + jid)
print("    job_state = " + state["jobs"][jid])
""")
        path.chmod(0o755)
        self.sync()
        return path

    def sync(self) -> None:
        (self.base / "server-jobs.json").write_text(json.dumps(
            {"reachable": self.reachable, "jobs": {j: job.state for j, job in self.jobs.items()}}))

    def qdel_queued(self, job: TorqueJob) -> None:
        """qdel of a job that is not running (queued or held): the server drops it, no mom is told,
        no epilogue runs (keep_completed 0)."""
        assert job.state in ("Q", "H"), job.state
        self.jobs.pop(job.id, None)
        self.sync()

    def qsub(self, script_path: Path, *args: str, user: pwd.struct_passwd, cwd: Path):
        """qsub ARGS SCRIPT as `user` in `cwd`: (exit status, stderr, job or None).

        qsub_functions.c get_script(): `/bin/sh -c "FILTER 'arg' ... >tmp"` through popen, as the
        submitter, in qsub's cwd, qsub's own arguments each single-quoted (the script path last),
        the script fed on the filter's stdin; its stderr goes to the user's terminal."""
        argv = [*args, str(script_path)]
        with tempfile.NamedTemporaryFile(dir="/tmp", delete=False) as t:
            out = Path(t.name)
        os.chown(out, user.pw_uid, user.pw_gid)
        cmd = str(self.filter) + "".join(f" '{a}'" for a in argv) + f" >{out}"
        env = {"PATH": "/usr/bin:/bin", "HOME": user.pw_dir, "USER": user.pw_name, "LOGNAME": user.pw_name}
        r = subprocess.run(["/bin/sh", "-c", cmd], input=script_path.read_bytes(), capture_output=True,
                           cwd=cwd, env=env, user=user.pw_uid, group=user.pw_gid,
                           extra_groups=os.getgrouplist(user.pw_name, user.pw_gid), timeout=60)
        filtered = out.read_text(errors="surrogateescape")
        out.unlink()
        err = r.stderr.decode(errors="replace")
        if r.returncode == 255:
            return 1, err + ADMIN_REJECT, None
        if r.returncode != 0:
            return 1, err + FILTER_ERROR, None
        opts = _directives(filtered, list(args))
        self.seq += 1
        name = opts.get("N") or script_path.name
        res = ",".join(x for x in (opts.get("l", ""),) if x)
        nodes = re.search(r"nodes=([^,]+)", res)
        resources = (f"neednodes={nodes.group(1) if nodes else '1'},nodes={nodes.group(1) if nodes else '1'}"
                     + "".join(f",{x}" for x in res.split(",") if x and not x.startswith("nodes=")))
        job = TorqueJob(self.seq, self.name, name, user, grp.getgrgid(user.pw_gid).gr_name, filtered, str(cwd),
                        resources, opts.get("v", {}), opts.get("S"), opts.get("c", ""))
        self.jobs[job.id] = job
        return 0, err, job


def _directives(script: str, argv: list[str]) -> dict:
    """qsub's options: #PBS lines of the script's leading comments first, the command line wins."""
    words: list[str] = []
    for line in script.splitlines():
        s = line.strip()
        if s.startswith("#PBS"):
            words += shlex.split(s[4:])
        elif s and not s.startswith("#"):
            break
    words += argv
    opts: dict = {"v": {}}
    i = 0
    while i < len(words):
        w = words[i]
        if w in ("-N", "-l", "-v", "-S", "-c", "-q", "-A") and i + 1 < len(words):
            v = words[i + 1]
            if w == "-v":
                for item in v.split(","):
                    k, _, val = item.partition("=")
                    opts["v"][k] = val
            elif w == "-l":
                opts["l"] = ",".join(x for x in (opts.get("l"), v) if x)
            else:
                opts[w[1]] = v
            i += 2
        else:
            i += 1
    return opts


class Mom:
    """One pbs_mom: its PBS_HOME (mom_priv/{prologue,epilogue,jobs}, spool, checkpoint), and the
    hooks it runs. `config` is the vmwrap settings file the installed wrappers name."""

    def __init__(self, server: Server, base: Path, name: str, hooks: Path, config: Path, prologalarm: int = 300):
        self.server = server
        self.name = name
        self.home = Path(base) / name
        self.mom_priv = self.home / "mom_priv"
        self.jobs = self.mom_priv / "jobs"
        self.spool = self.home / "spool"
        self.aux = self.home / "aux"
        for d, mode in ((self.home, 0o755), (self.mom_priv, 0o751), (self.jobs, 0o751), (self.spool, 0o1777),
                        (self.aux, 0o755)):
            d.mkdir(parents=True, exist_ok=True)
            d.chmod(mode)
        ck = self.home / "checkpoint"
        if not ck.exists():
            ck.symlink_to(server.checkpoint_dir)   # $remote_checkpoint_dirs: one shared dir
        self.prologalarm = prologalarm
        self.hooks = hooks
        self.config = config
        self.install("prologue", hooks / "torque-prologue")
        self.install("epilogue", hooks / "torque-epilogue")
        self.checkpoint_script = self.install("vmwrap-checkpoint", hooks / "torque-checkpoint", self.aux)
        self.restart_script = self.install("vmwrap-restart", hooks / "torque-restart", self.aux)
        self.procs: dict[str, subprocess.Popen] = {}

    def install(self, name: str, hook: Path, where: Path | None = None) -> Path:
        """As `vmwrap config render torque` says: a root-owned 0500 wrapper naming the config."""
        p = (where or self.mom_priv) / name
        p.write_text(f"#!/bin/sh\nexec {shlex.quote(str(hook))} --config {shlex.quote(str(self.config))} \"$@\"\n")
        os.chown(p, 0, 0)
        p.chmod(0o500)
        return p

    # --- prolog.c: run_pelog ------------------------------------------------------------------------
    def _pelog_env(self, job: TorqueJob) -> dict[str, str]:
        """What Torque 6.1's run_pelog leaves in the environment (seen on a real build: no PBS_JOBID,
        no -v variables); the Admin Guide promises less (an empty environment), so the glue may use
        none of it for anything that matters."""
        nodefile = self.aux / job.id
        nodefile.write_text(f"{self.name}\n")
        return {"LANG": "C", "PATH": PELOG_PATH, "PBS_MSHOST": self.name, "PBS_NODEFILE": str(nodefile),
                "PBS_NODENUM": "0", "PBS_NP": "1", "PBS_NUM_NODES": "1", "PBS_NUM_PPN": "1",
                "PBS_O_WORKDIR": job.workdir, "PBS_RESOURCE_NODES": "1"}

    def pelog_permissions_ok(self, path: Path) -> bool:
        """prolog.c check_pelog_permissions: root-owned, not writable by group or others, executable."""
        st = os.stat(path)
        return st.st_uid == 0 and not st.st_mode & 0o022 and bool(st.st_mode & 0o100)

    def run_pelog(self, which: str, job: TorqueJob, argv: list[str]) -> int:
        """Run mom_priv/<which> as pbs_mom does: root, the argv above, stdin /dev/null, stdout/stderr
        appended to the job's spool .OU/.ER (PE_IO_TYPE_ASIS), umask 0077, its own process group,
        killed at $prologalarm - 10 s (then -4, 'prolog/epilog timeout occurred')."""
        path = self.mom_priv / which
        if not self.pelog_permissions_ok(path):
            return -1
        out = open(self.spool / f"{job.id}.OU", "ab")
        err = open(self.spool / f"{job.id}.ER", "ab")
        try:
            p = subprocess.Popen([str(path), *argv], stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                 env=self._pelog_env(job), cwd=self.mom_priv, umask=0o077, start_new_session=True)
            alarm = self.prologalarm - 10 if self.prologalarm > 10 else self.prologalarm
            try:
                return p.wait(timeout=alarm)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                return -4
        finally:
            out.close()
            err.close()

    def prologue_argv(self, job: TorqueJob) -> list[str]:
        """prolog.c: id, user, group, job name, resource list, queue, account, script path (6.x)."""
        return [job.id, job.user.pw_name, job.group, job.name, job.resources, job.queue, job.account,
                str(self.jobs / f"{job.id}.SC")]

    def epilogue_argv(self, job: TorqueJob, session: int) -> list[str]:
        """prolog.c: id, user, group, name, session, resource list, resources used, queue, account,
        exit status, script path."""
        return [job.id, job.user.pw_name, job.group, job.name, str(session), job.resources,
                "cput=00:00:00,vmem=0kb,walltime=00:00:01,mem=0kb", job.queue, job.account,
                str(job.exit_status), str(self.jobs / f"{job.id}.SC")]

    # --- start_exec.c: the job --------------------------------------------------------------------
    def _spool_files(self, job: TorqueJob) -> tuple[Path, Path]:
        """The spooled .OU/.ER, created as the job's user 0600 (open_std_file), kept across restarts."""
        paths = (self.spool / f"{job.id}.OU", self.spool / f"{job.id}.ER")
        for p, key in zip(paths, ("OU", "ER")):
            if not p.exists():
                p.write_bytes(job.spool.get(key, b""))
                os.chown(p, job.user.pw_uid, job.user.pw_gid)
                p.chmod(0o600)
        return paths

    def _job_env(self, job: TorqueJob) -> dict[str, str]:
        pw = job.user
        env = {"HOME": pw.pw_dir, "LOGNAME": pw.pw_name, "USER": pw.pw_name, "SHELL": pw.pw_shell,
               "PATH": "/usr/local/bin:/usr/bin:/bin", "PBS_O_HOME": pw.pw_dir, "PBS_O_LOGNAME": pw.pw_name,
               "PBS_O_WORKDIR": job.workdir, "PBS_O_HOST": self.server.name, "PBS_O_SERVER": self.server.name,
               "PBS_O_QUEUE": job.queue, "PBS_O_SHELL": pw.pw_shell, "PBS_JOBNAME": job.name, "PBS_JOBID": job.id,
               "PBS_QUEUE": job.queue, "PBS_ENVIRONMENT": "PBS_BATCH", "PBS_NODEFILE": str(self.aux / job.id),
               "PBS_NODENUM": "0", "PBS_TASKNUM": "1", "PBS_MOMPORT": "15003", "PBS_NP": "1",
               "PBS_NUM_NODES": "1", "PBS_NUM_PPN": "1", "PBS_VERSION": "6.1.3"}
        env.update({k: v for k, v in job.variables.items() if k})
        return env

    def start(self, job: TorqueJob) -> int:
        """Run the job here: spool the script, the prologue, then the job's shell as the user.
        Returns the prologue's status; on 0 the job runs (self.procs[job.id])."""
        sc = self.jobs / f"{job.id}.SC"
        sc.write_text(job.script, errors="surrogateescape")
        sc.chmod(0o500)
        ou, er = self._spool_files(job)
        rc = self.run_pelog("prologue", job, self.prologue_argv(job))
        job.history.append(f"prologue {self.name} {rc}")
        if rc != PROLOGUE_RUN:
            job.state = "Q" if rc != PROLOGUE_ABORT else "C"   # abort: JOB_EXEC_FAIL2; else requeued
            if rc == PROLOGUE_ABORT:
                job.exit_status = -1
                self.deliver(job)
            return rc
        pw = job.user
        shell = job.shell or pw.pw_shell or "/bin/sh"
        # TMomFinalizeChild: the user's login shell ("-sh"), the spooled script as its stdin
        # (the default build: not SHELL_USE_ARGV), umask 0077 (determine_umask), $HOME, its own session.
        with open(sc, "rb") as stdin, open(ou, "ab") as o, open(er, "ab") as e:
            p = subprocess.Popen(["-" + os.path.basename(shell)], executable=shell, stdin=stdin, stdout=o, stderr=e,
                                 env=self._job_env(job), cwd=pw.pw_dir, user=pw.pw_uid, group=pw.pw_gid,
                                 extra_groups=os.getgrouplist(pw.pw_name, pw.pw_gid), umask=0o077,
                                 start_new_session=True)
        self.procs[job.id] = p
        job.state = "R"
        return rc

    def session(self, job: TorqueJob) -> list[int]:
        """Every process of the job's session (pbs_mom signals tasks by session, not process group)."""
        sid = self.procs[job.id].pid
        pids = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if int(fields[3]) == sid:
                    pids.append(int(d.name))
        return pids

    def signal_session(self, job: TorqueJob, sig: int) -> None:
        for pid in self.session(job):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def wait(self, job: TorqueJob, timeout: float = 180) -> int:
        """The job's end: exit status (256 + signal when killed, as Torque reports it), the epilogue,
        then the output delivered as NAME.oSEQ / NAME.eSEQ into PBS_O_WORKDIR."""
        p = self.procs.pop(job.id)
        rc = p.wait(timeout=timeout)
        job.exit_status = rc if rc >= 0 else 256 - rc
        job.history.append(f"exited {job.exit_status}")
        erc = self.run_pelog("epilogue", job, self.epilogue_argv(job, p.pid))
        job.history.append(f"epilogue {self.name} {erc}")
        if job.state == "H":
            for key in ("OU", "ER"):   # the server keeps a held job's output and sends it to its next mom
                f = self.spool / f"{job.id}.{key}"
                job.spool[key] = f.read_bytes()
                f.unlink()
        else:
            job.state = "C"
            self.deliver(job)
        (self.jobs / f"{job.id}.SC").unlink(missing_ok=True)
        return job.exit_status

    def deliver(self, job: TorqueJob) -> None:
        """The spool files copied, as the job's user, to PBS_O_WORKDIR/NAME.o<SEQ>, NAME.e<SEQ>."""
        for key, letter in (("OU", "o"), ("ER", "e")):
            src = self.spool / f"{job.id}.{key}"
            dst = Path(job.workdir) / f"{job.name}.{letter}{job.seq}"
            subprocess.run(["/bin/cp", str(src), str(dst)], user=job.user.pw_uid, group=job.user.pw_gid, check=True)
            src.unlink()

    # --- qdel, qsig ---------------------------------------------------------------------------------
    def qdel(self, job: TorqueJob) -> None:
        """SIGCONT (a suspended job), SIGTERM to the session, SIGKILL kill_delay later."""
        self.signal_session(job, signal.SIGCONT)
        self.signal_session(job, signal.SIGTERM)
        try:
            self.procs[job.id].wait(timeout=KILL_DELAY)
        except subprocess.TimeoutExpired:
            self.signal_session(job, signal.SIGKILL)

    def suspend(self, job: TorqueJob) -> None:
        """qsig -s suspend: SIGTSTP to every process of the session, SIGSTOP 5 s later."""
        self.signal_session(job, signal.SIGTSTP)
        time.sleep(SUSPEND_STOP_AFTER)
        self.signal_session(job, signal.SIGSTOP)
        job.state = "S"

    def resume(self, job: TorqueJob) -> None:
        self.signal_session(job, signal.SIGCONT)
        job.state = "R"

    # --- checkpoint.c ---------------------------------------------------------------------------------
    def qhold(self, job: TorqueJob, depth: str = "1") -> tuple[int, str]:
        """blcr_checkpoint_job with abort=15: the job's checkpoint dir made 0755 and given to the
        user, then `$checkpoint_script SID ID EUSER EGROUP DIR NAME 15 DEPTH 2>&1 1>/dev/null` through
        popen as root (stderr read back: the job's comment on failure). Exit 0: the job is held."""
        ckdir = self.home / "checkpoint" / f"{job.id}.CK"
        if not ckdir.exists():
            ckdir.mkdir(mode=0o755)
            os.chown(ckdir, job.user.pw_uid, job.user.pw_gid)
        job.checkpoint_name = f"ckpt.{job.id}.{int(time.time())}"
        sid = self.procs[job.id].pid
        cmd = " ".join([str(self.checkpoint_script), str(sid), job.id, job.user.pw_name, job.group, str(ckdir),
                        job.checkpoint_name, "15", depth]) + "  2>&1 1>/dev/null"
        r = subprocess.run(["/bin/sh", "-c", cmd], capture_output=True, env={"PATH": PELOG_PATH}, cwd=self.mom_priv,
                           timeout=900)
        if r.returncode == 0:
            job.state = "H"
        return r.returncode, r.stdout.decode(errors="replace")

    def restart(self, job: TorqueJob) -> None:
        """qrls of a checkpointed job sent here: no prologue (TMomFinalizeJob1 restarts at once); the
        .SC and the spool files from the server; the checkpoint file stat()ed; then blcr_restart_job
        forks `$restart_script SID ID EUSER EGROUP DIR NAME` as root in a new session, which is the job."""
        sc = self.jobs / f"{job.id}.SC"
        sc.write_text(job.script, errors="surrogateescape")
        os.chown(sc, job.user.pw_uid, job.user.pw_gid)   # blcr_restart_job gives the .SC to the user
        self._spool_files(job)
        ckdir = self.home / "checkpoint" / f"{job.id}.CK"
        restart_file = ckdir / job.checkpoint_name
        os.stat(restart_file)   # missing: "Restart failed"
        os.chown(restart_file, job.user.pw_uid, job.user.pw_gid)
        argv = [str(self.restart_script), "0", job.id, job.user.pw_name, job.group, str(ckdir), job.checkpoint_name]
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={"PATH": PELOG_PATH}, cwd=self.mom_priv, start_new_session=True)
        self.procs[job.id] = p
        job.state = "R"
        job.history.append(f"restarted {self.name}")


def output(job: TorqueJob) -> tuple[str, str]:
    """NAME.o<SEQ>, NAME.e<SEQ> as delivered ("" when absent)."""
    o = Path(job.workdir) / f"{job.name}.o{job.seq}"
    e = Path(job.workdir) / f"{job.name}.e{job.seq}"
    return (o.read_text(errors="replace") if o.exists() else "", e.read_text(errors="replace") if e.exists() else "")


def wait_for(cond, what: str, timeout: float = 120.0, every: float = 0.2):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = cond()
        if v:
            return v
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def remove(base: Path) -> None:
    shutil.rmtree(base, ignore_errors=True)
