"""`vmwrap status`: the node agent started as deployed publishes its node's report, one command shows
every node with exit codes for monitoring; hostile or stale reports are shown, not trusted. No VM."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vmwrap import agent
from vmwrap.config import load

VMWRAP = [sys.executable, "-I", "-m", "vmwrap.cli"]
NODE = socket.gethostname().split(".")[0]


def _vmwrap(cfg: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(VMWRAP + ["--config", str(cfg), *args], capture_output=True, text=True, cwd="/",
                          env={"PATH": "/usr/bin:/bin"}, timeout=60)


@pytest.fixture
def site(tmp_path):
    cfg = tmp_path / "vmwrap.toml"
    cfg.write_text(f'state_dir = "{tmp_path}/state"\ncatalog = "{tmp_path}/images.toml"\n'
                   f'status_dir = "{tmp_path}/status"\ncache_dir = "{tmp_path}/cache"\ndaemons = "agent"\n'
                   f'log_file = "{tmp_path}/log"\n')
    yield cfg
    _vmwrap(cfg, "daemons", "stop")


def test_agent_publishes_and_status_reads(site, tmp_path):
    status = tmp_path / "status"
    r = _vmwrap(site, "status")
    assert r.returncode == 3 and "no node reports" in r.stderr, r.stderr
    assert _vmwrap(site, "daemons", "start").returncode == 0
    report = status / f"{NODE}.json"
    end = time.monotonic() + 30
    while not report.exists() and time.monotonic() < end:
        time.sleep(0.2)
    assert report.exists(), (tmp_path / "log").read_text()
    assert agent.ping(load(str(site))) == agent.PROTOCOL == 1
    r = _vmwrap(site, "status", "--json")
    doc = json.loads(r.stdout)
    (node,) = doc["nodes"]
    assert node["node"] == NODE and node["format"] == 1 and node["agent"] == {"ok": True, "protocol": 1}, node
    assert node["daemons"] == {"agent": True} and node["cache"]["max_bytes"] == 20 * 1024**3 and node["vms"] == []
    assert r.returncode == (0 if node["libvirt"]["ok"] else 1) and doc["ok"] == node["healthy"] == node["libvirt"]["ok"]

    # A run dir without its VM shows; the agent stopped: this node's fresh report says so (exit 1).
    (tmp_path / "state" / "jobs" / "4242").mkdir(parents=True)
    _vmwrap(site, "daemons", "stop")
    r = _vmwrap(site, "status", "--publish", "--json")
    (node,) = json.loads(r.stdout)["nodes"]
    assert r.returncode == 1 and not node["healthy"] and node["agent"]["ok"] is False, node
    assert node["vms"] == [{"job": "4242", "state": "no VM"}] and node["daemons"] == {"agent": False}
    r = _vmwrap(site, "status")
    assert r.returncode == 1 and "agent down" in r.stdout and "UNHEALTHY" in r.stdout, r.stdout


def test_stale_and_hostile_reports(site, tmp_path):
    status = tmp_path / "status"
    status.mkdir()
    fresh = {"at": time.time(), "agent": {"ok": True}, "libvirt": {"ok": True}, "daemons": {}, "vms": [],
             "cache": {"used_bytes": 3 * 1024**3, "max_bytes": 10 * 1024**3}, "node": "elsewhere"}
    (status / "n1.json").write_text(json.dumps(fresh))
    r = _vmwrap(site, "status")
    assert r.returncode == 0 and r.stdout.splitlines()[1].split()[:5] == ["n1", "0s", "ok", "0/0", "3.0/10.0"], r.stdout
    (status / "n2.json").write_text(json.dumps(dict(fresh, at=time.time() - 1000)))
    (status / "n3.json").symlink_to("/etc/shadow")
    (status / "n4.json").write_text(json.dumps(dict(fresh, agent="yes", daemons=[1])))
    (status / "n5.json").write_bytes(b"{" * 300_000)
    r = _vmwrap(site, "status", "--json")
    assert r.returncode == 1, r.stderr
    nodes = {n["node"]: n for n in json.loads(r.stdout)["nodes"]}
    assert nodes["n1"]["healthy"] and not any(nodes[n]["healthy"] for n in ("n2", "n3", "n4", "n5"))
    assert nodes["n2"]["age_s"] > 900 and "error" in nodes["n3"] and "error" in nodes["n5"]
    assert "root:" not in r.stdout
    r = _vmwrap(site, "status")
    assert "stale" in r.stdout and "BAD REPORT" in r.stdout and r.returncode == 1, r.stdout
