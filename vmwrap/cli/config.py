"""`vmwrap config ...`: the scheduler configuration that enables vmwrap, rendered by its adapter."""

from __future__ import annotations

import os
import sys

import click

from .context import friendly_oserrors, settings


@click.group("config")
def config_group():
    """Render scheduler configuration snippets."""


PUBLIC = ("/usr/bin/vmwrap", "/usr/local/bin/vmwrap")  # the Debian package's name, install-host.sh's


def installed_vmwrap() -> str:
    """This installation's vmwrap command, by the name nodes with the same install have: a public name
    that leads to this environment's entry point (the package links /usr/bin/vmwrap to
    /opt/vmwrap/venv/bin/vmwrap), else the entry point itself. Scheduler configs name it for the job's
    own steps, so it must exist on the nodes, not merely be first on someone's PATH."""
    own = os.path.join(sys.prefix, "bin", "vmwrap")
    if os.path.isfile(own):
        for name in PUBLIC:
            if os.path.isfile(name) and os.path.realpath(name) == os.path.realpath(own):
                return name
        return own
    return next((n for n in PUBLIC if os.path.isfile(n)), PUBLIC[1])


@config_group.command("render")
@click.argument("scheduler")
@click.option("--lua-out", type=click.Path(dir_okay=False), default=None,
              help="slurm: write job_submit.lua here (default: next to $SLURM_CONF or /etc/slurm).")
@click.option("--vmwrap", "vmwrap_path", default=None,
              help="vmwrap as the nodes see it (default: this installation's, e.g. /usr/bin/vmwrap from the package).")
@click.option("--default-image", default=None, help="Run jobs without a directive in this image.")
@click.option("--node-config", default=None, help="Settings file the nodes use (may contain %n).")
@click.option("--hooks", "hooks", default=None, metavar="DIR",
              help="Hooks written by `vmwrap hooks install DIR` (default: the package's own, for /opt/vmwrap/venv).")
@friendly_oserrors
def config_render(scheduler, lua_out, vmwrap_path, default_image, node_config, hooks) -> None:
    """Print SCHEDULER's configuration that enables vmwrap (slurm: slurm.conf lines, and job_submit.lua
    written; sge: the queue and sge_request settings)."""
    from ..adapter import scheduler as find

    from .. import resources

    adapter = find(scheduler)
    extra = {}
    if hooks is not None:
        try:
            extra["hooks_dir"] = resources.hooks_dir(hooks)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--hooks") from None
    text = adapter.render_config(settings(), lua_out=lua_out, vmwrap_path=vmwrap_path or installed_vmwrap(),
                                 default_image=default_image, node_config=node_config, **extra)
    if hooks is not None and str(resources.HOOKS) in text:
        raise click.UsageError(f"vmwrap config render {scheduler} does not take --hooks yet (it names {resources.HOOKS})")
    click.echo(text)
