"""The `vmwrap` command: what a scheduler runs as the job payload, and what an admin types.

One module per area (jobs, images, cache and node checks, checkpoints, scheduler config, simulation);
scheduler plugins add their groups through entry points (`vmwrap.cli`, vmwrap.adapter). A VmwrapError
that reaches here becomes a click error once, in `_Root.invoke`, so every command, a plugin's
included, reports it the same way ("Error: <message>", exit 1) instead of a traceback.
"""

from __future__ import annotations

import click

from ..errors import VmwrapError
from . import checkpoints, config, daemons, drain, hooks, images, jobs, node, simulate, status
from .snapshots import snapshot
from .context import Site


class _UsageLine(click.ClickException):
    """A usage mistake as one line (click's own prints the usage, a hint and the error on three)."""

    exit_code = 2


def _one_line(e: click.UsageError) -> _UsageLine:
    where = e.ctx.command_path if e.ctx is not None else "vmwrap"
    return _UsageLine(f"{e.format_message().rstrip('.')} (see '{where} --help')")


class _Root(click.Group):
    """The root group: the single place a VmwrapError turns into a ClickException (exit 1) and a usage
    mistake into one error line (exit 2, as click's)."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as e:
            raise _one_line(e) from e

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except VmwrapError as e:
            raise click.ClickException(str(e)) from e
        except click.UsageError as e:
            raise _one_line(e) from e


@click.group(cls=_Root)
@click.version_option()
@click.option("--config", "config_path", default=None, metavar="FILE",
              help="Settings file (default $VMWRAP_CONFIG or /etc/vmwrap/vmwrap.toml; scheduler hooks ignore "
                   "$VMWRAP_CONFIG); %n = node name.")
@click.pass_context
def main(ctx, config_path) -> None:
    """Run batch jobs in per-job VMs."""
    ctx.obj = Site(config_path)


for _cmd in (jobs.run, jobs.teardown, jobs.shell, node.ps, node.agent, images.image, images.images, node.cache,
             checkpoints.checkpoints, node.doctor, node.reconcile, drain.drain, config.config_group, hooks.hooks, simulate.simulate,
             daemons.daemons, status.status):
    main.add_command(_cmd)
main.add_command(snapshot)  # fast start's templates (vmwrap/snapshot.py)


def _register_plugins() -> None:
    """Each installed scheduler plugin's commands (entry points `vmwrap.cli`, vmwrap.adapter)."""
    from ..adapter import cli_groups

    for group in cli_groups():
        main.add_command(group)


_register_plugins()
