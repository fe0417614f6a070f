"""Slurm's facts for prestaging (the loop is vmwrap.prestage.node_pass) and cache-aware placement.

Node mode (each node, root): the core loop asks the adapter for Slurm's plan for pending jobs
(`pending`: squeue's planned start and scheduled nodes, filled in by the backfill scheduler),
prestages the images this node will need, and the adapter publishes the images it holds as node
features `vmw_<image>` (`publish`; other features are kept).
Controller mode (next to slurmctld): collect the active `vmw_*` features of all nodes into
`vmwrap-active.lua` beside job_submit.lua (which then sets `prefer` at submit, so a job that can
start at once still lands where its image is), and give pending vmwrap jobs without a preference
`Prefer=vmw_<image>` once their image is active somewhere. Slurm 22.05 refuses at submit a `prefer`
that no node has active, hence the table instead of always setting it.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from vmwrap import prestage as core
from vmwrap import wire
from vmwrap.errors import UserError
from vmwrap.prestage import Need, Prestager

from .commands import epoch as _epoch
from .commands import run as _run

log = logging.getLogger("vmwrap.prestage")
PREFIX = "vmw_"


def feature(image: str) -> str:
    return PREFIX + re.sub(r"[^A-Za-z0-9_]", "_", image)


_warned: dict[str, str] = {}


def _warn_once(key: str, what: str) -> None:
    """Log a job left out once per reason (a pass runs every few seconds)."""
    if _warned.get(key) != what:
        _warned[key] = what
        log.warning("%s", what)


_JOB_ID = re.compile(r"\d{1,10}(?:_(?:\d{1,10}|\[[0-9,%-]{1,200}\]))?")
_NODES = re.compile(r"[A-Za-z0-9_.,\[\]-]{1,4000}")


def _lines(*fields: str) -> dict[str, list[str]]:
    """Pending jobs' fields by job id from `squeue -O`, one user-written field at most and last (it may
    hold the separator). A line whose job id is malformed or seen twice (a comment with a line break
    can forge one) is left out with a logged reason."""
    fmt = ",".join(f"{f}:|" for f in fields[:-1]) + f",{fields[-1]}:"
    out: dict[str, list[str]] = {}
    bad: set[str] = set()
    for line in _run("squeue", "-h", "-t", "PD", "-O", fmt).splitlines():
        parts = [p.strip() for p in line.split("|", len(fields) - 1)]
        if len(parts) < len(fields):
            continue
        if not _JOB_ID.fullmatch(parts[0]):
            _warn_once(line[:80], f"squeue line left out, not a job id: {line[:80]!r}")
            continue
        if parts[0] in out:
            bad.add(parts[0])
        out[parts[0]] = parts[1:]
    for j in bad:
        _warn_once(j, f"job {j}: left out, squeue printed it twice (a forged line?)")
        del out[j]
    return out


def pending() -> list[dict]:
    """Pending vmwrap jobs: id, image, planned start (or None), scheduled nodes. Comments are users':
    a malformed request leaves its job out (its prolog fails it) with a logged reason."""
    jobs, hosts = [], {}
    for job_id, (start, sched, comment) in _lines("JobID", "StartTime", "SchedNodes", "Comment").items():
        try:
            req = wire.decode(comment)
        except UserError as e:
            _warn_once(job_id, f"job {job_id}: not prestaged: {e}")
            continue
        if req is None:
            continue
        nodes: list[str] = []
        if sched and sched not in ("(null)", "N/A") and _NODES.fullmatch(sched):
            if sched not in hosts:
                hosts[sched] = _run("scontrol", "show", "hostnames", sched).split()
            nodes = hosts[sched]
        jobs.append({"job": job_id, "image": req.image, "start": _epoch(start), "nodes": nodes})
    return jobs


def preferences() -> dict[str, str]:
    """Pending jobs' own `--prefer` (users write it, '|' included: it is queried on its own)."""
    return {j: ("" if p in ("(null)", "N/A") else p) for j, (p,) in _lines("JobID", "Prefer").items()}


def needs_for(node: str, jobs: list[dict]) -> list[Need]:
    return core.needs_for(node, jobs)


def publish(node: str, images: list[str]) -> None:
    """Set this node's vmw_* features to `images`, keeping every other feature."""
    line = _run("scontrol", "-o", "show", "node", node)
    m_av = re.search(r"AvailableFeatures=(\S*)", line)
    m_ac = re.search(r"ActiveFeatures=(\S*)", line)
    other_av = [f for f in (m_av.group(1) if m_av else "").split(",") if f and f != "(null)" and not f.startswith(PREFIX)]
    other_ac = [f for f in (m_ac.group(1) if m_ac else "").split(",") if f and f != "(null)" and not f.startswith(PREFIX)]
    mine = [feature(i) for i in images]
    new_av, new_ac = ",".join(other_av + mine), ",".join(other_ac + mine)
    if m_av and m_av.group(1) == (new_av or "(null)") and m_ac and m_ac.group(1) == (new_ac or "(null)"):
        return
    _run("scontrol", "update", f"nodename={node}", f"AvailableFeatures={new_av}", f"ActiveFeatures={new_ac}")


def node_pass(prestager: Prestager, node: str) -> list:
    """The core prestage pass (vmwrap.prestage.node_pass) through the Slurm adapter."""
    from .hooks import SLURM

    return core.node_pass(SLURM, prestager, node)


def holders() -> tuple[str | None, dict[str, dict[str, tuple[int, int]]]]:
    """Default partition, and feature -> partition -> (max CPUs, max MB) over nodes holding it active."""
    out = _run("sinfo", "-h", "-N", "-o", "%N|%P|%b|%c|%m")
    default, held = None, {}
    for line in out.splitlines():
        try:
            _node, part, feats, cpus, mem = line.split("|")
            cpus_i, mem_i = int(cpus), int(mem.rstrip("+"))
        except ValueError:
            continue
        if part.endswith("*"):
            part = default = part[:-1]
        for f in feats.split(","):
            if f.startswith(PREFIX):
                c, m = held.setdefault(f, {}).get(part, (0, 0))
                held[f][part] = (max(c, cpus_i), max(m, mem_i))
    return default, held


def _lua_str(s: str) -> str:
    return '"' + re.sub(r'[^A-Za-z0-9_.,+-]', "_", s) + '"'


def controller_pass(catalog_images: list[str], lua_dir: Path) -> list[str]:
    """Write vmwrap-active.lua; prefer placement for queued jobs. Returns the jobs given a preference."""
    default, held = holders()
    active = set(held)
    entries = []
    for i in sorted(catalog_images):
        parts = held.get(feature(i))
        if parts:
            body = "".join(f"[{_lua_str(p)}]={{cpus={c},mem={m}}}," for p, (c, m) in sorted(parts.items()))
            entries.append(f"[{_lua_str(i)}]={{{body}}},")
    text = (f"return {{default={_lua_str(default) if default else 'nil'}, images={{" + "".join(entries) + "}}\n")
    target = lua_dir / "vmwrap-active.lua"
    if not target.exists() or target.read_text() != text:
        tmp = target.with_suffix(f".tmp.{os.getpid()}")
        tmp.write_text(text)
        tmp.chmod(0o644)
        os.replace(tmp, target)
    preferred = []
    prefer = preferences()
    for j in pending():
        if j["job"] in prefer and not prefer[j["job"]] and feature(j["image"]) in active:
            _run("scontrol", "update", f"jobid={j['job']}", f"Prefer={feature(j['image'])}")
            preferred.append(j["job"])
    return preferred
