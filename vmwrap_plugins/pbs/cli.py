"""`vmwrap pbs ...`: what the PBS mom hook body and the launched job call (vmwrap/hooks/pbs-*)."""

from __future__ import annotations

import sys

import click

_ARGV = {"ignore_unknown_options": True, "allow_interspersed_args": False}


def _config_path() -> str | None:
    return click.get_current_context().find_root().params.get("config_path")


@click.group("pbs")
def pbs() -> None:
    """PBS Professional / OpenPBS hooks (mom events, the job payload)."""


@pbs.command()
@click.argument("event")
@click.pass_obj
def mom(obj, event):
    """A mom hook event (root): facts as JSON on stdin, the reply as JSON on stdout."""
    from vmwrap.rootenv import clean_environment

    from . import mom as mom_

    clean_environment(())
    sys.exit(mom_.main(obj.settings(hook=True), event, sys.stdin, sys.stdout, _config_path()))


@pbs.command(context_settings=_ARGV)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_obj
def job(obj, args):
    """The job payload (the user), launched by execjob_launch in place of the login shell."""
    from . import job as job_

    sys.exit(job_.payload(obj.settings(hook=True), sys.stdin.buffer, list(args)))


@pbs.command(context_settings=_ARGV)
@click.argument("argv", nargs=-1, type=click.UNPROCESSED)
@click.pass_obj
def task(obj, argv):
    """A TM task the payload's pbs_tmrsh spawned (the user): SOCKET TOKEN JOB -- COMMAND..."""
    from . import task as task_

    sys.exit(task_.main(obj.settings(hook=True), list(argv)))


@pbs.command(context_settings=_ARGV)
@click.argument("argv", nargs=-1, type=click.UNPROCESSED)
@click.pass_obj
def action(obj, argv):
    """pbs_mom's `$action checkpoint_abort|checkpoint|restart` script (root): ACTION %jobid %uid %gid %path."""
    import os

    from vmwrap.rootenv import clean_environment

    from . import action as action_

    for fd in (0, 1, 2):   # pbs_mom closed them (mom_main.c:2410-2414): nothing we open may land there
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)   # the lowest free descriptor: this one
    clean_environment(("PBS_JOBID", "PBS_JOBNAME", "PBS_QUEUE", "PBS_NODEFILE", "PBS_JOBDIR"))
    sys.exit(action_.main(obj.settings(hook=True), list(argv)))


@pbs.command()
@click.option("--qstat", "qstat", default="/opt/pbs/bin/qstat", show_default=True,
              help="PBS's qstat (absolute path): asks the server whether a saved job still exists.")
@click.option("--interval", type=float, default=600.0, show_default=True, help="Seconds between passes.")
@click.option("--once", is_flag=True, help="One pass, then exit.")
@click.pass_obj
def gc(obj, qstat, interval, once):
    """Delete checkpoints of rerun jobs deleted while queued (no mom hook runs for them): root, on
    one host that sees the checkpoint store and can reach the server."""
    import os

    from vmwrap import daemons
    from vmwrap.rootenv import clean_environment

    from .mom import PBS

    clean_environment(())
    if not os.path.isabs(qstat) or not os.path.isfile(qstat):
        raise click.BadParameter(f"{qstat!r} is not an absolute path to PBS's qstat", param_hint="--qstat")
    settings = obj.settings(hook=True)
    sys.exit(daemons.gc(PBS(settings, qstat=qstat), settings, interval, once, say=click.echo))
