"""`vmwrap checkpoints ...`: saved VMs of preempted/requeued jobs in the shared checkpoint store."""

from __future__ import annotations

import time

import click

from .context import settings


@click.group(invoke_without_command=True)
@click.pass_context
def checkpoints(ctx):
    """Saved VMs of preempted/requeued jobs (the shared checkpoint store)."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(checkpoints_list)


@checkpoints.command("list")
def checkpoints_list():
    """Checkpoints: job, size, age, node that saved it, restarts, image."""
    from ..checkpoint import Store

    store = Store(settings().checkpoint_dir)
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
    from ..checkpoint import Store

    s = settings()
    m = Store(s.checkpoint_dir, s.checkpoint_key_file).verify(job_id)
    click.echo(f"job {job_id}: intact ({len(m['files'])} files, saved on {m['node']})")


@checkpoints.command("delete")
@click.argument("job_ids", nargs=-1, required=True)
def checkpoints_delete(job_ids):
    """Delete checkpoints (the job can then no longer continue where it was saved)."""
    from ..checkpoint import Store

    store = Store(settings().checkpoint_dir)
    for j in job_ids:
        click.echo(f"{j}: {'deleted' if store.delete(j) else 'no checkpoint'}")


@checkpoints.command("keygen")
def checkpoints_keygen():
    """Create the site's checkpoint key (checkpoint_key_file, root 0600); copy it to every node."""
    from ..checkpoint import keygen

    click.echo(f"created {keygen(settings().checkpoint_key_file)}: copy it to every node (same owner and mode)")
