"""Grid Engine's facts and actions for the core daemon loops (gap planner, prestager, checkpoint GC).

Read from machine-readable output only: `qrstat -xml` (advance reservations), `qstat -xml` (the
queue, queue instances, a job's context and hard requests) and the scheduler's `schedule` file
(sge_schedule(5), written when sched_conf `params` has MONITOR=1: the reservations GE's own
backfilling makes for `-R y` jobs, i.e. where and when it will start them). Actions: `qalter -l`
(a pending job's h_rt) and `qmod -f -rj` (reschedule a running job: its epilog saves the VM).

Run as root next to sge_qmaster (the planner) or on each execution host (the prestager); every
command by absolute path with the cell's own SGE_ROOT/SGE_CELL and no variable of the caller's.
Users write job names, contexts and requests: a record that does not read as expected leaves its
job out with a logged reason, never fails a pass.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import os
import re
import subprocess
import time
import xml.etree.ElementTree as ET

from vmwrap import sizing, wire
from vmwrap.config import Settings
from vmwrap.errors import UserError
from vmwrap.plan import QueuedJob, Reservation, Timing

from .hooks import MEMORY_REQUESTS, memory_bytes

log = logging.getLogger("vmwrap.sge")
SGE_ROOT = "/var/lib/gridengine"
SGE_CELL = "default"
BIN = "/usr/bin"
ENV = {"SGE_ROOT": SGE_ROOT, "SGE_CELL": SGE_CELL, "PATH": "/usr/sbin:/usr/bin:/bin", "LC_ALL": "C"}
SCHEDULE = os.path.join(SGE_ROOT, SGE_CELL, "common", "schedule")
SCHEDULE_TAIL = 4 << 20      # the file grows every interval: only its end is read
OUTPUT_MAX = 64 << 20        # a command's output beyond this is refused, not parsed

_ID = re.compile(r"\d{1,10}")
_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,255}")      # queue, host, complex names as GE allows them
_VALUE = re.compile(r"[A-Za-z0-9_.:+-]{1,64}")      # a hard request's value passed back to qalter


def run(*argv: str, check: bool = True) -> str:
    """stdout of a Grid Engine command (a name in BIN); RuntimeError with its message if it failed."""
    exe = os.path.join(BIN, os.path.basename(argv[0]))
    r = subprocess.run([exe, *argv[1:]], capture_output=True, text=True, errors="replace", timeout=60,
                       env=ENV, cwd="/")
    if r.returncode != 0 and check:
        raise RuntimeError(f"{' '.join(argv)}: {(r.stderr.strip() or r.stdout.strip())[:300]}")
    if len(r.stdout) > OUTPUT_MAX:
        raise RuntimeError(f"{argv[0]}: {len(r.stdout)} bytes of output, more than {OUTPUT_MAX}")
    return r.stdout


# 8.1.9's `qstat -xml -j` names each array task's element `<JATASK:      2.>`, which is not XML.
_JATASK = re.compile(r"<(/?)JATASK:[ \t]{0,40}\d{1,10}\.>")


def _xml(text: str, what: str) -> ET.Element:
    try:
        return ET.fromstring(_JATASK.sub(r"<\1JATASK>", text))
    except ET.ParseError as e:
        raise RuntimeError(f"{what}: not XML: {e}") from None


_warned: dict[str, str] = {}


def _warn_once(job: str, what: str) -> None:
    """Log a job left out or taken as plain once per reason (a pass runs every few seconds)."""
    if _warned.get(job) != what:
        _warned[job] = what
        log.warning("job %s: %s", job, what)


def stamp(text: str | None) -> float | None:
    """Grid Engine's XML time (local, 2026-12-03T05:30:00, maybe with .mmm) as epoch seconds."""
    m = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.\d{1,6})?", (text or "").strip())
    return time.mktime(time.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S")) if m else None


def host_of(queue_instance: str) -> str | None:
    """'vmwrap.q@node1' -> 'node1'."""
    q, sep, host = queue_instance.partition("@")
    return host if sep and q and _NAME.fullmatch(host) else None


# -- advance reservations ----------------------------------------------------------------------

def reservations() -> list[Reservation]:
    """ARs not yet over, with the hosts of their granted queue instances. No one's job but one
    submitted into an AR (`-ar ID`) runs on its slots during it, so `users` stays empty."""
    ids = [el.findtext("id", "") for el in _xml(run("qrstat", "-xml", "-u", "*"), "qrstat -xml").iter("ar_summary")]
    ids = [i.strip() for i in ids if _ID.fullmatch(i.strip())]
    if not ids:
        return []
    out = []
    found = []
    for i in ids:   # one at a time: an AR that ended since the summary makes qrstat -ar fail
        try:
            found += _xml(run("qrstat", "-xml", "-ar", i), "qrstat -xml -ar").iter("ar_summary")
        except RuntimeError as e:
            log.info("advance reservation %s: %s", i, str(e)[:200])
    for ar in found:
        start, end = stamp(ar.findtext("start_time")), stamp(ar.findtext("end_time"))
        if start is None or end is None:
            continue
        nodes = frozenset(h for h in (host_of(g.get("queue_instance", ""))
                                      for g in ar.iter("granted_slots")) if h)
        # the name (qrsub -N) is its owner's: it only names the reservation in the planner's log
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", (ar.findtext("name") or "").strip())[:64]
        out.append(Reservation(name or f"ar{(ar.findtext('id') or '').strip()}", start, end, nodes))
    return out


# -- queue instances and jobs ------------------------------------------------------------------

_UNUSABLE = set("dEsSDCuaAo")   # disabled, error, suspended (also by calendar or subordinate), unknown, alarm


def idle_hosts() -> dict[str, set[str]]:
    """Cluster queue -> hosts where its instance runs nothing and can take jobs."""
    out: dict[str, set[str]] = {}
    root = _xml(run("qstat", "-xml", "-f", "-u", "*"), "qstat -xml -f")
    for q in root.iter("Queue-List"):
        name = q.findtext("name", "")
        host = host_of(name)
        try:
            used = int(q.findtext("slots_used", "0")) + int(q.findtext("slots_resv", "0") or 0)
        except ValueError:
            continue
        state = q.findtext("state", "") or ""
        if host and used == 0 and not (set(state) & _UNUSABLE):
            out.setdefault(name.partition("@")[0], set()).add(host)
    return out


def h_rt_seconds(value: str) -> float:
    """A GE time (sge_types(5): seconds, or [[h:]m:]s, or INFINITY) in seconds."""
    v = value.strip()
    if v.upper() in ("INFINITY", "INF"):
        return math.inf
    if not re.fullmatch(r"\d{1,9}(?::\d{1,9}){0,2}", v):
        raise ValueError(f"not a time: {v[:40]!r}")
    secs = 0
    for part in v.split(":"):
        secs = secs * 60 + int(part)
    return float(secs)


def job_details(ids: list[str]) -> dict[str, dict]:
    """For each job: its hard requests (name -> value), context (name -> value) and AR id, from
    `qstat -xml -j` (GE's own record; users wrote the values, so they are only data here)."""
    if not ids:
        return {}
    # a job that ended since the caller saw it makes qstat exit 1, with the others' records
    root = _xml(run("qstat", "-xml", "-j", ",".join(ids), check=False) or "<none/>", "qstat -xml -j")
    out: dict[str, dict] = {}
    for el in root.iter():
        num = el.find("JB_job_number")
        if num is None or not _ID.fullmatch((num.text or "").strip()):
            continue
        hard: dict[str, str] = {}
        ctx: dict[str, set[str]] = {}
        lst = el.find("JB_hard_resource_list")
        for ce in (lst.iter() if lst is not None else ()):
            name, val = ce.findtext("CE_name"), ce.findtext("CE_stringval")
            if name and val is not None:
                hard[name.strip()] = val.strip()
        lst = el.find("JB_context")
        for va in (lst.iter() if lst is not None else ()):
            name = va.findtext("VA_variable")
            if name:
                ctx.setdefault(name.strip(), set()).add((va.findtext("VA_value") or "").strip())
        out[num.text.strip()] = {"hard": hard, "context": ctx, "ar": (el.findtext("JB_ar") or "").strip()}
    return out


def image_of(jid: str, details: dict) -> str | None:
    """The job's vmwrap_image context (set by the JSV; `qalter -ac` may change it): None for a job
    without a VM; UserError for two names or one that is not an image name."""
    return wire.decode_context(f"{k}={v}" for k, vs in details.get("context", {}).items() for v in vs)


def queue(settings: Settings, now: float) -> list[QueuedJob]:
    """Pending and running jobs in GE's priority order. A job's VM memory is sized as the launcher
    does it (the script's --memory, which the JSV copied into the job context, else the image's or
    the site's; its hard memory request per slot caps it). A job whose context no longer reads as
    expected (`qalter -ac`) is left out of the plan with a logged reason."""
    from vmwrap.catalog import Catalog

    root = _xml(run("qstat", "-xml", "-r", "-u", "*", "-s", "pr"), "qstat -xml -r")
    rows = []
    for j in root.iter("job_list"):
        jid = (j.findtext("JB_job_number") or "").strip()
        if not _ID.fullmatch(jid):
            _warn_once(jid[:20], "left out of the plan: no job number qstat should print")
            continue
        if j.findtext("tasks"):
            _warn_once(jid, "left out of the plan: an array job")
            continue
        rows.append((jid, j))
    details = job_details([jid for jid, _ in rows])
    idle = idle_hosts()
    try:
        images = Catalog.load(settings.catalog).images
    except Exception:
        images = {}
    out = []
    for jid, j in rows:
        try:
            out.append(_queued(settings, images, idle, details.get(jid, {}), jid, j))
        except (TypeError, ValueError, AttributeError, KeyError, UserError) as e:
            _warn_once(jid, f"left out of the plan: its qstat record does not read as expected ({e})")
    return [q for *_, q in sorted(out, key=lambda t: (t[0], t[1]))]


def _queued(settings: Settings, images: dict, idle: dict[str, set[str]], d: dict, jid: str, j: ET.Element):
    state_s = (j.findtext("state") or "").strip()   # GE's letters: q queued, w waiting, h hold, r running...
    state = ("running" if ("r" in state_s or "t" in state_s) and not set(state_s) & set("sSTd") else
             "pending" if "q" in state_s else "other")
    try:
        image = image_of(jid, d)
    except UserError as e:
        _warn_once(jid, f"taken as a job without a VM: {e}")
        image = None
    hard = d.get("hard", {})
    slots = max(1, int(j.findtext("slots") or 1))
    items = [f"{k}={v}" for k, vs in d.get("context", {}).items() for v in vs]
    requested = wire.decode_context_memory(items) if image else None   # the JSV's copy of --memory
    mem = float(sizing.memory_mib(requested, images.get(image or ""), settings)[0])
    caps = [memory_bytes(v) for k, v in hard.items() if k in MEMORY_REQUESTS]
    caps = [c * slots / 2**20 for c in caps if c is not None]
    if caps:
        mem = min([mem, *caps])
    queues = [q.text.strip() for q in j.iter("hard_req_queue") if q.text and _NAME.fullmatch(q.text.strip())]
    usable = set().union(*(idle.get(q, set()) for q in (queues or idle)))
    limit = h_rt_seconds(hard["h_rt"]) if "h_rt" in hard else math.inf
    start = stamp(j.findtext("JAT_start_time")) if state == "running" else None
    prio = float(j.findtext("JAT_prio") or 0.0)
    return (-prio, int(jid), QueuedJob(
        job=jid, user=j.findtext("JB_owner") or "", partition=queues[0] if len(queues) == 1 else "",
        nodes=1, limit_s=limit, mem_mb=mem,
        saveable=image is not None and settings.workdir_share == "serial" and j.find("requested_PE") is None,
        state=state, start=start, idle=frozenset(usable) if state == "pending" else frozenset(),
        eligible=state == "pending" and not set(state_s) & set("hE"), reservation=d.get("ar", "") if d.get("ar", "") not in ("", "0") else ""))


def _ge_time(text: str, key: str, default: float) -> float:
    """A `key  [[h:]m:]s` line of qconf output in seconds."""
    m = re.search(rf"^{key}\s+(\d{{1,6}}(?::\d{{1,2}}){{0,2}})\s*$", text, re.M)
    return h_rt_seconds(m.group(1)) if m else default


def duration_offset(sched: str) -> float:
    """sched_conf `params` DURATION_OFFSET=time (sge_sched_conf(5)); 60 s when not set."""
    m = re.search(r"^params\s+(.*)$", sched, re.M)
    for item in re.split(r"[,\s]+", m.group(1) if m else ""):
        k, _, v = item.partition("=")
        if k.upper() == "DURATION_OFFSET":
            try:
                return h_rt_seconds(v)
            except ValueError:
                break
    return 60.0


def timing() -> Timing:
    """GE plans a job's slots busy until h_rt + DURATION_OFFSET (sched_conf params, 60 s by default)
    and schedules every schedule_interval; h_rt counts seconds. A rescheduled job's old run is
    killed at its execd's next load report (load_report_time, 40 s by default)."""
    sched = run("qconf", "-ssconf")
    conf = run("qconf", "-sconf", "global")
    return Timing(kill_s=max(5.0, duration_offset(sched)),
                  pass_s=_ge_time(sched, "schedule_interval", 15.0), limit_unit_s=1.0,
                  vacate_s=_ge_time(conf, "load_report_time", 40.0))


def set_time_limit(job: str, seconds: float) -> None:
    """`qalter -l` replaces the whole hard resource list: the others are passed back as they are."""
    if not _ID.fullmatch(job):
        raise RuntimeError(f"not a Grid Engine job id: {job[:20]!r}")
    hard = job_details([job]).get(job, {}).get("hard", {})
    keep = []
    for k, v in hard.items():
        if k == "h_rt":
            continue
        if not (_NAME.fullmatch(k) and _VALUE.fullmatch(v)):
            raise RuntimeError(f"job {job}: its request {k[:40]}={v[:40]!r} cannot be passed back to qalter")
        keep.append(f"{k}={v}")
    limit = "INFINITY" if math.isinf(seconds) else str(max(1, int(seconds)))
    run("qalter", "-l", ",".join([*keep, f"h_rt={limit}"]), job)


def reschedule(job: str) -> None:
    """`qmod -f -rj`: the running job goes back to the queue (forced: it need not be rerunnable)."""
    if not _ID.fullmatch(job):
        raise RuntimeError(f"not a Grid Engine job id: {job[:20]!r}")
    run("qmod", "-f", "-rj", job)


# -- prestage: where and when GE will start jobs ----------------------------------------------------

def schedule_tail(path: str | None = None) -> list[str]:
    """The lines of the last scheduling interval in the schedule file (sge_schedule(5)), or []
    when the file is missing (MONITOR is off). qmaster writes it; nothing of a user's is in it."""
    try:
        fd = os.open(path or SCHEDULE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return []
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        f.seek(max(0, size - SCHEDULE_TAIL))
        data = f.read(SCHEDULE_TAIL).decode("ascii", "replace")
    lines = data.splitlines()
    marks = [i for i, ln in enumerate(lines) if ln.strip() == "::::::::"]
    # the interval being written may be incomplete: take the last complete one
    if len(marks) >= 2:
        return lines[marks[-2] + 1:marks[-1]]
    return []


def reserved_starts(lines: list[str], now: float) -> dict[str, tuple[float, set[str]]]:
    """Job -> (planned start, hosts) from RESERVING lines whose start is still ahead."""
    out: dict[str, tuple[float, set[str]]] = {}
    for ln in lines:
        f = ln.split(":")
        if len(f) < 8 or f[2] != "RESERVING" or not _ID.fullmatch(f[0]) or f[0] == "0" or not f[3].isdigit():
            continue
        start = float(f[3])
        if start <= now:
            continue
        level, obj = f[5], f[6]
        host = host_of(obj) if level == "Q" else obj if level == "H" and _NAME.fullmatch(obj) and obj != "global" else None
        if host is None:
            continue
        s, hosts = out.setdefault(f[0], (start, set()))
        hosts.add(host)
    return out


def pending(now: float | None = None) -> list[dict]:
    """VM jobs GE will start next, where and when it reserved resources for them: {job, image, start, nodes}."""
    now = time.time() if now is None else now
    planned = reserved_starts(schedule_tail(), now)
    if not planned:
        return []
    details = job_details(sorted(planned))
    out = []
    for jid, (start, hosts) in sorted(planned.items()):
        try:
            image = image_of(jid, details.get(jid, {}))
        except UserError as e:
            _warn_once(jid, f"not prestaged: {e}")
            continue
        if image:
            out.append({"job": jid, "image": image, "start": start, "nodes": sorted(hosts)})
    return out


def still_queued():
    """For checkpoint GC: a job id GE still has (any state). GE unreachable: keep everything."""
    try:
        root = _xml(run("qstat", "-xml", "-u", "*", "-s", "a"), "qstat -xml")
    except RuntimeError:
        return lambda j: True
    have = {(j.findtext("JB_job_number") or "").strip() for j in root.iter("job_list")}
    return lambda j: j.split(".")[0] in have


# -- cache-aware placement: the images a host holds, as a host-level complex ----------------------
# A STRING complex (sge_complex(5), `==` matches the request as a wildcard pattern against the host's
# value): each host's prestager sets `vmwrap_cached=+img1+img2+` in its exechost complex_values and
# the JSV gives a VM job the soft request `vmwrap_cached=*+IMAGE+*`, so GE prefers a host holding its
# image (a soft request is never required: a job still starts where nothing is cached). '+' is in no
# image name and literal in GE's patterns; image names have no pattern characters.

CACHED = "vmwrap_cached"
CACHED_COMPLEX = f"{CACHED:<20} vmwc       STRING      ==    YES         NO         NONE     0"
CACHED_VALUE_MAX = 4000        # a longer complex value is cut at a whole name (logged)
_SC_MAX_AGE = 60.0             # a long-lived server JSV re-reads the complex list this often
_sc_seen: list = []            # [(monotonic time, defined)]


def _note_once(key: str, what: str) -> None:
    if _warned.get(key) != what:
        _warned[key] = what
        log.warning("%s", what)


def cached_value(images: list[str]) -> str:
    """The complex value naming `images` (invalid names are left out with a logged reason)."""
    from vmwrap.directives import check_image_name

    names = []
    for i in sorted(set(images)):
        try:
            names.append(check_image_name(i))
        except UserError as e:
            _note_once(f"image {i[:64]!r}", f"not published as cached: {e}")
    value = "+"
    for n in names:
        if len(value) + len(n) + 1 > CACHED_VALUE_MAX:
            _note_once("publish", f"{CACHED}: {len(names)} images do not fit into {CACHED_VALUE_MAX} characters; "
                                  f"published up to {n!r} (exclusive)")
            break
        value += n + "+"
    return value


def soft_request(image: str) -> str:
    """The JSV's soft request for `image` (validated: it goes into the job's resource list)."""
    from vmwrap.directives import check_image_name

    return f"{CACHED}=*+{check_image_name(image)}+*"


def cached_complex_defined() -> bool:
    """Whether the cell has the vmwrap_cached complex (qsub refuses a request naming an unknown one).
    Cached for a minute; unknown (qconf failed) counts as not defined."""
    now = time.monotonic()
    if _sc_seen and now - _sc_seen[0][0] < _SC_MAX_AGE:
        return _sc_seen[0][1]
    try:
        defined = any(ln.split()[:1] == [CACHED] for ln in run("qconf", "-sc").splitlines())
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        log.warning("cannot read the complex list: %s", str(e)[:200])
        defined = False
    _sc_seen[:] = [(now, defined)]
    return defined


def pe_allocation_rules(pattern: str) -> dict[str, str]:
    """allocation_rule of each parallel environment a `-pe` name selects (GE takes wildcards there:
    `-pe mpi* 4` may get any PE whose name matches). RuntimeError when qconf cannot answer."""
    return {n: s["allocation_rule"] for n, s in pe_settings(pattern).items() if "allocation_rule" in s}


def pe_settings(pattern: str) -> dict[str, dict[str, str]]:
    """allocation_rule and control_slaves of each parallel environment a `-pe` name selects. A VM
    job may span hosts only in a PE with control_slaves TRUE: its other hosts' VMs are booted by the
    job's first `qrsh -inherit` task there (no prolog runs on a slave host)."""
    if not _NAME.fullmatch(pattern.replace("*", "x").replace("?", "x")):
        raise RuntimeError(f"{pattern[:64]!r} is not a parallel environment name")
    names = [n for n in run("qconf", "-spl").split() if _NAME.fullmatch(n) and fnmatch.fnmatchcase(n, pattern)]
    out: dict[str, dict[str, str]] = {}
    for n in names:
        keep = {}
        for ln in run("qconf", "-sp", n).splitlines():
            key, _, value = ln.strip().partition(" ")
            if key in ("allocation_rule", "control_slaves"):
                keep[key] = value.strip()
        out[n] = keep
    return out


def allocation_from_xml(text: str, job: str, task: str | None = None) -> list[tuple[str, int]]:
    """(host, slots) of a running job (of its array task `task`) from `qstat -g t -u '*' -xml`, one
    entry per host (a host's queue instances summed), the MASTER task's host first. [] when qstat does
    not list it running."""
    if not _ID.fullmatch(job) or (task is not None and not _ID.fullmatch(task)):
        raise RuntimeError(f"{job[:20]!r}.{(task or '')[:20]!r} is not a job id")
    hosts: dict[str, int] = {}
    master = None
    for j in _xml(text, "qstat -g t -xml").iter("job_list"):
        if (j.findtext("JB_job_number") or "").strip() != job or (j.findtext("tasks") or "").strip() != (task or ""):
            continue
        host = host_of((j.findtext("queue_name") or "").strip())
        slots = (j.findtext("slots") or "").strip()
        if host is None or not slots.isdigit() or len(slots) > 6:
            raise RuntimeError(f"job {job}: unreadable queue instance or slots in qstat -g t")
        hosts[host] = hosts.get(host, 0) + int(slots)
        if (j.findtext("master") or "").strip() == "MASTER" and master is None:
            master = host
    if master is None:
        return []
    return [(master, hosts[master])] + [(h, n) for h, n in hosts.items() if h != master]


def start_from_xml(text: str, job: str, task: str | None = None) -> str:
    """When qmaster started this run of `job` (its MASTER task's JAT_start_time in `qstat -g t -xml`);
    '' when qstat does not list it running. A run started again is another run."""
    for j in _xml(text, "qstat -g t -xml").iter("job_list"):
        if ((j.findtext("JB_job_number") or "").strip() == job and (j.findtext("tasks") or "").strip() == (task or "")
                and (j.findtext("master") or "").strip() == "MASTER"):
            return (j.findtext("JAT_start_time") or "").strip()[:64]
    return ""


def job_run(job: str, task: str | None = None) -> tuple[list[tuple[str, int]], str]:
    """job_allocation and start_from_xml from one `qstat -g t`."""
    text = run("qstat", "-g", "t", "-u", "*", "-xml")
    return allocation_from_xml(text, job, task), start_from_xml(text, job, task)


def job_allocation(job: str, task: str | None = None) -> list[tuple[str, int]]:
    """Where qmaster runs `job` (its array task `task`) and with how many slots per host (see
    allocation_from_xml): what a slave host's VM is sized by, never what the job's own processes say."""
    return allocation_from_xml(run("qstat", "-g", "t", "-u", "*", "-xml"), job, task)


def host_complex_values(text: str) -> dict[str, str]:
    """complex_values of `qconf -se HOST` output (continuation lines joined) as name -> value."""
    lines, out = text.replace("\\\n", " ").splitlines(), {}
    for ln in lines:
        key, _, rest = ln.strip().partition(" ")
        if key == "complex_values":
            for item in rest.replace(" ", "").split(","):
                k, sep, v = item.partition("=")
                if sep:
                    out[k] = v
    return out


def publish_cached(node: str, images: list[str]) -> None:
    """Set `node`'s vmwrap_cached to `images` (qconf -mattr, only when it changed; other complex
    values are kept). Needs the complex defined and this host an admin host (qconf -ah)."""
    if not _NAME.fullmatch(node):
        raise RuntimeError(f"not a Grid Engine host name: {node[:60]!r}")
    if not cached_complex_defined():
        _note_once("publish", f"the complex {CACHED} is not defined: images cached here are not published "
                              "(`vmwrap config render sge` shows the qconf -mc line)")
        return
    value = cached_value(images)
    if host_complex_values(run("qconf", "-se", node)).get(CACHED) == value:
        return
    run("qconf", "-mattr", "exechost", "complex_values", f"{CACHED}={value}", node)
    log.info("published %s=%s for %s", CACHED, value, node)


# -- vmwrap drain: the jobs on a host, and keeping new ones off it ---------------------------------

def _check_host(host: str) -> None:
    if not _NAME.fullmatch(host) or "@" in host:
        raise RuntimeError(f"invalid Grid Engine host name {host[:80]!r}")
    if run("qconf", "-se", host, check=False).strip() == "":   # qconf prints why on stderr
        raise RuntimeError(f"Grid Engine has no execution host {host!r}")


def host_jobs(host: str) -> dict[str, bool]:
    """Jobs running (or suspended) in `host`'s queue instances: id -> whether it has a VM (its
    vmwrap_image context, which the JSV sets). Array tasks are listed as 'job.task'."""
    _check_host(host)
    root = _xml(run("qstat", "-xml", "-f", "-u", "*", "-s", "rs"), "qstat -xml -f")
    found: dict[str, str] = {}
    for q in root.iter("Queue-List"):
        if host_of(q.findtext("name", "")) != host:
            continue
        for j in q.iter("job_list"):
            jid = (j.findtext("JB_job_number") or "").strip()
            task = (j.findtext("tasks") or "").strip()
            if _ID.fullmatch(jid):
                found[f"{jid}.{task}" if _ID.fullmatch(task) else jid] = jid
    details = job_details(sorted(set(found.values())))
    out = {}
    for key, jid in found.items():
        try:
            out[key] = image_of(jid, details.get(jid, {})) is not None
        except UserError as e:
            _warn_once(jid, f"taken as a job without a VM: {e}")
            out[key] = False
    return out


def disable_host(host: str) -> None:
    """`qmod -d '*@host'`: every queue instance on the host takes no new job; running ones go on."""
    _check_host(host)
    run("qmod", "-d", f"*@{host}")
