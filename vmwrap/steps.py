"""Scheduler steps run inside the job's VM: the host end of the guest's `srun` shim (vmwrap-srun.c).

Why this shape: a step must be a real scheduler step (accounting, step environment, limits, signals),
and only the host can start one. The guest's shim sends its argv over the virtio port org.vmwrap.steps
(a unix socket QEMU binds in the run dir, `SOCKET`); the job's payload (the job's user, never root)
serves it in a thread (`StepServer`): the scheduler plugin turns the argv into a host command line
(`Launch`, e.g. vmwrap_plugins/slurm/steps.py: the real srun with checked options), whose tasks are
`python -m vmwrap.steps SOCK TOKEN` (`task_main`). Each task connects back to the payload over a
private unix socket (`TASKS` in the run dir's ctl/user, the job's user's 0700 dir; peer uid checked,
per-step random token) and the guest runs the command with the task's SLURM_* environment; its output
goes back through the scheduler's own I/O. Only the host's processes talk to a scheduler, so this works
the same across real hosts.

The task socket lives in the run dir, never in /tmp: a payload killed by SIGKILL (OOM, a node agent, a
time limit past KillWait) cannot remove anything, and the run dir goes with the job on every exit path
(the epilog's teardown). A run dir path too long for AF_UNIX (107 bytes) is bound and reached through
/proc/self/fd/N/ of an O_PATH fd on its dir (`_unix_address`): no chdir, which a threaded process must
not do.

A VM runs rundir.STEPS_PORTS steps at once, a step port each (a guest port opens once: the shim takes
one that is free, and waits when all are taken); the payload serves each port in a thread of its own
with its own task socket (`StepServers`). A step in flight when the VM is saved for a
requeue ends with the job's batch step (its srun is killed with the job); the restored job's payload
says B(ye) on connecting and the guest's waiting shim exits 1 with a message.
Everything from the guest is hostile: frames are bounded (FRAME_MAX), resynchronised on garbage, and
carry no host path; the guest's argv only reaches the plugin's validator and srun's argv (no shell).
"""

from __future__ import annotations

import hmac
import os
import re
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from . import rundir
from .errors import NodeError, UserError

SOCKET = rundir.STEPS_SOCKET  # in the run dir: the guest's step port (QEMU binds it, as the job's user)
MARKER = "steps"           # ctl/user/steps: the guest agent installs its srun shim only when served
MARKER_DIRS = "steps.dirs"  # ctl/user/steps.dirs: more dirs the guest installs it in, one a line
_SHIM_DIR = re.compile(r"(/[A-Za-z0-9_+-][A-Za-z0-9._+-]{0,63}){1,16}")
SHIM_NAMES = ("srun", "qrsh", "pbs_tmrsh")   # what the marker may name (init.sh allows the same)
TASKS = "tasks.sock"       # ctl/user/tasks.sock: the payload's listener the step's tasks connect to
UNIX_PATH_MAX = 107        # sun_path's 108 bytes, NUL included
DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
MAGIC = b"VWS1"
HEADER = struct.Struct(">4scIHI")  # magic, type, step id, task id, length
FRAME_MAX = 1 << 17
ENV_PREFIXES = ("SLURM_", "SLURMD_")  # what a task hands to the guest of its own environment
SEND_TIMEOUT = 30.0         # a peer that reads nothing for this long loses its step, not the server
FORWARDED_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2}
WARNINGS_MAX = 10

# (guest argv, the task's argv) -> (index of the command in the guest argv, host argv to run);
# UserError for a request the user must fix (its message reaches the script's stderr).
Launch = Callable[[list[str], list[str]], tuple[int, list[str]]]


def frame(kind: bytes, step: int, task: int, data: bytes = b"") -> bytes:
    if len(data) > FRAME_MAX:
        raise ValueError("frame too long")
    return HEADER.pack(MAGIC, kind, step & 0xFFFFFFFF, task & 0xFFFF, len(data)) + data


class Frames:
    """Incremental frame decoder: bounded buffer, garbage and oversize headers skipped (and counted)."""

    def __init__(self) -> None:
        self.buf = b""
        self.skipped = 0

    def feed(self, data: bytes) -> list[tuple[bytes, int, int, bytes]]:
        self.buf += data
        out = []
        while len(self.buf) >= HEADER.size:
            magic, kind, step, task, n = HEADER.unpack_from(self.buf)
            if magic != MAGIC or n > FRAME_MAX:
                i = self.buf.find(MAGIC, 1)
                drop = i if i > 0 else max(1, len(self.buf) - len(MAGIC) + 1)
                self.skipped += drop
                self.buf = self.buf[drop:]
                continue
            if len(self.buf) < HEADER.size + n:
                break
            out.append((kind, step, task, self.buf[HEADER.size:HEADER.size + n]))
            self.buf = self.buf[HEADER.size + n:]
        return out


@contextmanager
def _unix_address(path: str) -> Iterator[str]:
    """An AF_UNIX address for `path` while the block runs: the path itself when it fits sun_path, else
    /proc/self/fd/N/NAME with N an O_PATH fd on its dir (Linux resolves it for bind and connect)."""
    if len(os.fsencode(path)) <= UNIX_PATH_MAX:
        yield path
        return
    parent, name = os.path.split(path)
    fd = os.open(parent or ".", DIR_FLAGS)
    try:
        yield f"/proc/self/fd/{fd}/{name}"
    finally:
        os.close(fd)


def _status_text(returncode: int) -> bytes:
    return f"signal {-returncode}".encode() if returncode < 0 else f"exit {returncode & 255}".encode()


class _Step:
    def __init__(self, step_id: int, token: str, proc: subprocess.Popen):
        self.id, self.token, self.proc = step_id, token, proc
        self.pipes = {proc.stdout: b"S", proc.stderr: b"T"}
        self.tasks: dict[int, socket.socket] = {}
        self.finished: set[int] = set()


def tasks_socket(i: int) -> str:
    """The task socket of step port i's server, in ctl/user."""
    return rundir.numbered(TASKS, i)


class StepServer(threading.Thread):
    """The payload's step service for one step port of a job's VM (a daemon thread; the job's user)."""

    def __init__(self, run_dir: Path, launch: Launch, err_fd: int = 2, index: int = 0, shim: str = "srun",
                 shim_dirs: tuple[str, ...] = ()):
        super().__init__(daemon=True, name=f"vmwrap steps {index}")
        if shim not in SHIM_NAMES:
            raise ValueError(f"no step shim is named {shim!r}")
        self.shim = shim  # what the guest's user typed: the messages say it as that command would
        # where tools look for the launcher besides PATH (Open MPI: $SGE_ROOT/bin/$ARC/qrsh); absolute,
        # plain names only: the guest agent makes them in the job's root
        self.shim_dirs = tuple(d for d in shim_dirs if plain_dir(d))
        self.run_dir = Path(run_dir)
        self.launch = launch
        self.err_fd = err_fd
        self.port = rundir.steps_socket(index)
        self.tasks = tasks_socket(index)
        # ctl/user: the job's user's 0700 dir (ctl above it is root's), removed with the run dir however
        # the job ends. The payload is that user, so nothing in it is anyone else's to trust or fear.
        self.dir = rundir.user_dir(self.run_dir)
        self.path = str(self.dir / self.tasks)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._dfd = -1
        try:
            self._dfd = os.open(self.dir, DIR_FLAGS)
            try:  # a previous payload's (SIGKILLed before a requeue: the run dir stayed for the restore)
                os.unlink(self.tasks, dir_fd=self._dfd)
            except FileNotFoundError:
                pass
            with _unix_address(self.path) as address:
                self.listener.bind(address)
            self._ino = os.stat(self.tasks, dir_fd=self._dfd, follow_symlinks=False).st_ino
            self.listener.listen(64)
        except BaseException:
            self.listener.close()
            if self._dfd >= 0:
                os.close(self._dfd)
            raise
        self.sel = selectors.DefaultSelector()
        self.guest: socket.socket | None = None
        self.frames = Frames()
        self.step: _Step | None = None
        self.conns: dict[socket.socket, tuple[Frames, int | None]] = {}
        self.warnings = 0
        self._stop = threading.Event()

    def offer(self) -> None:
        """Tell the guest agent (before GO) that steps are served: it then installs its shim under
        this server's name (the scheduler's launcher: srun, qrsh; an empty marker, from an older host,
        is srun)."""
        from .payload import _write_private

        name = self.shim
        _write_private(rundir.user_dir(self.run_dir) / MARKER, b"" if name == "srun" else name.encode(), 0o600)
        dirs = rundir.user_dir(self.run_dir) / MARKER_DIRS
        if self.shim_dirs:
            _write_private(dirs, "".join(d + "\n" for d in self.shim_dirs).encode(), 0o600)
        else:
            dirs.unlink(missing_ok=True)

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self.stop()
        if self.step is not None and self.step.proc.poll() is None:
            self.step.proc.kill()
        if self._dfd < 0:
            return
        try:  # ours only: the name is gone for new tasks (a SIGKILLed payload leaves it to the teardown)
            if os.stat(self.tasks, dir_fd=self._dfd, follow_symlinks=False).st_ino == self._ino:
                os.unlink(self.tasks, dir_fd=self._dfd)
        except OSError:
            pass
        os.close(self._dfd)
        self._dfd = -1

    def _warn(self, msg: str) -> None:
        if self.warnings < WARNINGS_MAX:
            self.warnings += 1
            from .payload import write_all

            write_all(self.err_fd, f"vmwrap: {msg}\n".encode())

    def _to_guest(self, kind: bytes, step: int, task: int, data: bytes = b"") -> None:
        if self.guest is None:
            return
        try:
            for i in range(0, max(len(data), 1), FRAME_MAX):
                self.guest.sendall(frame(kind, step, task, data[i:i + FRAME_MAX]))
        except OSError:  # the guest reads nothing (its shim is gone): this step is lost, not the server
            self._end_step(kill=True)

    def run(self) -> None:
        try:
            self._serve()
        except Exception as e:  # noqa: BLE001 (a broken step service must not take the job down)
            self._warn(f"the step service stopped: {e}")

    def _connect(self) -> bool:
        while not self._stop.is_set():
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                with _unix_address(str(self.run_dir / self.port)) as address:
                    s.connect(address)
            except OSError:
                s.close()
                self._stop.wait(0.2)
                continue
            s.settimeout(SEND_TIMEOUT)
            self.guest = s
            return True
        return False

    def _serve(self) -> None:
        if not self._connect():
            return
        self._to_guest(b"B", 0, 0)  # a shim still waiting from before a save/restore: its step is gone
        self.sel.register(self.guest, selectors.EVENT_READ, "guest")
        self.sel.register(self.listener, selectors.EVENT_READ, "listen")
        while not self._stop.is_set():
            for key, _ in self.sel.select(0.2):
                what = key.data
                if what == "guest":
                    try:
                        data = self.guest.recv(1 << 16)
                    except OSError:
                        data = b""
                    if not data:  # QEMU went away: the VM is gone
                        self._end_step(kill=True)
                        return
                    before = self.frames.skipped
                    for f in self.frames.feed(data):
                        self._from_guest(*f)
                    if self.frames.skipped != before:
                        self._warn(f"ignored {self.frames.skipped - before} malformed bytes on the VM's step port")
                elif what == "listen":
                    self._accept()
                elif what == "pipe":
                    self._pump(key.fileobj)
                else:
                    self._from_task(key.fileobj)
            self._check_done()

    # --- the guest's side -------------------------------------------------------------------------

    def _from_guest(self, kind: bytes, step: int, task: int, data: bytes) -> None:
        if kind == b"Q":
            self._start(step, data)
            return
        s = self.step
        if s is None or step != s.id:
            return
        if kind in (b"O", b"E", b"X"):
            conn = s.tasks.get(task)
            if kind == b"X":
                s.finished.add(task)
            if conn is not None:
                try:
                    conn.sendall(frame(kind, step, task, data))
                except OSError:
                    pass
        elif kind == b"G":
            sig = _signal(data)
            if sig is not None and s.proc.poll() is None:
                s.proc.send_signal(sig)

    def _start(self, step_id: int, data: bytes) -> None:
        if self.step is not None:  # the previous shim died (the port freed): its step ends now
            self._end_step(kill=True)
        if not data.endswith(b"\0") and data:
            data += b"\0"
        argv = [a.decode("utf-8", "surrogateescape") for a in data.split(b"\0")[:-1]]
        token = os.urandom(16).hex()
        task_argv = [sys.executable, "-m", "vmwrap.steps", self.path, token]
        try:
            index, host_argv = self.launch(argv, task_argv)
        except UserError as e:
            self._to_guest(b"T", step_id, 0, f"{self.shim}: error: vmwrap: {e}\n".encode())
            self._to_guest(b"Z", step_id, 0, b"exit 1")
            return
        try:
            proc = subprocess.Popen(host_argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, close_fds=True)
        except OSError as e:
            self._to_guest(b"T", step_id, 0, f"{self.shim}: error: vmwrap: cannot run {host_argv[0]}: {e.strerror}\n".encode())
            self._to_guest(b"Z", step_id, 0, b"exit 1")
            return
        self.step = _Step(step_id, token, proc)
        for p in (proc.stdout, proc.stderr):
            os.set_blocking(p.fileno(), False)
            self.sel.register(p, selectors.EVENT_READ, "pipe")
        self._to_guest(b"A", step_id, 0, str(index).encode())

    def _pump(self, pipe) -> None:
        s = self.step
        try:
            data = os.read(pipe.fileno(), 1 << 16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.sel.unregister(pipe)
            pipe.close()
            if s is not None:
                s.pipes.pop(pipe, None)
            return
        if s is not None:
            self._to_guest(s.pipes.get(pipe, b"T"), s.id, 0, data)

    def _check_done(self) -> None:
        s = self.step
        if s is None or s.pipes or s.proc.poll() is None:
            return
        self._end_step(kill=False)
        self._to_guest(b"Z", s.id, 0, _status_text(s.proc.returncode))

    def _end_step(self, kill: bool) -> None:
        s, self.step = self.step, None
        if s is None:
            return
        if kill and s.proc.poll() is None:
            s.proc.terminate()  # srun passes it on to the tasks; the job's end kills what is left
        for p in list(s.pipes):
            try:
                self.sel.unregister(p)
            except (KeyError, ValueError):
                pass
            p.close()
        s.pipes.clear()
        for conn in s.tasks.values():
            self._drop(conn)
        if kill:
            try:
                s.proc.wait(5)
            except subprocess.TimeoutExpired:
                s.proc.kill()

    # --- the tasks' side (host processes started by the scheduler) --------------------------------

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _, uid, _ = struct.unpack("3i", creds)
        if uid != os.getuid():
            conn.close()
            return
        conn.settimeout(SEND_TIMEOUT)
        self.conns[conn] = (Frames(), None)
        self.sel.register(conn, selectors.EVENT_READ, "task")

    def _drop(self, conn: socket.socket) -> None:
        if conn in self.conns:
            self.sel.unregister(conn)
            del self.conns[conn]
        conn.close()

    def _from_task(self, conn: socket.socket) -> None:
        frames, task = self.conns[conn]
        try:
            data = conn.recv(1 << 16)
        except OSError:
            data = b""
        s = self.step
        if not data:
            if s is not None and task is not None and s.tasks.get(task) is conn:
                del s.tasks[task]
                if task not in s.finished:  # the task was killed (scancel, time limit): so is its command
                    self._to_guest(b"K", s.id, task, b"9")
            self._drop(conn)
            return
        for kind, _, t, body in frames.feed(data):
            if kind == b"H" and task is None:
                token, _, env = body.partition(b"\0")
                if s is None or not hmac.compare_digest(token, s.token.encode()) or t in s.tasks:
                    self._drop(conn)
                    return
                task = t
                self.conns[conn] = (frames, t)
                s.tasks[t] = conn
                self._to_guest(b"R", s.id, t, env)
            elif kind == b"K" and task is not None and s is not None and s.tasks.get(task) is conn:
                if _signal(body) is not None:
                    self._to_guest(b"K", s.id, task, body)


class StepServers:
    """The servers of a VM's step ports, one each."""

    def __init__(self, servers: list[StepServer]):
        self.servers = servers

    def close(self) -> None:
        for s in self.servers:
            s.close()


def plain_dir(d: str) -> bool:
    """An absolute dir of plain names (no `.` or `..` component, nothing a shell or the guest could
    read otherwise), for the guest agent to install a shim in."""
    return bool(_SHIM_DIR.fullmatch(d)) and "/." not in d


def serve(run_dir: Path, launch: Launch, shim: str = "srun", shim_dirs: tuple[str, ...] = ()) -> StepServers | None:
    """Start serving the VM's step ports, if its VM has them (a VM booted by an older vmwrap has none, or
    one); the guest's shim is named `shim`, in its PATH and in each of `shim_dirs`."""
    from .payload import write_all

    for d in shim_dirs:
        if not plain_dir(d):
            write_all(2, f"vmwrap: warning: no {shim} in {d[:200]!r} inside the VM: not a plain absolute "
                         "path (tools looking for it there will not find it)\n".encode(errors="replace"))
    servers: list[StepServer] = []
    try:
        for i, name in enumerate(rundir.STEPS_SOCKETS):
            if (Path(run_dir) / name).exists():
                servers.append(StepServer(run_dir, launch, index=i, shim=shim, shim_dirs=shim_dirs))
        if not servers:
            return None
        servers[0].offer()
    except OSError:
        for s in servers:
            s.close()
        return None
    for s in servers:
        s.start()
    return StepServers(servers)


def _signal(data: bytes) -> int | None:
    text = data.decode("ascii", "replace").strip()
    return int(text) if text.isdigit() and len(text) <= 2 and int(text) in FORWARDED_SIGNALS | {signal.SIGKILL} else None


def task_env() -> bytes:
    """The step's own variables for the guest (the rest of the task's environment is the host's)."""
    out = b""
    for k, v in os.environ.items():
        if k.startswith(ENV_PREFIXES) and "\0" not in k + v:
            item = f"{k}={v}".encode("utf-8", "surrogateescape") + b"\0"
            if len(out) + len(item) <= FRAME_MAX - 64:
                out += item
    return out


def task_main(argv: list[str]) -> int:
    """One task of a step (run by the scheduler on the node, as the job's user): have the job's VM run
    the command, relay its output, end as it ended (a signal that killed it kills this process)."""
    from .payload import die_by, write_all

    if len(argv) != 2:
        print("usage: python -m vmwrap.steps SOCKET TOKEN", file=sys.stderr)
        return 2
    path, token = argv
    procid = os.environ.get("SLURM_PROCID", "0")
    task = int(procid) if procid.isdigit() and int(procid) < 0xFFFF else 0
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with _unix_address(path) as address:
            s.connect(address)
    except OSError as e:
        print(f"vmwrap: cannot reach the job's VM step service ({e.strerror})", file=sys.stderr)
        return 1
    pending: list[int] = []
    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, lambda n, _f: pending.append(n))
    s.sendall(frame(b"H", 0, task, token.encode() + b"\0" + task_env()))
    s.settimeout(0.2)
    frames = Frames()
    while True:
        while pending:
            s.sendall(frame(b"K", 0, task, str(pending.pop(0)).encode()))
        try:
            data = s.recv(1 << 16)
        except socket.timeout:
            continue
        except InterruptedError:
            continue
        except OSError:
            data = b""
        if not data:
            print("vmwrap: the job's VM step service went away during the step", file=sys.stderr)
            return 1
        for kind, _, _, body in frames.feed(data):
            if kind == b"O":
                write_all(1, body)
            elif kind == b"E":
                write_all(2, body)
            elif kind == b"X":
                word, _, num = body.decode("ascii", "replace").partition(" ")
                n = int(num) if num.isdigit() and len(num) <= 3 else 1
                if word == "signal" and 0 < n < 65:
                    die_by(n)
                    return 128 + n
                return n & 255


def _text(s: str) -> bool:
    try:
        s.encode()
    except UnicodeEncodeError:
        return False
    return True


# A task on another node whose environment has no PATH at all runs its command with this one.
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def peer_task(settings, job_id: str, command: list[str]) -> int:
    """One task of a multi-node job's step on another node than its batch script's: the job's VM here
    runs no payload to serve steps, so the command goes to it through a shell session (the node agent
    checks that the caller owns the job; vmwrap/shell.py). The command gets the task's environment (the
    job's, as srun propagates it, with the step's variables) over the image's, as the batch script's
    VM gets the job's (payload.job_environment): MPI daemons need HOME and the like. The session is a
    pipe: the command's output and errors arrive on this task's stdout and stderr. A VM serves
    rundir.SHELL_PORTS sessions at once: the step's tasks on this node beyond that wait for a free one."""
    import shlex

    from . import payload, shell

    if not command:
        print("vmwrap: no command for this task", file=sys.stderr)
        return 2
    # (values that are not text, as Grid Engine's QRSH_COMMAND with its \xff separators, stay behind)
    own = {k: v for k, v in os.environ.items() if k != "VMWRAP_CONFIG" and "\0" not in k + v and _text(k + v)}
    env = {"PATH": GUEST_PATH, **payload.job_environment(rundir.path(settings, job_id), own)}
    line = "exec env -i " + " ".join(shlex.quote(f"{k}={v}") for k, v in env.items()) + " " + shlex.join(command)
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        return shell.run(settings, job_id, line, stdin=null, stdout=1, stderr=2, waiting_note_s=600.0, wait_busy=True)
    except (UserError, NodeError) as e:
        print(f"vmwrap: {e}", file=sys.stderr)
        return 1
    finally:
        os.close(null)


if __name__ == "__main__":
    sys.exit(task_main(sys.argv[1:]))
