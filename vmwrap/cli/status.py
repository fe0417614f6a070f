"""`vmwrap status`: the cluster at a glance, from the reports every node's agent publishes
(vmwrap.nodestatus); exit codes and --json for monitoring."""

from __future__ import annotations

import sys

import click

from .context import echo_json, echo_table, friendly_oserrors, json_option, settings

UNHEALTHY = 1  # a node is stale, its agent or libvirt does not answer, or a configured daemon is down
NO_REPORTS = 3


def _part(report: dict, key: str) -> dict:
    """A report's sub-object; anything else (a node's report is not trusted) as empty."""
    v = report.get(key)
    return v if isinstance(v, dict) else {}


def _gib(n) -> str:
    return f"{n / 1024**3:.1f}" if isinstance(n, (int, float)) else "?"


@click.command()
@click.option("--stale", "stale_s", type=click.FloatRange(min=1.0), default=180.0, show_default=True, metavar="S",
              help="A report older than this many seconds means the node is down.")
@click.option("--publish", is_flag=True, help="Write this node's report now (the agent does so every 60 s) "
              "and show only it.")
@json_option
@friendly_oserrors
def status(stale_s: float, publish: bool, as_json: bool) -> None:
    """Every node: VMs, cache use, agent and libvirt health, daemons (from status_dir).

    Exit 0 when every node is healthy, 1 when one is not, 3 when no node reported."""
    from .. import nodestatus

    s = settings()
    if publish:
        nodestatus.publish(s, nodestatus.collect(s))
    nodes = nodestatus.read_all(s, stale_s)
    if publish:
        nodes = [n for n in nodes if n["node"] == nodestatus.node_name()]
    if as_json:
        echo_json({"ok": bool(nodes) and all(n["healthy"] for n in nodes), "status_dir": s.status_dir, "nodes": nodes})
    else:
        rows = []
        for n in nodes:
            if "error" in n:
                rows.append([n["node"], "-", "BAD REPORT", "-", "-", n["error"]])
                continue
            vms = n.get("vms") if isinstance(n.get("vms"), list) else []
            agent, lv, cache = _part(n, "agent"), _part(n, "libvirt"), _part(n, "cache")
            down = [str(d) for d, up in _part(n, "daemons").items() if up is not True]
            problems = ([] if n["age_s"] <= stale_s else ["stale"]) + ([] if agent.get("ok") else ["agent down"]) \
                + ([] if lv.get("ok") else ["libvirt down"]) + ([f"{', '.join(down)} down"] if down else [])
            rows.append([n["node"], f"{n['age_s']:.0f}s", "ok" if n["healthy"] else "UNHEALTHY",
                         f"{sum(1 for v in vms if isinstance(v, dict) and v.get('state') == 'running')}/{len(vms)}",
                         f"{_gib(cache.get('used_bytes'))}/{_gib(cache.get('max_bytes'))}",
                         "; ".join(problems) or str(n.get("version", ""))])
        echo_table(["NODE", "AGE", "HEALTH", "VMS RUN/ALL", "CACHE GIB", "PROBLEMS / VERSION"], rows, right={1})
    if not nodes:
        click.echo(f"no node reports in {s.status_dir} (status_dir): is the node agent running "
                   f"(`vmwrap daemons start agent`)?", err=True)
        sys.exit(NO_REPORTS)
    sys.exit(0 if all(n["healthy"] for n in nodes) else UNHEALTHY)
