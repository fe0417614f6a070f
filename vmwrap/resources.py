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
