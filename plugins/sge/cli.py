"""`vmwrap sge ...`: what the Grid Engine queue configuration calls."""

from __future__ import annotations

import os
import sys

import click


@click.group("sge")
def sge() -> None:
    """Grid Engine hooks (prolog, epilog, starter and suspend/resume/terminate methods)."""


@sge.command()
@click.argument("owner")
@click.pass_obj
def prolog(obj, owner):
    """prolog root@... $job_owner"""
    from . import hooks

    sys.exit(hooks.prolog(obj.settings(), dict(os.environ), owner))


@sge.command()
@click.pass_obj
def epilog(obj):
    """epilog root@..."""
    from . import hooks

    sys.exit(hooks.epilog(obj.settings(), dict(os.environ)))


@sge.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("argv", nargs=-1, type=click.UNPROCESSED)
@click.pass_obj
def starter(obj, argv):
    """starter_method: run the job in its VM (or as usual without one)."""
    from . import hooks

    sys.exit(hooks.starter(obj.settings(), list(argv)))


@sge.command()
@click.argument("action", type=click.Choice(["suspend", "resume", "terminate"]))
@click.argument("job_id")
@click.argument("job_pid", type=int)
@click.pass_obj
def method(obj, action, job_id, job_pid):
    """suspend_method / resume_method / terminate_method."""
    from . import hooks

    sys.exit(hooks.method(obj.settings(), action, job_id, job_pid))


@sge.command()
@click.pass_obj
def jsv(obj):
    """Client JSV (`-jsv` in the cell's sge_request): checks #VMWRAP directives at qsub time."""
    from . import hooks

    sys.exit(hooks.jsv(obj.settings(), sys.stdin, sys.stdout))
