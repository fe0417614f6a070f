"""Package data as real paths: the templates (Jinja2 and guest agent sources) and the root hook scripts.

They ship inside the `vmwrap` package (package data in pyproject.toml), so an editable install, a
wheel and a source checkout find them the same way. vmwrap is never imported from a zip, so the
data are plain files: gcc, `cp` and the schedulers' hook settings need real paths.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def path(*parts: str) -> Path:
    """The real path of vmwrap/<parts...> (a file or a directory)."""
    p = files("vmwrap").joinpath(*parts)
    if not isinstance(p, Path):  # a zip import: not a supported install
        raise RuntimeError(f"vmwrap package data {'/'.join(parts)} is not a plain file ({p!r})")
    return p


TEMPLATES = path("templates")
HOOKS = path("hooks")


def hooks_dir(installed: str | None = None) -> Path:
    """Where the scheduler should run the hooks from: the package's own (they name the reference
    install's /opt/vmwrap/venv/bin/python), or a dir `vmwrap hooks install` wrote for this install."""
    if installed is None:
        return HOOKS
    d = Path(installed)
    if not d.is_absolute():
        raise ValueError(f"hooks dir {installed}: give an absolute path")
    missing = sorted(h.name for h in HOOKS.iterdir()
                     if h.is_file() and not h.name.startswith((".", "__")) and not (d / h.name).is_file())
    if missing:
        raise ValueError(f"hooks dir {installed}: no {', '.join(missing)} (run `vmwrap hooks install {installed}` first)")
    return d
