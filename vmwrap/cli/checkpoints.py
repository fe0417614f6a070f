"""`vmwrap checkpoints ...`: saved VMs of preempted/requeued jobs in the shared checkpoint store."""

from __future__ import annotations

import time

import click

from .context import echo_json, echo_table, friendly_oserrors, json_option, quiet_option, settings


@click.group(invoke_without_command=True)
@click.pass_context
def checkpoints(ctx):
    """Saved VMs of preempted/requeued jobs (the shared checkpoint store)."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(checkpoints_list)


@checkpoints.command("list")
@json_option
@friendly_oserrors
def checkpoints_list(as_json: bool = False) -> None:
    """Checkpoints: job, size, age, node that saved it, restarts, image."""
    from ..checkpoint import Store

    store = Store(settings().checkpoint_dir)
    items = store.list()
    lost = [(j, store.lost_reason(j)) for j in sorted(store.jobs())]
    lost = [(j, why) for j, why in lost if why]
    if as_json:
        echo_json({"checkpoints": [{"job": i.job_id, "bytes": i.bytes, "created": i.created, "node": i.node,
                                    "restarts": i.restarts, "image": i.image} for i in items],
                   "lost": [{"job": j, "reason": why} for j, why in lost], "store": str(store.root)})
        return
    now = time.time()
    echo_table(["JOB", "MiB", "AGE", "SAVED ON", "RESTARTS", "IMAGE"],
               [[i.job_id, f"{i.bytes / 2**20:.1f}", f"{now - i.created:.0f}s", i.node, i.restarts, i.image]
                for i in items], right={1, 2, 4})
    for j, why in lost:
        click.echo(f"{j}: lost: {why}")
    click.echo(f"{len(items)} checkpoints, {sum(i.bytes for i in items) / 2**20:.1f} MiB in {store.root}")


@checkpoints.command("verify")
@click.argument("job_id")
@quiet_option
@friendly_oserrors
def checkpoints_verify(job_id: str, quiet: bool) -> None:
    """Check a checkpoint's files against their recorded sizes and checksums (progress on a terminal)."""
    from ..checkpoint import Store
    from ..progress import progress

    s = settings()
    store = Store(s.checkpoint_dir, s.checkpoint_key_file)
    with progress(f"verify checkpoint {job_id}", "bytes", quiet=quiet) as report:  # bytes and rate, no total
        m = store.verify(job_id, on_bytes=report)
    click.echo(f"job {job_id}: intact ({len(m['files'])} files, saved on {m['node']})")


@checkpoints.command("delete")
@click.argument("job_ids", nargs=-1, required=True)
@friendly_oserrors
def checkpoints_delete(job_ids: tuple[str, ...]) -> None:
    """Delete checkpoints (the job can then no longer continue where it was saved)."""
    from ..checkpoint import Store

    store = Store(settings().checkpoint_dir)
    for j in job_ids:
        click.echo(f"{j}: {'deleted' if store.delete(j) else 'no checkpoint'}")


@checkpoints.command("keygen")
@friendly_oserrors
def checkpoints_keygen() -> None:
    """Create the site's checkpoint key (checkpoint_key_file, root 0600); copy it to every node."""
    from ..checkpoint import keygen

    click.echo(f"created {keygen(settings().checkpoint_key_file)}: copy it to every node (same owner and mode)")


@checkpoints.command("init")
@friendly_oserrors
def checkpoints_init() -> None:
    """Stamp the shared checkpoint store with this site's identity (once per site, as root, where the
    shared storage is mounted; after `keygen`). Nodes refuse a store without this site's stamp: on a
    node where the storage is not mounted, its path is an empty local directory."""
    from ..checkpoint import init_store

    s = settings()
    what, stamp = init_store(s.checkpoint_dir, s.checkpoint_key_file)
    if what == "already":
        click.echo(f"{s.checkpoint_dir} is already this site's checkpoint store ({stamp} verifies with "
                   f"{s.checkpoint_key_file}): nothing to do")
    elif what == "adopted":
        click.echo(f"adopted the existing checkpoint store {s.checkpoint_dir} (its checkpoints are kept): wrote {stamp}")
    else:
        click.echo(f"initialised the checkpoint store {s.checkpoint_dir}: wrote {stamp}; every node that mounts "
                   "this storage there may now save and restore checkpoints")
