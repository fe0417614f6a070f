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
