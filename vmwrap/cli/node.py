"""This node: its VMs (`ps`), its health (`doctor`), its node agent and its image cache."""

from __future__ import annotations

import os
import sys
import time

import click

from ..config import Settings
from ..errors import VmwrapError
from .context import echo_json, echo_table, friendly_oserrors, json_option, quiet_option, settings


@click.command()
@click.option("--failed", is_flag=True, help="Guests that died, with where their console and timeline were kept.")
@json_option
@friendly_oserrors
def ps(failed: bool, as_json: bool) -> None:
    """VMs on this node, with the ledger's last event for each job."""
    from .. import domain, evidence
    from ..ledger import Ledger

    s = settings()
    if failed:
        died = evidence.listing(s.state_dir)
        if as_json:
            echo_json([{"job": e["job_id"], "at": e["at"], "evidence": str(e["path"]), "reason": e["reason"]}
                       for e in died])
            return
        echo_table(["JOB", "WHEN", "EVIDENCE", "REASON"],
                   [[e["job_id"], time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["at"])), e["path"], e["reason"]]
                    for e in died])
        return
    ledger = Ledger(s.ledger_path)
    last, booted = ledger.last_events(), ledger.provenance()
    conn = domain.connect(s.libvirt_uri)
    doms = {job: d for d in conn.listAllDomains() if (job := _job_of_domain(d.name())) is not None}
    states = {1: "running", 3: "paused", 5: "shutoff"}
    now = time.time()
    vms = []
    for job, d in sorted(doms.items()):
        ev = last.get(job, {})
        img = booted.get(job, {})
        vms.append({"job": job, "state": states.get(d.state()[0], str(d.state()[0])),
                    "last_event": ev.get("event"), "since_s": round(now - ev["ts"], 1) if ev else None,
                    "image": img.get("image"), "digest": img.get("digest"), "origin": img.get("origin")})
    if as_json:
        echo_json(vms)
        return
    echo_table(["JOB", "STATE", "LAST EVENT", "SINCE", "IMAGE", "DIGEST"],
               [[v["job"], v["state"], v["last_event"] or "-", "-" if v["since_s"] is None else f"{v['since_s']:.0f}s",
                 v["image"] or "-", (v["digest"] or "-")[:19]] for v in vms], right={3})


# vmwrap's own VMs that are no job's: image templates (snapshot.py) and the boot and KVM probes
# (domain.py, accel.py). No scheduler's job id starts so.
NOT_JOBS = ("vmwrap-template-", "vmwrap-probe-", "vmwrap-kvmprobe-")


def _job_of_domain(name: str) -> str | None:
    """The job id a libvirt domain runs, or None when it is not a job's VM.

    Every job VM of this node's libvirtd is listed (on a cluster each node has its own libvirtd)."""
    from ..job import _JOB_ID
    from ..rundir import split_domain_name

    parsed = None if name.startswith(NOT_JOBS) else split_domain_name(name)
    if parsed is None:
        return None
    return parsed[0] if _JOB_ID.match(parsed[0]) else None   # a multi-node job's VM here: vmwrap-JOB@K


@click.command()
@click.option("--reconcile", "reconcile_with", metavar="SCHEDULER", default=None,
              help="Also repair this node (as `vmwrap reconcile SCHEDULER`) when the agent starts and then "
                   "every --reconcile-interval seconds.")
@click.option("--reconcile-interval", type=click.FloatRange(min=10.0), default=300.0, show_default=True,
              help="Seconds between repair passes.")
@friendly_oserrors
def agent(reconcile_with: str | None, reconcile_interval: float) -> None:
    """Run the node agent (root, foreground): lets a job's user pause/resume that job's VM.

    With --reconcile, the node also repairs itself: after a crash or reboot (every VM gone, state dirs
    left) its first pass removes what the jobs the scheduler no longer has left behind."""
    import threading

    from .. import agent as agent_mod
    from .. import daemons

    s = settings()
    if reconcile_with is not None:
        from ..adapter import scheduler

        sched = scheduler(reconcile_with)   # an unknown name is an error now, not in a thread later
        threading.Thread(target=daemons.reconcile, args=(sched, s, reconcile_interval, False),
                         kwargs={"say": lambda line: click.echo(f"reconcile: {line}", err=True)},
                         name="reconcile", daemon=True).start()
    agent_mod.serve(s)


@click.command()
@click.argument("scheduler_name", metavar="SCHEDULER")
@click.option("--dry-run", is_flag=True, help="Only list what would be removed.")
@click.option("--interval", type=float, default=300.0, help="Seconds between passes (loop mode).")
@click.option("--once", is_flag=True, help="One pass, then exit (at boot, from cron, or by hand).")
@friendly_oserrors
def reconcile(scheduler_name: str, dry_run: bool, interval: float, once: bool) -> None:
    """Remove VMs, run dirs, pins and checkpoints of jobs SCHEDULER no longer has (root, on each node).

    Run it once when the node starts (after a crash: every VM gone, state dirs left) and then
    periodically; each removal is a `reconciled` event in the ledger."""
    from .. import daemons
    from ..adapter import scheduler

    sys.exit(daemons.reconcile(scheduler(scheduler_name), settings(), interval, once or dry_run, dry_run,
                               say=click.echo))


@click.command()
@json_option
@friendly_oserrors
def doctor(as_json: bool) -> None:
    """Check this node: libvirt, QEMU, acceleration, catalog, cache. Exit 1 when a check FAILs."""
    checks = _doctor_checks(settings())
    ok = all(c["status"] != "FAIL" for c in checks)
    if as_json:
        echo_json({"ok": ok, "checks": checks})
    else:
        for c in checks:
            click.echo(f"{c['status']:<4} {c['name']}: {c['detail']}")
    sys.exit(0 if ok else 1)


def _doctor_checks(s: Settings) -> list[dict]:
    """Every check as {"status": ok|WARN|FAIL, "name", "detail"}; a FAIL does not stop the next check."""
    from .. import accel, domain, evidence, hostcheck
    from ..catalog import Catalog

    out: list[dict] = []

    def add(status: str, name: str, detail: str) -> None:
        out.append({"status": status, "name": name, "detail": detail})

    try:
        conn = domain.connect(s.libvirt_uri)
        add("ok", "libvirt", f"{s.libvirt_uri} (hypervisor {conn.getVersion()})")
        conn.close()
    except VmwrapError as e:
        add("FAIL", "libvirt", str(e))
    for level, msg in hostcheck.check(s):  # setups that would let a user or a guest reach root
        add(level, "host", msg)
    died = [e for e in evidence.listing(s.state_dir) if e["at"] > time.time() - 86400]
    if died:
        add("WARN", "guests", f"{len(died)} guest(s) died in the last 24 h without an exit status (latest: job "
                              f"{died[0]['job_id']}, {died[0]['path']}); `vmwrap ps --failed` lists them")
    try:
        cat = Catalog.load(s.catalog)
        add("ok", "catalog", f"{s.catalog}: {len(cat.images)} image(s)")
        if all(c["status"] != "FAIL" for c in out) and cat.images:
            img = next(iter(cat.images.values()))
            vt = accel.choose(s, img.kernel.source, img.initrd.source, img.kernel.sha256)
            add("ok", "acceleration", f"domain type {vt!r} "
                                      f"({'KVM verified' if vt == 'kvm' else 'TCG: KVM absent or not working'})")
    except VmwrapError as e:
        add("FAIL", "catalog", str(e))
    for name, d in (("cache_dir", s.cache_dir), ("state_dir", s.state_dir)):
        try:
            os.makedirs(d, exist_ok=True)
            st = os.statvfs(d)
            add("ok", name, f"{d}: {st.f_bavail * st.f_frsize / 2**30:.1f} GiB free")
        except OSError as e:
            add("FAIL", name, f"{d}: {e.strerror or e}")
    if s.workdir_share == "serial":
        level, msg = hostcheck.shared_store(s.checkpoint_dir, ["/", s.state_dir])
        add(level, "checkpoint store shared", msg)
        level, msg = hostcheck.store_identity(s.checkpoint_dir, s.checkpoint_key_file)
        add(level, "checkpoint store identity", msg)
        probe = os.path.join(s.checkpoint_dir, f".doctor.{os.getpid()}")
        try:  # never created here: a missing store is an unmounted one
            with open(probe, "w") as f:
                f.write("x")
            os.unlink(probe)
            st = os.statvfs(s.checkpoint_dir)
            add("ok", "checkpoint store", f"{s.checkpoint_dir}: writable, {st.f_bavail * st.f_frsize / 2**30:.1f} GiB "
                                          "free (must be shared by all nodes for restores elsewhere)")
        except OSError as e:
            add("FAIL", "checkpoint store", f"{s.checkpoint_dir}: {e.strerror or e} (preempted jobs cannot be saved)")
        try:
            from ..checkpoint import Store

            Store(s.checkpoint_dir, s.checkpoint_key_file).key()
            add("ok", "checkpoint key", f"{s.checkpoint_key_file}: root's alone (it must be the same file on every node)")
        except VmwrapError as e:
            add("FAIL", "checkpoint key", str(e))
    else:
        add("ok", "workdir_share", "virtio-9p: VMs cannot be saved; requeued jobs start again from the beginning")
    return out


@click.group()
def cache():
    """This node's image cache."""


def _cache_and_names():
    from ..cache import Cache
    from ..catalog import Catalog

    s = settings()
    names: dict[str, str] = {}
    try:  # the cache is still listed and collected when the catalog is unreadable
        for img in Catalog.load(s.catalog).images.values():
            for key, art in img.artifacts().items():
                names[art.sha256] = f"{img.name}.{key}"
    except VmwrapError:
        pass
    return s, Cache(s.cache_dir, s.cache_max_bytes, s.verify_on_use), names


@cache.command("list")
@json_option
@friendly_oserrors
def cache_list(as_json: bool) -> None:
    """Cached blobs: image, size, pins (jobs), last use."""
    s, c, names = _cache_and_names()
    entries = sorted(c.entries(), key=lambda e: -e.last_use)
    used = sum(e.size for e in entries)
    if as_json:
        echo_json({"blobs": [{"image": names.get(e.sha256), "sha256": e.sha256, "bytes": e.size,
                              "last_use": e.last_use or None, "pinned_by": list(e.pins)} for e in entries],
                   "used_bytes": used, "max_bytes": s.cache_max_bytes, "cache_dir": str(s.cache_dir)})
        return
    now = time.time()
    echo_table(["IMAGE", "SHA256", "MiB", "LAST USE", "PINNED BY"],
               [[names.get(e.sha256, "(not in catalog)"), e.sha256[:12], f"{e.size / 2**20:.1f}",
                 f"{now - e.last_use:.0f}s ago" if e.last_use else "-", ",".join(e.pins) or "-"] for e in entries],
               right={2, 3})
    click.echo(f"{len(entries)} blobs, {used / 2**20:.1f} MiB of {s.cache_max_bytes / 2**20:.0f} MiB")


@cache.command("fetch")
@click.argument("name")
@quiet_option
@friendly_oserrors
def cache_fetch(name: str, quiet: bool) -> None:
    """Fetch an image into this node's cache now (progress on a terminal's stderr)."""
    from ..catalog import Catalog
    from ..progress import progress

    s, c, _ = _cache_and_names()
    img = Catalog.load(s.catalog).images.get(name)
    if img is None:
        raise click.ClickException(f"no image {name!r} in {s.catalog}: `vmwrap image list` shows the names")
    for key, art in img.artifacts().items():
        with progress(f"{name}.{key}", "bytes", total=art.size, quiet=quiet) as report:
            got = c.fetch(art, on_bytes=report)
        click.echo(f"{name}.{key}: {'hit' if got.hit else f'fetched {got.bytes_transferred} bytes'}")


@cache.command("evict")
@click.argument("name")
@friendly_oserrors
def cache_evict(name: str) -> None:
    """Evict an image (or one blob by sha256) unless a job pins it."""
    s, c, names = _cache_and_names()
    shas = [sha for sha, n in names.items() if n.split(".")[0] == name] or \
        [e.sha256 for e in c.entries() if e.sha256.startswith(name.lower()) and len(name) >= 8]
    if not shas:
        raise click.ClickException(f"nothing cached for {name!r}")
    refused = [sha for sha in shas if c.blob(sha).exists() and not c.evict(sha)]
    if refused:
        raise click.ClickException(f"pinned by running or suspended jobs: {', '.join(x[:12] for x in refused)}")
    click.echo(f"evicted {name}")


@cache.command("gc")
@friendly_oserrors
def cache_gc() -> None:
    """Drop unpinned blobs no catalog image uses, and leftovers of crashed fetches."""
    s, c, names = _cache_and_names()
    gone = c.gc(set(names))
    click.echo(f"removed {len(gone)} item(s)" + "".join(f"\n  {g}" for g in gone))
