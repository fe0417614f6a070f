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

    sys.exit(hooks.starter(obj.settings(hook=True), list(argv)))


@sge.command()
@click.argument("action", type=click.Choice(["suspend", "resume", "terminate"]))
@click.argument("job_id")
@click.argument("job_pid", type=int)
@click.pass_obj
def method(obj, action, job_id, job_pid):
    """suspend_method / resume_method / terminate_method."""
    from . import hooks

    sys.exit(hooks.method(obj.settings(hook=True), action, job_id, job_pid))


@sge.command()
@click.pass_obj
def jsv(obj):
    """Client JSV (`-jsv` in the cell's sge_request): checks #VMWRAP directives at qsub time."""
    from . import hooks

    sys.exit(hooks.jsv(obj.settings(hook=True), sys.stdin, sys.stdout))
