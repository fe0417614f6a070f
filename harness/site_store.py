"""The shared checkpoint store of a test site, set up as the admin guide says: the site key, then
`vmwrap checkpoints init` once where the store is mounted (nodes refuse an unstamped store)."""

from __future__ import annotations

import os
from pathlib import Path


def init_stores(*configs: str | os.PathLike) -> None:
    """Stamp the store each vmwrap config names (a no-op on one already stamped with its key). A
    config whose key file does not exist is left alone: its saves fail as they would on such a site."""
    from vmwrap import config
    from vmwrap.checkpoint import init_store

    for c in configs:
        s = config.load(str(c), from_env=False)
        if s.workdir_share == "serial" and os.path.exists(s.checkpoint_key_file):
            init_store(Path(s.checkpoint_dir), s.checkpoint_key_file)


def store_elsewhere(config: Path, shared: Path, local: Path) -> str:
    """Point the node config `config`'s checkpoint_dir from the site's `shared` store at `local`, a new
    empty root-owned directory: what a node sees where the shared store is not mounted. Returns the
    config as it was, to write back afterwards."""
    before = config.read_text()
    line = f'checkpoint_dir = "{shared}"'
    assert line in before, before
    local.mkdir(mode=0o700)
    config.write_text(before.replace(line, f'checkpoint_dir = "{local}"'))
    return before
