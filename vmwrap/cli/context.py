"""The settings every command reads, from --config only as the root group received it.

The path lives on the click context object (no global, no environment variable): root hooks replace
os.environ first thing (vmwrap.rootenv), and Grid Engine hands its hooks the job's `qsub -v` variables,
so a hook never takes the path from the environment.
"""

from __future__ import annotations

import click

from .. import config as config_mod
from ..config import Settings


class Site:
    """`ctx.obj` of every command (plugins call `obj.settings(hook=True)`)."""

    def __init__(self, config_path: str | None) -> None:
        self.config_path = config_path

    def settings(self, hook: bool = False) -> Settings:
        """The settings of --config, else $VMWRAP_CONFIG, else the default. Scheduler hooks (`hook`) never
        take the path from the environment: Grid Engine hands its hooks the job's `qsub -v` variables."""
        return config_mod.load(self.config_path, from_env=not hook)


def settings(hook: bool = False) -> Settings:
    """The current command's settings (see Site.settings); a VmwrapError is reported by the root group."""
    return click.get_current_context().find_object(Site).settings(hook)
