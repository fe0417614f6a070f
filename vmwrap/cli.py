"""The `vmwrap` command: what a scheduler runs as the job payload, and what an admin types."""

from __future__ import annotations

import os
import pwd
import sys
import time

import click

from . import config as config_mod
from .errors import VmwrapError


_CONFIG_PATH: str | None = None  # --config, kept here: root hooks replace os.environ (vmwrap.rootenv)


def _settings(hook: bool = False):
    """The settings of --config, else $VMWRAP_CONFIG, else the default. Scheduler hooks (`hook`) never
    take the path from the environment: Grid Engine hands its hooks the job's `qsub -v` variables."""
    try:
        return config_mod.load(_CONFIG_PATH, from_env=not hook)
    except VmwrapError as e:
        raise click.ClickException(str(e))


class _Obj:
    @staticmethod
    def settings(hook: bool = False):
        return _settings(hook)


@click.group()
@click.version_option()
@click.option("--config", "config_path", default=None, metavar="FILE",
              help="Settings file (default $VMWRAP_CONFIG or /etc/vmwrap/vmwrap.toml; scheduler hooks ignore "
                   "$VMWRAP_CONFIG); %n = node name.")
@click.pass_context
def main(ctx, config_path) -> None:
    """Run batch jobs in per-job VMs."""
    global _CONFIG_PATH
    _CONFIG_PATH = config_path
    ctx.obj = _Obj()


@main.command(context_settings={"ignore_unknown_options": False})
@click.argument("script", type=click.Path(dir_okay=False))
@click.option("--job-id", default=lambda: f"local-{os.getpid()}", help="Scheduler's job id (names the VM).")
@click.option("--user", "user", default=None, help="Run the job as this user (default: the caller).")
@click.option("--workdir", default=None, help="Job work dir shared into the VM (default: current dir).")
@click.option("--image", default=None, help="Image when the script has no #VMWRAP --image directive.")
@click.option("--cpus", type=int, default=None, help="CPUs allocated by the scheduler (ceiling).")
@click.option("--memory", "memory_mib", type=int, default=None, help="MiB allocated by the scheduler (ceiling).")
@click.option("--scheduler", default="none", help="Scheduler name for the ledger.")
def run(script, job_id, user, workdir, image, cpus, memory_mib, scheduler):
    """Run SCRIPT inside its own VM; exit with its exit code."""
    from .job import Job
    from .launcher import EXIT_FOR
    from .launcher import run as run_job

    try:
        with open(script, encoding="utf-8", errors="surrogateescape") as f:
            text = f.read()
    except OSError as e:
        click.echo(f"vmwrap: error: cannot read job script {script}: {e.strerror}", err=True)
        sys.exit(EXIT_FOR["user"])
    try:
        pw = pwd.getpwnam(user) if user else pwd.getpwuid(os.getuid())
    except KeyError:
        click.echo(f"vmwrap: error: unknown user {user!r}", err=True)
        sys.exit(EXIT_FOR["user"])
    settings = _settings()
    try:
        job = Job(
            job_id=job_id, scheduler=scheduler, user=pw.pw_name, uid=pw.pw_uid, gid=pw.pw_gid,
            work_dir=os.path.abspath(workdir or os.getcwd()), script=text,
            environment=dict(os.environ), cpus=cpus, memory_mib=memory_mib, image=image,
            groups=[g for g in os.getgrouplist(pw.pw_name, pw.pw_gid) if g != pw.pw_gid],
        )
    except VmwrapError as e:
        click.echo(f"vmwrap: error: {e}", err=True)
        sys.exit(EXIT_FOR[e.kind])
    sys.exit(run_job(job, settings))


@main.command()
@click.argument("job_id")
def teardown(job_id):
    """Destroy JOB_ID's VM and remove its files (idempotent; for epilogs and admins)."""
    from .job import Job
    from .launcher import teardown as do_teardown

    Job(job_id=job_id, scheduler="none", user="root", uid=0, gid=0, work_dir="/", script="")  # validates id
    did = do_teardown(job_id, _settings())
    click.echo(f"{job_id}: {'removed' if did else 'nothing to remove'}")


@main.command()
@click.option("--failed", is_flag=True, help="Guests that died, with where their console and timeline were kept.")
def ps(failed):
    """VMs on this node, with the ledger's last event for each job."""
    from . import domain, evidence
    from .ledger import Ledger

    s = _settings()
    if failed:
        click.echo(f"{'JOB':<20} {'WHEN':<20} {'EVIDENCE':<50} REASON")
        for e in evidence.listing(s.state_dir):
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["at"]))
            click.echo(f"{e['job_id']:<20} {when:<20} {e['path']:<50} {e['reason']}")
        return
    last = Ledger(s.ledger_path).last_events()
    try:
        conn = domain.connect(s.libvirt_uri)
        doms = {d.name(): d for d in conn.listAllDomains() if d.name().startswith("vmwrap-")}
    except VmwrapError as e:
        raise click.ClickException(str(e))
    click.echo(f"{'JOB':<20} {'STATE':<10} {'LAST EVENT':<12} {'SINCE':>8}")
    states = {1: "running", 3: "paused", 5: "shutoff"}
    for name, d in sorted(doms.items()):
        job = name[len("vmwrap-"):]
        ev = last.get(job, {})
        age = f"{time.time() - ev['ts']:.0f}s" if ev else "-"
        click.echo(f"{job:<20} {states.get(d.state()[0], str(d.state()[0])):<10} {ev.get('event', '-'):<12} {age:>8}")


@main.command()
def agent():
    """Run the node agent (root, foreground): lets a job's user pause/resume that job's VM."""
    from . import agent as agent_mod

    try:
        agent_mod.serve(_settings())
    except VmwrapError as e:
        raise click.ClickException(str(e))


@main.group()
def image():
    """Images in the catalog: build, add, list, verify, remove."""


@image.command("build")
@click.option("--name", required=True)
@click.option("--kind", type=click.Choice(["busybox", "debootstrap", "initramfs"]), default="busybox",
              help="busybox: tiny root disk (tests); debootstrap: Debian root disk; initramfs: no disk.")
@click.option("--memory", "memory_mib", type=int, default=256)
def image_build(name, kind, memory_mib):
    """Build an appliance from Debian packages and register it in the catalog."""
    from . import appliance
    from .directives import check_image_name

    s = _settings()
    try:
        check_image_name(name)
        t0 = time.monotonic()
        img = appliance.build(name, kind, s.appliance_dir, s.catalog, memory_mib=memory_mib)
    except VmwrapError as e:
        raise click.ClickException(str(e))
    click.echo(f"built {img.name} ({img.description}) in {time.monotonic() - t0:.1f}s -> {s.catalog}")


@image.command("list")
def image_list():
    """Images in the site catalog."""
    from .catalog import Catalog

    s = _settings()
    try:
        cat = Catalog.load(s.catalog)
    except VmwrapError as e:
        raise click.ClickException(str(e))
    for img in cat.images.values():
        size = sum(a.size for a in img.artifacts().values())
        who = ",".join(img.users + ["@" + g for g in img.groups]) or "everyone"
        click.echo(f"{img.name:<20} {size / 2**20:8.1f} MiB  {who:<20} {img.description}")


@image.command("add")
@click.argument("name")
@click.option("--kernel", type=click.Path(exists=True, dir_okay=False), required=True)
@click.option("--initrd", type=click.Path(exists=True, dir_okay=False), required=True)
@click.option("--disk", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--disk-format", type=click.Choice(["qcow2", "raw"]), default="qcow2")
@click.option("--memory", default=None, help="Default memory, e.g. 512M.")
@click.option("--cpus", type=int, default=None)
@click.option("--user", "users", multiple=True, help="May use it (repeat; none and no --group = everyone).")
@click.option("--group", "groups", multiple=True)
@click.option("--description", default="")
def image_add(name, kernel, initrd, disk, disk_format, memory, cpus, users, groups, description):
    """Register existing appliance files (hashed now) in the catalog."""
    from . import appliance
    from .catalog import Image, register
    from .directives import check_image_name, parse_memory
    from pathlib import Path

    s = _settings()
    try:
        check_image_name(name)
        img = Image(name=name, boot="kernel", kernel=appliance.artifact(Path(kernel).resolve()),
                    initrd=appliance.artifact(Path(initrd).resolve()),
                    disk=appliance.artifact(Path(disk).resolve(), disk_format) if disk else None,
                    memory_mib=parse_memory(memory) if memory else None, cpus=cpus,
                    users=list(users), groups=list(groups), description=description)
        register(s.catalog, img)
    except VmwrapError as e:
        raise click.ClickException(str(e))
    click.echo(f"added {name} to {s.catalog}")


@image.command("remove")
@click.argument("name")
def image_remove(name):
    """Remove an image from the catalog (cached copies go with `vmwrap cache gc`)."""
    from .catalog import Catalog, unregister

    s = _settings()
    try:
        if name not in Catalog.load(s.catalog).images:
            raise click.ClickException(f"no image {name!r} in {s.catalog}")
        unregister(s.catalog, name)
    except VmwrapError as e:
        raise click.ClickException(str(e))
    click.echo(f"removed {name} from {s.catalog}")


@image.command("verify")
@click.argument("names", nargs=-1)
def image_verify(names):
    """Re-hash each image's sources against the catalog (all images by default)."""
    import hashlib

    from . import transport
    from .catalog import Catalog

    s = _settings()
    try:
        cat = Catalog.load(s.catalog)
    except VmwrapError as e:
        raise click.ClickException(str(e))
    bad = 0
    for name in names or sorted(cat.images):
        img = cat.images.get(name)
        if img is None:
            click.echo(f"FAIL {name}: not in the catalog")
            bad += 1
            continue
        for key, art in img.artifacts().items():
            h, n = hashlib.sha256(), 0
            try:
                with transport.open_source(art.source) as f:
                    while buf := f.read(1 << 20):
                        h.update(buf)
                        n += len(buf)
                ok = (h.hexdigest(), n) == (art.sha256, art.size)
                msg = "ok" if ok else f"mismatch: {n} bytes, sha256 {h.hexdigest()}"
            except VmwrapError as e:
                ok, msg = False, str(e)
            bad += not ok
            click.echo(f"{'ok  ' if ok else 'FAIL'} {name}.{key}: {msg}")
    sys.exit(1 if bad else 0)


@main.group()
def cache():
    """This node's image cache."""


def _cache_and_names():
    from .cache import Cache
    from .catalog import Catalog

    s = _settings()
    names: dict[str, str] = {}
    try:
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
    from .catalog import Catalog

    s, c, _ = _cache_and_names()
    try:
        img = Catalog.load(s.catalog).images.get(name)
        if img is None:
            raise click.ClickException(f"no image {name!r} in {s.catalog}")
        for key, art in img.artifacts().items():
            got = c.fetch(art)
            click.echo(f"{name}.{key}: {'hit' if got.hit else f'fetched {got.bytes_transferred} bytes'}")
    except VmwrapError as e:
        raise click.ClickException(str(e))


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


@main.group(invoke_without_command=True)
@click.pass_context
def checkpoints(ctx):
    """Saved VMs of preempted/requeued jobs (the shared checkpoint store)."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(checkpoints_list)


@checkpoints.command("list")
def checkpoints_list():
    """Checkpoints: job, size, age, node that saved it, restarts, image."""
    from .checkpoint import Store

    store = Store(_settings().checkpoint_dir)
    items = store.list()
    click.echo(f"{'JOB':<16} {'MiB':>8} {'AGE':>8} {'SAVED ON':<16} {'RESTARTS':>8}  IMAGE")
    for i in items:
        click.echo(f"{i.job_id:<16} {i.bytes / 2**20:8.1f} {time.time() - i.created:7.0f}s {i.node:<16} "
                   f"{i.restarts:>8}  {i.image}")
    lost = sorted(j for j in store.jobs() if store.lost_reason(j))
    for j in lost:
        click.echo(f"{j}: lost: {store.lost_reason(j)}")
    click.echo(f"{len(items)} checkpoints, {sum(i.bytes for i in items) / 2**20:.1f} MiB in {store.root}")


@checkpoints.command("verify")
@click.argument("job_id")
def checkpoints_verify(job_id):
    """Check a checkpoint's files against their recorded sizes and checksums."""
    from .checkpoint import Store

    try:
        s = _settings()
        m = Store(s.checkpoint_dir, s.checkpoint_key_file).verify(job_id)
    except VmwrapError as e:
        raise click.ClickException(str(e))
    click.echo(f"job {job_id}: intact ({len(m['files'])} files, saved on {m['node']})")


@checkpoints.command("delete")
@click.argument("job_ids", nargs=-1, required=True)
def checkpoints_delete(job_ids):
    """Delete checkpoints (the job can then no longer continue where it was saved)."""
    from .checkpoint import Store

    store = Store(_settings().checkpoint_dir)
    for j in job_ids:
        try:
            click.echo(f"{j}: {'deleted' if store.delete(j) else 'no checkpoint'}")
        except VmwrapError as e:
            raise click.ClickException(str(e))


@checkpoints.command("keygen")
def checkpoints_keygen():
    """Create the site's checkpoint key (checkpoint_key_file, root 0600); copy it to every node."""
    from .checkpoint import keygen

    try:
        click.echo(f"created {keygen(_settings().checkpoint_key_file)}: copy it to every node (same owner and mode)")
    except VmwrapError as e:
        raise click.ClickException(str(e))


# The old spelling of `image`, hidden: the same subcommands, with a deprecation notice on stderr.
main.add_command(click.Group("images", commands=image.commands, hidden=True, deprecated=True,
                             help="Deprecated: use `vmwrap image`."))


@main.command()
def doctor():
    """Check this node: libvirt, QEMU, acceleration, catalog, cache."""
    from . import accel, domain
    from .catalog import Catalog

    s = _settings()
    ok = True
    try:
        conn = domain.connect(s.libvirt_uri)
        click.echo(f"ok   libvirt {s.libvirt_uri} (hypervisor {conn.getVersion()})")
        conn.close()
    except VmwrapError as e:
        click.echo(f"FAIL {e}")
        ok = False
    from . import hostcheck

    for level, msg in hostcheck.check(s):  # setups that would let a user or a guest reach root
        click.echo(f"{level:<4} {msg}")
        ok = ok and level != "FAIL"
    from . import evidence

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
            from .checkpoint import Store

            Store(s.checkpoint_dir, s.checkpoint_key_file).key()
            click.echo(f"ok   checkpoint key {s.checkpoint_key_file}: root's alone (it must be the same file on every node)")
        except VmwrapError as e:
            click.echo(f"FAIL {e}")
            ok = False
    else:
        click.echo("ok   workdir_share = virtio-9p: VMs cannot be saved; requeued jobs start again from the beginning")
    sys.exit(0 if ok else 1)


@main.group("config")
def config_group():
    """Render scheduler configuration snippets."""


@config_group.command("render")
@click.argument("scheduler")
@click.option("--lua-out", type=click.Path(dir_okay=False), default=None,
              help="slurm: write job_submit.lua here (default: next to $SLURM_CONF or /etc/slurm).")
@click.option("--vmwrap", "vmwrap_path", default="/usr/local/bin/vmwrap", help="vmwrap as the nodes see it.")
@click.option("--default-image", default=None, help="Run jobs without a directive in this image.")
@click.option("--node-config", default=None, help="Settings file the nodes use (may contain %n).")
def config_render(scheduler, lua_out, vmwrap_path, default_image, node_config):
    """Print SCHEDULER's configuration that enables vmwrap (slurm: slurm.conf lines, and job_submit.lua
    written; sge: the queue and sge_request settings)."""
    from .adapter import scheduler as find

    try:
        adapter = find(scheduler)
        click.echo(adapter.render_config(_settings(), lua_out=lua_out, vmwrap_path=vmwrap_path,
                                         default_image=default_image, node_config=node_config))
    except VmwrapError as e:
        raise click.ClickException(str(e))


@main.command()
@click.option("--swf", type=click.Path(exists=True, dir_okay=False), help="Batch trace (Standard Workload Format).")
@click.option("--lwf", type=click.Path(exists=True, dir_okay=False), help="Advance reservations (Haizea LWF lines).")
@click.option("--synthetic", "synth", is_flag=True, help="Generate a mix instead of reading traces.")
@click.option("--jobs", default=500, show_default=True, help="Synthetic: batch jobs.")
@click.option("--load", default=0.8, show_default=True, help="Synthetic: batch load (share of the cluster).")
@click.option("--ar-share", default=0.1, show_default=True, help="Synthetic: reservations' share of all work.")
@click.option("--ar-nodes", default="4-16", show_default=True, help="Synthetic: AR size range, e.g. 25-48.")
@click.option("--ar-hours", default=2.0, show_default=True, help="Synthetic: mean AR duration (+-30 min).")
@click.option("--configs", "names", default="novm,novm+suspend,vm+predeployed,vm+noreuse,vm+reuse-uniform,vm+reuse-skewed",
              show_default=True, help="Comma-separated configurations (see --list).")
@click.option("--list", "list_configs", is_flag=True, help="List the configurations and exit.")
@click.option("--images", default=None, help="uniform, skewed or an image-popularity file (NAME SIZE_MB WEIGHT "
              "lines); default: each configuration's own.")
@click.option("--nodes", type=int, default=None, help="Nodes (default 144).")
@click.option("--cache-gb", type=float, default=None, help="Image cache per node (default 20).")
@click.option("--bandwidth", type=float, default=None, help="Image link MB/s (default 10).")
@click.option("--suspend-rate", type=float, default=None, help="Save/restore MB/s of VM memory (default 50).")
@click.option("--seed", default=0, show_default=True)
@click.option("--format", "fmt", type=click.Choice(["text", "csv", "json"]), default="text", show_default=True)
@click.option("--plot-dir", type=click.Path(file_okay=False), default=None, help="Write utilization.png and comparison.png here.")
@click.option("--check", is_flag=True, help="Check invariants after every event (slower).")
@click.option("--swf-cancelled", type=click.Choice(["queue", "skip"]), default="queue", show_default=True,
              help="SWF jobs cancelled while waiting: queue them until their user gave up (as HPDC'08), or skip them.")
def simulate(swf, lwf, synth, jobs, load, ar_share, ar_nodes, ar_hours, names, list_configs, images, nodes,
             cache_gb, bandwidth, suspend_rate, seed, fmt, plot_dir, check, swf_cancelled):
    """What per-job VMs, image caching and suspend/resume would do to a workload (trace-driven).

    Prints, per configuration, when the last batch job finishes (and how much later than with no
    reservations and no VMs), utilization, mean wait, mean bounded slowdown, reservations on time or
    rejected, suspensions and image transfers."""
    from .sim import CONFIGS, Cluster, WorkloadError
    from .sim import report, workload

    if list_configs:
        for c in CONFIGS.values():
            click.echo(f"{c.name:20} vm={c.vm} suspend={c.suspend} transfer={c.transfer} images={c.images} "
                       f"backfill={c.backfill} placement={c.placement} prestage={c.prestage}")
        return
    unknown = [n for n in names.split(",") if n not in CONFIGS]
    if unknown:
        raise click.BadParameter(f"unknown configuration(s) {', '.join(unknown)}; see --list", param_hint="--configs")
    for opt, v in (("--nodes", nodes), ("--cache-gb", cache_gb), ("--bandwidth", bandwidth),
                   ("--suspend-rate", suspend_rate)):
        if v is not None and not v > 0:
            raise click.BadParameter("must be > 0", param_hint=opt)
    cluster = report.with_nodes(Cluster(), nodes=nodes, bandwidth_mb_s=bandwidth, suspend_mb_s=suspend_rate,
                                cache_mb=cache_gb * 1024 if cache_gb else None)
    try:
        if synth:
            lo, _, hi = ar_nodes.partition("-")
            try:
                rng = (int(lo), int(hi or lo))
            except ValueError:
                raise click.BadParameter(f"expected LOW-HIGH, got {ar_nodes!r}", param_hint="--ar-nodes")
            js, ars = workload.synthetic(jobs=jobs, nodes=cluster.nodes, load=load, ar_share=ar_share,
                                         ar_nodes=rng, ar_hours=ar_hours, seed=seed)
        elif swf:
            js = workload.read_swf(swf, cluster.nodes, cancelled=swf_cancelled)
            ars = workload.read_lwf(lwf, cluster.nodes) if lwf else []
        else:
            raise click.UsageError("give --swf (and --lwf) or --synthetic")
        if images:
            workload.image_mix(images)   # parse errors now, not after the first configuration
        base, results = report.compare(js, ars, [CONFIGS[n] for n in names.split(",")], cluster, seed,
                                       images, check)
    except WorkloadError as e:
        raise click.ClickException(str(e))
    click.echo(report.render(report.rows(base, results), fmt))
    if plot_dir:
        for p in report.plot(base, results, cluster.nodes, plot_dir):
            click.echo(f"wrote {p}", err=True)


def _register_plugins() -> None:
    """Each installed scheduler plugin's commands (entry points `vmwrap.cli`, vmwrap.adapter)."""
    from .adapter import cli_groups

    for group in cli_groups():
        main.add_command(group)


_register_plugins()

if __name__ == "__main__":
    main()
