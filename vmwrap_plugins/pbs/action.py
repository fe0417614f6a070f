"""pbs_mom's `$action checkpoint_abort` / `$action checkpoint` / `$action restart` scripts (root)
translated into core calls. OpenPBS sources (github.com/openpbs/openpbs):

- mom config `$action NAME TIMEOUT !SCRIPT ARGS...` (mom_main.c:1468 add_mom_action); ARGS may be
  `%jobid %sid %taskid %uid %gid %login %owner %path ...` (mom_main.c:2233-2266). vmwrap's line:
  `... !SCRIPT ACTION %jobid %uid %gid %path`.
- do_mom_action_script (mom_main.c:2149): the script must be root's (gid <= 10, u+x, not o+w);
  it runs as root with an environment of only UID GID HOME LOGNAME PBS_JOBNAME PBS_JOBID PBS_QUEUE
  SHELL USER PBS_JOBCOOKIE PBS_NODENUM PBS_TASKNUM PBS_MOMPORT PBS_NODEFILE PBS_SID PBS_JOBDIR; for a
  checkpoint, stdin/stdout/stderr closed, killed (SIGKILL) after TIMEOUT; exit 0 = done, else failed.
- `qhold` of a running job whose Checkpoint attribute is not `n` (server req_holdjob.c:215) makes
  the mom run checkpoint_abort once per task (requests.c:3608, %path =
  `<checkpoint_path>/<ID>.CK/<TASK>`); on success execjob_end runs, then the job's processes are
  killed (requests.c:3842-3851) and the job goes back to the server held, exit status
  JOB_EXEC_CHKP (-12). `$action checkpoint` (the job goes on running) cannot be done by saving a VM,
  which stops it: refused.
- `qrls`: the server sends the job to a mom again without counting a run (req_runjob.c:1021);
  execjob_begin runs (`e.job.is_checkpointed()`), no execjob_launch, and the restart script runs
  for each task whose `%path` exists (requests.c:4177-4196). With `$restart_transmogrify true` it
  is run as root in a new session and *becomes* the job's task (mom_main.c:2279, 2338-2360): its
  exit status is the job's. Here it restores the VM, then becomes the job's user and streams the
  job's output into the mom's spool files, as the payload does after execjob_launch.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import sys
import threading
import time
from pathlib import Path

from vmwrap import lifecycle, restart_record, rundir, safeio
from vmwrap.config import Settings
from vmwrap.errors import UserError
from vmwrap.job import Job
from vmwrap.payload import EXIT_CHECKPOINT, EXIT_NODE

from .mom import NAME, job_id, record_path

ACTIONS = ("checkpoint", "checkpoint_abort", "restart")
HOLD = "pbs-checkpoint"       # in a run dir: checkpoint_abort is saving the VM (root's file)
SAVED = "pbs-saved"           # in a run dir: its result, for the payload waiting to leave
SAVE_WAIT = 900.0             # s the payload waits for the save (the action's TIMEOUT kills it first)
DETACH_WAIT = 10.0            # s the save waits for the payload to record what it delivered


def _args(argv: list[str]) -> tuple[str, str, pwd.struct_passwd, int, str]:
    """(PBS id, vmwrap id, user, gid, %path) from `%jobid %uid %gid %path`."""
    if len(argv) != 4:
        raise UserError(f"pbs_mom passes 4 arguments (%jobid %uid %gid %path), got {len(argv)}")
    pbs_id, uid, gid, path = argv
    jid = job_id(pbs_id)
    if not re.fullmatch(r"\d{1,9}", uid) or not re.fullmatch(r"\d{1,9}", gid):
        raise UserError(f"uid/gid {uid[:12]!r}/{gid[:12]!r} are not numbers")
    try:
        pw = pwd.getpwuid(int(uid))
    except KeyError:
        raise UserError(f"unknown uid {uid}") from None
    if pw.pw_uid == 0:
        raise UserError("root's jobs do not run in VMs")
    if not path.startswith("/") or "\0" in path or len(path) > 4096:
        raise UserError(f"checkpoint path {path[:100]!r} from pbs_mom is not absolute")
    return pbs_id, jid, pw, int(gid), path


def _write_result(path: Path, text: str) -> None:
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def main(settings: Settings, argv: list[str]) -> int:
    """`vmwrap pbs action ACTION %jobid %uid %gid %path`: the exit status pbs_mom reads."""
    os.umask(0o022)
    action, rest = (argv[0], argv[1:]) if argv else ("", [])
    if action not in ACTIONS:
        print(f"vmwrap pbs action: no such action {action[:40]!r} (one of {', '.join(ACTIONS)})", file=sys.stderr)
        return 1
    try:
        pbs_id, jid, pw, gid, path = _args(rest)
    except UserError as e:
        print(f"vmwrap: {e}", file=sys.stderr)
        return 1
    if action == "checkpoint":
        print("vmwrap: a VM is checkpointed by saving it, which stops it: use qhold (checkpoint_abort), "
              "not a periodic checkpoint", file=sys.stderr)
        return 1
    if action == "checkpoint_abort":
        return checkpoint_abort(settings, pbs_id, jid, pw, gid)
    return restart(settings, pbs_id, jid, pw, gid)


def checkpoint_abort(settings: Settings, pbs_id: str, jid: str, pw: pwd.struct_passwd, gid: int) -> int:
    """Save the job's VM into the checkpoint store (the payload detaches first, then leaves). The
    record beside the checkpoint says it is qhold's: execjob_end keeps it, the next execjob_begin
    leaves the restore to the restart action, and `vmwrap pbs gc` finds the PBS id."""
    from vmwrap import checkpoint as ckpt, domain
    from vmwrap.ledger import Ledger

    run_dir = rundir.path(settings, jid)
    if not (run_dir / rundir.JOB).exists() or run_dir.is_symlink():
        print(f"vmwrap: job {pbs_id} has no VM on this node to checkpoint", file=sys.stderr)
        return 1
    meta = json.loads(safeio.read_capped(run_dir / rundir.JOB, 1 << 20) or b"{}")
    if meta.get("uid") not in (None, pw.pw_uid):
        print(f"vmwrap: job {pbs_id}'s VM belongs to another user", file=sys.stderr)
        return 1
    hosts = rundir.placement(run_dir)[1]
    if hosts > 1:   # one host's VM saved and the others not would be half a job
        print(f"vmwrap: job {pbs_id}'s VMs span {hosts} hosts, which vmwrap does not save: it runs on", file=sys.stderr)
        return 1
    work_dir = (safeio.read_capped(rundir.ctl(run_dir) / rundir.CTL_WORKDIR, 4096) or b"").decode(errors="replace")
    _write_result(run_dir / HOLD, pbs_id)
    delivered = rundir.user_dir(run_dir) / rundir.DELIVERED   # the payload detached: its offsets are in
    end = time.monotonic() + DETACH_WAIT
    while time.monotonic() < end and not os.path.lexists(delivered):
        time.sleep(0.05)
    store = ckpt.Store(settings.checkpoint_dir, settings.checkpoint_key_file)
    ledger = Ledger(settings.ledger_path)
    try:
        conn = domain.connect(settings.libvirt_uri)
        try:
            info = ckpt.save(jid, run_dir, store, conn, 0)
        finally:
            conn.close()
        restart_record.write(record_path(settings, jid), {"job": pbs_id, "checkpoint": True, "uid": pw.pw_uid,
                                                          "gid": gid, "image": meta.get("image"), "work_dir": work_dir})
    except Exception as e:  # noqa: BLE001 (PBS logs the failure, the job learns why; the node stays up)
        ledger.record(jid, rundir.domain_name(jid), "save_failed", scheduler=NAME, message=str(e))
        store.delete(jid)
        _write_result(run_dir / SAVED, f"failed\n{e}")
        print(f"vmwrap: saving the VM of job {pbs_id} failed: {e}", file=sys.stderr)
        return 1
    ledger.record(jid, rundir.domain_name(jid), "saved", scheduler=NAME, **info)
    _write_result(run_dir / SAVED, "ok\n")
    return 0


def held(settings: Settings, jid: str) -> bool:
    """Whether the store holds qhold's checkpoint of `jid` (checkpoint_abort's record)."""
    try:
        raw = safeio.read_capped(record_path(settings, jid), 1 << 16)
        return raw is not None and json.loads(raw).get("checkpoint") is True
    except (OSError, ValueError, AttributeError, UserError):
        return False


def spool_dir(env: dict[str, str], pbs_id: str) -> Path:
    """PBS_HOME/spool, where the mom keeps the job's .OU/.ER: PBS_NODEFILE is PBS_HOME/aux/<ID>
    (mom_main.c:2357-2359), the one path do_mom_action_script hands over that names PBS_HOME."""
    nodefile = env.get("PBS_NODEFILE", "")
    if not nodefile.startswith("/") or os.path.normpath(nodefile) != nodefile or \
            not nodefile.endswith(f"/aux/{pbs_id}"):
        raise UserError(f"PBS_NODEFILE {nodefile[:200]!r} is not PBS_HOME/aux/{pbs_id}")
    return Path(nodefile).parent.parent / "spool"


def restart(settings: Settings, pbs_id: str, jid: str, pw: pwd.struct_passwd, gid: int) -> int:
    """Restore the VM from the store (lifecycle.start of a restarted job), then become the job."""
    try:
        spool = spool_dir(dict(os.environ), pbs_id)
    except UserError as e:
        print(f"vmwrap: {e}", file=sys.stderr)
        return EXIT_NODE

    def read_job() -> Job:
        return restart_record.restart_job(record_path(settings, jid), pbs_id, jid, NAME, pw, gid)

    out = lifecycle.start(settings, jid, read_job, NAME)
    if out.verdict is lifecycle.Verdict.NODE_FAULT:
        print(f"vmwrap: {out.reason}", file=sys.stderr)
        return EXIT_NODE
    record_path(settings, jid).unlink(missing_ok=True)   # restored: execjob_end treats the job as any other
    os.setgroups(os.getgrouplist(pw.pw_name, gid))
    os.setgid(gid)
    os.setuid(pw.pw_uid)
    os.chdir(pw.pw_dir if os.path.isdir(pw.pw_dir) else "/")
    for fd, suffix in ((1, ".OU"), (2, ".ER")):
        try:
            f = os.open(spool / f"{pbs_id}{suffix}", os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        except OSError:
            continue
        os.dup2(f, fd)
        os.close(f)
    keep = {k: os.environ[k] for k in ("PBS_JOBID", "PBS_JOBNAME", "PBS_QUEUE", "PBS_NODEFILE", "PBS_JOBDIR")
            if k in os.environ}
    os.environ.clear()
    os.environ.update({**keep, "HOME": pw.pw_dir, "USER": pw.pw_name, "LOGNAME": pw.pw_name,
                       "PATH": "/usr/bin:/bin"})
    from .job import run

    return run(settings, pbs_id, "", [])


# --- the payload's side (the job's user) ----------------------------------------------------------

def watch_hold(run_dir: Path) -> None:
    """checkpoint_abort cannot signal the job's process (root signals nothing a user controls): the
    payload signals itself when the mark appears, and its handler detaches."""
    import signal

    def watch() -> None:
        while not (run_dir / HOLD).exists():
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True).start()


def wait_saved(run_dir: Path) -> int:
    """After detaching for qhold: 0 once the VM is saved (pbs_mom then kills us anyway)."""
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
    print("vmwrap: error: the checkpoint action did not finish saving the VM", file=sys.stderr)
    return EXIT_CHECKPOINT

