"""The `vmwrap` command: what a scheduler runs as the job payload, and what an admin types.

One module per area (jobs, images, cache and node checks, checkpoints, scheduler config, simulation);
scheduler plugins add their groups through entry points (`vmwrap.cli`, vmwrap.adapter). A command's
module is imported when the command is used: every job start runs this (prolog, batch step), and
importing every area and plugin cost each of them ~40 ms. A VmwrapError
that reaches here becomes a click error once, in `_Root.invoke`, so every command, a plugin's
included, reports it the same way ("Error: <message>", exit 1) instead of a traceback.
"""

from __future__ import annotations

import click

from ..errors import VmwrapError
from .context import Site

# command name -> "module:attribute" under vmwrap.cli
COMMANDS = {
    "run": "jobs:run", "teardown": "jobs:teardown", "shell": "jobs:shell", "ps": "node:ps", "agent": "node:agent",
    "image": "images:image", "images": "images:images", "cache": "node:cache", "checkpoints": "checkpoints:checkpoints",
    "doctor": "node:doctor", "reconcile": "node:reconcile", "drain": "drain:drain", "config": "config:config_group",
    "hooks": "hooks:hooks", "simulate": "simulate:simulate", "daemons": "daemons:daemons", "status": "status:status",
    "snapshot": "snapshots:snapshot",   # fast start's templates (vmwrap/snapshot.py)
}


class _UsageLine(click.ClickException):
    """A usage mistake as one line (click's own prints the usage, a hint and the error on three)."""

    exit_code = 2


def _one_line(e: click.UsageError) -> _UsageLine:
    where = e.ctx.command_path if e.ctx is not None else "vmwrap"
    return _UsageLine(f"{e.format_message().rstrip('.')} (see '{where} --help')")


class _Root(click.Group):
    """The root group: the single place a VmwrapError turns into a ClickException (exit 1) and a usage
    mistake into one error line (exit 2, as click's). Commands load on first use (COMMANDS, then the
    plugins' entry points); one added with add_command wins."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        from ..adapter import cli_names

        return sorted(set(self.commands) | set(COMMANDS) | set(cli_names()))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.commands:
            if name in COMMANDS:
                import importlib

                module, attr = COMMANDS[name].split(":")
                self.add_command(getattr(importlib.import_module(f"{__name__}.{module}"), attr), name)
            else:
                from ..adapter import cli_group

                cmd = cli_group(name)
                if cmd is not None:
                    self.add_command(cmd, name)
        return self.commands.get(name)

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
