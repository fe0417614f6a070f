"""The node's HTCondor bridge (root, on the host): a job's wrapper asks, root runs its VM.

HTCondor's per-job code on an execute node (USER_JOB_WRAPPER, starter hooks) runs as the job's user,
maybe in a chroot, while libvirtd and the VMs are the host's. The wrapper connects to this Unix
socket (bound into the chroot), hands over its stdin/stdout/stderr (SCM_RIGHTS) with the job's argv
and environment, and waits. The bridge:
  - takes the caller's uid and pid from the kernel (SO_PEERCRED), never from the request;
  - requires the caller to descend from a root-owned condor_starter, and the job (CLUSTER.PROC) to be
    the caller's, running, on a startd of this node, per the schedd (htcondor2) - never the job ad
    file in the sandbox, which the job's user can rewrite;
  - reads image, request_cpus and request_memory from the schedd's ad, `#VMWRAP` lines from the head of
    the executable the wrapper (the job's user) read and sent (what the user could write anyway: it is
    parsed and validated like +VmwrapImage), the work dir from the caller's own cwd (/proc/PID/cwd:
    the sandbox, the same path inside and outside the chroot);
  - runs the core lifecycle (prolog: boot; epilog: tear down), and in between the payload side as the
    job's user (`condor attach`) with the wrapper's descriptors;
  - watches the caller: HTCondor suspends a job by SIGSTOPping its process tree, which the VM is not
    in, so a stopped wrapper pauses the VM and a continued one resumes it; a wrapper that is gone
    (condor_rm's hard kill) destroys the VM at once; a TERM line from it (the starter's soft kill)
    is passed to the payload, which stops the job in its VM.
  - on the starter's SIGTERM asks the schedd whether the job is still running there: then it is a
    vacate (condor_vacate_job, the startd's PREEMPT, preemption), the payload detaches and the epilog
    saves the VM into the checkpoint store; removed or held, the job is stopped in its VM. Only a job
    running in its initialdir (no file transfer) is saved: a restore needs the same work dir, and a
    sandbox is new on every match (such a job starts again from the beginning, like a bare one).
Bounds as in the node agent (vmwrap/agent.py): one deadline for the request, a size cap, connections
per uid and in all. Answers: `exit N`; `bare` (no VM); `hold REASON` for what the job asked (the
wrapper sets VmwrapHoldReason through chirp, the transform's OnExitHold holds it); `requeue REASON`
for what this node cannot do (VmwrapRequeue: OnExitRemove is false, the job goes back to idle) - a
lifecycle node fault also writes the fault file, and the startd stops matching VM jobs.
"""

from __future__ import annotations

import array
import json
import os
import pwd
import select
import signal
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from vmwrap import domain, lifecycle, procs, rundir, safeio
from vmwrap.config import Settings
from vmwrap.errors import NodeError, UserError, VmwrapError
from vmwrap.job import validate_host_path
from vmwrap.ledger import Ledger
from vmwrap.rootenv import BASE

from .facts import Schedd, node_job_id, split_id, split_node_id
from .hooks import PARALLEL, PAYLOAD_MAX, SCRIPT_MAX, HTCondor, find_node, hold_reason, job_from_ad

REQUEST_TIMEOUT = 10.0
MAX_CLIENTS = 64
MAX_CLIENTS_PER_UID = 16
ANCESTRY_MAX = 32
STARTER = "condor_starter"
WATCH = 0.1             # s between looks at the wrapper's state
SERVE_WAIT = 120.0      # s a request waits for an earlier one for the same VM to end


class Refused(UserError):
    """The request cannot be served: the reason becomes the job's HoldReason."""


def _peer(sock: socket.socket) -> tuple[int, int]:
    pid, uid, _gid = struct.unpack("iII", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                          struct.calcsize("iII")))
    return pid, uid


def receive(sock: socket.socket, timeout: float = REQUEST_TIMEOUT) -> tuple[list[int], dict]:
    """The wrapper's three descriptors and its request line, within one deadline and PAYLOAD_MAX."""
    deadline = time.monotonic() + timeout
    fds: list[int] = []
    buf = bytearray()
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise Refused("the wrapper sent no complete request in time")
        sock.settimeout(left)
        try:
            if not fds and not buf:
                fdsize = array.array("i").itemsize
                data, anc, flags, _ = sock.recvmsg(65536, socket.CMSG_SPACE(4 * fdsize))
                for level, kind, raw in anc:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        a = array.array("i")
                        a.frombytes(raw[: len(raw) - len(raw) % fdsize])
                        fds += list(a)
                if flags & socket.MSG_CTRUNC or len(fds) != 3:
                    for fd in fds:
                        os.close(fd)
                    raise Refused("the wrapper must pass exactly its stdin, stdout and stderr")
            else:
                data = sock.recv(65536)
        except TimeoutError:
            continue
        if not data:
            break
        buf += data
        if len(buf) > PAYLOAD_MAX:
            raise Refused(f"the job's arguments and environment exceed {PAYLOAD_MAX} bytes")
    try:
        req = json.loads(bytes(buf).split(b"\n", 1)[0])
    except (ValueError, RecursionError):
        req = None
    if not isinstance(req, dict) or req.get("op") != "run":
        raise Refused('the wrapper\'s request is not {"op": "run", ...}')
    argv, env, job, script = req.get("argv"), req.get("env"), req.get("job"), req.get("script", "")
    if not (isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)):
        raise Refused("the wrapper's argv must be a non-empty list of strings")
    if not (isinstance(env, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())):
        raise Refused("the wrapper's env must map strings to strings")
    if not (isinstance(script, str) and len(script) <= SCRIPT_MAX):
        raise Refused(f"the wrapper's script head must be a string of at most {SCRIPT_MAX} characters")
    split_id(job)
    return fds, {"job": job, "argv": argv, "env": env, "script": script}


def _stat_fields(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of a process from /proc/PID/stat (the command name may hold ') '), or None."""
    raw = safeio.read_proc(f"/proc/{pid}/stat", 4096)
    if not raw:
        return None
    rest = raw.rpartition(b")")[2].split()
    try:
        return rest[0].decode(), int(rest[1])
    except (IndexError, ValueError):
        return None


def under_starter(pid: int) -> int | None:
    """The pid of the root condor_starter the process descends from (a user cannot make one), or None."""
    for _ in range(ANCESTRY_MAX):
        f = _stat_fields(pid)
        if f is None or f[1] <= 1:
            return None
        pid = f[1]
        comm = (safeio.read_proc(f"/proc/{pid}/comm", 64) or b"").strip()
        ids = procs.uids(pid)
        if comm == STARTER.encode() and ids is not None and ids[0] == 0:
            return pid
    return None


def starter_slot(pid: int) -> str | None:
    """The slot a condor_starter runs for: its `-a SLOT` (the startd starts it so; root's process)."""
    argv = (safeio.read_proc(f"/proc/{pid}/cmdline", 4096) or b"").split(b"\0")
    for i, a in enumerate(argv[:-1]):
        if a == b"-a":
            return argv[i + 1].decode(errors="replace")
    return None


def peer_cwd(pid: int) -> str:
    """The wrapper's cwd (the job's sandbox or initialdir) as a host path: its link text, checked to
    name the very directory the process is in (a chroot whose paths differ fails here)."""
    link = f"/proc/{pid}/cwd"
    try:
        path = os.readlink(link)
        root = os.readlink(f"/proc/{pid}/root")  # a chrooted starter's: its paths are shown under it
        if root != "/" and path.startswith(root + "/"):
            path = path[len(root):]
        here, there = os.stat(link), os.stat(path, follow_symlinks=False)
    except OSError as e:
        raise Refused(f"cannot find the job's working directory: {e.strerror}") from None
    validate_host_path(path, "the job's working directory")
    if (here.st_dev, here.st_ino) != (there.st_dev, there.st_ino):
        raise Refused(f"the job's working directory {path} is not at the same path on the host "
                      "(bind the execute dir at the same path inside and outside the chroot)")
    return path


class Bridge:
    def __init__(self, settings: Settings, config_path: str | None, schedd: Schedd,
                 startds: list[str] | None = None, python: str = sys.executable, fault_file: Path | None = None):
        self.settings = settings
        self.fault_file = fault_file
        self.config_path = config_path
        self.schedd = schedd
        self.startds = list(startds or [])
        self.python = python
        self._serving: dict[str, list] = {}   # per node job id: [its lock, requests holding or awaiting it]
        self._serving_lock = threading.Lock()

    def _local(self, remote_host) -> bool:
        if not isinstance(remote_host, str):
            return False
        if self.startds:
            return any(remote_host.endswith("@" + s) or remote_host == s for s in self.startds)
        return remote_host.rpartition("@")[2].split(".")[0] == os.uname().nodename.split(".")[0]

    def verify(self, job_id: str, uid: int, pid: int, claimed_node=None) -> tuple[dict, int | None]:
        """The schedd's ad of the caller's running job, and for a parallel job the caller's node."""
        starter = under_starter(pid)
        if starter is None:
            raise Refused("only a job's wrapper under the node's condor_starter may ask for its VM")
        cluster, proc = split_id(job_id)
        ad = self.schedd.job(cluster, proc)
        for _ in range(20):  # the schedd may learn that the job runs a moment after its starter did
            if ad is None or (ad.get("JobStatus") == 2 and ad.get("RemoteHost")):
                break
            time.sleep(0.5)
            ad = self.schedd.job(cluster, proc)
        try:
            owner = pwd.getpwuid(uid).pw_name
        except KeyError:
            raise Refused(f"uid {uid} has no user name on this node") from None
        if ad is None or ad.get("Owner") != owner:
            raise Refused(f"job {job_id} is not a job of {owner} in the schedd")
        if ad.get("JobStatus") != 2:
            raise Refused(f"job {job_id} is not running (JobStatus {ad.get('JobStatus')})")
        if ad.get("JobUniverse") == PARALLEL:   # RemoteHost is node 0's; this may be any node
            return ad, find_node(ad, starter_slot(starter) or "", self._local, claimed_node)
        if not self._local(ad.get("RemoteHost")):
            raise Refused(f"job {job_id} runs on {str(ad.get('RemoteHost'))[:80]}, not on this node")
        return ad, None

    def serve_one(self, sock: socket.socket, pid: int, uid: int) -> None:
        fds: list[int] = []
        try:
            fds, req = receive(sock)
            ad, node = self.verify(req["job"], uid, pid, req["env"].get("_CONDOR_PROCNO"))
            job_id = node_job_id(req["job"], node or 0)
            work_dir = peer_cwd(pid)
            try:
                job, err = job_from_ad(ad, uid, work_dir, req["script"], node), None
            except VmwrapError as e:
                job, err = None, e
            if job is None and err is None:
                _reply(sock, {"bare": True})  # the schedd says: no VM (the wrapper runs it as usual)
                return
            if node is not None:   # the guest is told its node as the schedd numbers it
                req["env"]["_CONDOR_PROCNO"] = str(node)
            adapter = HTCondor(job, err, fault_file=self.fault_file)
            # HTCondor starts a parallel job again from the beginning (all nodes): vmwrap saves none of its VMs
            adapter.saveable = node is None and isinstance(ad.get("Iwd"), str) and os.path.realpath(ad["Iwd"]) == work_dir
            with self._alone(job_id) as waited:
                if waited and self.verify(req["job"], uid, pid, req["env"].get("_CONDOR_PROCNO"))[1] != node:
                    raise Refused(f"job {job_id}: its node changed while its request waited")  # verify: still running here
                self.run(sock, pid, job_id, adapter, req, fds)
        except NodeError as e:  # e.g. the schedd did not answer: not the job's fault, nor proof of a bad node
            _reply(sock, {"requeue": hold_reason(str(e))})
        except VmwrapError as e:
            _reply(sock, {"hold": hold_reason(str(e))})
        except Exception as e:  # noqa: BLE001 (one job's request fails, the bridge stays)
            print(f"vmwrap condor bridge: request of uid {uid} failed: {e!r}", file=sys.stderr, flush=True)
            _reply(sock, {"hold": hold_reason(f"internal error in the node's vmwrap bridge: {e}")})
        finally:
            for fd in fds:
                os.close(fd)

    def run(self, sock, pid: int, job_id: str, adapter: HTCondor, req: dict, fds: list[int]) -> None:
        env = {"VMWRAP_CONDOR_JOB": job_id}
        out = lifecycle.prolog(adapter, self.settings, env)
        if out.verdict is not lifecycle.Verdict.RUN or not out.vm:
            lifecycle.epilog(adapter, self.settings, env)
            if out.verdict is lifecycle.Verdict.RUN:
                _reply(sock, {"bare": True})
            elif out.verdict is lifecycle.Verdict.NODE_FAULT:  # prolog took the node out (fault file)
                _reply(sock, {"requeue": hold_reason(out.reason)})
            else:
                _reply(sock, {"hold": hold_reason(out.reason)})
            return
        code = None
        try:
            code = self.supervise(sock, pid, job_id, adapter, req, fds)
        finally:
            lifecycle.epilog(adapter, self.settings, env)
        if code is not None:  # a payload killed by signal N (the job's own, passed on): the wrapper ends by it too
            _reply(sock, {"exit": 128 - code, "signal": -code} if code < 0 else {"exit": code})

    def _child(self, job, req: dict, fds: list[int]) -> tuple[subprocess.Popen, int]:
        """The payload side as the job's user, and the write end of its control pipe."""
        r, w = os.pipe()
        cr, cw = os.pipe()
        cmd = [self.python, "-I", "-m", "vmwrap_plugins.htcondor"]
        if self.config_path:
            cmd += ["--config", self.config_path]
        cmd += ["condor", "attach", job.job_id, "--payload-fd", str(r), "--control-fd", str(cr)]
        pw = pwd.getpwuid(job.uid)
        try:
            child = subprocess.Popen(cmd, stdin=fds[0], stdout=fds[1], stderr=fds[2], pass_fds=(r, cr),
                                     user=job.uid, group=job.gid, extra_groups=job.groups, cwd=job.work_dir,
                                     env={**BASE, "HOME": pw.pw_dir, "USER": pw.pw_name}, start_new_session=True)
        except BaseException:
            os.close(cw)
            raise
        finally:
            os.close(r)
            os.close(cr)
        data = json.dumps({"argv": req["argv"], "env": req["env"]}).encode("utf-8", "surrogateescape")

        def feed():
            try:
                with os.fdopen(w, "wb") as f:
                    f.write(data)
            except OSError:
                pass

        threading.Thread(target=feed, daemon=True).start()
        return child, cw

    @contextmanager
    def _alone(self, job_id: str):
        """One request per VM at a time, prolog to epilog: a second one for the same id (the next run
        matched here while the last one's save still runs, or a user's second connection) waits for
        the first, then starts from what it left; never two boots racing for one VM name, whose loser
        would read as this node's fault. Still busy after SERVE_WAIT: back to the queue."""
        with self._serving_lock:
            entry = self._serving.setdefault(job_id, [threading.Lock(), 0])
            entry[1] += 1   # requests holding or awaiting it: the last one out removes it
        try:
            waited = not entry[0].acquire(blocking=False)
            if waited and not entry[0].acquire(timeout=SERVE_WAIT):
                raise NodeError(f"job {job_id}: an earlier request for its VM is still being served on this node")
            try:
                yield waited
            finally:
                entry[0].release()
        finally:
            with self._serving_lock:
                entry[1] -= 1
                if not entry[1]:
                    del self._serving[job_id]

    def vacating(self, job_id: str) -> bool:
        """The starter's SIGTERM is a vacate when the schedd still has the job running (condor_rm
        marks it removed, condor_hold held, before the starter is told). Unknown: save (GC cleans up)."""
        try:
            ad = self.schedd.job(*split_id(split_node_id(job_id)[0]))
        except VmwrapError:
            return True
        return ad is not None and ad.get("JobStatus") == 2

    def supervise(self, sock, pid: int, job_id: str, adapter: HTCondor, req: dict, fds: list[int]) -> int | None:
        """Run the payload; follow the wrapper (stopped: pause, continued: resume, TERM: a vacate
        detaches the payload for the epilog to save the VM, else pass it on; gone: kill). The
        payload's exit code, or None when the wrapper is gone."""
        child, control = self._child(adapter._job, req, fds)
        conn = domain.connect(self.settings.libvirt_uri)
        name = adapter._job.domain_name
        born = procs.start_time(pid)
        paused = False
        term_sent = False
        try:
            while True:
                rc = child.poll()
                if rc is not None:
                    return rc
                ready, _, _ = select.select([sock], [], [], WATCH)
                if ready:
                    try:
                        data = sock.recv(256)
                    except OSError:
                        data = b""
                    if not data:  # the wrapper is gone: condor_rm's hard kill, or the starter died
                        self._record(job_id, "wrapper_gone")
                        child.kill()
                        child.wait(10)
                        return None
                    if b"TERM" in data and child.returncode is None and not term_sent:
                        term_sent = True
                        if paused:
                            paused = not self._vm(conn, name, job_id, "resume")
                        if adapter.saveable and self.vacating(job_id):
                            adapter.vacated = True
                            try:
                                os.write(control, b"vacate\n")
                            except OSError:
                                pass
                        child.send_signal(signal.SIGTERM)
                f = _stat_fields(pid)
                if f is None or procs.start_time(pid) != born:
                    continue  # gone: the socket says so next
                if f[0] == "T" and not paused:
                    paused = self._vm(conn, name, job_id, "pause")
                elif f[0] != "T" and paused:
                    paused = not self._vm(conn, name, job_id, "resume")
        finally:
            if child.poll() is None:
                child.kill()
                child.wait(10)
            os.close(control)
            conn.close()

    def _vm(self, conn, name: str, job_id: str, op: str) -> bool:
        dom = domain.lookup(conn, name)
        if dom is None:
            return False
        try:
            changed = domain.set_paused(conn, name, dom, op == "pause")
        except Exception as e:  # noqa: BLE001 (the job goes on unpaused; the ledger says why)
            self._record(job_id, f"{op}_failed", message=str(e)[:500])
            return False
        if changed:
            self._record(job_id, "paused" if op == "pause" else "resumed", via="condor-suspend")
        return True

    def _record(self, job_id: str, event: str, **kw) -> None:
        # Its own connection: each request is served in a thread of its own, and an sqlite3
        # connection made in another thread refuses to work (the records were lost that way).
        try:
            ledger = Ledger(self.settings.ledger_path)
            try:
                ledger.record(job_id, rundir.vm_name(self.settings, job_id), event, scheduler="condor", **kw)
            finally:
                ledger.close()
        except Exception:  # noqa: BLE001 (accounting only)
            pass


def _reply(sock: socket.socket, reply: dict) -> None:
    try:
        sock.settimeout(REQUEST_TIMEOUT)
        sock.sendall(json.dumps(reply).encode() + b"\n")
    except OSError:
        pass


def serve(bridge: Bridge, path: str, ready: threading.Event | None = None) -> None:
    sock_path = Path(path)
    sock_path.parent.mkdir(parents=True, exist_ok=True)
    sock_path.unlink(missing_ok=True)

    class Handler(socketserver.BaseRequestHandler):
        def handle(self):
            pid, uid = self.client_address
            bridge.serve_one(self.request, pid, uid)

    class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
        daemon_threads = True
        block_on_close = False

        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.lock = threading.Lock()
            self.clients: dict[int, int] = {}

        def process_request(self, request, client_address):
            pid, uid = _peer(request)
            with self.lock:
                total, mine = sum(self.clients.values()), self.clients.get(uid, 0)
                busy = total >= MAX_CLIENTS or mine >= MAX_CLIENTS_PER_UID
                if not busy:
                    self.clients[uid] = mine + 1
            if busy:
                _reply(request, {"hold": hold_reason(f"the node's vmwrap bridge is busy ({total} requests, "
                                                     f"{mine} of uid {uid})")})
                self.shutdown_request(request)
                return
            try:
                super().process_request(request, (pid, uid))
            except BaseException:
                self._done(uid)
                raise

        def process_request_thread(self, request, client_address):
            try:
                super().process_request_thread(request, client_address)
            finally:
                self._done(client_address[1])

        def _done(self, uid: int) -> None:
            with self.lock:
                self.clients[uid] -= 1
                if not self.clients[uid]:
                    del self.clients[uid]

    with Server(str(sock_path), Handler) as srv:
        os.chmod(sock_path, 0o666)  # every job's wrapper may ask; only a job's own running wrapper is served
        if ready is not None:
            ready.set()
        srv.serve_forever()
