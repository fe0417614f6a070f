"""This node: its VMs (`ps`), its health (`doctor`), its node agent and its image cache."""

from __future__ import annotations

import os
import sys
import time

import click

from ..errors import VmwrapError
from .context import settings


@click.command()
@click.option("--failed", is_flag=True, help="Guests that died, with where their console and timeline were kept.")
def ps(failed):
    """VMs on this node, with the ledger's last event for each job."""
    from .. import domain, evidence
    from ..ledger import Ledger

    s = settings()
    if failed:
        click.echo(f"{'JOB':<20} {'WHEN':<20} {'EVIDENCE':<50} REASON")
        for e in evidence.listing(s.state_dir):
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["at"]))
            click.echo(f"{e['job_id']:<20} {when:<20} {e['path']:<50} {e['reason']}")
        return
    last = Ledger(s.ledger_path).last_events()
    conn = domain.connect(s.libvirt_uri)
    doms = {d.name(): d for d in conn.listAllDomains() if d.name().startswith("vmwrap-")}
    click.echo(f"{'JOB':<20} {'STATE':<10} {'LAST EVENT':<12} {'SINCE':>8}")
    states = {1: "running", 3: "paused", 5: "shutoff"}
    for name, d in sorted(doms.items()):
        job = name[len("vmwrap-"):]
        ev = last.get(job, {})
        age = f"{time.time() - ev['ts']:.0f}s" if ev else "-"
        click.echo(f"{job:<20} {states.get(d.state()[0], str(d.state()[0])):<10} {ev.get('event', '-'):<12} {age:>8}")


@click.command()
def agent():
    """Run the node agent (root, foreground): lets a job's user pause/resume that job's VM."""
    from .. import agent as agent_mod

    agent_mod.serve(settings())


@click.command()
@click.argument("scheduler_name", metavar="SCHEDULER")
@click.option("--dry-run", is_flag=True, help="Only list what would be removed.")
@click.option("--interval", type=float, default=300.0, help="Seconds between passes (loop mode).")
@click.option("--once", is_flag=True, help="One pass, then exit (at boot, from cron, or by hand).")
def reconcile(scheduler_name, dry_run, interval, once):
    """Remove VMs, run dirs, pins and checkpoints of jobs SCHEDULER no longer has (root, on each node).

    Run it once when the node starts (after a crash: every VM gone, state dirs left) and then
    periodically; each removal is a `reconciled` event in the ledger."""
    from .. import daemons
    from ..adapter import scheduler

    sys.exit(daemons.reconcile(scheduler(scheduler_name), settings(), interval, once or dry_run, dry_run,
                               say=click.echo))


@click.command()
def doctor():
    """Check this node: libvirt, QEMU, acceleration, catalog, cache."""
    from .. import accel, domain
    from ..catalog import Catalog

    # Each check's failure is a FAIL line and the next check still runs; the exit code sums them up.
    s = settings()
    ok = True
    try:
        conn = domain.connect(s.libvirt_uri)
        click.echo(f"ok   libvirt {s.libvirt_uri} (hypervisor {conn.getVersion()})")
        conn.close()
    except VmwrapError as e:
        click.echo(f"FAIL {e}")
        ok = False
    from .. import hostcheck

    for level, msg in hostcheck.check(s):  # setups that would let a user or a guest reach root
        click.echo(f"{level:<4} {msg}")
        ok = ok and level != "FAIL"
    from .. import evidence

    died = [e for e in evidence.listing(s.state_dir) if e["at"] > time.time() - 86400]
    if died:
        click.echo(f"WARN {len(died)} guest(s) died in the last 24 h without an exit status (latest: job "
                   f"{died[0]['job_id']}, {died[0]['path']}); `vmwrap ps --failed` lists them")
    try:
        cat = Catalog.load(s.catalog)
        click.echo(f"ok   catalog {s.catalog}: {len(cat.images)} image(s)")
        if ok and cat.images:
            img = next(iter(cat.images.values()))
            vt = accel.choose(s, img.kernel.source, img.initrd.source, img.kernel.sha256)
            click.echo(f"ok   acceleration: domain type {vt!r} ({'KVM verified' if vt == 'kvm' else 'TCG: KVM absent or not working'})")
    except VmwrapError as e:
        click.echo(f"FAIL {e}")
        ok = False
    for d in (s.cache_dir, s.state_dir):
        os.makedirs(d, exist_ok=True)
        st = os.statvfs(d)
        click.echo(f"ok   {d}: {st.f_bavail * st.f_frsize / 2**30:.1f} GiB free")
    if s.workdir_share == "serial":
        probe = os.path.join(s.checkpoint_dir, f".doctor.{os.getpid()}")
        try:
            os.makedirs(s.checkpoint_dir, exist_ok=True)
            with open(probe, "w") as f:
                f.write("x")
            os.unlink(probe)
            st = os.statvfs(s.checkpoint_dir)
            click.echo(f"ok   checkpoint store {s.checkpoint_dir}: writable, {st.f_bavail * st.f_frsize / 2**30:.1f} GiB "
                       "free (must be shared by all nodes for restores elsewhere)")
        except OSError as e:
            click.echo(f"FAIL checkpoint store {s.checkpoint_dir}: {e} (preempted jobs cannot be saved)")
            ok = False
        try:
            from ..checkpoint import Store

            Store(s.checkpoint_dir, s.checkpoint_key_file).key()
            click.echo(f"ok   checkpoint key {s.checkpoint_key_file}: root's alone (it must be the same file on every node)")
        except VmwrapError as e:
            click.echo(f"FAIL {e}")
            ok = False
    else:
        click.echo("ok   workdir_share = virtio-9p: VMs cannot be saved; requeued jobs start again from the beginning")
    sys.exit(0 if ok else 1)


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
def cache_list():
    """Cached blobs: image, size, pins (jobs), last use."""
    s, c, names = _cache_and_names()
    entries = c.entries()
    click.echo(f"{'IMAGE':<28} {'SHA256':<14} {'MiB':>8} {'LAST USE':>10}  PINNED BY")
    for e in sorted(entries, key=lambda e: -e.last_use):
        age = f"{time.time() - e.last_use:.0f}s ago" if e.last_use else "-"
        click.echo(f"{names.get(e.sha256, '(not in catalog)'):<28} {e.sha256[:12]:<14} {e.size / 2**20:8.1f} "
                   f"{age:>10}  {','.join(e.pins) or '-'}")
    used = sum(e.size for e in entries)
    click.echo(f"{len(entries)} blobs, {used / 2**20:.1f} MiB of {s.cache_max_bytes / 2**20:.0f} MiB")


@cache.command("fetch")
@click.argument("name")
def cache_fetch(name):
    """Fetch an image into this node's cache now."""
    from ..catalog import Catalog

    s, c, _ = _cache_and_names()
    img = Catalog.load(s.catalog).images.get(name)
    if img is None:
        raise click.ClickException(f"no image {name!r} in {s.catalog}")
    for key, art in img.artifacts().items():
        got = c.fetch(art)
        click.echo(f"{name}.{key}: {'hit' if got.hit else f'fetched {got.bytes_transferred} bytes'}")


@cache.command("evict")
@click.argument("name")
def cache_evict(name):
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
def cache_gc():
    """Drop unpinned blobs no catalog image uses, and leftovers of crashed fetches."""
    s, c, names = _cache_and_names()
    gone = c.gc(set(names))
    click.echo(f"removed {len(gone)} item(s)" + "".join(f"\n  {g}" for g in gone))
