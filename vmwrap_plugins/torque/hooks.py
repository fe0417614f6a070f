"""Torque glue: pbs_mom's prologue/epilogue (root), the job payload (the user), `$checkpoint_script`
and `$restart_script` (root) translated into core calls. Conventions from the Torque Admin Guide
(appendix G, prologue and epilogue scripts) and pbs_mom's sources (src/resmom/prolog.c, start_exec.c,
checkpoint.c):

- prologue argv: id user group name resource-list queue account script-path (6.x); epilogue: id user
  group name session resource-list resources-used queue account exit-status script-path. Almost empty
  environment, stdin /dev/null, umask 0077, output appended to the job's .o/.e, killed at
  `$prologalarm` - 10 s. Exit 0 runs the job, 1 aborts it, anything else requeues it.
- a node fault cannot be told by an exit code (Torque has no "drain" status): the prologue requeues
  the job (exit 2) and leaves a reason the node health check (`$node_check_script`) reports as
  `ERROR ...`, which marks the node down. A user's mistake never does: the job runs and its payload
  prints why it fails (as under Slurm and Grid Engine).
- `qhold` of a running job calls `$checkpoint_script SID ID USER GROUP DIR NAME 15 DEPTH` as root: the
  VM is saved into the shared checkpoint store and the job ends; `qrls` starts it again, on any mom,
  through `$restart_script SID ID USER GROUP DIR NAME`, which runs as root instead of the job script
  and *is* the job from then on: it restores the VM and becomes the user to stream the job's output.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

from vmwrap import lifecycle, restart_record, rundir, safeio
from vmwrap.config import Settings
from vmwrap.errors import NodeError, UserError
from vmwrap.job import Job
from vmwrap.payload import EXIT_CHECKPOINT, EXIT_NODE, attach
from vmwrap.request import one_node

from . import jobs

NAME = "torque"
# What the prologue/epilogue keep of pbs_mom's environment (Torque 6.1 sets these; older ones none).
ROOT_ENV = ("PBS_O_WORKDIR", "PBS_NUM_PPN", "PBS_NP", "PBS_MSHOST", "PBS_NODENUM")
OFFLINE = "torque-offline"    # in state_dir: the reason the node health check reports
HOLD = "torque-hold"          # in a run dir: a checkpoint for qhold is under way (root's file)
SAVED = "torque-saved"        # in a run dir: its result, for the payload waiting to leave
SAVE_WAIT = 900.0             # s the payload waits for a checkpoint script to finish the save
EXIT_REQUEUE = 2              # prologue: "other values requeue the job"


class Torque:
    """vmwrap.adapter.Scheduler for Torque. The hook's argv is the environment here: `env` maps
    `argv` to the list pbs_mom passed, plus the few variables in ROOT_ENV."""

    name = NAME
    root_env = ROOT_ENV

    def __init__(self, settings: Settings | None = None, qstat: str | None = None):
        self.settings = settings
        self.qstat = qstat        # `vmwrap torque gc --qstat PATH`: Torque's qstat, by absolute path

    def job_id(self, env) -> str:
        return jobs.job_id(env["argv"][0])

    def job(self, env) -> Job | None:
        return prologue_job(env)

    def requeue_state(self, settings: Settings, env) -> tuple[bool, int]:
        """A qhold checkpoint (HOLD in the run dir): the VM was saved, keep its checkpoint."""
        return (rundir.path(settings, self.job_id(env)) / HOLD).exists(), 0

    def take_out(self, env, reason: str) -> None:
        if self.settings is not None:
            take_out(self.settings, reason)

    def still_queued(self):
        """For the checkpoint GC (`vmwrap torque gc`): a saved job is gone once pbs_server says so
        through qstat; without a qstat (the hooks) or a server answer, every checkpoint is kept."""
        if self.settings is None or not self.qstat:
            return lambda j: True
        def still_queued(jid: str) -> bool:
            if not ended(self.settings, self.qstat, jid):
                return True
            _sidecar(self.settings, jid).unlink(missing_ok=True)   # the store deletes the checkpoint next
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
        raise RuntimeError("the gap planner does not drive Torque")

    def set_time_limit(self, job: str, seconds: float) -> None:
        raise RuntimeError("the gap planner does not drive Torque")

    def vacate(self, job: str) -> None:
        raise RuntimeError("the gap planner does not drive Torque")

    def render_config(self, settings: Settings, **options) -> str:
        from .render import render_torque

        return render_torque(settings, node_config=options.get("node_config"),
                             vmwrap_path=options.get("vmwrap_path") or "/usr/local/bin/vmwrap")


def take_out(settings: Settings, reason: str) -> None:
    """Leave the reason where `vmwrap torque health` ($node_check_script) reports it as ERROR."""
    p = Path(settings.state_dir) / OFFLINE
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.unlink(missing_ok=True)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(" ".join(reason.split())[:500])
    except OSError as e:
        print(f"vmwrap: cannot record that this node is out of service ({reason}): {e}", file=sys.stderr)


QSTAT_UNKNOWN = 153           # qstat's exit status for PBSE_UNKJOBID (15001 & 0xff)


def ended(settings: Settings, qstat: str, jid: str) -> bool:
    """Whether the held job whose VM is in the store under `jid` ended for good: pbs_server does not
    know it (qstat -f ID: `qstat: Unknown Job Id Error ID`, exit(PBSE_UNKJOBID) = 153; src/cmds/
    qstat.c `exit(ret_code)`, src/include/pbs_error_db.h) or lists it completed (`job_state = C`,
    kept for keep_completed). The Torque id is the one the checkpoint script recorded beside the
    checkpoint; without that record, an unreachable server or any other answer: not ended."""
    import re
    import subprocess

    try:
        raw = safeio.read_capped(_sidecar(settings, jid), 1 << 16)
        torque_id = json.loads(raw)["job"] if raw is not None else None
        if not isinstance(torque_id, str) or jobs.job_id(torque_id) != jid:
            return False
        r = subprocess.run([qstat, "-f", torque_id], capture_output=True, timeout=60, cwd="/",
                           env={"PATH": "/usr/bin:/bin"}, stdin=subprocess.DEVNULL)
    except (OSError, ValueError, KeyError, TypeError, UserError, subprocess.TimeoutExpired):
        return False
    out, err = r.stdout[:1 << 20].decode(errors="replace"), r.stderr[:4096].decode(errors="replace")
    if r.returncode == QSTAT_UNKNOWN and "Unknown Job Id" in err:
        return True
    return r.returncode == 0 and re.search(r"^\s*job_state = C\s*$", out, re.M) is not None


def health(settings: Settings, out) -> int:
    """$node_check_script: `ERROR <reason>` marks the node down in pbs_server (Admin Guide, 'Compute
    node health check'); nothing while the node is fine. `vmwrap torque online` clears it."""
    reason = safeio.read_capped(Path(settings.state_dir) / OFFLINE, 1024)
    if reason is not None:
        out.write("ERROR " + (" ".join(reason.decode(errors="replace").split()) or "vmwrap: node fault") + "\n")
    return 0


def online(settings: Settings) -> bool:
    p = Path(settings.state_dir) / OFFLINE
    gone = p.exists()
    p.unlink(missing_ok=True)
    return gone


def prologue_job(env) -> Job | None:
    argv = env["argv"]
    torque_id, user, group, _name, resource_list = argv[:5]
    script_path = argv[7] if len(argv) > 7 else ""
    jid = jobs.job_id(torque_id)
    pw, gid = jobs.user_ids(user, group)
    script = jobs.spooled_script(script_path, torque_id, pw.pw_uid)
    if script is None or not jobs.wrapped(script):
        from vmwrap import directives

        if script and directives.parse(script).image:  # asked for a VM, yet was not wrapped by the filter
            raise UserError("the job asks for a VM but was not submitted through vmwrap's submit filter "
                            "(SUBMITFILTER in torque.cfg); it cannot run in a VM")
        return None
    res = jobs.resources(resource_list)
    # The filter refused multi-node requests at qsub; `qalter -l` does not run it, and procs=N may or
    # may not have spread: what pbs_mom gave the job is the truth.
    n = jobs.node_total(res, env.get("PBS_NUM_NODES", ""))
    one_node(n, f"the job was given {n} nodes", "ask for one node with its processors: -l nodes=1:ppn=N")
    cpus = jobs.ppn(res, env.get("PBS_NUM_PPN", ""))
    work_dir = env.get("PBS_O_WORKDIR") or pw.pw_dir
    return Job(job_id=jid, scheduler=NAME, user=pw.pw_name, uid=pw.pw_uid, gid=gid, work_dir=work_dir,
               script=script, cpus=cpus, memory_mib=jobs.memory_mib(res, cpus), image=None,
               groups=[g for g in os.getgrouplist(pw.pw_name, gid) if g != gid])


def check_argv(argv: list[str], least: int, what: str) -> str | None:
    if len(argv) < least:
        return f"vmwrap torque {what}: pbs_mom passes at least {least} arguments, got {len(argv)}"
    return None


def prologue(settings: Settings, argv: list[str], env: dict[str, str]) -> int:
    """mom_priv/prologue: boot the job's VM. 0 runs the job (a user's mistake too: its payload prints
    why); a node fault requeues it (exit 2) and marks the node for the health check."""
    os.umask(0o022)  # pbs_mom runs it with 0077: the VM's files must stay readable as at any hook
    if (bad := check_argv(argv, 7, "prologue")):
        print(bad, file=sys.stderr)
        return EXIT_REQUEUE
    adapter = Torque(settings)
    try:
        jid = adapter.job_id({"argv": argv})
    except UserError as e:
        print(f"vmwrap: {e}", file=sys.stderr)
        return 1  # abort: no job of vmwrap's can have that id
    out = lifecycle.start(settings, jid, lambda: prologue_job({**env, "argv": argv}), NAME)
    if out.verdict is lifecycle.Verdict.NODE_FAULT:
        adapter.take_out({}, f"vmwrap: {out.reason}")
        return EXIT_REQUEUE
    return 0


def epilogue(settings: Settings, argv: list[str], env: dict[str, str]) -> int:
    """mom_priv/epilogue: save nothing (qhold saved already), destroy the VM, clean up."""
    os.umask(0o022)
    if (bad := check_argv(argv, 10, "epilogue")):
        print(bad, file=sys.stderr)
        return 1
    adapter = Torque(settings)
    e = {**env, "argv": argv}
    try:
        jid = adapter.job_id(e)
    except UserError:
        return 0
    held, _ = adapter.requeue_state(settings, e)
    status = argv[9] if argv[9].lstrip("-").isdigit() and len(argv[9]) < 12 else "?"
    out = lifecycle.end(settings, jid, requeued=held, restarts=0, scheduler=NAME, torque_exit=status)
    if not held:
        _sidecar(settings, jid).unlink(missing_ok=True)
    if out.verdict is lifecycle.Verdict.NODE_FAULT:
        adapter.take_out(e, f"vmwrap: {out.reason}")
        return 1
    return 0


def _sidecar(settings: Settings, jid: str) -> Path:
    return restart_record.path(settings, jid, NAME)


# --- the job's payload (the user, started by pbs_mom's shell through the filter's wrapper) ----------

def payload(settings: Settings, script: str, args: list[str]) -> int:
    """Hand the job to its VM (booted by the prologue) and stream its output; pbs_mom writes our
    stdout/stderr to NAME.oSEQ / NAME.eSEQ and records our exit status as the job's.

    qsig -s suspend sends SIGTSTP (then SIGSTOP) to the session, resume SIGCONT: the attachment
    pauses and resumes the whole VM through the node agent. qhold: the checkpoint script (root)
    marks the run dir; we then detach as a requeued Slurm step does and leave once the VM is saved."""
    torque_id = os.environ.get("PBS_JOBID", "")
    try:
        jid = jobs.job_id(torque_id)
    except UserError as e:
        print(f"vmwrap: error: {e}", file=sys.stderr)
        return EXIT_NODE
    run_dir = rundir.path(settings, jid)
    if not run_dir.exists():
        print(f"vmwrap: error: job {torque_id} has no VM on this node: is vmwrap's prologue installed as "
              "mom_priv/prologue?", file=sys.stderr)
        return EXIT_NODE
    hold = run_dir / HOLD
    threading.Thread(target=_watch_hold, args=(hold,), daemon=True).start()
    env = {k: v for k, v in os.environ.items() if k != "VMWRAP_CONFIG"}
    rc = attach(run_dir, jid, script, env, args, grace=settings.grace_seconds, settings=settings,
                requeued=hold.exists)
    if hold.exists():
        return _wait_saved(run_dir)
    return rc


def _watch_hold(hold: Path) -> None:
    """The checkpoint script cannot signal the job's process (root signals nothing a user controls):
    the payload signals itself when the mark appears, and its handler detaches."""
    import signal

    while not hold.exists():
        time.sleep(0.1)
    os.kill(os.getpid(), signal.SIGTERM)


def _wait_saved(run_dir: Path) -> int:
    end = time.monotonic() + SAVE_WAIT
    while time.monotonic() < end:
        r = safeio.read_capped(run_dir / SAVED, 4096)
        if r is not None:
            ok, _, why = r.decode(errors="replace").partition("\n")
            if ok == "ok":
                return 0
            print(f"vmwrap: error: the job's VM could not be saved for qhold: {why.strip()}", file=sys.stderr)
            return EXIT_CHECKPOINT
        time.sleep(0.1)
    print("vmwrap: error: the checkpoint script did not finish saving the VM", file=sys.stderr)
    return EXIT_CHECKPOINT


# --- $checkpoint_script / $restart_script (root) ------------------------------------------------------

def _write_result(path: Path, text: str) -> None:
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def checkpoint(settings: Settings, argv: list[str]) -> int:
    """`$checkpoint_script SID ID USER GROUP DIR NAME SIGNAL DEPTH` (src/resmom/checkpoint.c,
    blcr_checkpoint_job: root, through popen, stdout to /dev/null; stderr becomes the job's comment
    when the exit status is not 0). SIGNAL 15 is qhold (checkpoint, then the job ends and is held);
    0 is qchkpt (checkpoint and go on), which a VM save cannot do: refused with the reason."""
    from vmwrap import checkpoint as ckpt, domain
    from vmwrap.ledger import Ledger

    os.umask(0o022)
    if (bad := check_argv(argv, 7, "checkpoint")):
        print(bad, file=sys.stderr)
        return 1
    _sid, torque_id, user, group, ckpt_dir, ckpt_name, sig = argv[:7]
    try:
        jid = jobs.job_id(torque_id)
        pw, gid = jobs.user_ids(user, group)
    except UserError as e:
        print(f"vmwrap: {e}", file=sys.stderr)
        return 1
    run_dir = rundir.path(settings, jid)
    if not (run_dir / rundir.JOB).exists():
        print(f"vmwrap: job {torque_id} has no VM on this node to checkpoint", file=sys.stderr)
        return 1
    if sig != "15":
        print("vmwrap: a VM is checkpointed by saving it, which stops it: use qhold (checkpoint and hold), "
              "not qchkpt", file=sys.stderr)
        return 1
    work_dir = (safeio.read_capped(rundir.ctl(run_dir) / rundir.CTL_WORKDIR, 4096) or b"").decode(errors="replace")
    image = json.loads(safeio.read_capped(run_dir / rundir.JOB, 1 << 20) or b"{}").get("image")
    _write_result(run_dir / HOLD, torque_id)
    delivered = rundir.user_dir(run_dir) / rundir.DELIVERED  # the payload detached: its offsets are in
    end = time.monotonic() + 10
    while time.monotonic() < end and not os.path.lexists(delivered):
        time.sleep(0.05)
    store = ckpt.Store(settings.checkpoint_dir, settings.checkpoint_key_file)
    try:
        conn = domain.connect(settings.libvirt_uri)
        try:
            info = ckpt.save(jid, run_dir, store, conn, 0)
        finally:
            conn.close()
        restart_record.write(_sidecar(settings, jid), {"job": torque_id, "uid": pw.pw_uid, "gid": gid,
                                                       "image": image, "work_dir": work_dir})
        _torque_file(Path(ckpt_dir) / ckpt_name, pw.pw_uid, gid)
    except Exception as e:  # noqa: BLE001 (the job learns why; the node stays up)
        Ledger(settings.ledger_path).record(jid, rundir.domain_name(jid), "save_failed", scheduler=NAME, message=str(e))
        store.delete(jid)
        _write_result(run_dir / SAVED, f"failed\n{e}")
        print(f"vmwrap: saving the VM of job {torque_id} failed: {e}", file=sys.stderr)
        return 1
    Ledger(settings.ledger_path).record(jid, rundir.domain_name(jid), "saved", scheduler=NAME, **info)
    _write_result(run_dir / SAVED, "ok\n")
    return 0


def _torque_file(path: Path, uid: int, gid: int) -> None:
    """The file pbs_mom stat()s before a restart (its mtime counts as the checkpoint's time). The
    directory is the job user's (pbs_mom chowns it): made as that user, never through a link."""
    import subprocess

    if "\0" in str(path) or not path.is_absolute():
        raise UserError(f"checkpoint path {str(path)[:100]!r} from pbs_mom is not absolute")
    r = subprocess.run([sys.executable, "-I", "-c",
                        "import os,sys\nfd=os.open(sys.argv[1],os.O_WRONLY|os.O_CREAT|os.O_TRUNC|os.O_NOFOLLOW,0o600)\n"
                        "os.write(fd,b'vmwrap: this job VM is in the vmwrap checkpoint store\\n')",
                        str(path)], user=uid, group=gid, extra_groups=[], capture_output=True, text=True,
                       cwd="/", env={"PATH": "/usr/bin:/bin"}, timeout=60)
    if r.returncode != 0:
        raise NodeError(f"cannot write Torque's checkpoint file {path}: {r.stderr.strip()[-300:]}")


def restart(settings: Settings, argv: list[str], spool: str | None = None) -> int:
    """`$restart_script SID ID USER GROUP DIR NAME` (checkpoint.c, blcr_restart_job): root, its own
    session, instead of the job script; pbs_mom takes its exit status as the job's. No prologue runs
    before it (start_exec.c, TMomFinalizeJob1), so the VM is restored here, then the process becomes
    the job's user and streams the job's output into its spool files (PBS_HOME/spool/ID.OU, .ER,
    which pbs_mom delivers as NAME.oSEQ / NAME.eSEQ when the job ends)."""
    os.umask(0o022)
    if (bad := check_argv(argv, 6, "restart")):
        print(bad, file=sys.stderr)
        return 1
    _sid, torque_id, user, group, ckpt_dir, _name = argv[:6]
    try:
        jid = jobs.job_id(torque_id)
        pw, gid = jobs.user_ids(user, group)
    except UserError as e:
        print(f"vmwrap: {e}", file=sys.stderr)
        return 1
    spool_dir = Path(spool) if spool else Path(os.path.normpath(os.path.join(ckpt_dir, "..", "..", "spool")))

    def read_job() -> Job:
        return restart_record.restart_job(_sidecar(settings, jid), torque_id, jid, NAME, pw, gid)

    out = lifecycle.start(settings, jid, read_job, NAME)
    if out.verdict is lifecycle.Verdict.NODE_FAULT:
        take_out(settings, f"vmwrap: {out.reason}")
        print(f"vmwrap: {out.reason}", file=sys.stderr)
        return EXIT_NODE
    groups = [g for g in os.getgrouplist(pw.pw_name, gid)]
    os.setgroups(groups)
    os.setgid(gid)
    os.setuid(pw.pw_uid)
    os.chdir(pw.pw_dir if os.path.isdir(pw.pw_dir) else "/")
    for fd, suffix in ((1, ".OU"), (2, ".ER")):
        try:
            f = os.open(spool_dir / f"{torque_id}{suffix}", os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        except OSError:
            continue
        os.dup2(f, fd)
        os.close(f)
    os.environ.clear()
    os.environ.update({"PBS_JOBID": torque_id, "HOME": pw.pw_dir, "USER": pw.pw_name, "LOGNAME": pw.pw_name,
                       "PATH": "/usr/bin:/bin"})
    return payload(settings, "", [])
