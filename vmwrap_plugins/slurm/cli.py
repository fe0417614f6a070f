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

    sys.exit(hooks.attach(obj.settings(hook=True), script, list(args)))


@slurm.command()
@click.option("--interval", type=float, default=60.0, help="Seconds between passes (loop mode).")
@click.option("--once", is_flag=True, help="One pass, then exit (cron or timer).")
@click.pass_obj
def gc(obj, interval, once):
    """Delete checkpoints of jobs Slurm no longer has queued (e.g. cancelled while saved)."""
    import time

    from . import hooks

    while True:
        try:
            for job in hooks.checkpoint_gc(obj.settings()):
                click.echo(f"job {job}: ended while saved, checkpoint deleted")
        except Exception as e:
            click.echo(f"vmwrap slurm gc: {e}", err=True)
            if once:
                sys.exit(1)
        if once:
            return
        time.sleep(interval)


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
    import logging
    import time
    from pathlib import Path

    from vmwrap.cache import Cache
    from vmwrap.catalog import Catalog
    from vmwrap.ledger import Ledger
    from vmwrap.prestage import Prestager

    from . import prestage as sp

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    s = obj.settings()
    while True:
        try:
            cat = Catalog.load(s.catalog)
            if controller:
                for job in sp.controller_pass(list(cat.images), Path(lua_dir)):
                    logging.getLogger("vmwrap.prestage").info("job %s: prefer nodes holding its image", job)
            else:
                p = Prestager(cat, Cache(s.cache_dir, s.cache_max_bytes, s.verify_on_use),
                              Ledger(s.ledger_path), rate=bandwidth * 1e6 if bandwidth else None, horizon=horizon)
                sp.node_pass(p, node)
        except Exception as e:  # keep the loop alive through a slurmctld restart or a bad catalog edit
            logging.getLogger("vmwrap.prestage").error("pass failed: %s", e)
            if once:
                sys.exit(1)
        if once:
            return
        time.sleep(interval)


@click.command("plan")
@click.option("--interval", type=float, default=5.0, help="Seconds between passes (loop mode).")
@click.option("--once", is_flag=True, help="One pass, then exit.")
@click.option("--dry-run", is_flag=True, help="Say what would be done and why; change nothing.")
@click.pass_obj
def plan(obj, interval, once, dry_run):
    """Run queue heads in the gaps before advance reservations, saved in time (next to slurmctld).

    Settings: plan_* in vmwrap.toml (docs/plan.md). Every decision is logged with its reason.
    """
    import logging
    import time

    from .planner import Planner

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    s = obj.settings()
    if not s.plan_enabled:
        logging.getLogger("vmwrap.plan").info(
            "plan_enabled is false: no new job is put into a gap (jobs already in one are still saved in time)")
    p = Planner(s, dry_run=dry_run)
    while True:
        try:
            p.pass_once()
        except Exception as e:  # keep going through a slurmctld restart
            logging.getLogger("vmwrap.plan").error("pass failed: %s", e)
            if once:
                sys.exit(1)
        if once:
            return
        time.sleep(interval)
