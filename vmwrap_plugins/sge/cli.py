"""`vmwrap sge ...`: what the Grid Engine queue configuration calls."""

from __future__ import annotations

import sys

import click


@click.group("sge")
def sge() -> None:
    """Grid Engine hooks (prolog, epilog, starter and suspend/resume/terminate methods)."""


@sge.command()
@click.argument("owner")
@click.pass_obj
def prolog(obj, owner):
    """prolog root@... $job_owner (root, with the job's environment: a clean one first, vmwrap.rootenv)"""
    from vmwrap.rootenv import clean_environment

    from . import hooks

    env = clean_environment(hooks.ROOT_ENV, hooks.ROOT_FIXED)
    sys.exit(hooks.prolog(obj.settings(hook=True), env, owner))


@sge.command()
@click.pass_obj
def epilog(obj):
    """epilog root@... (root, with the job's environment: a clean one first, vmwrap.rootenv)"""
    from vmwrap.rootenv import clean_environment

    from . import hooks

    env = clean_environment(hooks.ROOT_ENV, hooks.ROOT_FIXED)
    sys.exit(hooks.epilog(obj.settings(hook=True), env))


@sge.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("argv", nargs=-1, type=click.UNPROCESSED)
@click.pass_obj
def starter(obj, argv):
    """starter_method: run the job in its VM (or as usual without one)."""
    from . import hooks

    sys.exit(hooks.starter(obj.settings(hook=True), list(argv), config_path=obj.config_path))


@sge.command()
@click.argument("action", type=click.Choice(["suspend", "resume", "terminate", "migrate"]))
@click.argument("job_id")
@click.argument("job_pid", type=int)
@click.pass_obj
def method(obj, action, job_id, job_pid):
    """suspend_method / resume_method / terminate_method, and the checkpointing environment's migr_command."""
    from . import hooks

    sys.exit(hooks.method(obj.settings(hook=True), action, job_id, job_pid))


@sge.command()
@click.pass_obj
def jsv(obj):
    """Client JSV (`-jsv` in the cell's sge_request): checks #VMWRAP directives at qsub time."""
    from . import hooks

    sys.exit(hooks.jsv(obj.settings(hook=True), sys.stdin, sys.stdout))


# -- the daemon loops, core code driven by the Grid Engine adapter (vmwrap.daemons) ----------------

@sge.command()
@click.option("--interval", type=float, default=60.0, help="Seconds between passes (loop mode).")
@click.option("--once", is_flag=True, help="One pass, then exit (cron or timer).")
@click.pass_obj
def gc(obj, interval, once):
    """Delete checkpoints of jobs Grid Engine no longer has (e.g. deleted while saved)."""
    from vmwrap import daemons

    from .hooks import GridEngine

    sys.exit(daemons.gc(GridEngine(), obj.settings(), interval, once, say=click.echo))


@sge.command()
@click.option("--node", default=lambda: __import__("socket").gethostname(),
              help="This execution host's name as Grid Engine knows it (default: the hostname).")
@click.option("--interval", type=float, default=10.0, help="Seconds between passes (loop mode).")
@click.option("--once", is_flag=True, help="One pass, then exit (for a cron job or systemd timer).")
@click.option("--bandwidth", type=float, default=None, help="Cap on prestage transfers, MB/s.")
@click.option("--horizon", type=float, default=3600.0, help="Only prestage for starts planned this soon (s).")
@click.pass_obj
def prestage(obj, node, interval, once, bandwidth, horizon):
    """Prestage the images of the jobs Grid Engine reserved this host for (root, on each host).

    Needs sched_conf `params MONITOR=1` (the scheduler's schedule file) and jobs with `-R y` while
    max_reservation > 0: those are the jobs GE plans a start for."""
    from vmwrap import daemons

    from .hooks import GridEngine

    sys.exit(daemons.prestage(GridEngine(), obj.settings(), node, interval, once, bandwidth, horizon))


@sge.command()
@click.option("--interval", type=float, default=5.0, help="Seconds between passes (loop mode).")
@click.option("--once", is_flag=True, help="One pass, then exit.")
@click.option("--dry-run", is_flag=True, help="Say what would be done and why; change nothing.")
@click.option("--json", "as_json", is_flag=True,
              help="With --dry-run: one pass, its decisions as one JSON document on stdout.")
@click.pass_obj
def plan(obj, interval, once, dry_run, as_json):
    """Run queue heads in the gaps before advance reservations (qrsub), saved in time (root, next
    to sge_qmaster). Settings: plan_* in vmwrap.toml; plan_partitions names cluster queues."""
    from vmwrap import daemons

    from .hooks import GridEngine

    if not as_json:
        sys.exit(daemons.plan(GridEngine(), obj.settings(), interval, once, dry_run))
    if not dry_run:
        raise click.UsageError("--json lists what one pass would do: add --dry-run")
    import json

    from vmwrap.planner import dry_run_decisions

    click.echo(json.dumps(dry_run_decisions(GridEngine(), obj.settings()), indent=2))
