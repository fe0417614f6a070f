"""`vmwrap snapshot ...`: pre-booted template VMs that jobs start from when `fast_start = true`."""

from __future__ import annotations

import os
import time

import click

from .context import echo_json, echo_table, friendly_oserrors, json_option, settings


@click.group("snapshot")
def snapshot() -> None:
    """Pre-booted template VMs per image shape (fast job start, docs/design.md)."""


@snapshot.command("prepare")
@click.argument("image")
@click.option("--cpus", type=click.IntRange(1, 1024), default=None, help="The jobs' CPUs (default: the image's, else the site's).")
@click.option("--memory", "memory_mib", type=click.IntRange(1, 1 << 24), default=None, metavar="MIB",
              help="The jobs' memory in MiB (default: the image's, else the site's).")
@click.option("--force", is_flag=True, help="Make it again even if a usable one exists.")
@json_option
@friendly_oserrors
def prepare(image: str, cpus: int | None, memory_mib: int | None, force: bool, as_json: bool = False) -> None:
    """Boot IMAGE's template of one shape once and save it (root; needs libvirt)."""
    from .. import snapshot as snap
    from ..catalog import Catalog
    from ..errors import NodeError

    if os.geteuid() != 0:
        raise NodeError("vmwrap snapshot prepare needs root (it saves a VM into the node's cache)")
    s = settings()
    got = snap.prepare(s, Catalog.load(s.catalog), image, cpus, memory_mib, force=force)
    if as_json:
        echo_json(got)
    else:
        verb = "made" if got["made"] else "already there:"
        click.echo(f"{verb} {got['path']} ({got['bytes'] / 2**20:.1f} MiB, {got['seconds']:.1f} s)")


@snapshot.command("list")
@json_option
@friendly_oserrors
def list_(as_json: bool = False) -> None:
    """This node's snapshots: image, CPUs, memory, accelerator, size, age."""
    from .. import snapshot as snap

    items = snap.listing(settings())
    if as_json:
        echo_json(items)
        return
    now = time.time()
    echo_table(["IMAGE", "CPUS", "MiB RAM", "ACCEL", "MiB FILE", "AGE", "KEY"],
               [[i["image"], i["cpus"], i["memory_mib"], i["virt_type"], f"{i['bytes'] / 2**20:.1f}",
                 f"{now - (i['created'] or now):.0f}s", i["key"]] for i in items], right={1, 2, 4, 5})


@snapshot.command("clear")
@friendly_oserrors
def clear() -> None:
    """Delete every snapshot of this node (jobs cold-boot until prepared again)."""
    from .. import snapshot as snap

    click.echo(f"removed {snap.remove_all(settings())} snapshots")
