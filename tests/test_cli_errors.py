"""A VmwrapError from any command reaches the admin the same way: one conversion in the root group.

Each area's command (and a plugin's hook) is made to raise an error kind no command handles itself;
the root group must turn it into click's "Error: <message>" on stderr with exit 1, not a traceback.
Light: no VM, no daemon (the calls that would reach libvirt or a store are replaced by the raise).
"""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from vmwrap import config
from vmwrap.cli import main
from vmwrap.errors import VmwrapError


class Surprise(VmwrapError):
    """An error kind no command catches (a new subclass added after the CLI was written)."""

    kind = "surprise"


def _raise(*_args, **_kwargs):
    raise Surprise("the surprise's message")


# (area, argv after --config, what the command calls that raises)
CASES = [
    ("jobs", ["teardown", "j1"], "vmwrap.launcher.teardown"),
    ("images", ["image", "list"], "vmwrap.catalog.Catalog.load"),
    ("node", ["ps"], "vmwrap.domain.connect"),
    ("node agent", ["agent"], "vmwrap.agent.serve"),
    ("checkpoints", ["checkpoints", "verify", "j1"], "vmwrap.checkpoint.Store.verify"),
    ("config", ["config", "render", "slurm"], "vmwrap.adapter.scheduler"),
    ("simulate", ["simulate", "--synthetic", "--jobs", "5"], "vmwrap.sim.report.compare"),
    ("settings", ["cache", "list"], "vmwrap.config.load"),
    ("run", ["run", "/dev/null"], "vmwrap.config.load"),
    ("plugin hook", ["slurm", "attach", "/dev/null"], "vmwrap.config.load"),
]


@pytest.fixture
def cfg(tmp_path):
    path = tmp_path / "vmwrap.toml"
    path.write_text(config.render({"catalog": str(tmp_path / "images.toml"), "state_dir": str(tmp_path / "state"),
                                   "cache_dir": str(tmp_path / "cache"), "checkpoint_dir": str(tmp_path / "ckpt")}))
    return path


@pytest.mark.parametrize("area,argv,target", CASES, ids=[c[0] for c in CASES])
def test_unhandled_vmwrap_error_is_one_click_error(cfg, monkeypatch, area, argv, target):
    monkeypatch.setattr(target, _raise)
    r = CliRunner().invoke(main, ["--config", str(cfg), *argv])
    assert isinstance(r.exception, SystemExit), r.exception  # not the Surprise escaping as a traceback
    assert (r.exit_code, r.stderr, r.stdout) == (1, "Error: the surprise's message\n", ""), area


@pytest.mark.parametrize("argv,from_env", [(["cache", "list"], True), (["slurm", "attach", "/dev/null"], False)])
def test_settings_come_from_config_option_and_hooks_never_from_environment(cfg, monkeypatch, argv, from_env):
    seen = []

    def load(path, from_env):
        seen.append((path, from_env))
        raise Surprise("stop here")

    monkeypatch.setattr("vmwrap.config.load", load)
    monkeypatch.setenv("VMWRAP_CONFIG", "/elsewhere.toml")
    r = CliRunner().invoke(main, ["--config", str(cfg), *argv])
    assert seen == [(str(cfg), from_env)] and r.exit_code == 1
