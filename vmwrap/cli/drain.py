"""`vmwrap drain NODE`: maintenance without killing or losing a job (vmwrap.drain)."""

from __future__ import annotations

import sys

import click

from .context import quiet_option, settings


@click.command()
@click.argument("node")
@click.option("--reason", default="vmwrap drain", show_default=True,
              help="Why, as the scheduler shows it (sinfo -R); one printable line.")
@click.option("--scheduler", "scheduler_name", default="slurm", show_default=True, metavar="NAME",
              help="The scheduler adapter (slurm, sge).")
@click.option("--timeout", type=float, default=600.0, show_default=True, metavar="S",
              help="Seconds to wait for all VM jobs to be saved.")
@click.option("--dry-run", is_flag=True, help="Only list what would be requeued; change nothing.")
@quiet_option
def drain(node, reason, scheduler_name, timeout, dry_run, quiet):
    """Drain NODE, then save every vmwrap VM job on it and requeue it to run on other nodes (admin).

    Jobs without a VM run to their end on NODE. Exit 1 when a VM job could not be saved; each job's
    outcome is a `drained` event in the ledger."""
    from .. import drain as drain_mod
    from ..adapter import scheduler

    from ..progress import progress

    with progress("saving VM jobs", unit="items", quiet=quiet or dry_run) as report:
        results = drain_mod.drain(scheduler(scheduler_name), settings(), node, reason, timeout=timeout,
                                  dry_run=dry_run, say=click.echo, report=report)
    sys.exit(1 if any(r.status == "failed" for r in results) else 0)
