"""vmwrap.toml is checked on load: every key against its Settings field's type and range."""

import typing
from dataclasses import fields
from pathlib import Path

import pytest

from vmwrap import config
from vmwrap.config import Settings
from vmwrap.errors import NodeError


def _load(tmp_path: Path, text: str) -> Settings:
    cfg = tmp_path / "vmwrap.toml"
    cfg.write_text(text)
    return config.load(str(cfg))


def _error(tmp_path: Path, text: str) -> str:
    with pytest.raises(NodeError) as e:
        _load(tmp_path, text)
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / 'vmwrap.toml'}: "), msg
    return msg


@pytest.mark.parametrize("line, msg", [
    ('grace_seconds = "soon"', "grace_seconds must be a number of seconds, got 'soon'"),
    ('cache_max_bytes = "20G"', "cache_max_bytes must be a whole number of bytes, got '20G'"),
    ("cache_max_bytes = 2e10", "cache_max_bytes must be a whole number of bytes, got 20000000000.0"),
    ("default_memory_mib = 512.5", "default_memory_mib must be a whole number of MiB, got 512.5"),
    ("plan_max_nodes = true", "plan_max_nodes must be a whole number, got True"),
    ("plan_save_rate_mb_s = [1]", "plan_save_rate_mb_s must be a number of MB per second, got [1]"),
    ("grace_seconds = -1", "grace_seconds must be 0 or more, got -1"),
    ("job_disk_max_bytes = -4096", "job_disk_max_bytes must be 0 or more, got -4096"),
    ("plan_max_gap_s = inf", "plan_max_gap_s must be a finite number of seconds, got inf"),
    ("plan_save_margin = nan", "plan_save_margin must be a finite number, got nan"),
    ("default_cpus = 0", "default_cpus must be more than 0, got 0"),
    ("prolog_timeout_s = 70000", "prolog_timeout_s must be at most 65533 seconds, got 70000"),
    ("plan_save_rate_mb_s = 0.0", "plan_save_rate_mb_s must be more than 0, got 0.0"),
    ('verify_on_use = "yes"', "verify_on_use must be true or false, got 'yes'"),
    ("plan_enabled = 1", "plan_enabled must be true or false, got 1"),
    ("catalog = 3", "catalog must be a string, got 3"),
    ('plan_users = ["a", "b"]', "plan_users must be a string, got ['a', 'b']"),
    ('accel = "xen"', "accel must be auto, kvm or tcg, got 'xen'"),
    ('workdir_share = "nfs"', "workdir_share must be serial or virtio-9p, got 'nfs'"),
    ("grace_secnds = 5", "unknown setting 'grace_secnds' (did you mean grace_seconds?)"),
    ("[plan]\nenabled = true", "unknown setting 'plan'"),
    ("frobnicate = 1", "unknown setting 'frobnicate'"),
])
def test_bad_value_names_key_and_file(tmp_path, line, msg):
    assert _error(tmp_path, line + "\n").endswith(": " + msg)


def _wrong(typ):
    """A value of the wrong type for a setting of type `typ` (every type Settings uses)."""
    if typing.get_origin(typ) is typing.Literal:
        return '"not-a-choice"'
    return {bool: '"yes"', int: '"20G"', float: '"soon"', str: "3"}[typ]


@pytest.mark.parametrize("f", fields(Settings), ids=lambda f: f.name)
def test_every_setting_is_type_checked(tmp_path, f):
    """No setting escapes the check (a new field of a type load() cannot check fails here)."""
    typ = typing.get_type_hints(Settings)[f.name]
    msg = _error(tmp_path, f"{f.name} = {_wrong(typ)}\n")
    assert f": {f.name} must be " in msg, msg


def test_good_values_load(tmp_path):
    s = _load(tmp_path, 'grace_seconds = 7\ncache_max_bytes = 0\naccel = "tcg"\nverify_on_use = true\n'
                        'plan_users = "a,b"\ndefault_cpus = 2\n')
    assert s.grace_seconds == 7.0 and type(s.grace_seconds) is float  # a whole number is a fine float
    assert (s.cache_max_bytes, s.accel, s.verify_on_use, s.plan_users, s.default_cpus) == (0, "tcg", True, "a,b", 2)


def test_rendered_defaults_load_back(tmp_path):
    """render() (test sites, local clusters) writes what load() accepts, for every setting."""
    defaults = {f.name: getattr(Settings(), f.name) for f in fields(Settings)}
    assert _load(tmp_path, config.render(defaults)) == Settings()


EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "vmwrap.toml.example"


def test_example_lists_every_setting_with_its_default(tmp_path):
    """docs/vmwrap.toml.example cannot drift from Settings: same keys, the defaults as values, and a
    one-line comment right above each key; it loads cleanly (scripts/install-host.sh installs it)."""
    import tomllib

    example = tomllib.loads(EXAMPLE.read_text())
    assert set(example) == {f.name for f in fields(Settings)}
    defaults = Settings()
    assert {k: v for k, v in example.items() if v != getattr(defaults, k)} == {}
    lines = EXAMPLE.read_text().splitlines()
    for i, line in enumerate(lines):
        if line and not line.startswith("#"):
            assert i > 0 and lines[i - 1].startswith("# "), f"no comment above {line!r}"
    assert _load(tmp_path, EXAMPLE.read_text()) == defaults
