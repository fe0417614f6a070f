"""A real Grid Engine 8.1.9 cell on this host for tests and the demo (Debian packages, no systemd).

Debian's postinst creates the cell `default` under /var/lib/gridengine; this adds what it leaves out
(host alias, submit/admin host, a queue wired to vmwrap's hooks), and starts sge_qmaster and
sge_execd directly under `env -i` (jobs inherit the daemon's environment).
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

from vmwrap.resources import HOOKS
from vmwrap_plugins.sge.render import queue_config  # noqa: F401 (the cell's queue is the rendered one)

SGE_ROOT = Path("/var/lib/gridengine")
CELL = "default"


def env() -> dict:
    return dict(os.environ, SGE_ROOT=str(SGE_ROOT), SGE_CELL=CELL)


def qconf(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["qconf", *args], capture_output=True, text=True, env=env(), timeout=60)
    if check and r.returncode != 0:
        raise RuntimeError(f"qconf {' '.join(args)}: {r.stdout}{r.stderr}")
    return r


def _daemon(path: str) -> None:
    subprocess.run(["env", "-i", f"SGE_ROOT={SGE_ROOT}", f"SGE_CELL={CELL}", "PATH=/usr/sbin:/usr/bin:/bin", path],
                   check=True, timeout=60)


def _wait(cond, what: str, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.3)
    raise RuntimeError(f"Grid Engine: timed out waiting for {what}")


class Cell:
    def __init__(self, base: Path, vmwrap_config: str, slots: int = 2, jsv: str = "client"):
        self.base = base
        self.jsv = jsv  # client: `-jsv` in sge_request (sees the script); server: jsv_url (fast)
        self.vmwrap_config = vmwrap_config
        self.slots = slots
        self.host = socket.gethostname()

    def start(self) -> None:
        common = SGE_ROOT / CELL / "common"
        if not (common / "bootstrap").exists():
            raise RuntimeError("Grid Engine is not installed (scripts/install-host.sh installs it)")
        # Clients whose IP resolves to 'localhost' are refused unless it is an alias of the host name.
        (common / "host_aliases").write_text(f"{self.host} localhost\n")
        # Per-cell wrappers name the site config on the hooks' command line (hooks never take it from
        # the environment: GE hands them the job's `qsub -v` variables).
        hooks = self.base / "hooks"
        hooks.mkdir(parents=True, exist_ok=True)
        for kind in ("prolog", "epilog", "starter", "method", "jsv"):
            h = hooks / f"sge-{kind}"
            h.write_text(f"#!/bin/sh\nexec {HOOKS}/sge-{kind} --config '{self.vmwrap_config}' \"$@\"\n")
            h.chmod(0o755)
        # Every qsub on this cell runs vmwrap's client JSV (it reads the script body; a server JSV cannot).
        (common / "sge_request").write_text(f"-jsv {hooks / 'sge-jsv'}\n" if self.jsv == "client" else "")
        if subprocess.run(["pgrep", "-x", "sge_qmaster"], capture_output=True).returncode != 0:
            _daemon("/usr/sbin/sge_qmaster")
        _wait(lambda: qconf("-sh", check=False).returncode == 0, "sge_qmaster")
        self.set_server_jsv(hooks / "sge-jsv" if self.jsv == "server" else None)
        qconf("-ah", self.host, check=False)
        qconf("-as", self.host, check=False)
        sched = self.base / "sched.conf"
        text = qconf("-ssconf").stdout
        text = "\n".join("schedule_interval                 0:0:1" if ln.startswith("schedule_interval") else
                         "flush_submit_sec                  1" if ln.startswith("flush_submit_sec") else
                         "flush_finish_sec                  1" if ln.startswith("flush_finish_sec") else ln
                         for ln in text.splitlines()) + "\n"
        sched.write_text(text)
        qconf("-Msconf", str(sched))
        if subprocess.run(["pgrep", "-x", "sge_execd"], capture_output=True).returncode != 0:
            _daemon("/usr/sbin/sge_execd")
        _wait(lambda: self.host in qconf("-sel", check=False).stdout, "sge_execd to register")
        qfile = self.base / "vmwrap.q"
        qfile.write_text(queue_config("vmwrap.q", self.host, self.slots, hooks))
        if qconf("-sq", "vmwrap.q", check=False).returncode == 0:
            qconf("-Mq", str(qfile))
        else:
            qconf("-Aq", str(qfile))
        _wait(lambda: "vmwrap.q@" in self.run("qstat", "-f").stdout, "the queue instance")

    def set_server_jsv(self, script: Path | None) -> None:
        """jsv_url in the global configuration: one JSV process inside sge_qmaster for every submission."""
        text = qconf("-sconf", "global").stdout
        url = f"script:{script}" if script else "none"
        lines = [f"jsv_url                      {url}" if ln.startswith("jsv_url") else ln for ln in text.splitlines()]
        (self.base / "conf").mkdir(exist_ok=True)
        f = self.base / "conf" / "global"  # -Mconf takes the configuration's name from the file's
        f.write_text("\n".join(lines) + "\n")
        qconf("-Mconf", str(f))

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
        qconf("-kej", check=False)
        qconf("-km", check=False)
        for _ in range(50):
            if subprocess.run(["pgrep", "sge_"], capture_output=True).returncode != 0:
                break
            time.sleep(0.2)
        subprocess.run(["pkill", "-9", "-x", "sge_execd"], capture_output=True)
        subprocess.run(["pkill", "-9", "-x", "sge_qmaster"], capture_output=True)
