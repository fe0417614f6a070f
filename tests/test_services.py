"""vmwrap's daemons as deployed (vmwrap.services): the systemd units, the real commands they run per
scheduler, and `vmwrap daemons start|status|stop` without systemd on a real node agent. No VM."""

from __future__ import annotations

import configparser
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT
from vmwrap import services
from vmwrap.config import Settings

UNITS = ROOT / "systemd"
SCHEDULERS = ("none", "slurm", "sge", "condor", "torque", "pbs")
VMWRAP = [sys.executable, "-I", "-m", "vmwrap.cli"]


def _unit(path: Path) -> configparser.ConfigParser:
    c = configparser.ConfigParser(strict=False, interpolation=None)
    c.optionxform = str
    c.read(path)
    return c


def test_one_unit_per_daemon_running_it():
    assert sorted(p.name for p in UNITS.glob("*.service")) == sorted(f"vmwrap-{n}.service" for n in services.DAEMONS)
    for name in services.DAEMONS:
        svc = _unit(UNITS / f"vmwrap-{name}.service")["Service"]
        assert svc["ExecStart"] == f"/opt/vmwrap/venv/bin/python -I -m vmwrap.cli daemons run {name}"
        for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "full", "RestartPreventExitStatus": "78",
                           "ProtectKernelModules": "yes", "RestrictSUIDSGID": "yes"}.items():
            assert svc.get(key) == value, (name, key)


@pytest.mark.parametrize("daemon", services.DAEMONS)
def test_unit_verifies(daemon):
    """Each unit, alone (a failure names it). systemd-analyze (package systemd, from install-host.sh;
    never skipped) exits 0 on a bad or unknown key and only warns: no output at all is the check."""
    assert shutil.which("systemd-analyze"), "systemd-analyze missing: scripts/install-host.sh installs systemd"
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(UNITS / f"vmwrap-{daemon}.service")],
                       capture_output=True, text=True)
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), r.stderr


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_daemon_commands_are_real_commands(scheduler):
    """Each daemon's command line on this scheduler is an existing vmwrap command with those options."""
    s = Settings(scheduler=scheduler)
    have = []
    for name in services.DAEMONS:
        try:
            argv = services.argv(name, s)
        except Exception as e:
            assert f"scheduler = {scheduler!r}" in str(e)
            continue
        have.append(name)
        r = subprocess.run(VMWRAP + argv + ["--help"], capture_output=True, text=True, cwd="/")
        assert r.returncode == 0, (name, argv, r.stderr)
    assert "agent" in have and (scheduler == "none" or "gc" in have)


def _site(tmp_path: Path, **extra) -> Path:
    cfg = tmp_path / "vmwrap.toml"
    lines = {"state_dir": str(tmp_path / "state"), "catalog": str(tmp_path / "images.toml"), **extra}
    cfg.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in lines.items()))
    return cfg


def _vmwrap(cfg: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(VMWRAP + ["--config", str(cfg), *args], capture_output=True, text=True, cwd="/",
                          env={"PATH": "/usr/bin:/bin"}, timeout=60)


def test_config_errors_name_the_key(tmp_path):
    r = _vmwrap(_site(tmp_path, scheduler="lsf"), "daemons", "status")
    assert r.returncode == 1 and "scheduler must be" in r.stderr and "'lsf'" in r.stderr, r.stderr
    r = _vmwrap(_site(tmp_path, scheduler="torque", daemons="agent, plan"), "daemons", "status")
    assert r.returncode == 1 and r.stderr.startswith("Error: daemons: daemon 'plan' does not exist for scheduler = "
                                                     "'torque'"), r.stderr
    r = _vmwrap(_site(tmp_path, daemons="agent,planner"), "daemons", "start")
    assert r.returncode == 1 and "daemons: unknown daemon 'planner'" in r.stderr, r.stderr
    # What a unit runs for a daemon this site has not got: exit 78, which the units do not restart.
    r = _vmwrap(_site(tmp_path, scheduler="slurm"), "daemons", "run", "bridge")
    assert r.returncode == 78 and "bridge" in r.stderr, r.stderr


def test_start_status_stop_without_systemd(tmp_path):
    """The one command on a node without systemd: the configured node agent really runs, detached,
    logging at the configured level into log_file; status is 0 then 3 for monitoring."""
    log = tmp_path / "vmwrap.log"
    cfg = _site(tmp_path, daemons="agent", log_file=str(log))
    r = _vmwrap(cfg, "daemons", "status")
    assert r.returncode == 3 and "stopped" in r.stdout, r.stdout
    r = _vmwrap(cfg, "daemons", "start")
    assert r.returncode == 0 and r.stdout.startswith("agent: started, pid "), r.stderr
    pid = int(r.stdout.split()[-1])
    try:
        sock = tmp_path / "state" / "agent.sock"
        end = time.monotonic() + 30
        while not sock.exists() and time.monotonic() < end:
            time.sleep(0.1)
        assert sock.exists(), log.read_text()
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        assert argv[-4:-1] == ["daemons", "run", "agent"] and os.getsid(pid) == pid, argv
        assert _vmwrap(cfg, "daemons", "start").stdout == f"agent: already running, pid {pid}\n"
        r = _vmwrap(cfg, "daemons", "status", "--json")
        assert r.returncode == 0, r.stdout
        rows = {d["name"]: d for d in json.loads(r.stdout)}
        assert rows["agent"] == {"name": "agent", "where": "node", "configured": True, "pid": pid,
                                 "command": "vmwrap agent", "answers": True}
        assert rows["gc"]["pid"] is None and rows["gc"]["command"] is None
        assert " INFO vmwrap.daemons: starting agent: vmwrap agent" in log.read_text()
    finally:
        r = _vmwrap(cfg, "daemons", "stop")
    assert r.stdout == f"agent: stopped, pid {pid}\n", r.stderr
    assert not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/status").read_text().find("State:\tZ") >= 0
    assert _vmwrap(cfg, "daemons", "status").returncode == 3
    # log_level above info: the start line is not logged.
    log.unlink()
    cfg = _site(tmp_path, daemons="agent", log_file=str(log), log_level="warning")
    assert _vmwrap(cfg, "daemons", "start").returncode == 0
    _vmwrap(cfg, "daemons", "stop")
    assert "starting agent" not in log.read_text()


def test_status_sees_an_agent_started_otherwise(tmp_path):
    """An agent started without `daemons start` (no pid file) counts when it answers on its socket."""
    cfg = _site(tmp_path, daemons="agent")
    p = subprocess.Popen(VMWRAP + ["--config", str(cfg), "agent"], cwd="/", stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, env={"PATH": "/usr/bin:/bin"})
    try:
        end = time.monotonic() + 30
        while not (tmp_path / "state" / "agent.sock").exists() and time.monotonic() < end:
            time.sleep(0.1)
        r = _vmwrap(cfg, "daemons", "status")
        assert r.returncode == 0 and "answers (no pid file)" in r.stdout, r.stdout
    finally:
        p.terminate()
        p.wait(timeout=10)
    r = _vmwrap(cfg, "daemons", "status", "--json")
    assert r.returncode == 3 and json.loads(r.stdout)[0]["answers"] is False


def test_journald_gets_syslog_levels(monkeypatch, capsys):
    """Under systemd (JOURNAL_STREAM set) each line carries its priority, so journalctl -p filters."""
    import logging

    from vmwrap import logsetup

    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    monkeypatch.setenv("JOURNAL_STREAM", "8:1234")
    try:
        logsetup.configure(Settings(log_level="info"))
        log = logging.getLogger("vmwrap.test")
        log.debug("hidden")
        log.info("hello")
        log.warning("careful\nsecond line")
        log.error("bad")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    assert capsys.readouterr().err == ("<6>INFO vmwrap.test: hello\n<4>WARNING vmwrap.test: careful\n<4>second line\n"
                                       "<3>ERROR vmwrap.test: bad\n")


def test_every_python_package_is_in_the_wheel_and_the_debian_package():
    """pyproject lists packages by hand (data dirs too): a new subpackage left out installs a vmwrap
    whose CLI cannot even import (vmwrap.imports was, in a package build)."""
    import tomllib

    root = Path(__file__).resolve().parent.parent
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(root).parts) for top in ("vmwrap", "vmwrap_plugins")
             for p in (root / top).rglob("__init__.py")}
    assert found - listed == set(), f"packages missing from pyproject.toml: {sorted(found - listed)}"
