"""What Torque says about a job, in the core's terms: job ids, the resource list, the spooled script.

Every value here comes from pbs_mom's argv (prologue/epilogue/checkpoint/restart scripts) and most of
it is the user's to choose (job name, resource list, the script): all of it is bounded and validated
before it reaches a path, a number or the core (Torque Admin Guide, appendix G; src/resmom/prolog.c).
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import stat

from vmwrap import directives
from vmwrap.errors import UserError

# `123.server`, `123[4].server` (an array task), `123` (no server suffix): sequence, index, server.
_JOB_ID = re.compile(r"(\d{1,12})(?:\[(\d{1,9})\])?(?:\.([A-Za-z0-9][A-Za-z0-9.-]{0,252}))?")
# The filter's mark in a rewritten script: the prologue boots a VM only for such a script.
WRAPPED = "#VMWRAP-TORQUE-WRAPPED"
SCRIPT_MAX = 1 << 20        # bytes of the spooled script root reads (the directives are at its head)


def job_id(torque_id: str) -> str:
    """The core's job id (file and domain name) for Torque's: `SEQ[-INDEX].SERVER-LABEL`, at most 64
    characters. UserError for anything pbs_mom should never hand over."""
    m = _JOB_ID.fullmatch(torque_id or "")
    if not m:
        raise UserError(f"{torque_id[:80]!r} is not a Torque job id (SEQ[.SERVER] or SEQ[INDEX].SERVER)")
    seq, idx, server = m.groups()
    jid = seq + (f"-{idx}" if idx else "")
    if server:
        jid += "." + server.split(".")[0][:64 - len(jid) - 1]
    return jid


def sequence(torque_id: str) -> str:
    """The number Torque names output files with (`NAME.o<SEQ>`; with `-<INDEX>` for an array task)."""
    m = _JOB_ID.fullmatch(torque_id or "")
    if not m:
        raise UserError(f"{torque_id[:80]!r} is not a Torque job id")
    return m.group(1) + (f"-{m.group(2)}" if m.group(2) else "")


# Torque sizes (pbs_resources(7)): an integer with an optional b/kb/mb/gb/tb (bytes) or w/kw/mw/gw/tw
# (words of 8 bytes) suffix, case-insensitive; no suffix = bytes.
_SIZE = re.compile(r"(\d{1,15})([kmgt]?)([bw]?)", re.I)
_SHIFT = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}
MEMORY_KEYS = ("mem", "vmem", "pmem", "pvmem")


def size_bytes(value: str) -> int:
    m = _SIZE.fullmatch(value.strip())
    if not m:
        raise UserError(f"cannot read the job's memory request {value[:40]!r} (Torque size: e.g. 512mb, 2gb)")
    n = int(m.group(1)) << _SHIFT[m.group(2).lower()]
    return n * 8 if m.group(3).lower() == "w" else n


def resources(resource_list: str) -> dict[str, str]:
    """The prologue's resource list (`neednodes=1:ppn=2,nodes=1:ppn=2,walltime=01:00:00,mem=512mb`)."""
    out: dict[str, str] = {}
    for item in resource_list[:8192].split(","):
        k, sep, v = item.partition("=")
        if sep and k.strip():
            out.setdefault(k.strip(), v.strip())
    return out


def ppn(res: dict[str, str], env_ppn: str = "") -> int | None:
    """This node's processors: PBS_NUM_PPN (Torque 6 sets it for the prologue), else `nodes=N:ppn=P`
    (first node spec), else `procs=N`; None when the job named none."""
    for v in (env_ppn, *re.findall(r"(?:^|:)ppn=(\d{1,5})(?::|\+|$)", res.get("nodes", "").split("+")[0]),
              res.get("procs", "")):
        if re.fullmatch(r"\d{1,5}", v or "") and int(v) > 0:
            return int(v)
    return None


def node_count(spec: str) -> int:
    """Nodes in a `-l nodes=` spec as Torque counts them (ctnodes, src/server/resc_def_all.c): per
    `+`-separated part its leading number, else 1 (a host name or property); `#...` adds none."""
    total = 0
    for part in spec.split("+"):
        digits = re.match(r"\s*(\d*)", part).group(1)
        total += 1 if not digits else (int(digits) if len(digits) <= 6 else 10 ** 6)
    return total


def node_total(res: dict[str, str], env_nodes: str = "") -> int:
    """The job's nodes: PBS_NUM_NODES (pbs_mom sets it for the prologue), else the `nodes=` spec's count."""
    if re.fullmatch(r"\d{1,6}", env_nodes or "") and int(env_nodes) > 0:
        return int(env_nodes)
    return node_count(res["nodes"]) if res.get("nodes") else 1


def memory_mib(res: dict[str, str], cpus: int | None) -> int | None:
    """The least memory any of the job's requests grants it (mem, vmem; pmem/pvmem per processor), MiB."""
    found = []
    for k in MEMORY_KEYS:
        if k in res:
            b = size_bytes(res[k])
            found.append(b * (cpus or 1) if k.startswith("p") else b)
    return min(found) >> 20 if found else None


def user_ids(user: str, group: str) -> tuple[pwd.struct_passwd, int]:
    """The job's passwd entry and its effective group's gid (the argv's euser/egroup)."""
    try:
        pw = pwd.getpwnam(user)
    except (KeyError, ValueError):
        raise UserError(f"unknown job user {user[:64]!r}") from None
    try:
        gid = grp.getgrnam(group).gr_gid
    except (KeyError, ValueError):
        raise UserError(f"unknown job group {group[:64]!r}") from None
    return pw, gid


def spooled_script(path: str, torque_id: str, owner_uid: int) -> str | None:
    """The job script as pbs_mom spooled it (`<PBS_HOME>/mom_priv/jobs/<ID>.SC`, the prologue's 8th
    argument since Torque 6), at most SCRIPT_MAX bytes; None for anything else: another name, a link,
    a directory the job's user owns or may write."""
    if not path.startswith("/") or os.path.normpath(path) != path or not path.endswith(".SC"):
        return None
    d = os.path.dirname(path)
    if os.path.basename(d) != "jobs" or os.path.basename(os.path.dirname(d)) != "mom_priv":
        return None
    stem = os.path.basename(path)[:-len(".SC")]   # pbs_mom's file prefix: the job id (or its sequence)
    if stem != torque_id and stem.split(".")[0] != torque_id.split(".")[0]:
        return None
    from vmwrap import safeio

    try:
        st = os.lstat(d)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
            return None
        data = safeio.read_capped(path, SCRIPT_MAX)
    except OSError:
        return None
    return None if data is None else data.decode("utf-8", "surrogateescape")


def marker(line: str) -> bool:
    """Whether a line is vmwrap's wrapped-script marker, of any format (users may not write one)."""
    return line == WRAPPED or line.startswith(WRAPPED + " ")


def wrapped(script: str) -> bool:
    """Whether vmwrap's submit filter wrapped the script. Its marker is the carried request's format:
    `WRAPPED` alone is format 1 (what every filter so far writes), a later one adds ` v=N` (wire.FORMAT);
    a newer format than this node's fails the job naming both (wire.FormatError, a user error)."""
    from vmwrap import wire

    for _, line in directives.leading_comment_block(script):
        if line == WRAPPED:
            return True
        if line.startswith(WRAPPED + " "):
            field = line[len(WRAPPED) + 1:]
            if not field.startswith(wire.VERSION_FIELD + "="):
                raise wire.WireError(f"the wrapped script's marker line is not one vmwrap wrote: {field[:40]!r}")
            wire.format_of(field[len(wire.VERSION_FIELD) + 1:], f"the wrapped script's {WRAPPED} line")
            return True
    return False
