"""The settings every command reads, from --config only as the root group received it, and how
every command shows what it found (aligned tables, --json, one-line errors).

The path lives on the click context object (no global, no environment variable): root hooks replace
os.environ first thing (vmwrap.rootenv), and Grid Engine hands its hooks the job's `qsub -v` variables,
so a hook never takes the path from the environment.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import fields
from typing import Any

import click

from .. import config as config_mod
from ..config import Settings
from ..errors import UserError

WIDTH = 100  # human tables fit a 100-column terminal


class Site:
    """`ctx.obj` of every command (plugins call `obj.settings(hook=True)`)."""

    def __init__(self, config_path: str | None) -> None:
        self.config_path = config_path
        self.loaded: Settings | None = None

    def settings(self, hook: bool = False) -> Settings:
        """The settings of --config, else $VMWRAP_CONFIG, else the default. Scheduler hooks (`hook`) never
        take the path from the environment: Grid Engine hands its hooks the job's `qsub -v` variables.
        A --config file that is not there is a mistake to name, not a reason to run on the defaults."""
        if self.config_path:
            path = self.config_path
            if "%n" in path:  # as config.load resolves it
                path = path.replace("%n", os.environ.get("SLURMD_NODENAME") or os.uname().nodename)
            if not os.path.lexists(path):
                raise UserError(f"config file {path} (--config) does not exist: fix the path, or leave --config "
                                f"out to use $VMWRAP_CONFIG or {config_mod.DEFAULT_PATH}")
        self.loaded = config_mod.load(self.config_path, from_env=not hook)
        return self.loaded


def settings(hook: bool = False) -> Settings:
    """The current command's settings (see Site.settings); a VmwrapError is reported by the root group."""
    return click.get_current_context().find_object(Site).settings(hook)


def friendly_oserrors(f: Callable) -> Callable:
    """A command whose files or directories are unusable (a setting naming a missing or unwritable
    path) says which path and which setting in one line, instead of a traceback."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return f(*args, **kwargs)
        except BrokenPipeError:  # `vmwrap ... | head`: click ends quietly, as for any command
            raise
        except OSError as e:
            where = e.filename if e.filename is not None else ""
            site = click.get_current_context().find_object(Site)
            hint = ""
            if site is not None and site.loaded is not None and where:
                hint = _setting_hint(site.loaded, str(where))
            raise click.ClickException(f"{where}: {e.strerror or e}{hint}" if where else str(e)) from None

    return wrapper


def _setting_hint(s: Settings, where: str) -> str:
    """Which path settings `where` belongs to (else lies under), for the admin to change."""
    paths = {f.name: getattr(s, f.name) for f in fields(Settings)
             if isinstance(getattr(s, f.name), str) and getattr(s, f.name).startswith("/")}
    hits = [k for k, v in paths.items() if where == v or where.startswith(v.rstrip("/") + "/")]
    hits = hits or [k for k, v in paths.items() if v.startswith(where.rstrip("/") + "/")]
    if not hits:
        return ""
    return f" (check setting {' or '.join(hits)}: {', '.join(repr(paths[k]) for k in hits)})"


def echo_json(data: Any) -> None:
    """`data` as the --json output: one JSON document on stdout (shapes in README, "Output for scripts")."""
    click.echo(json.dumps(data, indent=2))


def _fit(cell: str, width: int) -> str:
    """`cell` in `width` characters: the middle elided, so a path keeps both its root and its file."""
    if len(cell) <= width:
        return cell
    head = (width - 1) // 2
    return cell[:head] + "…" + cell[len(cell) - (width - 1 - head):]


def table(headers: Sequence[str], rows: Iterable[Sequence[object]], right: Iterable[int] = (),
          width: int = WIDTH) -> list[str]:
    """Lines of an aligned table no wider than `width`: the widest columns are shortened (middle
    elided) until it fits; columns in `right` are right-aligned."""
    cells = [[str(c) for c in r] for r in [list(headers), *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    while sum(widths) + 2 * (len(widths) - 1) > width and max(widths) > 8:
        widths[widths.index(max(widths))] -= 1
    right = set(right)
    out = []
    for r in cells:
        parts = [_fit(c, w).rjust(w) if i in right else _fit(c, w).ljust(w)
                 for i, (c, w) in enumerate(zip(r, widths))]
        out.append("  ".join(parts).rstrip())
    return out


def echo_table(headers: Sequence[str], rows: Iterable[Sequence[object]], right: Iterable[int] = ()) -> None:
    for line in table(headers, rows, right):
        click.echo(line)


json_option = click.option("--json", "as_json", is_flag=True,
                           help="One JSON document on stdout for scripts (shape: README, 'Output for scripts').")
quiet_option = click.option("--quiet", "-q", is_flag=True, help="No progress on the terminal (stderr).")
