"""`vmwrap image import`: an image someone else built (OCI, docker/podman save, SIF, rootfs tarball, whole
disk) as a catalog image that boots with vmwrap's guest agent (vmwrap/imports/)."""

from __future__ import annotations

import importlib
import time
from dataclasses import replace
from pathlib import Path

import click

from ..imports.layers import NOTE
from .context import friendly_oserrors, quiet_option, settings

# kind -> (module under vmwrap.imports, function): each takes (source, name, out_dir, catalog_path, *,
# max_bytes, on_stage) and returns the registered Image.
KINDS = {
    "oci": ("oci", "import_oci"),
    "docker-archive": ("oci", "import_docker_archive"),
    "sif": ("sif", "import_sif"),
    "tarball": ("rootfs", "import_tarball"),
    "disk": ("disk", "import_disk"),
}


def _importer(kind: str):
    module, func = KINDS[kind]
    try:
        mod = importlib.import_module(f"vmwrap.imports.{module}")
    except ModuleNotFoundError as e:
        if e.name != f"vmwrap.imports.{module}":
            raise
        raise click.ClickException(f"--kind {kind} is not available in this vmwrap") from None
    return getattr(mod, func)


@click.command("import")
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option("--kind", type=click.Choice(list(KINDS)), required=True,
              help="oci: OCI layout dir or its tar; docker-archive: docker/podman save; sif: Apptainer SIF; "
                   "tarball: root filesystem .tar/.tar.gz; disk: whole-disk qcow2/raw.")
@click.option("--name", required=True, help="The image's name in the catalog.")
@click.option("--memory", default=None, help="Default memory, e.g. 512M.")
@click.option("--cpus", type=click.IntRange(min=1), default=None)
@click.option("--user", "users", multiple=True, help="May use it (repeat; none and no --group = everyone).")
@click.option("--group", "groups", multiple=True)
@click.option("--description", default=None)
@quiet_option
@friendly_oserrors
def image_import(source: Path, kind: str, name: str, memory: str | None, cpus: int | None, users: tuple[str, ...],
                 groups: tuple[str, ...], description: str | None, quiet: bool, max_memory: str | None = None,
                 max_cpus: int | None = None, checkpoint: bool = True, network: str = "none") -> None:
    """Import SOURCE as image NAME: its files under appliance_dir, registered in the catalog last (a failure
    leaves both as they were). Sizes are bounded by image_import_max_size."""
    # (--max-memory, --max-cpus, --checkpoint, --network: images.policy_options, added where the group registers this.)
    from ..catalog import register
    from ..directives import check_image_name, parse_memory
    from ..progress import progress, stage_callback
    from ..imports.publish import scratch_dir
    from .images import policy

    s = settings()
    check_image_name(name)
    mem = parse_memory(memory) if memory else None  # a bad option before reading gigabytes
    pol = policy(max_memory, max_cpus, checkpoint, mem, cpus, network)
    run = _importer(kind)
    t0 = time.monotonic()
    out = Path(s.appliance_dir)
    out.mkdir(parents=True, exist_ok=True)
    # The importer registers into a scratch catalog; the site's gets the entry once, with this command's
    # users and groups already in it (a restricted image is never briefly open to everyone).
    with scratch_dir(out, f"{name}-catalog") as scratch, \
            progress(f"import {name}", "stages", quiet=quiet) as report:
        stage = stage_callback(report)
        notes: list[str] = []  # what the admin should know even without a terminal (devices skipped)

        def on_stage(line: str) -> None:
            if line.startswith(NOTE):
                notes.append(line)
            else:
                stage(line)

        img = run(source.resolve(), name, out, str(Path(scratch) / "images.toml"),
                  max_bytes=s.image_import_max_bytes, on_stage=on_stage)
        img = replace(img, memory_mib=mem, cpus=cpus, users=list(users), groups=list(groups), **pol,
                      description=description if description is not None else img.description)
        if img.restricted:
            _private(img, out)
        register(s.catalog, img)
    for line in notes:
        click.echo(line, err=True)
    click.echo(f"imported {img.name} ({img.origin}) in {time.monotonic() - t0:.1f}s -> {s.catalog}")


def _private(img, out: Path) -> None:
    """A restricted image's files are for its users' jobs only (the cache grants them): the imported
    copies in the appliance dir must not be readable by everyone either."""
    import os

    dirs = set()
    for a in img.artifacts().values():
        p = Path(a.source)
        if p.parent.parent == out:          # the importer's out/NAME/FILE, never a file elsewhere
            os.chmod(p, 0o600)
            dirs.add(p.parent)
    for d in dirs:
        os.chmod(d, 0o700)
