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
    """Prolog= hook (root, under slurmd)."""
    from . import hooks

    sys.exit(hooks.prolog(obj.settings(), dict(os.environ)))


@slurm.command()
@click.pass_obj
def epilog(obj):
    """Epilog= hook (root, under slurmd)."""
    from . import hooks

    sys.exit(hooks.epilog(obj.settings(), dict(os.environ)))


@slurm.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("script")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_obj
def attach(obj, script, args):
    """The batch step (job's user): hand the job to its VM and stream its output."""
    from . import hooks

    sys.exit(hooks.attach(obj.settings(), script, list(args)))
