"""The cluster view (`vmwrap status`): each node publishes a small report, one command reads them all.

No head-node daemon and no ssh: the node agent (under `vmwrap daemons run agent`) writes
`status_dir/<node>.json` every PUBLISH_INTERVAL s (atomically: tmp + rename), `status_dir` being a
directory every node shares (as the checkpoint store). Readers take regular files only, bounded, without
following links, and any report they cannot parse is shown as that node's error, never a crash.
A report older than `stale_s` means the node (or its agent) is down.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import time
from pathlib import Path

from . import __version__, safeio
from .config import Settings

FORMAT = 1             # of a report; keys are only ever added
PUBLISH_INTERVAL = 60.0
REPORT_MAX = 256 * 1024
STATES = {1: "running", 3: "paused", 5: "shutoff"}


def node_name() -> str:
    return socket.gethostname().split(".")[0]


def collect(settings: Settings) -> dict:
    """This node's report: VMs (run dirs and their libvirt state), cache use, agent and daemons."""
    from . import agent, domain, rundir, services
    from .cache import Cache

    jobs = sorted(p.name for p in settings.jobs_dir.iterdir()) if settings.jobs_dir.is_dir() else []
    libvirt = {"ok": True, "detail": settings.libvirt_uri}
    states: dict[str, str] = {}
    try:
        conn = domain.connect(settings.libvirt_uri)
        for d in conn.listAllDomains():
            states[d.name()] = STATES.get(d.state()[0], str(d.state()[0]))
    except Exception as e:  # noqa: BLE001 (libvirt down is what the report is for)
        libvirt = {"ok": False, "detail": str(e)}
    vms = [{"job": j, "state": states.get(rundir.vm_name(settings, j), "no VM")} for j in jobs]
    try:
        agent_ok = {"ok": True, "protocol": agent.ping(settings)}
    except Exception as e:  # noqa: BLE001
        agent_ok = {"ok": False, "detail": str(e)}
    cache = Cache(settings.cache_dir, settings.cache_max_bytes, settings.verify_on_use)
    try:
        daemons = {n: services.running(settings, n) is not None for n in services.configured(settings)}
    except Exception:  # noqa: BLE001 (a bad `daemons` setting is doctor's to report)
        daemons = {}
    return {"format": FORMAT, "node": node_name(), "at": time.time(), "version": __version__,
            "vms": vms, "cache": {"used_bytes": cache.used_bytes(), "max_bytes": settings.cache_max_bytes},
            "agent": agent_ok, "libvirt": libvirt, "daemons": daemons}


def publish(settings: Settings, report: dict) -> Path:
    """Write `report` as status_dir/<node>.json, atomically."""
    d = Path(settings.status_dir)
    d.mkdir(mode=0o755, parents=True, exist_ok=True)
    dest = d / f"{report['node']}.json"
    tmp = d / f".{report['node']}.json.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as f:
        json.dump(report, f, sort_keys=True)
    os.rename(tmp, dest)
    return dest


def read_all(settings: Settings, stale_s: float, now: float | None = None) -> list[dict]:
    """Every node's report, each with `age_s` and `healthy` (fresh, agent and libvirt answer), or
    {node, error, healthy: False} when its file is unusable."""
    now = time.time() if now is None else now
    d = Path(settings.status_dir)
    out = []
    for p in sorted(d.iterdir()) if d.is_dir() else []:
        if not p.name.endswith(".json") or p.name.startswith("."):
            continue
        node = p.name[:-5]
        try:
            st = os.lstat(p)
            raw = safeio.read_capped(p, REPORT_MAX + 1) if stat.S_ISREG(st.st_mode) else None
            if raw is None or len(raw) > REPORT_MAX:
                raise ValueError("not a regular file of at most 256 KiB")
            r = json.loads(raw)
            if not isinstance(r, dict) or not isinstance(r.get("at"), (int, float)):
                raise ValueError("not a node report")
        except (OSError, ValueError) as e:
            out.append({"node": node, "error": str(e), "healthy": False})
            continue
        r["node"] = node  # the file name, not what the file claims
        r["age_s"] = round(now - r["at"], 1)
        daemons = r.get("daemons")
        r["healthy"] = (r["age_s"] <= stale_s and _ok(r.get("agent")) and _ok(r.get("libvirt"))
                        and isinstance(daemons, dict) and all(v is True for v in daemons.values()))
        out.append(r)
    return out


def _ok(part) -> bool:
    return isinstance(part, dict) and part.get("ok") is True


def publisher(settings: Settings, interval: float = PUBLISH_INTERVAL, first: float = 2.0) -> None:
    """Publish this node's report every `interval` s (a daemon thread of the node agent)."""
    import logging

    log = logging.getLogger("vmwrap.status")
    time.sleep(first)  # the agent's socket is up by then
    while True:
        try:
            publish(settings, collect(settings))
        except Exception as e:  # noqa: BLE001 (the shared dir may be away for a while)
            log.warning("cannot publish node status to %s: %s", settings.status_dir, e)
        time.sleep(interval)
