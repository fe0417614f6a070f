"""The job's payload: hand the job to its waiting VM, relay its output and signals, exit with its code.

Runs as the job's user under a scheduler (`attach`: the prolog booted the VM), or inside `vmwrap run`
(root, vmwrap/launcher.py). Exit codes: the job's own; a signal N that killed it inside the guest gives
128+N, and under a scheduler the payload then ends by that same signal (`attach`), as the bare job would;
before the job could run, 64 = the job's request is wrong, 65 = the image is unusable, 66 = the job's
checkpoint is missing or corrupt (and it asked to fail then), 69 = this node cannot run VMs (or no
disk space for the job now), 70 = the guest died without reporting an exit status, 153 (128 +
SIGXFSZ) = the job's VM was stopped for writing more than a per-job limit allows
(job_output_max_bytes, console_max_bytes, job_disk_max_bytes: vmwrap/limits.py).

Whatever it reads from the run dir is written by QEMU for the (hostile) guest, or by root: it goes
through vmwrap/safeio.py (no links, no FIFOs, bounded).
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import signal
import stat
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from . import domain, evidence, limits, rundir, safeio
from .config import Settings
from .errors import JobDiskError, NodeError, VmwrapError
from .ledger import Ledger

EXIT_USER, EXIT_IMAGE, EXIT_CHECKPOINT, EXIT_NODE, EXIT_GUEST = 64, 65, 66, 69, 70
EXIT_FOR = {"user": EXIT_USER, "image": EXIT_IMAGE, "checkpoint": EXIT_CHECKPOINT, "node": EXIT_NODE}
EXIT_STALE = 128 + signal.SIGTERM  # a copy the scheduler restarted elsewhere ends as one it stopped
POLL = 0.02
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
SMALL_FILE_MAX = 1 << 16     # error, notice, restored.json: root-written, capped anyway
RESUME_RETRY_S = 2.0        # a resume the node agent could not do is asked for again this often
GO_RESEND_S = 2.0           # GO again until the guest says "started" (a line can be lost: stream())
STATUS_TIMELINE_MAX = 1 << 16  # the agent's booted/ready/started/exit lines come first
STATUS_READ_MAX = 1 << 16    # status bytes taken per poll
STATUS_LINE_MAX = 4096       # a longer unfinished status "line" is the guest's garbage: dropped
CONSOLE_TAIL = 2000
PANIC_WINDOW = 16 * 1024   # bytes read back to find a panic's first line
PANIC_CONTEXT_LINES = 15

if TYPE_CHECKING:
    from .steps import Launch

IMAGE_ENV_MAX = 1 << 17  # the catalog's env of an image (imports cap it at 64 KiB)


def job_environment(run_dir: Path, environment: dict[str, str]) -> dict[str, str]:
    """The job's environment over its image's defaults (ctl/image-env, root's): the job's own variables
    win, except PATH, which is the image's when it sets one (the host's PATH means nothing in its root)."""
    raw = safeio.read_capped(rundir.ctl(run_dir) / rundir.CTL_IMAGE_ENV, IMAGE_ENV_MAX) or b""
    image = dict(e.decode("utf-8", "surrogateescape").partition("=")[::2] for e in raw.split(b"\0") if b"=" in e)
    merged = {**image, **environment}
    if "PATH" in image:
        merged["PATH"] = image["PATH"]
    return merged


class Attachment:
    """Either side: hand the job to the waiting guest, stream its output, forward signals.

    With a libvirt connection (root) SIGTSTP/SIGCONT pause/resume the whole VM; without one (the
    job's user under a scheduler) they stop/continue the job's processes inside the guest.
    """

    def __init__(self, run_dir: Path, job_id: str, out_fd: int = 1, err_fd: int = 2, grace: float = 30.0,
                 conn=None, ledger: Ledger | None = None, settings: Settings | None = None):
        self.run_dir = Path(run_dir)
        self.job_id = job_id
        self.name = rundir.domain_name(job_id)
        self.out_fd, self.err_fd = out_fd, err_fd
        self.grace = grace
        self.conn = conn
        self.ledger = ledger
        self.control = domain.Control(self.run_dir)
        self.settings = settings
        self._stopped_inside = False
        self._agent_may_have_paused = False
        self._signals: list[int] = []
        self.timeline: dict[str, float] = {}
        # The scheduler's answer to "is this SIGTERM a requeue/preemption?": then the step only
        # detaches and the VM is saved by the epilog instead of the job being terminated.
        self.requeued: Callable[[], bool] | None = None
        self.offsets = {rundir.STDOUT: 0, rundir.STDERR: 0}  # bytes of each stream already delivered
        self.detached = False
        self.stale: str | None = None  # the job runs again elsewhere: the agent stopped this copy's VM
        self.killed_by: int | None = None  # the signal that ended the job inside the guest
        self.checkpoint_every: int | None = None  # s between periodic checkpoints (vmwrap/periodic.py)

    def _record(self, event: str, **kw) -> None:
        if self.ledger is not None:
            self.ledger.record(self.job_id, self.name, event, **kw)

    def install_signal_handlers(self) -> None:
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGTSTP, signal.SIGCONT):
            signal.signal(s, lambda signum, _f: self._signals.append(signum))

    def start(self, script: str, environment: dict[str, str], args: list[str] = ()) -> None:
        restored = safeio.read_capped(self.run_dir / rundir.RESTORED, SMALL_FILE_MAX)
        if restored is not None:  # the job already runs in a VM restored from its checkpoint
            self._resume_streams(json.loads(restored).get("delivered", {}))
            if "started" in guest_timeline(self.run_dir):
                return
            # ... unless it was saved while its guest still booted (a checkpoint or a requeue right after
            # the start): that guest waits for GO and reads the job's files from this run dir.
        user = rundir.user_dir(self.run_dir)
        try:
            _write_private(user / rundir.USER_SCRIPT, script.encode("utf-8", "surrogateescape"), 0o700)
            _write_private(user / rundir.USER_ENV, b"".join(
                f"{k}={v}".encode("utf-8", "surrogateescape") + b"\0"
                for k, v in job_environment(self.run_dir, environment).items() if "\0" not in k + v and "=" not in k),
                0o600)
            _write_private(user / rundir.USER_ARGS, b"".join(a.encode("utf-8", "surrogateescape") + b"\0" for a in args), 0o600)
            _write_private(user / rundir.USER_LIMITS, own_limits().encode(), 0o600)
            (user / rundir.USER_MERGED).unlink(missing_ok=True)
            if same_file(self.out_fd, self.err_fd):
                _write_private(user / rundir.USER_MERGED, b"", 0o600)
        except OSError as e:
            if e.errno not in DISK_FULL:
                raise
            raise JobDiskError(f"cannot hand the job to its VM: {e.strerror} writing {e.filename}") from None
        if not self.control.connect(timeout=5.0):
            if evidence.guest_ran(self.run_dir):
                return  # it booted and died before we attached: stream() reports it, console included
            raise NodeError(f"cannot reach the job's VM control socket in {self.run_dir} (VM not running?)")
        self.control.send("GO")
        self.timeline["go"] = time.monotonic()

    def _resume_streams(self, delivered: dict[str, int]) -> None:
        """Continue each stream where the previous run's step stopped delivering it. If the scheduler
        truncated the output file on restart (it is empty now), deliver everything again instead; if it
        holds more than when the checkpoint was taken (the node crashed after it: a periodic
        checkpoint), cut it back to that size, so that nothing is delivered twice."""
        for name, fd in ((rundir.STDOUT, self.out_fd), (rundir.STDERR, self.err_fd)):
            off = int(delivered.get(name, 0))
            size = delivered.get(f"{name}_size")
            try:
                st = os.fstat(fd)
                if stat.S_ISREG(st.st_mode) and st.st_size == 0:
                    off = 0
                elif stat.S_ISREG(st.st_mode) and type(size) is int and 0 <= size < st.st_size:
                    os.ftruncate(fd, size)
                    os.lseek(fd, size, os.SEEK_SET)
            except OSError:
                pass
            self.offsets[name] = off

    def _save_offsets(self) -> None:
        """Record how much of each stream was delivered, and how big the output files are with it."""
        sizes = {}
        for name, fd in ((rundir.STDOUT, self.out_fd), (rundir.STDERR, self.err_fd)):
            try:
                st = os.fstat(fd)
                if stat.S_ISREG(st.st_mode):
                    sizes[f"{name}_size"] = st.st_size
            except OSError:
                pass
        try:
            _write_private(rundir.user_dir(self.run_dir) / rundir.DELIVERED,
                           json.dumps({**self.offsets, **sizes}).encode(), 0o600)
        except OSError:
            pass

    def _checkpoint(self) -> None:
        """Ask the node agent for a periodic checkpoint of the running VM (the caller delivered what
        the guest wrote and recorded it). A failure is the agent's ledger's: the job runs on."""
        from . import agent, periodic

        try:
            reply = agent.request(self.settings, "checkpoint", self.job_id, timeout=periodic.SAVE_TIMEOUT)
        except (NodeError, TypeError):
            return
        if isinstance(reply, dict) and reply.get("stale"):
            self.stale = str(reply.get("error", ""))[:2000]

    def _gone(self) -> bool:
        if self.conn is not None:
            return domain.is_gone(self.conn, self.name)
        return self.control.eof()

    def stream(self) -> int:
        files: dict[str, object] = {}
        pending = {rundir.STDOUT: self.out_fd, rundir.STDERR: self.err_fd}
        status_buf = b""
        exit_code: int | None = None
        killed_by: int | None = None
        exit_seen_at = None
        term_deadline = kill_deadline = None
        # TERM/KILL sent before the guest said it started may be lost: its agent reads GO and closes the
        # port, dropping what arrived behind it. Such a line is sent again once the job has started.
        again: list[str] = []
        paused = False
        retry_resume = None   # when to ask again for a resume the node agent could not do (it restarts)
        next_checkpoint = time.monotonic() + self.checkpoint_every if self.checkpoint_every else None
        last_check = 0.0
        status_f = None
        # The guest agent polls the control port (open, read, close) while no host is attached, and a
        # port closed just as a line arrives drops it: GO is sent again until the job has started.
        last_go = self.timeline.get("go")

        def pump(name: str, fd: int) -> bool:
            f = files.get(name)
            if f is None:
                f = files[name] = _open_or_none(self.run_dir / name)
                if f is None:
                    return False
                f.seek(self.offsets[name])
            moved = False
            while buf := f.read(1 << 20):
                write_all(fd, buf)
                self.offsets[name] += len(buf)
                moved = True
                self.timeline.setdefault("first_output", time.monotonic())
                if len(buf) < (1 << 20):
                    break
            return moved

        while True:
            moved = any([pump(n, fd) for n, fd in pending.items()])
            if status_f is None:
                status_f = _open_or_none(self.run_dir / rundir.STATUS)
            if status_f is not None:
                lines, status_buf = _status_lines(status_f, status_buf)
                for ln in lines:
                    word, _, arg = ln.decode(errors="replace").partition(" ")
                    if word in ("booted", "ready", "started"):
                        self.timeline.setdefault(word, time.monotonic())
                        if word != "ready":
                            self._record(word, guest_uptime=arg[:32])
                    elif word == "signal" and exit_code is None:
                        killed_by = _signal_number(arg)
                    elif word == "exit" and exit_code is None:
                        exit_code = _exit_status(arg)
                        if exit_code is not None:
                            exit_seen_at = time.monotonic()
                    elif word == "error":
                        write_all(self.err_fd, f"vmwrap: guest error: {arg[:1000]}\n".encode())
            while self._signals:
                sig = self._signals.pop(0)
                if sig == signal.SIGTSTP and not paused:
                    paused = self._pause()
                    retry_resume = None
                elif sig == signal.SIGCONT and paused:
                    paused = not self._resume()
                    retry_resume = time.monotonic() + RESUME_RETRY_S if paused else None
                elif sig == signal.SIGTERM and term_deadline is None and self.requeued and self.requeued():
                    # Preempted/requeued: leave the VM as it is for the epilog to save; record how much
                    # of each stream was delivered so that the restored job continues from there.
                    for name, fd in pending.items():
                        pump(name, fd)
                    self._save_offsets()
                    self.detached = True
                    self._record("detached")
                    break
                elif sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP) and term_deadline is None:
                    if paused:
                        paused = not self._resume()
                    self.control.send("TERM")
                    term_deadline = time.monotonic() + self.grace
                    if "started" not in self.timeline:
                        again.append("TERM")
            if self.detached:
                break
            now = time.monotonic()
            if paused and retry_resume is not None and now >= retry_resume:
                # The scheduler resumed the job but its VM stayed paused (the agent was down): a job
                # must not sleep until its time limit because a node daemon restarted.
                paused = not self._resume(quiet=True)
                retry_resume = now + RESUME_RETRY_S if paused else None
                if not paused:
                    write_all(self.err_fd, b"vmwrap: the VM resumed\n")
            # Not before the job runs: a guest saved while booting waits for a GO after its restore.
            if (next_checkpoint is not None and now >= next_checkpoint and not paused and exit_code is None
                    and term_deadline is None and not self._signals and "started" in self.timeline):
                for name, fd in pending.items():
                    pump(name, fd)
                self._save_offsets()
                self._checkpoint()
                if self.stale is not None:
                    break   # what the stopped VM wrote since is not the job's: nothing more is delivered
                now = time.monotonic()
                next_checkpoint = now + self.checkpoint_every
            if last_go is not None and ("started" in self.timeline or exit_code is not None or term_deadline):
                last_go = None
            if last_go is not None and now - last_go >= GO_RESEND_S:
                self.control.send("GO")
                last_go = now
            if again and "started" in self.timeline and exit_code is None:
                for line in again:
                    self.control.send(line)
                again.clear()
            if term_deadline and now > term_deadline and kill_deadline is None:
                self.control.send("KILL")
                kill_deadline = now + 2.0
                if "started" not in self.timeline:
                    again.append("KILL")
            if kill_deadline and now > kill_deadline and self.conn is not None:
                domain.destroy(self.conn, self.name)
            if now - last_check > 0.1 or exit_code is not None:
                last_check = now
                # Without libvirt, a guest that reported its exit but lingers is given 5 s to power off.
                lingering = exit_seen_at is not None and self.conn is None and now - exit_seen_at > 5.0
                if self._gone() or lingering:
                    for name, fd in pending.items():
                        pump(name, fd)
                        f = files.get(name)
                        while f is not None and (buf := f.read(1 << 20)):
                            write_all(fd, buf)
                            self.offsets[name] += len(buf)
                    if status_f is None:
                        status_f = _open_or_none(self.run_dir / rundir.STATUS)
                    if exit_code is None and status_f is not None:
                        for ln in (status_buf + status_f.read(16 * STATUS_READ_MAX)).split(b"\n"):
                            if ln.startswith(b"signal ") and exit_code is None:
                                killed_by = _signal_number(ln[7:].decode(errors="replace"))
                            if ln.startswith(b"exit ") and exit_code is None:
                                exit_code = _exit_status(ln[5:].decode(errors="replace"))
                    break
            if not moved:
                time.sleep(POLL)
        for f in files.values():
            f.close()
        self.control.close()
        if self.detached:
            return 0
        if self.stale is not None:
            # Not a word into the job's streams: the run elsewhere writes the same files.
            self._record("exited", exit_code=EXIT_STALE, message=self.stale)
            return EXIT_STALE
        why = limits.reason(self.run_dir)  # the root watcher stopped the VM: that is the job's end
        if why is not None:
            write_all(self.err_fd, why.encode())
            exit_code = limits.EXIT_LIMIT
        if exit_code is None:
            if term_deadline is not None:  # told to stop, and the VM ended before saying how
                exit_code, killed_by = 128 + signal.SIGTERM, signal.SIGTERM
            else:
                tail = _tail(self.run_dir / rundir.CONSOLE)
                write_all(self.err_fd, f"vmwrap: the guest died without reporting an exit status\n{tail}".encode())
                exit_code = EXIT_GUEST
        if killed_by is not None and exit_code == 128 + killed_by:
            self.killed_by = killed_by
        self._record("exited", exit_code=exit_code)
        return exit_code

    def _pause_unprivileged(self) -> bool:
        """Ask the node agent to pause the whole VM; without one, stop the job's processes inside."""
        try:
            from . import agent

            if self.settings is None:
                raise NodeError("no settings")
            agent.request(self.settings, "pause", self.job_id)
            return True
        except NodeError as e:
            # An agent killed between pausing the VM and answering paused it all the same: the
            # resume must then ask the agent too, or the VM stays paused while the job is resumed.
            self._agent_may_have_paused = isinstance(e, agent.Unanswered)
            write_all(self.err_fd, f"vmwrap: {e}; stopping the job's processes inside the VM instead\n".encode())
            self._stopped_inside = self.control.send("STOP")
            return self._stopped_inside or self._agent_may_have_paused

    def _pause(self) -> bool:
        if self.conn is None:
            return self._pause_unprivileged()
        dom = domain.lookup(self.conn, self.name)
        if dom is None:
            return False
        try:
            domain.guarded(self.conn, self.name, "pause", dom.suspend)
        except Exception:
            return False
        self._record("paused")
        return True

    def _resume(self, quiet: bool = False) -> bool:
        if self.conn is None:
            if self._stopped_inside:
                self._stopped_inside = False
                sent = self.control.send("CONT")
                if not self._agent_may_have_paused:
                    return sent
            try:
                from . import agent

                agent.request(self.settings, "resume", self.job_id)
                self._agent_may_have_paused = False
                return True
            except (NodeError, TypeError) as e:
                if not quiet:
                    write_all(self.err_fd, f"vmwrap: cannot resume the VM: {e}; trying again every "
                                           f"{RESUME_RETRY_S:.0f} s\n".encode())
                return False
        dom = domain.lookup(self.conn, self.name)
        if dom is None:
            return True
        try:
            if not domain.set_paused(self.conn, self.name, dom, False):
                return True
        except Exception:
            return False
        self._record("resumed")
        return True


GUEST_CTL = "/.vmwrap"   # where the job's root shows its control files (the guest agent binds them there)
GIVEN = "given."         # ctl/user/given.NAME: a file the scheduler gave the job, as the job sees it
_GIVEN_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")


def give(run_dir: Path, name: str, data: bytes) -> str:
    """Hand the guest a copy of a file the scheduler gave the job on the host (Grid Engine's
    pe_hostfile), before the job starts; returns its path in the guest, for the job's environment."""
    if not _GIVEN_NAME.fullmatch(name):
        raise ValueError(f"{name[:40]!r} is not a name for a file given to the guest")
    _write_private(rundir.user_dir(run_dir) / (GIVEN + name), data, 0o644)
    return f"{GUEST_CTL}/{rundir.CTL_USER}/{GIVEN}{name}"


def hand_over(run_dir: Path, env: dict[str, str], var: str, name: str, data: bytes) -> None:
    """`give` a file the scheduler gave the job and point the guest's `env[var]` at the copy; a VM
    that is not there (its start failed: the attachment says why) gets nothing, a copy that cannot be
    written is a warning on the job's stderr (the job runs on without it)."""
    try:
        env[var] = give(run_dir, name, data)
    except FileNotFoundError:
        pass
    except OSError as e:
        write_all(2, f"vmwrap: warning: cannot hand the VM the job's {var}: {e.strerror}\n".encode())


def attach(run_dir: Path, job_id: str, script: str, environment: dict[str, str], args: list[str] = (),
           grace: float = 30.0, settings: Settings | None = None,
           requeued: Callable[[], bool] | None = None, steps: "Launch | None" = None,
           steps_name: str = "srun", shim_dirs: tuple[str, ...] = ()) -> int:
    """The job's payload under a scheduler (runs as the job's user): the VM was booted by the prolog.
    `steps`: the scheduler's step launcher; then `srun` (or `steps_name`: Grid Engine's `qrsh`) inside
    the VM runs real steps (vmwrap/steps.py), and is also installed in `shim_dirs`."""
    err = safeio.read_capped(Path(run_dir) / rundir.ERROR, SMALL_FILE_MAX)
    if err is not None:
        kind, _, msg = err.decode(errors="replace").partition("\n")
        write_all(2, f"vmwrap: error: {msg.strip()}\n".encode())
        return EXIT_FOR.get(kind, EXIT_NODE)
    try:
        rundir.read_job(Path(run_dir), job_id)  # a run dir of a newer vmwrap (a node downgraded under it)
    except rundir.FormatError as e:
        write_all(2, f"vmwrap: error: {e}\n".encode())
        return EXIT_FOR[e.kind]
    except (OSError, ValueError):
        pass  # not readable by the job's user, or half-written: the attachment below says what is wrong
    notice = safeio.read_capped(Path(run_dir) / rundir.NOTICE, SMALL_FILE_MAX)
    if notice:
        write_all(2, notice)
    att = Attachment(Path(run_dir), job_id, grace=grace, settings=settings)
    att.requeued = requeued
    if settings is not None:
        from . import periodic

        att.checkpoint_every = periodic.interval(script, settings)
    att.install_signal_handlers()
    from . import steps as job_steps

    server = job_steps.serve(Path(run_dir), steps, steps_name, shim_dirs) if steps is not None else None
    try:
        att.start(script, environment, list(args))
        rc = att.stream()
    except VmwrapError as e:
        write_all(2, f"vmwrap: error: {e}\n".encode())
        return EXIT_FOR[e.kind]
    finally:
        if server is not None:
            server.close()
    if att.killed_by is not None:
        die_by(att.killed_by)
    return rc


def die_by(sig: int) -> None:
    """End this process by `sig`, so that the scheduler records what it records for a bare job killed by
    it (Slurm: ExitCode 0:N, not 128+N:0). No core file: the signal was the job's, not ours."""
    import resource

    sys.stdout.flush()
    sys.stderr.flush()
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ValueError, OSError):
        pass
    if sig not in (signal.SIGKILL, signal.SIGSTOP):  # these two cannot be caught, blocked or reset
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
        signal.signal(sig, signal.SIG_DFL)
    os.kill(os.getpid(), sig)
    time.sleep(1)  # a signal whose default is not to end the process: fall back to the 128+N exit


# The limits a scheduler (or the user's ulimit) puts on a job that mean the same inside a guest. Not
# carried: the scheduling ones (nice, rtprio, rttime) and those sized by the host (sigpending, msgqueue).
CARRIED_LIMITS = ("core", "cpu", "fsize", "data", "stack", "nofile", "as", "nproc", "memlock")


def own_limits() -> str:
    """This process's limits, `NAME SOFT HARD` per line (`unlimited` for infinity), for vmwrap-exec:
    a bare job runs with them, so the job in the guest does too (a core file where the queue allows one)."""
    import resource

    def word(v: int) -> str:
        return "unlimited" if v == resource.RLIM_INFINITY else str(v)

    lines = []
    for name in CARRIED_LIMITS:
        soft, hard = resource.getrlimit(getattr(resource, f"RLIMIT_{name.upper()}"))
        lines.append(f"{name} {word(soft)} {word(hard)}\n")
    return "".join(lines)


def same_file(a: int, b: int) -> bool:
    """Whether two descriptors write to one file (Slurm's default output, Grid Engine's -j y, a shared
    pipe or terminal): a bare job's lines then interleave in the order it wrote them."""
    try:
        sa, sb = os.fstat(a), os.fstat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _write_private(path: Path, data: bytes, mode: int) -> None:
    """Write a file the job's user owns (root writing on the user's behalf gives it to the dir's owner)."""
    # A fresh inode in the user's dir: a FIFO, link or hard link put there by the user is replaced,
    # never opened (opening a FIFO for writing would block root forever).
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        write_all(fd, data)
        if os.geteuid() == 0:
            st = os.stat(path.parent)
            os.fchown(fd, st.st_uid, st.st_gid)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def guest_timeline(run_dir: Path) -> dict[str, float | int]:
    """What the guest agent reported (guest uptimes at booted/ready/started, exit status)."""
    out: dict[str, float | int] = {}
    try:  # the guest writes this file (through QEMU): only its head, and never through a link or FIFO
        data = safeio.read_capped(Path(run_dir) / rundir.STATUS, STATUS_TIMELINE_MAX)
    except OSError:
        return out
    for ln in (data or b"").decode(errors="replace").splitlines():
        word, _, arg = ln.partition(" ")
        if word in ("booted", "ready", "started"):
            try:
                v = float(arg[:32])
            except ValueError:
                continue
            if math.isfinite(v):
                out[word] = v
        elif word == "exit" and (code := _exit_status(arg)) is not None:
            out["exit"] = code
    return out


def _signal_number(arg: str) -> int | None:
    """The N of a `signal N` line: a signal that ends a process by default, anything else is ignored."""
    arg = arg.strip()
    if not (arg.isascii() and arg.isdigit() and len(arg) <= 2):
        return None
    n = int(arg)
    return n if 1 <= n < signal.SIGRTMIN and n not in (signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN,
                                                      signal.SIGTTOU, signal.SIGCHLD, signal.SIGCONT,
                                                      signal.SIGURG, signal.SIGWINCH) else None


def _exit_status(arg: str) -> int | None:
    """The status of an `exit N` line: 0..255, anything else from the guest is ignored."""
    arg = arg.strip()
    return int(arg) if arg.isascii() and arg.isdigit() and len(arg) <= 3 and int(arg) <= 255 else None


def _status_lines(f, buf: bytes) -> tuple[list[bytes], bytes]:
    """Complete lines newly readable on the status port, and the unfinished rest (both bounded)."""
    *lines, rest = (buf + f.read(STATUS_READ_MAX)).split(b"\n")
    return lines, (rest if len(rest) <= STATUS_LINE_MAX else b"")


def write_all(fd: int, data: bytes) -> None:
    """All of `data` to `fd` across short writes and EINTR; a reader that went away is not an error."""
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except InterruptedError:
            continue
        except BrokenPipeError:
            return
        view = view[n:]


def _open_or_none(p: Path):
    """A reader on a stream file QEMU writes; None unless it is a regular file (no link, FIFO)."""
    return safeio.open_stream(p)


def _tail(p: Path, n: int = CONSOLE_TAIL) -> str:
    """The console's last lines for the job's error output (seek, never the whole file: the guest
    decides its size). A kernel panic's backtrace would fill the tail and push out what the user
    needs (their init's last words), so for a panic the lines before it are shown and the trace
    is left to the kept evidence."""
    try:
        data = safeio.tail_capped(p, PANIC_WINDOW)
    except OSError:
        return ""
    if data is None:
        return ""
    return "--- guest console (last lines) ---\n" + summarise_console(data.decode(errors="replace"), n) + "\n"


def summarise_console(text: str, n: int = CONSOLE_TAIL) -> str:
    """The last `n` characters of a console, or for a kernel panic the lines leading up to it."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if "Kernel panic - not syncing" in line:
            head = "\n".join(lines[max(0, i - PANIC_CONTEXT_LINES):i + 1])[-n:]
            return head + "\n[kernel backtrace omitted; `vmwrap ps --failed` shows the kept console]"
    return text[-n:]
