"""A real Grid Engine 8.1.9 cell on this host for tests and the demo (Debian packages, no systemd).

Debian's postinst creates the cell `default` under /var/lib/gridengine; this adds what it leaves out
(host alias, submit/admin host, a queue wired to vmwrap's hooks), and starts sge_qmaster and
sge_execd directly under `env -i` (jobs inherit the daemon's environment).

With `hosts=2` a second execution host runs on this machine, as a host of its own name (HOST2):
GE names a client by the reverse lookup of its source address and refuses one whose own host name
differs, so the second sge_execd lives in its own network namespace (a veth pair, its own address
in /etc/hosts) and UTS namespace (its host name); `ip netns exec` gives it a hosts file where the
qmaster's name is the host's side of the veth pair. Each host has its own execd spool (GE's
<execd_spool_dir>/<host>) and its own vmwrap config, state, cache and node agent (like the Slurm
harness's vmwrap-<node>.toml); the checkpoint store and its key are shared, as on a site's shared
storage.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from harness.host_share import SGE_FIRST_JOB
from vmwrap.resources import HOOKS
from vmwrap_plugins.sge.render import ckpt_config, queue_config  # the cell's queue is the rendered one

SGE_ROOT = Path("/var/lib/gridengine")
CELL = "default"
EXECD_SPOOL = Path("/var/spool/gridengine/execd")
QMASTER_PID = Path("/var/spool/gridengine/qmaster/qmaster.pid")
JOBSEQNUM = QMASTER_PID.parent / "jobseqnum"   # the last job id qmaster handed out
HOST2 = "sgehost2"
NETNS = "vmwrap-sge2"
HOSTNS = "vmwrap-sgehost"  # this host's own network namespace, named (Cell(shared_jobnet=True))
VETH = ("vmwsge0", "vmwsge1")           # host side, namespace side
ADDR = ("10.254.213.1", "10.254.213.2")  # a /30 nothing else on this machine uses
HOSTS_MARK = "# vmwrap test cell"
CKPT = "vmwrap"
# The group ids HOST2's execd tags its jobs' processes with (gid_range, sge_conf(5)): its own, not the
# global range the first host's execd uses. Both execds share one kernel here, and a shepherd ending a
# job SIGKILLs every process carrying its job's gid (pdc_kill_addgrpid): with one range both hosts
# handed out 65400 at once, and a job ending on one host killed the other host's job.
HOST2_GIDS = "20000-20099"


def env() -> dict:
    return dict(os.environ, SGE_ROOT=str(SGE_ROOT), SGE_CELL=CELL)


def qconf(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["qconf", *args], capture_output=True, text=True, env=env(), timeout=60)
    if check and r.returncode != 0:
        raise RuntimeError(f"qconf {' '.join(args)}: {r.stdout}{r.stderr}")
    return r


def _daemon(path: str, prefix: tuple[str, ...] = ()) -> None:
    subprocess.run([*prefix, "env", "-i", f"SGE_ROOT={SGE_ROOT}", f"SGE_CELL={CELL}", "PATH=/usr/sbin:/usr/bin:/bin",
                    path], check=True, timeout=60)


def _wait(cond, what: str, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.3)
    raise RuntimeError(f"Grid Engine: timed out waiting for {what}")


def _pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int | None, name: str) -> bool:
    """pid runs the GE daemon `name` (a stale pid file may name another process by now; a zombie
    is gone)."""
    try:
        return pid is not None and Path(f"/proc/{pid}/comm").read_text().strip() == name \
            and Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _ip(*args: str, check: bool = True) -> None:
    subprocess.run(["/usr/sbin/ip", *args], check=check, capture_output=True, timeout=30)



def _first_job_id(first: int) -> None:
    """Job ids from `first` on (see harness.host_share), as qmaster reads its counter when it starts."""
    try:
        last = int(JOBSEQNUM.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        last = 0
    if last < first - 1:
        JOBSEQNUM.write_text(f"{first - 1}\n")
        st = JOBSEQNUM.parent.stat()   # qmaster (GE's admin user) rewrites it
        os.chown(JOBSEQNUM, st.st_uid, st.st_gid)


class Cell:
    def __init__(self, base: Path, vmwrap_config: str | None = None, slots: int = 2, jsv: str = "client",
                 hosts: int = 1, site_config: dict | None = None, queue: dict | None = None,
                 shared_jobnet: bool = False):
        """`vmwrap_config`: one config file for a one-host cell whose caller runs its own node agent;
        or `site_config` (settings every host shares): then the cell writes vmwrap-<host>.toml per
        host and runs a node agent per host. `queue`: extra vmwrap.q settings (e.g. rerun)."""
        if (vmwrap_config is None) == (site_config is None):
            raise ValueError("give either vmwrap_config or site_config")
        if vmwrap_config is not None and hosts != 1:
            raise ValueError("a cell of several hosts needs site_config (one vmwrap config per host)")
        self.base = base
        self.jsv = jsv  # client: `-jsv` in sge_request (sees the script); server: jsv_url (fast)
        self.slots = slots
        self.host = socket.gethostname()
        self.hosts = [self.host, HOST2][:hosts]
        self.site_config = site_config
        self.queue = queue or {}
        self.configs = {self.host: vmwrap_config} if vmwrap_config else {
            h: str(base / f"vmwrap-{h}.toml") for h in self.hosts}
        self.vmwrap_config = self.configs[self.host]
        self.agents: list[subprocess.Popen] = []
        # HOST2's VMs are started by the one libvirtd, in this host's network namespace: a job bridge
        # HOST2's prolog or agent made in HOST2's namespace would be invisible to it. With
        # shared_jobnet they run in this host's network namespace with a hosts file giving both hosts
        # this host's loopback address, so jobnet takes them for nodes sharing a host (one bridge, no tunnel).
        self.shared_jobnet = shared_jobnet

    def node_dir(self, host: str) -> Path:
        return self.base / "nodes" / host

    def start(self) -> None:
        try:
            self._start()
        except Exception:
            self.stop()
            raise

    def _write_configs(self) -> None:
        from vmwrap import config as vmwrap_config
        from vmwrap.checkpoint import keygen

        if not (self.base / "checkpoint.key").exists():
            keygen(self.base / "checkpoint.key")
        for h in self.hosts:
            d = self.node_dir(h)
            for sub in ("state", "cache"):
                (d / sub).mkdir(parents=True, exist_ok=True)
            cfg = {"checkpoint_dir": str(self.base / "checkpoints"),  # "shared storage": one machine
                   "checkpoint_key_file": str(self.base / "checkpoint.key"),  # the same key on every host
                   **self.site_config, "state_dir": str(d / "state"), "cache_dir": str(d / "cache")}
            Path(self.configs[h]).write_text(vmwrap_config.render(cfg))

    def _write_hooks(self) -> Path:
        """Per-cell wrappers name the host's site config on the hooks' command line (hooks never take
        it from the environment: GE hands them the job's `qsub -v` variables). Every host runs the
        same queue: the wrapper picks the config by the host name it runs on."""
        hooks = self.base / "hooks"
        hooks.mkdir(parents=True, exist_ok=True)
        cases = "".join(f"  {h}) cfg='{c}' ;;\n" for h, c in self.configs.items())
        hop = ""
        if self.shared_jobnet and len(self.hosts) > 1:
            # both at 127.0.0.1: as this host's, so their GE clients (the agent's qstat) reach qmaster from
            # an address it resolves (host_aliases: localhost is this host)
            (self.base / "hosts.shared").write_text(f"127.0.0.1 localhost {self.host} {HOST2}\n")
            # (the host's namespace by the name _network gave it: /proc/1/ns/net is not root's to open here);
            # /sys mounted again there, so that /sys/class/net is the host namespace's (the job network's
            # teardown looks for the job's bridge there: it was left behind, one per run)
            hop = (f'if [ "$(/bin/uname -n)" = {HOST2} ] && [ -z "$VMWRAP_TEST_HOPPED" ]; then\n'
                   f'  export VMWRAP_TEST_HOPPED=1\n'
                   f'  exec /usr/bin/nsenter --net=/run/netns/{HOSTNS} -- /usr/bin/unshare --mount -- /bin/sh -c '
                   f'\'mount -t sysfs sysfs /sys && mount --bind {self.base / "hosts.shared"} /etc/hosts && '
                   f'exec "$0" "$@"\' "$0" "$@"\nfi\n')
        for kind in ("prolog", "epilog", "starter", "method", "jsv"):
            h = hooks / f"sge-{kind}"
            pick = (f"cfg='{self.vmwrap_config}'\n" if kind == "jsv" or len(self.hosts) == 1 else
                    f"case $(/bin/uname -n) in\n{cases}  *) echo 'vmwrap test cell: unknown host' >&2; exit 1 ;;\nesac\n")
            h.write_text(f"#!/bin/sh\n{hop if kind in ('prolog', 'epilog') else ''}{pick}"
                         f"exec {HOOKS}/sge-{kind} --config \"$cfg\" \"$@\"\n")
            h.chmod(0o755)
        return hooks

    def _start(self) -> None:
        common = SGE_ROOT / CELL / "common"
        if not (common / "bootstrap").exists():
            raise RuntimeError("Grid Engine is not installed (scripts/install-host.sh installs it)")
        if self.site_config is not None:
            self._write_configs()
        from harness.site_store import init_stores

        init_stores(*self.configs.values())  # as the admin guide's setup: `vmwrap checkpoints init`
        # Clients whose IP resolves to 'localhost' are refused unless it is an alias of the host name.
        (common / "host_aliases").write_text(f"{self.host} localhost\n")
        hooks = self._write_hooks()
        # Every qsub on this cell runs vmwrap's client JSV (it reads the script body; a server JSV cannot).
        (common / "sge_request").write_text(f"-jsv {hooks / 'sge-jsv'}\n" if self.jsv == "client" else "")
        if len(self.hosts) > 1:
            self._network()
        if not _alive(_pid(QMASTER_PID), "sge_qmaster"):
            _first_job_id(SGE_FIRST_JOB)
            _daemon("/usr/sbin/sge_qmaster")
        _wait(lambda: qconf("-sh", check=False).returncode == 0, "sge_qmaster")
        self.set_server_jsv(hooks / "sge-jsv" if self.jsv == "server" else None)
        for h in self.hosts:
            qconf("-ah", h, check=False)
            qconf("-as", h, check=False)
        sched = self.base / "sched.conf"
        text = qconf("-ssconf").stdout
        text = "\n".join("schedule_interval                 0:0:1" if ln.startswith("schedule_interval") else
                         "flush_submit_sec                  1" if ln.startswith("flush_submit_sec") else
                         "flush_finish_sec                  1" if ln.startswith("flush_finish_sec") else ln
                         for ln in text.splitlines()) + "\n"
        sched.write_text(text)
        qconf("-Msconf", str(sched))
        # execd reports its jobs every load_report_time: a rescheduled job's old instance is killed at
        # the next report (qmaster answers it with a kill), so tests want it short.
        self._global_conf(load_report_time="00:00:05")
        if len(self.hosts) > 1:
            self._local_conf(HOST2, gid_range=HOST2_GIDS)
        for h in self.hosts:
            if not self._execd_alive(h):
                self.start_execd(h)
        _wait(lambda: all(h in qconf("-sel", check=False).stdout for h in self.hosts), "sge_execd to register")
        for h in self.hosts:
            if self.site_config is not None:  # HOST2's agent in its namespaces too: its host name is HOST2's
                prefix = self.host_prefix(h)
                if self.shared_jobnet and h == HOST2:   # its job bridges where libvirtd is (see __init__)
                    prefix = ("/usr/bin/unshare", "--uts", "--mount", "/bin/sh", "-c",
                              f'/bin/hostname {h} && mount --bind {self.base / "hosts.shared"} /etc/hosts && exec "$@"',
                              "sh")
                self.agents.append(subprocess.Popen([*prefix, "vmwrap", "--config", self.configs[h],
                                                     "agent"], start_new_session=True, stdout=subprocess.DEVNULL,
                                                    stderr=subprocess.DEVNULL))
        ckpt = self.base / "ckpt.conf"
        ckpt.write_text(ckpt_config(CKPT, hooks))
        qconf("-Mckpt" if qconf("-sckpt", CKPT, check=False).returncode == 0 else "-Ackpt", str(ckpt))
        qfile = self.base / "vmwrap.q"
        qfile.write_text(queue_config("vmwrap.q", " ".join(self.hosts), self.slots, hooks,
                                      extra={"ckpt_list": CKPT, **self.queue}))
        if qconf("-sq", "vmwrap.q", check=False).returncode == 0:
            # From this host alone (a crashed two-host cell may have left HOST2's instance behind:
            # -Mq then refuses to create it "again").
            qconf("-mattr", "queue", "hostlist", self.host, "vmwrap.q", check=False)
            qconf("-Mq", str(qfile))
        else:
            qconf("-Aq", str(qfile))
        _wait(lambda: all(f"vmwrap.q@{h}" in self.run("qstat", "-f").stdout for h in self.hosts),
              "the queue instances")
        self.run("qmod", "-cq", "vmwrap.q")  # a test cell starts with its queue clear and enabled
        self.run("qmod", "-e", "vmwrap.q")
        _wait(lambda: not any("u" in self.queue_state(h) for h in self.hosts), "the queue instances to be up")
        if self.site_config is not None:
            _wait(lambda: all((self.node_dir(h) / "state" / "agent.sock").exists() for h in self.hosts),
                  "the node agents")

    def host_prefix(self, host: str) -> tuple[str, ...]:
        """The command prefix that runs a program as on `host`: HOST2's in its network and UTS
        namespaces (each step execs the next: the program keeps the pid the caller started)."""
        return () if host == self.host else (
            "/usr/sbin/ip", "netns", "exec", NETNS, "/usr/bin/unshare", "--uts", "/bin/sh", "-c",
            f'/bin/hostname {host} && exec "$@"', "sh")

    def start_execd(self, host: str) -> None:
        """Start `host`'s sge_execd, e.g. again after a test killed it; it takes up what its spool holds."""
        _daemon("/usr/sbin/sge_execd", self.host_prefix(host))

    def execd_pid(self, host: str) -> int | None:
        """The pid of `host`'s running sge_execd, None when it is not running."""
        dirs = ("localhost", host) if host == self.host else (host,)
        return next((p for d in dirs if _alive(p := _pid(EXECD_SPOOL / d / "execd.pid"), "sge_execd")), None)

    def _local_conf(self, host: str, **settings: str) -> None:
        """Set entries of `host`'s local configuration (`qconf -Aconf/-Mconf`), keeping its others."""
        r = qconf("-sconf", host, check=False)
        lines = [ln for ln in r.stdout.splitlines() if ln.split() and ln.split()[0] not in settings] \
            if r.returncode == 0 else []
        lines += [f"{k:<28} {v}" for k, v in settings.items()]
        (self.base / "conf").mkdir(exist_ok=True)
        f = self.base / "conf" / host  # -Aconf/-Mconf take the configuration's name from the file's
        f.write_text("\n".join(lines) + "\n")
        qconf("-Mconf" if r.returncode == 0 else "-Aconf", str(f))

    def global_conf(self, **settings: str) -> dict[str, str]:
        """Set entries of GE's global configuration (`qconf -Mconf`); returns their values before, for
        putting them back (the configuration outlives the cell: qmaster keeps it in its spool)."""
        before, lines = {}, []
        for ln in qconf("-sconf", "global").stdout.splitlines():
            f = ln.split(None, 1)
            if f and f[0] in settings:
                before[f[0]] = f[1].strip() if len(f) > 1 else ""
                ln = f"{f[0]:<28} {settings[f[0]]}"
            lines.append(ln)
        lines += [f"{k:<28} {v}" for k, v in settings.items() if k not in before]
        (self.base / "conf").mkdir(exist_ok=True)
        f = self.base / "conf" / "global"  # -Mconf takes the configuration's name from the file's
        f.write_text("\n".join(lines) + "\n")
        qconf("-Mconf", str(f))
        return before

    def _execd_alive(self, host: str) -> bool:
        # This host's execd resolves its own name through 127.0.0.1, i.e. as 'localhost' (its spool dir).
        dirs = ("localhost", host) if host == self.host else (host,)
        return any(_alive(_pid(EXECD_SPOOL / d / "execd.pid"), "sge_execd") for d in dirs)

    def _network(self) -> None:
        """The second host's namespace: its own address, and a hosts file naming the qmaster host."""
        self._unnetwork()
        _ip("netns", "add", NETNS)
        if self.shared_jobnet:  # a name for this host's own namespace, for HOST2's hooks to come back to
            Path("/run/netns", HOSTNS).touch()
            subprocess.run(["/bin/mount", "--bind", "/proc/self/ns/net", f"/run/netns/{HOSTNS}"], check=True)
        _ip("link", "add", VETH[0], "type", "veth", "peer", "name", VETH[1], "netns", NETNS)
        _ip("addr", "add", f"{ADDR[0]}/30", "dev", VETH[0])
        _ip("link", "set", VETH[0], "up")
        _ip("-n", NETNS, "addr", "add", f"{ADDR[1]}/30", "dev", VETH[1])
        _ip("-n", NETNS, "link", "set", VETH[1], "up")
        _ip("-n", NETNS, "link", "set", "lo", "up")
        d = Path("/etc/netns") / NETNS
        d.mkdir(parents=True, exist_ok=True)
        (d / "hosts").write_text(f"127.0.0.1 localhost\n{ADDR[0]} {self.host}\n{ADDR[1]} {HOST2}\n")
        with open("/etc/hosts", "a") as hosts:  # one appending write: resolvers elsewhere on the host read it
            hosts.write(f"{ADDR[1]} {HOST2} {HOSTS_MARK}\n")

    def _unnetwork(self) -> None:
        # Whatever runs in the second host's namespace is this cell's (its execd, shepherds, jobs).
        r = subprocess.run(["/usr/sbin/ip", "netns", "pids", NETNS], capture_output=True, text=True, timeout=30)
        for pid in r.stdout.split() if r.returncode == 0 else ():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        hosts = Path("/etc/hosts")
        text = hosts.read_text()
        if HOSTS_MARK in text:
            kept = "".join(ln for ln in text.splitlines(keepends=True) if HOSTS_MARK not in ln)
            if text.startswith(kept):  # our lines are the last ones: cut them off without emptying the file
                os.truncate(hosts, len(kept.encode()))
            else:
                hosts.write_text(kept)
        _ip("link", "del", VETH[0], check=False)
        _ip("netns", "del", NETNS, check=False)
        _ip("netns", "del", HOSTNS, check=False)   # only the name: `ip netns del` unmounts and removes it
        d = Path("/etc/netns") / NETNS
        (d / "hosts").unlink(missing_ok=True)
        if d.exists():
            d.rmdir()

    def _global_conf(self, **settings: str) -> None:
        text = qconf("-sconf", "global").stdout
        lines = [f"{ln.split()[0]:<28} {settings[ln.split()[0]]}" if ln.split() and ln.split()[0] in settings else ln
                 for ln in text.splitlines()]
        (self.base / "conf").mkdir(exist_ok=True)
        f = self.base / "conf" / "global"  # -Mconf takes the configuration's name from the file's
        f.write_text("\n".join(lines) + "\n")
        qconf("-Mconf", str(f))

    def set_server_jsv(self, script: Path | None) -> None:
        """jsv_url in the global configuration: one JSV process inside sge_qmaster for every submission."""
        self._global_conf(jsv_url=f"script:{script}" if script else "none")

    def queue_state(self, host: str | None = None) -> str:
        """The state letters of vmwrap.q@host (e.g. 'E', 'd', 'au'); '' when it is fine."""
        for ln in self.run("qstat", "-f", "-q", f"vmwrap.q@{host or self.host}").stdout.splitlines():
            if ln.startswith("vmwrap.q@"):
                f = ln.split()
                return f[5] if len(f) > 5 else ""
        return "?"

    def add_queue(self, name: str, **settings: str) -> None:
        """A plain queue (no vmwrap hooks), e.g. one whose jobs suspend vmwrap.q as its subordinate."""
        plain = {k: "NONE" for k in ("prolog", "epilog", "starter_method", "suspend_method", "resume_method",
                                     "terminate_method")}
        qfile = self.base / f"{name}.conf"
        qfile.write_text(queue_config(name, self.host, self.slots, extra={**plain, **settings}))
        qconf("-Mq" if qconf("-sq", name, check=False).returncode == 0 else "-Aq", str(qfile))

    def run(self, *argv: str, user: str | None = None, cwd: str | None = None,
            input: str | None = None) -> subprocess.CompletedProcess:
        cmd = list(argv)
        if user:
            cmd = ["runuser", "-u", user, "--", "env", f"SGE_ROOT={SGE_ROOT}", f"SGE_CELL={CELL}", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=cwd, input=input, timeout=120)

    def stop(self) -> None:
        # Leave no JSV behind that points into this cell's (soon removed) hooks dir.
        (SGE_ROOT / CELL / "common" / "sge_request").write_text("")
        try:
            self.set_server_jsv(None)
        except RuntimeError:
            pass
        pids = {(EXECD_SPOOL / d / "execd.pid"): "sge_execd" for d in ("localhost", self.host, HOST2)}
        pids[QMASTER_PID] = "sge_qmaster"
        started = [(_pid(f), name) for f, name in pids.items() if _alive(_pid(f), name)]
        qconf("-kej", check=False)
        end = time.monotonic() + 10
        while time.monotonic() < end and any(_alive(pid, n) for pid, n in started if n == "sge_execd"):
            time.sleep(0.2)
        if len(self.hosts) > 1:  # a later one-host cell must not wait for HOST2 (gone from /etc/hosts)
            qconf("-mattr", "queue", "hostlist", self.host, "vmwrap.q", check=False)
            qconf("-de", HOST2, check=False)
        qconf("-km", check=False)
        end = time.monotonic() + 10
        while time.monotonic() < end and any(_alive(pid, name) for pid, name in started):
            time.sleep(0.2)
        for pid, name in started:
            if _alive(pid, name):
                os.kill(pid, signal.SIGKILL)
        for a in self.agents:
            a.kill()
            a.wait()
        if len(self.hosts) > 1:
            self._unnetwork()
