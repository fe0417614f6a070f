"""`vmwrap torque ...`: what pbs_mom, qsub and the node health check call (vmwrap/hooks/torque-*)."""

from __future__ import annotations

import sys

import click

_ARGV = {"ignore_unknown_options": True, "allow_interspersed_args": False}


def _root_env():
    from vmwrap.rootenv import clean_environment

    from . import hooks

    return clean_environment(hooks.ROOT_ENV)


def _config_path() -> str | None:
    return click.get_current_context().find_root().params.get("config_path")


@click.group("torque")
def torque() -> None:
    """Torque hooks (submit filter, prologue, epilogue, job payload, checkpoint/restart, health check)."""


@torque.command(context_settings=_ARGV)
@click.argument("argv", nargs=-1, type=click.UNPROCESSED)
@click.pass_obj
def prologue(obj, argv):
    """mom_priv/prologue (root): ID USER GROUP NAME RESOURCES QUEUE ACCOUNT [SCRIPT]."""
    from . import hooks

    env = _root_env()
    sys.exit(hooks.prologue(obj.settings(hook=True), list(argv), env))


@torque.command(context_settings=_ARGV)
@click.argument("argv", nargs=-1, type=click.UNPROCESSED)
@click.pass_obj
def epilogue(obj, argv):
    """mom_priv/epilogue (root): ID USER GROUP NAME SESSION RESOURCES USED QUEUE ACCOUNT EXIT [SCRIPT]."""
    from . import hooks

    env = _root_env()
    sys.exit(hooks.epilogue(obj.settings(hook=True), list(argv), env))


@torque.command(context_settings=_ARGV)
@click.argument("argv", nargs=-1, type=click.UNPROCESSED)
@click.pass_obj
def submitfilter(obj, argv):
    """SUBMITFILTER in torque.cfg (the submitter): qsub's arguments, the script on stdin."""
    from . import submit

    sys.exit(submit.run(obj.settings(hook=True), list(argv), sys.stdin, sys.stdout, sys.stderr, _config_path()))


@torque.command(context_settings=_ARGV)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_obj
def job(obj, args):
    """The job payload (the user): the original script on stdin, the job's arguments."""
    from . import hooks

    script = sys.stdin.buffer.read(16 << 20).decode("utf-8", "surrogateescape")
    sys.exit(hooks.payload(obj.settings(hook=True), script, list(args)))


@torque.command(context_settings=_ARGV)
@click.argument("argv", nargs=-1, type=click.UNPROCESSED)
@click.pass_obj
def checkpoint(obj, argv):
    """$checkpoint_script (root): SID ID USER GROUP DIR NAME SIGNAL DEPTH."""
    from . import hooks

    _root_env()
    sys.exit(hooks.checkpoint(obj.settings(hook=True), list(argv)))


@torque.command(context_settings=_ARGV)
@click.argument("argv", nargs=-1, type=click.UNPROCESSED)
@click.pass_obj
def restart(obj, argv):
    """$restart_script (root, becomes the job): SID ID USER GROUP DIR NAME."""
    from . import hooks

    _root_env()
    sys.exit(hooks.restart(obj.settings(hook=True), list(argv)))


@torque.command()
@click.pass_obj
def health(obj):
    """$node_check_script: prints `ERROR <reason>` after a node fault (pbs_server marks the node down)."""
    from . import hooks

    sys.exit(hooks.health(obj.settings(hook=True), sys.stdout))


@torque.command()
@click.pass_obj
def online(obj):
    """Clear the node fault the health check reports (after fixing it)."""
    from . import hooks

    click.echo("cleared" if hooks.online(obj.settings(hook=True)) else "no node fault recorded")


@torque.command()
@click.option("--qstat", "qstat", default="/usr/local/bin/qstat", show_default=True,
              help="Torque's qstat (absolute path): asks pbs_server whether a saved job still exists.")
@click.option("--interval", type=float, default=600.0, show_default=True, help="Seconds between passes.")
@click.option("--once", is_flag=True, help="One pass, then exit.")
@click.pass_obj
def gc(obj, qstat, interval, once):
    """Delete checkpoints of jobs deleted while held (no epilogue runs for them): root, on one host
    that mounts the shared checkpoint store and can reach pbs_server."""
    import os

    from vmwrap import daemons

    from .hooks import Torque

    _root_env()
    if not os.path.isabs(qstat) or not os.path.isfile(qstat):
        raise click.BadParameter(f"{qstat!r} is not an absolute path to Torque's qstat", param_hint="--qstat")
    settings = obj.settings(hook=True)
    sys.exit(daemons.gc(Torque(settings, qstat=qstat), settings, interval, once, say=click.echo))
