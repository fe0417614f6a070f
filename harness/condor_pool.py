"""A real HTCondor 23.9 pool on this host for tests and the demo: central manager + schedd and two
execute nodes (two startds with their own names and execute dirs), run in the cached trixie root
(scripts/build-condor-root.sh) under `env -i`, no systemd.

Chroot mounts (shared/README): the root bound onto itself and made private (the starter unshares its
mount namespace), proc, rbind /dev, sysfs, and the pool dir bound at the same path inside and out, so
that execute dirs, submit files and the vmwrap bridge socket have one path for the chrooted daemons
and for root's vmwrap on the host. Queries go through the `htcondor2` bindings of the root's own
python3-htcondor (run in the chroot, answers as JSON): PyPI's `htcondor` is not in vmwrap's venv.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import time
from pathlib import Path

from harness import polling
from harness.host_share import CONDOR_FIRST_CLUSTER, destroy_vms_under, keep_logs

ROOT = Path(os.environ.get("VMWRAP_CONDOR_ROOT", "/var/cache/vmwrap/condor-root"))
STARTDS = ("node1", "node2")
PATH = "/usr/sbin:/usr/bin:/sbin:/bin"

# Runs inside the chroot with its python3 and htcondor2; argv: CONSTRAINT PROJECTION-JSON.
_QUERY = r"""
import json, sys, htcondor2 as h
what, constraint, proj = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
if what == "jobs":
    ads = h.Schedd().query(constraint=constraint, projection=proj)
elif what == "history":
    ads = h.Schedd().history(constraint=constraint, projection=proj, match=100)
else:
    ads = h.Collector().query(h.AdTypes.Startd, constraint=constraint, projection=proj)
def val(v):
    if type(v).__name__ == "Value":  # classad2's Undefined / Error (an int enum)
        return None
    return v if isinstance(v, (str, int, float, bool)) or v is None else str(v)
print(json.dumps([{k: val(ad.get(k)) for k in (proj or ad.keys())} for ad in ads]))
"""


def vmwrap_cmd(*args: str) -> list[str]:
    """`vmwrap ARGS` with the condor commands, from this checkout: `-I` ignores PYTHONPATH, so the
    checkout goes first on sys.path here (the venv's editable install may point at another clone)."""
    import sys

    repo = str(Path(__file__).resolve().parent.parent)
    boot = (f"import sys; sys.path.insert(0, {repo!r}); import runpy; "
            "runpy.run_module('vmwrap_plugins.htcondor', run_name='__main__')")
    return [sys.executable, "-I", "-c", boot, *args]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mounted(path: Path) -> list[str]:
    p = str(path)
    with open("/proc/self/mounts") as f:
        points = [ln.split()[1] for ln in f]
    return [m for m in points if m == p or m.startswith(p + "/")]


def unmount_all(root: Path = ROOT) -> None:
    """Undo every mount under the root (deepest first); a lazy unmount for what is still busy."""
    for m in sorted(set(_mounted(root)), key=len, reverse=True):
        if subprocess.run(["umount", m], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", m], capture_output=True)


class Pool:
    """`extra_config` is appended to the pool's config (vmwrap's rendered lines); `wrapper` becomes
    USER_JOB_WRAPPER when given."""

    def __init__(self, base: Path, extra_config: str = "", root: Path = ROOT, startds=STARTDS):
        self.base = Path(base)
        self.root = Path(root)
        self.startds = tuple(startds)
        self.extra_config = extra_config
        self.port = _free_port()
        self.config = self.base / "condor_config"
        self.master: subprocess.Popen | None = None

    # -- life ----------------------------------------------------------------------------------
    def local(self, *parts: str) -> Path:
        return self.base.joinpath("local", *parts)

    def execute_dir(self, startd: str) -> Path:
        return self.local("execute", startd)

    def write_config(self) -> None:
        lines = [
            # The Debian package's layout (its condor_config is not read: this file is CONDOR_CONFIG).
            "RELEASE_DIR = /usr",
            "BIN = $(RELEASE_DIR)/bin",
            "SBIN = $(RELEASE_DIR)/sbin",
            "LIB = $(RELEASE_DIR)/lib/condor",
            "LIBEXEC = $(RELEASE_DIR)/libexec/condor",
            "SHARE = $(RELEASE_DIR)/share/condor",
            "ETC = /etc/condor",
            "use ROLE: Personal",
            "CONDOR_HOST = 127.0.0.1",
            f"COLLECTOR_HOST = 127.0.0.1:{self.port}",
            "NETWORK_INTERFACE = 127.0.0.1",
            "USE_SHARED_PORT = False",
            "MOUNT_UNDER_SCRATCH =",
            "UID_DOMAIN = vmwrap.test",
            "TRUST_UID_DOMAIN = True",
            "SOFT_UID_DOMAIN = True",
            "SEC_DEFAULT_AUTHENTICATION_METHODS = FS",
            "SEC_CLIENT_AUTHENTICATION_METHODS = FS",
            "ALLOW_READ = *",
            "ALLOW_WRITE = *",
            "ALLOW_NEGOTIATOR = *",
            "ALLOW_ADMINISTRATOR = *",
            "ALLOW_DAEMON = *",
            "CONDOR_ADMIN =",
            "MAIL = /bin/true",
            f"LOCAL_DIR = {self.local()}",
            "LOG = $(LOCAL_DIR)/log",
            "SPOOL = $(LOCAL_DIR)/spool",
            "LOCK = $(LOCAL_DIR)/lock",
            "RUN = $(LOCAL_DIR)/run",
            "CRED_STORE_DIR = $(LOCAL_DIR)/cred_dir",
            "LOCAL_CONFIG_FILE =",
            "LOCAL_CONFIG_DIR =",
            # Fast turnaround for tests: negotiate, update and start at once.
            "NEGOTIATOR_INTERVAL = 2",
            "NEGOTIATOR_CYCLE_DELAY = 1",
            "SCHEDD_INTERVAL = 2",
            "UPDATE_INTERVAL = 2",
            # The negotiator's own ad, which condor_userprio locates it by, is sent every 300 s by
            # default; two CI runs found none for a minute (cause not found: six reconfigs in a row
            # never lost it). Sent every 2 s, a lost or expired ad comes back at once.
            "NEGOTIATOR_UPDATE_INTERVAL = 2",
            "STARTER_UPDATE_INTERVAL = 2",
            "SHADOW_QUEUE_UPDATE_INTERVAL = 2",
            "STARTD_CRON_UPDATE_INTERVAL = 2",
            "JOB_START_DELAY = 0",
            "JOB_START_COUNT = 10",
            "SCHEDD_MIN_INTERVAL = 0",
            f"SCHEDD_CLUSTER_INITIAL_VALUE = {CONDOR_FIRST_CLUSTER}",  # see harness.host_share
            "NUM_CPUS = 1",
            "MEMORY = 1024",
            "START = True",
            "SUSPEND = False",
            "PREEMPT = False",
            "KILL = False",
            "WANT_SUSPEND = False",
            "WANT_VACATE = False",
            "DAEMON_LIST = MASTER COLLECTOR NEGOTIATOR SCHEDD " + " ".join(s.upper() for s in self.startds),
        ]
        # vmwrap's lines before the per-startd ones, which extend what they set (STARTD_ATTRS).
        lines += self.extra_config.strip().splitlines()
        for s in self.startds:
            u = s.upper()
            lines += [
                f"{u} = $(SBIN)/condor_startd",
                f"{u}_ARGS = -local-name {u}",
                f"DC_DAEMON_LIST = $(DC_DAEMON_LIST) {u}",
                f"{u}_LOG = $(LOG)/StartLog.{s}",
                f"{u}.STARTD_NAME = {s}",
                f"{u}.STARTD_LOG = $(LOG)/StartLog.{s}",
                f"{u}.EXECUTE = {self.execute_dir(s)}",
                f"{u}.STARTD_ADDRESS_FILE = $(LOG)/.startd_address.{s}",
                f"{u}.VmwrapStartd = \"{s}\"",
                f"{u}.STARTD_ATTRS = $(STARTD_ATTRS) VmwrapStartd",
            ]
        self.set_config("\n".join(lines) + "\n")

    def set_config(self, text: str) -> None:
        """Replace the pool's config at once. A daemon still re-reading it after the last
        condor_reconfig must never see it half written: a schedd that read a truncated config exited
        with status 44 (DPRINTF_ERROR: its log undefined) in one CI run, where a test's two policy
        blocks ended back to back. Written in place, 17 such pairs killed it; replaced, 60 did not."""
        tmp = self.config.with_name(f".{self.config.name}.{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, self.config)

    def _users(self) -> None:
        """The chroot's passwd/group plus the host's ordinary users (same uids inside and out), bound
        over the root's own files so the cached root stays untouched."""
        etc = self.base / "etc"
        etc.mkdir(exist_ok=True)
        for name in ("passwd", "group"):
            inner = (self.root / "etc" / name).read_text().splitlines()
            names = {ln.split(":")[0] for ln in inner}
            ids = {ln.split(":")[2] for ln in inner}
            extra = [ln for ln in Path("/etc", name).read_text().splitlines()
                     if ln and ln.split(":")[0] not in names and ln.split(":")[2] not in ids
                     and int(ln.split(":")[2]) >= 1000 and ln.split(":")[2] != "65534"]
            (etc / name).write_text("\n".join(inner + extra) + "\n")

    def mount(self) -> None:
        r = str(self.root)
        unmount_all(self.root)
        subprocess.run(["mount", "--bind", r, r], check=True)
        subprocess.run(["mount", "--make-private", r], check=True)
        subprocess.run(["mount", "-t", "proc", "proc", f"{r}/proc"], check=True)
        subprocess.run(["mount", "--rbind", "/dev", f"{r}/dev"], check=True)
        subprocess.run(["mount", "--make-rslave", f"{r}/dev"], check=True)
        subprocess.run(["mount", "-t", "sysfs", "sysfs", f"{r}/sys"], check=True)
        inner = self.root / str(self.base).lstrip("/")
        inner.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "--bind", str(self.base), str(inner)], check=True)
        for name in ("passwd", "group"):
            subprocess.run(["mount", "--bind", str(self.base / "etc" / name), f"{r}/etc/{name}"], check=True)
        subprocess.run(["mount", "--bind", "/etc/hosts", f"{r}/etc/hosts"], check=True)  # the host's own name

    def start(self, timeout: float = 90) -> None:
        if not (self.root / ".vmwrap-condor-root").exists():
            raise RuntimeError(f"no HTCondor root at {self.root} (scripts/build-condor-root.sh builds it)")
        self.base.mkdir(parents=True, exist_ok=True)
        self.base.chmod(0o755)
        for d in ("log", "spool", "lock", "run", "cred_dir", "execute"):
            self.local(d).mkdir(parents=True, exist_ok=True)
            shutil.chown(self.local(d), "root", "root")
        for d in ("log", "spool", "lock", "run"):
            os.chown(self.local(d), *self._condor_ids())
        for s in self.startds:
            self.execute_dir(s).mkdir(exist_ok=True)
            os.chown(self.execute_dir(s), *self._condor_ids())  # the startd keeps it 0755, condor's
            self.execute_dir(s).chmod(0o755)
        self.write_config()
        self._users()
        self.mount()
        self.master = subprocess.Popen(
            ["chroot", str(self.root), "/usr/bin/env", "-i", f"PATH={PATH}", f"CONDOR_CONFIG={self.config}",
             "/usr/sbin/condor_master", "-f"],
            stdin=subprocess.DEVNULL, stdout=open(self.base / "master.out", "ab"), stderr=subprocess.STDOUT,
            start_new_session=True)
        self.wait_for(lambda: len(self.slots()) >= len(self.startds), "every startd's slot", timeout)

    def _condor_ids(self) -> tuple[int, int]:
        for ln in (self.root / "etc" / "passwd").read_text().splitlines():
            f = ln.split(":")
            if f[0] == "condor":
                return int(f[2]), int(f[3])
        raise RuntimeError("no condor user in the HTCondor root")

    def stop(self, timeout: float = 30) -> None:
        if self.master is not None and self.master.poll() is None:
            self.master.terminate()  # SIGTERM: the master shuts every daemon down gracefully
            try:
                self.master.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.master.pid, 9)
                self.master.wait(10)
        # Anything of the pool still running (a stuck starter or job) goes before the mounts do.
        for pid in self._pids_in_root():
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        unmount_all(self.root)
        inner = self.root / str(self.base).lstrip("/")
        while inner != self.root and inner.is_dir() and not any(inner.iterdir()):
            inner.rmdir()  # the empty mount point made in the cached root
            inner = inner.parent

    def _pids_in_root(self) -> list[int]:
        out = []
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    if os.readlink(f"/proc/{d}/root") == str(self.root):
                        out.append(int(d))
                except OSError:
                    pass
        return out

    # -- commands ------------------------------------------------------------------------------
    def env(self) -> list[str]:
        return ["/usr/bin/env", "-i", f"PATH={PATH}", f"CONDOR_CONFIG={self.config}", "LANG=C.UTF-8"]

    def run(self, *argv: str, user: str | None = None, cwd: str | None = None, timeout: float = 60,
            check: bool = False) -> subprocess.CompletedProcess:
        """A command in the chroot, as root or as `user` (with that user's HOME), in `cwd`."""
        cmd = ["chroot"]
        env = self.env()
        if user:
            pw = pwd.getpwnam(user)
            cmd.append(f"--userspec={pw.pw_uid}:{pw.pw_gid}")
            env += [f"HOME={pw.pw_dir}", f"USER={user}", f"LOGNAME={user}"]
        inner = env + (["/bin/sh", "-c", 'cd "$1" && shift && exec "$@"', "sh", cwd] if cwd else []) + list(argv)
        r = subprocess.run(cmd + [str(self.root)] + inner, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: rc={r.returncode}\n{r.stdout}{r.stderr}")
        return r

    def submit(self, text: str, user: str, cwd: Path) -> tuple[int, subprocess.CompletedProcess]:
        """condor_submit a submit description as `user` in `cwd` (inside the pool dir); (cluster, result),
        cluster -1 when condor_submit refused it."""
        f = Path(cwd) / f"job-{os.urandom(3).hex()}.sub"
        f.write_text(text)
        os.chmod(f, 0o644)
        end = time.monotonic() + 60
        while True:
            r = self.run("/usr/bin/condor_submit", "-terse", str(f), user=user, cwd=str(cwd))
            if r.returncode == 0:
                return int(r.stdout.strip().split(".")[0]), r
            # A schedd that is alive but did not take the connection (CI saw it once, on a loaded host,
            # right after a condor_reconfig): nothing was queued, so a second try is what a user does.
            # A schedd that died is a finding, not a flake: that fails at once with the master's word.
            unreachable = "Failed to connect to local queue manager" in r.stderr + r.stdout
            if not unreachable or self.schedd_deaths() or time.monotonic() > end:
                return -1, subprocess.CompletedProcess(
                    r.args, r.returncode, r.stdout,
                    r.stderr + ("\n" + "\n".join(self.schedd_deaths()) + "\n" + self.logs() if unreachable else ""))
            time.sleep(2)

    def schedd_deaths(self) -> list[str]:
        """The master's lines on a schedd that exited or died (none while it runs as started)."""
        log = self.local("log", "MasterLog")
        text = log.read_text(errors="replace") if log.exists() else ""
        return [ln for ln in text.splitlines()
                if "The SCHEDD (pid" in ln and ("exited" in ln or "died" in ln)]

    def query(self, what: str, constraint: str = "true", projection: list[str] | None = None) -> list[dict]:
        """jobs (schedd queue), history or startds (collector), through htcondor2 in the chroot."""
        r = self.run("/usr/bin/python3", "-I", "-c", _QUERY, what, constraint, json.dumps(projection or []))
        if r.returncode != 0:
            raise RuntimeError(f"htcondor2 query {what}: {r.stderr[-2000:]}")
        return json.loads(r.stdout)

    def slots(self) -> list[dict]:
        try:
            return self.query("startds", "true", ["Name", "State", "Activity", "VmwrapStartd"])
        except (RuntimeError, ValueError):
            return []

    def job(self, cluster: int, proc: int = 0, projection: list[str] | None = None) -> dict | None:
        c = f"ClusterId == {int(cluster)} && ProcId == {int(proc)}"
        found = self.query("jobs", c, projection) or self.query("history", c, projection)
        return found[0] if found else None

    def wait_job(self, cluster: int, proc: int = 0, status=(4,), timeout: float = 180,
                 projection: list[str] | None = None) -> dict:
        """Until the job's JobStatus is one of `status` (4 completed, 5 held, 3 removed, 2 running).

        A job that ended (3, 4) counts once its RemoteHost is gone: the shadow marks the job completed
        first and only then moves RemoteHost to LastRemoteHost (UniShadow::shutDown), so an ad read in
        between names the previous run's host as the last one."""
        last: dict = {}

        def done():
            nonlocal last
            last = self.job(cluster, proc, projection and ["JobStatus", "RemoteHost", *projection]) or {}
            st = last.get("JobStatus")
            return st in status and not (st in (3, 4) and last.get("RemoteHost"))

        self.wait_for(done, f"job {cluster}.{proc} in status {status}", timeout,
                      lambda: f"last: {last}")
        return last

    def wait_for(self, cond, what: str, timeout: float, detail=lambda: "") -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.master is not None and self.master.poll() is not None:
                raise RuntimeError(f"condor_master exited ({self.master.returncode}): {self.logs()}")
            if cond():
                return
            time.sleep(0.5)
        raise RuntimeError(f"HTCondor pool: timed out waiting for {what} {detail()}\n{self.logs()}")

    def logs(self, n: int = 30) -> str:
        out = []
        for f in sorted(self.local("log").glob("*Log*")):
            lines = f.read_text(errors="replace").splitlines()[-n:]
            out.append(f"== {f.name}\n" + "\n".join(lines))
        return "\n".join(out)


class VmwrapSite:
    """A pool with vmwrap enabled as an admin would: the rendered submit and execute sides, the
    wrapper as the chrooted starter sees it (root's copy in the pool dir, told where the bridge
    listens), and the bridge as root on the host. `start_bridge`/`stop_bridge` let a test take the
    bridge away (a node fault).

    The two startds share this host, hence one bridge; for cache-aware placement each plays a node of
    its own cache (`node_config`: cache-NODE) whose prestager (`advertise`) writes NODE.cached, the
    file that startd's probe publishes."""

    def __init__(self, base: Path, appliance, virt_type: str, user: str = "vmwrapuser", probe_period: int = 2,
                 dedicated: bool = False):
        from vmwrap.catalog import register
        from vmwrap.checkpoint import init_store, keygen
        from vmwrap.config import Settings, render
        from vmwrap.resources import HOOKS
        from vmwrap_plugins.htcondor import render as condor_render

        self.base, self.user = Path(base), user
        shutil.rmtree(self.base, ignore_errors=True)
        self.base.mkdir(parents=True)
        self.base.chmod(0o755)
        register(str(self.base / "images.toml"), appliance)
        self.cfg = self.base / "vmwrap.toml"
        self.state = self.base / "state"
        self.checkpoints = self.base / "checkpoints"
        # The pool's own site key and shared store, set up as the admin guide says (keygen, init).
        init_store(self.checkpoints, keygen(self.base / "checkpoint.key"))
        # Cluster ids restart at 1 in a fresh pool: a private state dir keeps them apart from other tests.
        values = {"catalog": str(self.base / "images.toml"), "accel": virt_type, "grace_seconds": 5.0,
                  "state_dir": str(self.state), "cache_dir": str(self.base / "cache"),
                  "checkpoint_dir": str(self.checkpoints), "checkpoint_key_file": str(self.base / "checkpoint.key")}
        self.cfg.write_text(render(values))
        for s in STARTDS:
            self.node_config(s).write_text(render({**values, "cache_dir": str(self.node_cache_dir(s))}))
        (self.base / "submit").mkdir(mode=0o755)
        hooks = self.base / "hooks"
        hooks.mkdir(mode=0o755)
        shutil.copy(HOOKS / "condor-wrapper", hooks / "condor-wrapper.py")
        self.sock = self.base / "bridge" / "condor.sock"
        (hooks / "condor-wrapper").write_text(
            f"#!/bin/sh\nexec /usr/bin/python3 -I {hooks / 'condor-wrapper.py'} --socket {self.sock} \"$@\"\n")
        for f in hooks.iterdir():
            f.chmod(0o755)
        settings = Settings(catalog=str(self.base / "images.toml"))
        extra = (condor_render.submit_side(settings) + "\n"
                 + condor_render.execute_side(str(self.sock), str(hooks / "condor-wrapper"), probe_period) + "\n"
                 + "\n".join(f"{s.upper()}.STARTD_CRON_VMWRAP_ARGS = --fault-ad --socket {self.sock} "
                             f"--cached-ad {self.cached_ad(s)}" for s in STARTDS))
        if dedicated:   # the parallel universe: the startds serve the schedd's dedicated scheduler
            extra += ('\nDedicatedScheduler = "DedicatedScheduler@$(FULL_HOSTNAME)"'
                      "\nSTARTD_ATTRS = $(STARTD_ATTRS) DedicatedScheduler")
        self.pool = Pool(self.base, extra_config=extra)
        self.bridge: subprocess.Popen | None = None

    def node_config(self, startd: str) -> Path:
        return self.base / f"vmwrap-{startd}.toml"

    def node_cache_dir(self, startd: str) -> Path:
        return self.base / f"cache-{startd}"

    def cached_ad(self, startd: str) -> Path:
        return self.sock.parent / f"{startd}.cached"

    def advertise(self, startd: str) -> subprocess.CompletedProcess:
        """One pass of `startd`'s prestager (root, its own cache): fetches the images of idle VM jobs
        that could start on that startd, writes what its probe publishes."""
        repo = Path(__file__).resolve().parent.parent
        return subprocess.run(vmwrap_cmd("--config", str(self.node_config(startd)), "condor", "prestage", "--once",
                                         "--node", f"{startd}@{os.uname().nodename}",
                                         "--condor-python", self.condor_python(),
                                         "--cached-ad", str(self.cached_ad(startd))),
                              cwd="/", capture_output=True, text=True, timeout=120,
                              env={"PATH": PATH, "PYTHONPATH": str(repo)})

    def condor_python(self) -> str:
        return f"chroot {self.pool.root} /usr/bin/env -i CONDOR_CONFIG={self.pool.config} /usr/bin/python3"

    def start_bridge(self, condor_python: str | None = None) -> None:
        """The bridge as root; `condor_python` replaces the command it queries the schedd with."""
        repo = Path(__file__).resolve().parent.parent
        self.sock.unlink(missing_ok=True)
        node = os.uname().nodename
        self.bridge = subprocess.Popen(
            vmwrap_cmd("--config", str(self.cfg), "condor", "bridge", "--socket", str(self.sock),
                       "--condor-python", condor_python or self.condor_python(),
                       *[a for s in self.pool.startds for a in ("--startd", f"{s}@{node}")]),
            cwd="/", stdout=open(self.base / "bridge.log", "ab"), stderr=subprocess.STDOUT, start_new_session=True,
            env={"PATH": PATH, "PYTHONPATH": str(repo)})
        for _ in range(100):
            if self.sock.exists():
                return
            time.sleep(0.1)
        raise RuntimeError(f"the bridge did not listen: {(self.base / 'bridge.log').read_text()[-2000:]}")

    def stop_bridge(self) -> None:
        if self.bridge is not None and self.bridge.poll() is None:
            self.bridge.terminate()
            try:
                self.bridge.wait(10)
            except subprocess.TimeoutExpired:
                self.bridge.kill()
                self.bridge.wait()
        self.bridge = None

    def gc(self) -> subprocess.CompletedProcess:
        repo = Path(__file__).resolve().parent.parent
        return subprocess.run(vmwrap_cmd("--config", str(self.cfg), "condor", "gc", "--once", "--condor-python",
                                         self.condor_python()),
                              cwd="/", capture_output=True, text=True, timeout=120,
                              env={"PATH": PATH, "PYTHONPATH": str(repo)})

    def __enter__(self) -> "VmwrapSite":
        try:
            self.start_bridge()
            self.pool.start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.pool.stop()
        self.stop_bridge()
        destroy_vms_under(self.base)
        keep_logs(self.base, "condor-" + self.base.name.rsplit("-", 1)[0].removeprefix("vmwrap-"))
        shutil.rmtree(self.base, ignore_errors=True)

    def jobdir(self) -> Path:
        d = self.base / "submit" / f"t{os.urandom(3).hex()}"
        d.mkdir(parents=True)
        pw = pwd.getpwnam(self.user)
        os.chown(d, pw.pw_uid, pw.pw_gid)
        return d

    def submit(self, d: Path, text: str) -> tuple[int, subprocess.CompletedProcess]:
        return self.pool.submit(text, self.user, d)

    def ledger(self, job: str) -> list[tuple[str, dict]]:
        import sqlite3

        db = sqlite3.connect(self.state / "ledger.sqlite")
        try:
            return [(e, json.loads(d)) for e, d in
                    db.execute("select event, detail from events where job_id=? order by id", (job,))]
        finally:
            db.close()

    def logs(self) -> str:
        return (self.base / "bridge.log").read_text(errors="replace")[-3000:] + self.pool.logs(15)

    def wait_until(self, cond, what: str, timeout: float):
        """`cond()`'s first true value within `timeout` s; else fail naming `what`, with the logs."""
        return polling.wait_for(cond, what, timeout, self.logs)


DEMO_JOB = """#!/bin/sh
echo "guest kernel: $(uname -r)  (host kernel: {host})"
echo "uid $(id -u), in $(pwd)"
exit 7
"""

DEMO_SUBMIT = """executable = job.sh
output = job.out
error = job.err
log = job.log
request_memory = 256
+VmwrapImage = "busybox"
queue
"""


def demo(base: Path = Path("/var/tmp/vmwrap-condor-demo"), user: str = "vmwrapuser") -> int:
    """Start a local pool with vmwrap, condor_submit one ordinary vanilla job asking for a VM with
    `+VmwrapImage`, print its output, exit code and node, stop the pool (on every way out)."""
    import signal
    import sys

    from vmwrap import config as vmwrap_config
    from vmwrap.catalog import Catalog

    def stop(signum, frame):
        raise SystemExit(128 + signum)  # unwinds through VmwrapSite.__exit__: daemons, mounts, VMs

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        subprocess.run(["useradd", "-m", "-U", user], check=True)
        pw = pwd.getpwnam(user)
    site_cfg = vmwrap_config.load()
    image = Catalog.load(site_cfg.catalog).images["busybox"]
    print(f"== starting an HTCondor 23.9 pool (collector, negotiator, schedd, startds {', '.join(STARTDS)}) "
          f"and vmwrap's bridge under {base}", flush=True)
    with VmwrapSite(base, image, site_cfg.accel, user=user) as site:
        work = site.jobdir()
        (work / "job.sh").write_text(DEMO_JOB.format(host=os.uname().release))
        os.chown(work / "job.sh", pw.pw_uid, pw.pw_gid)
        (work / "job.sh").chmod(0o755)
        print(f"== job.submit:\n{DEMO_SUBMIT}", end="", flush=True)
        cluster, r = site.submit(work, DEMO_SUBMIT)
        if cluster < 0:
            print(r.stdout + r.stderr, file=sys.stderr)
            return 1
        print(f"== condor_submit (as {user}): cluster {cluster}; waiting", flush=True)
        ad = site.pool.wait_job(cluster, 0, (3, 4, 5), 300,
                                ["ExitCode", "HoldReason", "LastRemoteHost", "RemoteWallClockTime"])
        state = {3: "removed", 4: "completed", 5: "held"}[ad["JobStatus"]]
        print(f"== job {cluster}.0: {state}, exit code {ad.get('ExitCode')}, ran "
              f"{ad.get('RemoteWallClockTime') or 0:.0f} s on {ad.get('LastRemoteHost')}; job.out:", flush=True)
        print((work / "job.out").read_text(errors="replace"), end="")
        if ad.get("HoldReason"):
            print(f"== hold reason: {ad['HoldReason']}")
        vm = [e for e, _ in site.ledger(f"{cluster}.0") if e in ("created", "destroyed")]
        print(f"== vmwrap's ledger for {cluster}.0: VM {' then '.join(vm) or 'never created'}", flush=True)
        print("== stopping the pool", flush=True)
        return 0 if (state, ad.get("ExitCode"), vm[:1]) == ("completed", 7, ["created"]) else 1


if __name__ == "__main__":
    import sys

    sys.exit(demo())
