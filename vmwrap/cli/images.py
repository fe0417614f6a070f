"""`vmwrap image ...`: the site's image catalog (build, add, list, verify, remove)."""

from __future__ import annotations

import sys
import time

import click

from ..errors import VmwrapError
from .context import echo_json, echo_table, friendly_oserrors, json_option, quiet_option, settings
from .image_import import image_import


@click.group()
def image():
    """Images in the catalog: build, add, list, verify, remove."""


def policy_options(f):
    """The catalog's per-image policy as options (image build, image add)."""
    for opt in reversed([
        click.option("--max-memory", default=None, help="Most memory a job's VM may ask for, e.g. 2G."),
        click.option("--max-cpus", type=click.IntRange(min=1), default=None, help="Most CPUs a job's VM may ask for."),
        click.option("--checkpoint/--no-checkpoint", default=True,
                     help="Whether jobs of this image may be saved (preemption, requeue, drain)."),
        click.option("--network", type=click.Choice(["none", "nat"]), default="none",
                     help="none: no network device; nat: NAT out of the node as the job's user, nothing in."),
    ]):
        f = opt(f)
    return f


def policy(max_memory: str | None, max_cpus: int | None, checkpoint: bool, memory_mib: int | None,
           cpus: int | None = None, network: str = "none") -> dict:
    """Image fields from the policy options, checked as the catalog will check them on load."""
    from ..directives import parse_memory
    from ..errors import UserError

    try:
        max_mib = parse_memory(max_memory) if max_memory else None
    except UserError as e:
        raise UserError(str(e).replace("--memory=", "--max-memory=", 1)) from None
    if max_mib and memory_mib and memory_mib > max_mib:
        raise UserError(f"--memory={memory_mib}M is more than --max-memory={max_mib}M")
    if max_cpus and cpus and cpus > max_cpus:
        raise UserError(f"--cpus={cpus} is more than --max-cpus={max_cpus}")
    return {"max_memory_mib": max_mib, "max_cpus": max_cpus, "checkpoint": checkpoint, "network": network}


@image.command("build")
@click.option("--name", required=True)
@click.option("--kind", type=click.Choice(["busybox", "debootstrap", "initramfs"]), default="busybox",
              help="busybox: tiny root disk (tests); debootstrap: Debian root disk; initramfs: no disk.")
@click.option("--memory", "memory_mib", type=click.IntRange(min=1), default=256, help="Default memory, MiB.")
@click.option("--packages", default="", metavar="LIST",
              help="debootstrap: comma-separated Debian packages to install besides minbase, e.g. python3-minimal.")
@policy_options
@quiet_option
@friendly_oserrors
def image_build(name: str, kind: str, memory_mib: int, packages: str, max_memory: str | None,
                max_cpus: int | None, checkpoint: bool, network: str, quiet: bool) -> None:
    """Build an appliance from Debian packages and register it in the catalog (stages on a terminal)."""
    from .. import appliance
    from ..directives import check_image_name
    from ..progress import progress, stage_callback

    s = settings()
    check_image_name(name)
    pkgs = appliance.check_packages([p.strip() for p in packages.split(",") if p.strip()])
    pol = policy(max_memory, max_cpus, checkpoint, memory_mib, 1, network)
    t0 = time.monotonic()
    with progress(f"build {name}", "stages", quiet=quiet) as report:
        img = appliance.build(name, kind, s.appliance_dir, s.catalog, memory_mib=memory_mib,
                              on_stage=stage_callback(report), packages=pkgs, policy=pol)
    click.echo(f"built {img.name} ({img.description}) in {time.monotonic() - t0:.1f}s -> {s.catalog}")


@image.command("list")
@json_option
@friendly_oserrors
def image_list(as_json: bool) -> None:
    """Images in the site catalog."""
    from ..catalog import Catalog

    cat = Catalog.load(settings().catalog)
    imgs = list(cat.images.values())
    if as_json:
        echo_json([{"name": i.name, "bytes": sum(a.size for a in i.artifacts().values()), "users": list(i.users),
                    "groups": list(i.groups), "memory_mib": i.memory_mib, "cpus": i.cpus,
                    "max_memory_mib": i.max_memory_mib, "max_cpus": i.max_cpus, "network": i.network,
                    "checkpoint": i.checkpoint, "origin": i.origin, "digest": i.digest,
                    "description": i.description,
                    "artifacts": {k: {"source": a.source, "sha256": a.sha256, "bytes": a.size}
                                  for k, a in i.artifacts().items()}} for i in imgs])
        return
    echo_table(["NAME", "MiB", "USERS", "POLICY", "DESCRIPTION"],
               [[i.name, f"{sum(a.size for a in i.artifacts().values()) / 2**20:.1f}",
                 ",".join(i.users + ["@" + g for g in i.groups]) or "everyone", _policy_cell(i), i.description]
                for i in imgs],
               right={1})


def _policy_cell(i) -> str:
    """e.g. 'mem<=2048M cpus<=2 no-ckpt nat' ('-' for no limits; no network is not shown)."""
    parts = ([f"mem<={i.max_memory_mib}M"] if i.max_memory_mib else []) + ([f"cpus<={i.max_cpus}"] if i.max_cpus else [])
    return " ".join(parts + ([] if i.checkpoint else ["no-ckpt"]) + ([] if i.network == "none" else [i.network])) or "-"


@image.command("add")
@click.argument("name")
@click.option("--kernel", type=click.Path(exists=True, dir_okay=False), required=True)
@click.option("--initrd", type=click.Path(exists=True, dir_okay=False), required=True)
@click.option("--disk", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--disk-format", type=click.Choice(["qcow2", "raw"]), default="qcow2")
@click.option("--memory", default=None, help="Default memory, e.g. 512M.")
@click.option("--cpus", type=click.IntRange(min=1), default=None)
@click.option("--user", "users", multiple=True, help="May use it (repeat; none and no --group = everyone).")
@click.option("--group", "groups", multiple=True)
@click.option("--description", default="")
@policy_options
@quiet_option
@friendly_oserrors
def image_add(name, kernel, initrd, disk, disk_format, memory, cpus, users, groups, description, max_memory,
              max_cpus, checkpoint, network, quiet) -> None:
    """Register existing appliance files (hashed now, progress on a terminal) in the catalog."""
    from pathlib import Path

    from .. import appliance
    from ..catalog import Image, register
    from ..directives import check_image_name, parse_memory
    from ..progress import progress

    s = settings()
    check_image_name(name)
    mem = parse_memory(memory) if memory else None  # a bad size before hashing GBs
    pol = policy(max_memory, max_cpus, checkpoint, mem, cpus, network)

    def hashed(key: str, path: str, fmt: str = "raw"):
        p = Path(path).resolve()
        with progress(f"hash {name}.{key}", "bytes", total=p.stat().st_size, quiet=quiet) as report:
            return appliance.artifact(p, fmt, on_bytes=report)

    img = Image(name=name, boot="kernel", kernel=hashed("kernel", kernel), initrd=hashed("initrd", initrd),
                disk=hashed("disk", disk, disk_format) if disk else None,
                memory_mib=mem, cpus=cpus,
                users=list(users), groups=list(groups), description=description, **pol)
    register(s.catalog, img)
    click.echo(f"added {name} to {s.catalog}")


@image.command("remove")
@click.argument("name")
@friendly_oserrors
def image_remove(name: str) -> None:
    """Remove an image from the catalog (cached copies go with `vmwrap cache gc`)."""
    from ..catalog import Catalog, unregister

    s = settings()
    if name not in Catalog.load(s.catalog).images:
        raise click.ClickException(f"no image {name!r} in {s.catalog}")
    unregister(s.catalog, name)
    click.echo(f"removed {name} from {s.catalog}")


@image.command("verify")
@click.argument("names", nargs=-1)
@quiet_option
@friendly_oserrors
def image_verify(names: tuple[str, ...], quiet: bool) -> None:
    """Re-hash each image's sources against the catalog (all images by default; progress on a terminal)."""
    import hashlib

    from .. import transport
    from ..catalog import Catalog
    from ..progress import progress

    cat = Catalog.load(settings().catalog)
    bad = 0
    for name in names or sorted(cat.images):
        img = cat.images.get(name)
        if img is None:
            click.echo(f"FAIL {name}: not in the catalog")
            bad += 1
            continue
        for key, art in img.artifacts().items():
            h, n = hashlib.sha256(), 0
            try:  # one bad source is a FAIL line, not the end of the check
                with transport.open_source(art.source) as f, \
                        progress(f"verify {name}.{key}", "bytes", total=art.size, quiet=quiet) as report:
                    while buf := f.read(1 << 20):
                        h.update(buf)
                        n += len(buf)
                        report(len(buf))
                ok = (h.hexdigest(), n) == (art.sha256, art.size)
                msg = "ok" if ok else f"mismatch: {n} bytes, sha256 {h.hexdigest()}"
            except VmwrapError as e:
                ok, msg = False, str(e)
            bad += not ok
            click.echo(f"{'ok  ' if ok else 'FAIL'} {name}.{key}: {msg}")
    sys.exit(1 if bad else 0)


image.add_command(policy_options(image_import))  # vmwrap/cli/image_import.py: OCI, docker/podman, SIF, tarballs, disks

# The old spelling of `image`, hidden: the same subcommands, with a deprecation notice on stderr.
images = click.Group("images", commands=image.commands, hidden=True, deprecated=True,
                     help="Deprecated: use `vmwrap image`.")
