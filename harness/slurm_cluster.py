"""A local Slurm 22.05 cluster on one host, for the demo and the tests: munged, slurmctld, 3 slurmd.

Each node has its own spool, log and vmwrap state/cache (`--config .../vmwrap-%n.toml` in the
root-written hook wrappers), so per-node caches and placement are real even though all nodes share
one machine.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from harness.host_share import clear_job_networks_under, destroy_vms_under, host_lock, slurm_first_job
from vmwrap import config as vmwrap_config
from vmwrap.resources import HOOKS

NODES = ["c1", "c2", "c3"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_munge() -> None:
    with host_lock():
        _start_munge()


def _start_munge() -> None:
    if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode == 0:
        return
    os.makedirs("/run/munge", exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    if not os.path.exists("/etc/munge/munge.key"):
        subprocess.run(["mungekey", "-c"], check=True)
        shutil.chown("/etc/munge/munge.key", "munge", "munge")
    subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)


class Cluster:
    stamp_store = True  # False: the store as an older vmwrap left it (no identity stamp; tests/test_upgrade.py)

    def __init__(self, base: Path, site_config: dict, extra_conf: str = "", accounting: bool = False,
                 prestage: bool = False, node_config: dict | None = None, prolog_timeout: int = 120):
        self.base = base
        self.prolog_timeout = prolog_timeout  # PrologEpilogTimeout (s): short for the prolog-timeout test
        self.conf = base / "slurm.conf"
        self.procs: list[subprocess.Popen] = []
        self.site_config = site_config
        self.extra_conf = extra_conf
        self.vmwrap_config = str(base / "vmwrap-%n.toml")
        self.accounting = accounting
        self.prestage = prestage
        self.node_config = node_config or {}  # per-node overrides, e.g. {"c2": {"cache_max_bytes": ...}}
        self.dbd_port = _free_port()

    @property
    def env(self) -> dict:
        return dict(os.environ, SLURM_CONF=str(self.conf))

    def node_dir(self, node: str) -> Path:
        return self.base / "nodes" / node

    def write_config(self) -> None:
        host = socket.gethostname()
        from harness.site_store import init_stores
        from vmwrap.checkpoint import keygen

        if not (self.base / "checkpoint.key").exists():
            keygen(self.base / "checkpoint.key")
        for n in NODES:
            d = self.node_dir(n)
            for sub in ("spool", "state", "cache"):
                (d / sub).mkdir(parents=True, exist_ok=True)
            cfg = dict({"checkpoint_dir": str(self.base / "checkpoints"),  # "shared storage": one host
                        "checkpoint_key_file": str(self.base / "checkpoint.key")},  # the same key on every node
                       **self.site_config, state_dir=str(d / "state"), cache_dir=str(d / "cache"),
                       **self.node_config.get(n, {}))
            (self.base / f"vmwrap-{n}.toml").write_text(vmwrap_config.render(cfg))
        # As the admin guide's setup: the shared store stamped once for the site (a no-op after that).
        if self.stamp_store:
            init_stores(*(self.base / f"vmwrap-{n}.toml" for n in NODES))
        (self.base / "ctld").mkdir(exist_ok=True)
        hooks = self.base / "hooks"
        hooks.mkdir(exist_ok=True)
        for kind in ("prolog", "epilog"):
            h = hooks / kind
            # Root hooks take their config from their command line only (never $VMWRAP_CONFIG).
            h.write_text(f"#!/bin/sh\nexec {HOOKS}/slurm-{kind} --config '{self.vmwrap_config}'\n")
            h.chmod(0o755)
        ctld_port = _free_port()
        acct = ""
        if self.accounting:
            acct = (f"AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=127.0.0.1\n"
                    f"AccountingStoragePort={self.dbd_port}\nJobAcctGatherType=jobacct_gather/none")
        nodes = "\n".join(
            f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={_free_port()} "
            f"Sockets=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=3000 State=UNKNOWN" for n in NODES)
        self.conf.write_text(f"""
ClusterName=vmwraptest
FirstJobId={slurm_first_job()}
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={self.base}/ctld
SlurmdSpoolDir={self.base}/nodes/%n/spool
SlurmctldPidFile={self.base}/slurmctld.pid
SlurmdPidFile={self.base}/nodes/%n/slurmd.pid
SlurmctldLogFile={self.base}/slurmctld.log
SlurmdLogFile={self.base}/nodes/%n/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerParameters=batch_sched_delay=0,bf_interval=2
ReturnToService=2
JobSubmitPlugins=lua
Prolog={hooks}/prolog
Epilog={hooks}/epilog
PrologFlags=Alloc
PrologEpilogTimeout={self.prolog_timeout}
LaunchParameters=use_interactive_step
InteractiveStepOptions="--interactive --preserve-env --pty {shutil.which('vmwrap')} --config {self.vmwrap_config} slurm interactive"
KillWait=10
MinJobAge=600
InactiveLimit=0
PreemptType=preempt/partition_prio
PreemptMode=SUSPEND,GANG
JobRequeue=1
# A requeued job may start again after cred_expire seconds (default 120): short, for tests.
AuthInfo=cred_expire=10
SlurmdTimeout=60
{acct}
{self.extra_conf}
{nodes}
PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP PriorityTier=1
PartitionName=high Nodes={','.join(NODES)} MaxTime=INFINITE State=UP PriorityTier=2
PartitionName=requeue Nodes={','.join(NODES)} MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE
""")

    @classmethod
    def for_site(cls, base: Path, images=("busybox",), site_config: dict | None = None, **kw) -> "Cluster":
        """A fresh cluster under `base` offering images (names, or Image objects) of this host's catalog."""
        from vmwrap.catalog import Catalog, register

        shutil.rmtree(base, ignore_errors=True)
        base.mkdir(parents=True)
        base.chmod(0o755)
        site = vmwrap_config.load()
        for img in images:
            register(str(base / "images.toml"), Catalog.load(site.catalog).images[img] if isinstance(img, str) else img)
        cfg = {"catalog": str(base / "images.toml"), "accel": site.accel, **(site_config or {})}
        return cls(base, cfg, **kw)

    def render_lua(self, **kw) -> subprocess.CompletedProcess:
        args = ["vmwrap", "config", "render", "slurm", "--lua-out", str(self.base / "job_submit.lua"),
                "--node-config", self.vmwrap_config]
        for k, v in kw.items():
            args += [f"--{k.replace('_', '-')}", v]
        env = dict(self.env, VMWRAP_CONFIG=str(self.base / "vmwrap-c1.toml"))
        return subprocess.run(args, env=env, capture_output=True, text=True, check=True)

    def start(self) -> None:
        try:
            self._start()
        except Exception:
            self.stop()
            raise

    def _start_accounting(self, env: dict) -> None:
        """A private MariaDB (TCP on loopback) and slurmdbd, so that sacct answers as on a real site."""
        db = self.base / "mysql"
        subprocess.run(["mariadb-install-db", "--user=root", f"--datadir={db}", "--skip-test-db",
                        "--auth-root-authentication-method=normal"], check=True, capture_output=True)
        db_port = _free_port()
        self.procs.append(subprocess.Popen(
            ["mariadbd", "--user=root", f"--datadir={db}", f"--socket={self.base}/mysql.sock",
             f"--port={db_port}", "--bind-address=127.0.0.1", f"--pid-file={self.base}/mysql.pid",
             "--skip-name-resolve", f"--log-error={self.base}/mysql.log"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        self._wait(lambda: (self.base / "mysql.sock").exists(), "mariadb")
        dbd = self.base / "slurmdbd.conf"
        dbd.write_text(f"""AuthType=auth/munge
DbdHost={socket.gethostname()}
DbdAddr=127.0.0.1
DbdPort={self.dbd_port}
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={db_port}
StorageUser=root
StorageLoc=slurm_acct_db_{os.getpid()}
LogFile={self.base}/slurmdbd.log
PidFile={self.base}/slurmdbd.pid
""")
        dbd.chmod(0o600)
        self.procs.append(subprocess.Popen(["slurmdbd", "-D"], env=env, stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL, start_new_session=True))
        self._wait(lambda: self.run("sacctmgr", "-n", "list", "cluster").returncode == 0, "slurmdbd")
        self.run("sacctmgr", "-i", "add", "cluster", "vmwraptest", check=True)

    def _start(self) -> None:
        start_munge()
        self.write_config()
        self.render_lua()
        env = dict(self.env)
        env.pop("VMWRAP_CONFIG", None)
        if self.accounting:
            self._start_accounting(env)
        self.procs.append(subprocess.Popen(["slurmctld", "-D", "-i", "-f", str(self.conf)], env=env,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                           start_new_session=True))
        self._wait(lambda: self.run("scontrol", "ping").stdout.count("UP") >= 1, "slurmctld")
        for n in NODES:  # one vmwrap node agent per node (pause/resume for the job's own user)
            self.procs.append(subprocess.Popen(["vmwrap", "--config", str(self.base / f"vmwrap-{n}.toml"), "agent"],
                                               env=env, start_new_session=True, stdout=subprocess.DEVNULL))
        for n in NODES:
            self.procs.append(subprocess.Popen(["slurmd", "-D", "-N", n, "-f", str(self.conf)], env=env,
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                               start_new_session=True))
        self._wait(lambda: self.idle_nodes() == len(NODES), "3 idle nodes")
        self._wait(lambda: all((self.node_dir(n) / "state" / "agent.sock").exists() for n in NODES), "node agents")
        if self.prestage:
            for n in NODES:
                self.procs.append(subprocess.Popen(
                    ["vmwrap", "--config", str(self.base / f"vmwrap-{n}.toml"), "slurm", "prestage", "--node", n,
                     "--interval", "1"], env=env, start_new_session=True,
                    stdout=open(self.base / f"prestage-{n}.log", "w"), stderr=subprocess.STDOUT))
            self.procs.append(subprocess.Popen(
                ["vmwrap", "--config", str(self.base / "vmwrap-c1.toml"), "slurm", "prestage", "--controller",
                 "--lua-dir", str(self.base), "--interval", "1"], env=env, start_new_session=True,
                stdout=open(self.base / "prestage-controller.log", "w"), stderr=subprocess.STDOUT))

    def idle_nodes(self) -> int:
        out = self.run("sinfo", "-h", "-N", "-o", "%N %t").stdout.split("\n")
        return len({ln.split()[0] for ln in out if ln.endswith(" idle")})  # a node is listed per partition

    def _wait(self, cond, what: str, timeout: float = 60) -> None:
        end = time.time() + timeout
        while time.time() < end:
            try:
                if cond():
                    return
            except Exception:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"timed out waiting for {what}; see {self.base}")

    def run(self, *argv, user: str | None = None, input: str | None = None, check=False) -> subprocess.CompletedProcess:
        cmd = list(argv)
        if user:
            cmd = ["runuser", "-u", user, "--", "env", f"SLURM_CONF={self.conf}"] + cmd
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, input=input, check=check,
                              timeout=120)

    def user_dir(self, user: str, name: str = "work") -> Path:
        """A new dir in the cluster's base owned by `user`: where that user's jobs run and write."""
        import pwd

        pw = pwd.getpwnam(user)
        d = self.base / name
        d.mkdir()
        os.chown(d, pw.pw_uid, pw.pw_gid)
        return d

    def sbatch(self, script: str, *args, user: str, cwd: Path) -> subprocess.CompletedProcess:
        path = cwd / f"job-{os.urandom(3).hex()}.sh"
        path.write_text(script)
        os.chmod(path, 0o755)
        return self.run("sbatch", "--parsable", "-D", str(cwd), *args, str(path), user=user)

    def sacct(self, job_id: str) -> dict[str, tuple[str, str]]:
        """{JobID: (State, ExitCode)} as sacct reports them (accounting clusters only)."""
        out = self.run("sacct", "-n", "-P", "-j", job_id, "-o", "JobID,State,ExitCode").stdout
        return {f[0]: (f[1], f[2]) for f in (ln.split("|") for ln in out.split("\n") if ln)}

    def job(self, job_id: str) -> dict:
        out = self.run("scontrol", "-o", "show", "job", job_id).stdout
        fields = {}
        for tok in out.split():
            k, _, v = tok.partition("=")
            fields.setdefault(k, v)
        return fields

    def wait_state(self, job_id: str, states: set[str], timeout: float = 120) -> dict:
        end = time.time() + timeout
        info = {}
        while time.time() < end:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            if "held" in info.get("Reason", "") and not any("held" in s for s in states):
                raise AssertionError(f"job {job_id} was held by Slurm ({info['Reason']}); see {self.base}/nodes/*/slurmd.log")
            time.sleep(0.3)
        raise AssertionError(f"job {job_id} not in {states} after {timeout}s: {info}")

    def stop(self) -> None:
        self.run("scancel", "--state=RUNNING,PENDING,SUSPENDED", "-u", "vmwrapuser")
        for p in reversed(self.procs):
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        # slurmd leaves job processes behind on shutdown; and VMs are not the job's processes at all
        subprocess.run(["pkill", "-f", f"{self.base}/nodes/"], capture_output=True)
        destroy_vms_under(self.base)
        clear_job_networks_under(self.base)


DEMO_SCRIPT = """#!/bin/sh
#SBATCH --job-name=vmwrap-demo
#VMWRAP --image=busybox --memory=256M
echo "guest kernel: $(uname -r)  (host kernel: {host})"
echo "job $SLURM_JOB_ID on $SLURMD_NODENAME, uid $(id -u), in $(pwd)"
echo "hello from inside a per-job VM" > from-the-vm.txt
ls -l from-the-vm.txt
"""

# Runs in the Debian appliance `scripts/demo.sh` builds once with --packages python3-minimal.
PYTHON_SCRIPT = """#!/bin/sh
#SBATCH --job-name=vmwrap-python3
#VMWRAP --image=python3 --memory=256M
exec python3 - <<'PY'
import platform, sys
print(f"python {sys.version.split()[0]} in a Debian VM (kernel {platform.release()})")
print("sum of squares below 10**6:", sum(i * i for i in range(10**6)))
PY
"""


def demo(base: Path = Path("/var/tmp/vmwrap-demo"), user: str = "vmwrapuser") -> int:
    """Start a local cluster, submit one job with sbatch, print its output, stop the cluster."""
    import pwd

    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        subprocess.run(["useradd", "-m", "-U", user], check=True)
        pw = pwd.getpwnam(user)
    from vmwrap.catalog import Catalog

    python3 = "python3" in Catalog.load(vmwrap_config.load().catalog).images
    c = Cluster.for_site(base, images=("busybox", "python3") if python3 else ("busybox",))
    print(f"== starting slurmctld + 3 slurmd under {base}")
    c.start()
    try:
        work = c.user_dir(pw.pw_name)
        scripts = [DEMO_SCRIPT.format(host=os.uname().release)] + ([PYTHON_SCRIPT] if python3 else [])
        jobs = []
        for script in scripts:  # submitted together: they run at once, on different nodes
            r = c.sbatch(script, user=user, cwd=work)
            if r.returncode != 0:
                print(r.stderr)
                return 1
            jobs.append(r.stdout.strip())
        print(f"== sbatch (as {user}): submitted job(s) {', '.join(jobs)}; waiting")
        ok = True
        for job in jobs:
            info = c.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=180)
            print(f"== job {job}: {info['JobState']}, exit code {info['ExitCode']}, ran {info['RunTime']} "
                  f"on {info['NodeList']}; slurm-{job}.out:")
            print((work / f"slurm-{job}.out").read_text(), end="")
            admin = re.search(r"AdminComment=(vmwrap image=\S+ digest=\S+)", c.run("scontrol", "show", "job", job).stdout)
            print(f"== its AdminComment (what sacct records): {admin.group(1) if admin else '-'}")
            ok = ok and info["JobState"] == "COMPLETED"
        bad = c.sbatch("#!/bin/sh\n#VMWRAP --image=../etc/passwd\n", user=user, cwd=work)
        print(f"== a bad request is refused at submit:\n{bad.stderr.strip()}")
        return 0 if ok else 1
    finally:
        c.stop()


if __name__ == "__main__":
    import sys

    sys.exit(demo())
