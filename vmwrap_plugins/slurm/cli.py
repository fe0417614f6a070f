"""`vmwrap slurm ...`: what slurm.conf and the wrapped batch script call."""

from __future__ import annotations

import os
import sys

import click


@click.group("slurm")
def slurm() -> None:
    """Slurm hooks (prolog, epilog, batch step)."""


@slurm.command()
@click.pass_obj
def prolog(obj):
    """Prolog= hook (root, under slurmd): a clean environment first (vmwrap.rootenv)."""
    from vmwrap.rootenv import clean_environment

    from . import hooks

    env = clean_environment(hooks.ROOT_ENV)
    sys.exit(hooks.prolog(obj.settings(hook=True), env))


@slurm.command()
@click.pass_obj
def epilog(obj):
    """Epilog= hook (root, under slurmd): a clean environment first (vmwrap.rootenv)."""
    from vmwrap.rootenv import clean_environment

    from . import hooks

    env = clean_environment(hooks.ROOT_ENV)
    sys.exit(hooks.epilog(obj.settings(hook=True), env))


@slurm.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("script")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_obj
def attach(obj, script, args):
    """The batch step (job's user): hand the job to its VM and stream its output."""
    from . import hooks

    sys.exit(hooks.attach(obj.settings(hook=True), script, list(args), config_path=obj.config_path))


@slurm.command()
@click.pass_obj
def interactive(obj):
    """salloc's interactive step (InteractiveStepOptions, job's user): a shell in the job's VM."""
    from . import hooks

    sys.exit(hooks.interactive(obj.settings(hook=True), config_path=obj.config_path))


@slurm.command()
@click.option("--interval", type=float, default=60.0, help="Seconds between passes (loop mode).")
@click.option("--once", is_flag=True, help="One pass, then exit (cron or timer).")
@click.pass_obj
def gc(obj, interval, once):
    """Delete checkpoints of jobs Slurm no longer has queued (e.g. cancelled while saved)."""
    from vmwrap import daemons

    from .hooks import SLURM

    sys.exit(daemons.gc(SLURM, obj.settings(), interval, once, say=click.echo))


@slurm.command()
@click.option("--node", default=lambda: os.environ.get("SLURMD_NODENAME") or os.uname().nodename,
              help="This node's Slurm name (default $SLURMD_NODENAME or the hostname).")
@click.option("--controller", is_flag=True, help="Run the controller side (next to slurmctld) instead.")
@click.option("--lua-dir", default=lambda: os.path.dirname(os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf")),
              help="Controller: where job_submit.lua lives.")
@click.option("--interval", type=float, default=10.0, help="Seconds between passes (loop mode).")
@click.option("--once", is_flag=True, help="One pass, then exit (for a cron job or systemd timer).")
@click.option("--bandwidth", type=float, default=None, help="Cap on prestage transfers, MB/s.")
@click.option("--horizon", type=float, default=3600.0, help="Only prestage for starts planned this soon (s).")
@click.pass_obj
def prestage(obj, node, controller, lua_dir, interval, once, bandwidth, horizon):
    """Prestage images for planned starts and publish cache contents for placement."""
    from vmwrap import daemons

    from .hooks import SLURM

    s = obj.settings()
    if not controller:
        sys.exit(daemons.prestage(SLURM, s, node, interval, once, bandwidth, horizon))
    import logging
    from pathlib import Path

    from vmwrap.catalog import Catalog

    from . import prestage as sp

    log = logging.getLogger("vmwrap.prestage")

    def step():
        for job in sp.controller_pass(list(Catalog.load(s.catalog).images), Path(lua_dir)):
            log.info("job %s: prefer nodes holding its image", job)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    sys.exit(daemons.repeat(step, interval, once, log))


@click.command("plan")
@click.option("--interval", type=float, default=5.0, help="Seconds between passes (loop mode).")
@click.option("--once", is_flag=True, help="One pass, then exit.")
@click.option("--dry-run", is_flag=True, help="Say what would be done and why; change nothing.")
@click.option("--json", "as_json", is_flag=True,
              help="With --dry-run: one pass, its decisions as one JSON document on stdout (README).")
@click.pass_obj
def plan(obj, interval: float, once: bool, dry_run: bool, as_json: bool) -> None:
    """Run queue heads in the gaps before advance reservations, saved in time (next to slurmctld).

    Settings: plan_* in vmwrap.toml (docs/plan.md). Every decision is logged with its reason.
    """
    from vmwrap import daemons

    from .hooks import SLURM

    if not as_json:
        sys.exit(daemons.plan(SLURM, obj.settings(), interval, once, dry_run))
    if not dry_run:
        raise click.UsageError("--json lists what one pass would do: add --dry-run")
    import json

    from vmwrap.planner import dry_run_decisions

    click.echo(json.dumps(dry_run_decisions(SLURM, obj.settings()), indent=2))
