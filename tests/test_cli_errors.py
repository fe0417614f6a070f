"""A VmwrapError from any command reaches the admin the same way: one conversion in the root group.

Each area's command (and a plugin's hook) is made to raise an error kind no command handles itself;
the root group must turn it into click's "Error: <message>" on stderr with exit 1, not a traceback.
Light: no VM, no daemon (the calls that would reach libvirt or a store are replaced by the raise).
"""

from __future__ import annotations

import json

import click
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


# --- a user's mistake, command by command: one "Error:" line saying what to change, never a traceback ---

BAD_URI = "qemu+unix:///system?socket=/nonexistent/libvirt-sock"
GONE = "/proc/vmwrap-nonexistent"


def _scontrol_down(*argv, **_kwargs):
    raise RuntimeError(f"{' '.join(argv)}: scontrol: error: resolve_ctls_from_dns_srv: Unknown host\n"
                       "scontrol: fatal: Could not establish a configuration source")


# (id, settings over the good site's, argv after --config, what the one error line must say, prepare)
MISTAKES = [
    ("config missing", None, ["image", "list"], "(--config) does not exist", None),
    ("config not toml", "x = [", ["cache", "list"], "cannot read vmwrap config", None),
    ("config unknown key", {"cache_dri": "/x"}, ["ps"], "did you mean cache_dir?", None),
    ("ps libvirt down", {"libvirt_uri": BAD_URI}, ["ps"], "is libvirtd running?", None),
    ("agent libvirt down", {"libvirt_uri": BAD_URI}, ["agent"], "is libvirtd running?", None),
    ("cache list bad dir", {"cache_dir": GONE + "/cache"}, ["cache", "list"], "check setting cache_dir", None),
    ("cache gc bad dir", {"cache_dir": GONE + "/cache"}, ["cache", "gc"], "check setting cache_dir", None),
    ("cache fetch bad dir", {"cache_dir": GONE + "/cache"}, ["cache", "fetch", "a"], "check setting cache_dir", None),
    ("teardown bad dir", {"state_dir": GONE + "/state", "cache_dir": GONE + "/state/c"}, ["teardown", "j1"],
     "No such file or directory (check setting", None),
    ("catalog missing", {"catalog": "/nonexistent/images.toml"}, ["image", "list"], "does not exist", None),
    ("cache fetch unknown image", {}, ["cache", "fetch", "nosuch"], "no image 'nosuch'", None),
    ("cache fetch source gone", {}, ["cache", "fetch", "a"], "cannot read image source", "rm-kernel"),
    ("cache evict nothing", {}, ["cache", "evict", "nosuch"], "nothing cached for 'nosuch'", None),
    ("image remove unknown", {}, ["image", "remove", "nosuch"], "no image 'nosuch'", None),
    ("image add bad name", {}, ["image", "add", "../x", "--kernel", "{k}", "--initrd", "{k}"], "invalid image name", None),
    ("image add bad memory", {}, ["image", "add", "b", "--kernel", "{k}", "--initrd", "{k}", "--memory", "lots"],
     "not a size", None),
    ("image add missing file", {}, ["image", "add", "b", "--kernel", "/nonexistent/k", "--initrd", "{k}"],
     "'/nonexistent/k' does not exist", None),
    ("image build bad kind", {}, ["image", "build", "--name", "b", "--kind", "bogus"], "is not one of", None),
    ("image build bad name", {}, ["image", "build", "--name", "a b"], "invalid image name", None),
    ("teardown bad job id", {}, ["teardown", "../x"], "invalid job id", None),
    ("checkpoint unknown", {}, ["checkpoints", "verify", "nosuch"], "has no checkpoint", "ckpt-dir"),
    ("checkpoint store missing", {}, ["checkpoints", "verify", "j1"], "shared storage not mounted on this node", None),
    ("checkpoints delete none", {}, ["checkpoints", "delete"], "Missing argument", None),
    ("config render unknown", {}, ["config", "render", "nosuch"], "no scheduler adapter 'nosuch'", None),
    ("reconcile unknown", {}, ["reconcile", "nosuch", "--once"], "no scheduler adapter 'nosuch'", None),
    ("hooks install relative", {}, ["hooks", "install", "relative/dir"], "give an absolute path", None),
    ("plan json without dry run", {}, ["plan", "--json"], "add --dry-run", None),
    ("plan json slurm down", {}, ["plan", "--dry-run", "--json"], "cannot ask Slurm", "scontrol-down"),
    ("sge plan json without dry run", {}, ["sge", "plan", "--json"], "add --dry-run", None),
    ("unknown option", {}, ["ps", "--bogus"], "No such option '--bogus'", None),
]


@pytest.fixture
def good_site(tmp_path):
    base = {"catalog": str(tmp_path / "images.toml"), "state_dir": str(tmp_path / "state"),
            "cache_dir": str(tmp_path / "cache"), "checkpoint_dir": str(tmp_path / "ckpt"),
            "checkpoint_key_file": str(tmp_path / "key"), "appliance_dir": str(tmp_path / "app")}
    (tmp_path / "k").write_bytes(b"kernel")
    cfg = tmp_path / "good.toml"
    cfg.write_text(config.render(base))
    r = CliRunner().invoke(main, ["--config", str(cfg), "image", "add", "a", "--kernel", str(tmp_path / "k"),
                                  "--initrd", str(tmp_path / "k")])
    assert r.exit_code == 0, r.output
    return tmp_path, base


@pytest.mark.parametrize("over,argv,says,prepare", [m[1:] for m in MISTAKES], ids=[m[0] for m in MISTAKES])
def test_a_mistake_is_one_error_line_saying_what_to_change(good_site, monkeypatch, over, argv, says, prepare):
    tmp, base = good_site
    cfg = tmp / "site.toml"
    if over is None:
        cfg = tmp / "missing.toml"
    elif isinstance(over, str):
        cfg.write_text(over)
    else:
        cfg.write_text(config.render({**base, **over}))
    if prepare == "ckpt-dir":  # the site's store, set up as the admin guide says
        from vmwrap import checkpoint

        checkpoint.init_store(tmp / "ckpt", checkpoint.keygen(tmp / "key"))
    if prepare == "rm-kernel":
        (tmp / "k").unlink()
    if prepare == "scontrol-down":
        monkeypatch.setattr("vmwrap_plugins.slurm.planner._run", _scontrol_down)
    argv = [a.replace("{k}", str(tmp / "k")) for a in argv]
    r = CliRunner().invoke(main, ["--config", str(cfg), *argv])
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)  # no traceback
    assert r.exit_code != 0 and "Traceback" not in r.output
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and says in errors[0], r.stderr
    assert r.stderr == errors[0] + "\n" and r.stdout == ""   # nothing but that one line, usage mistakes too
    if r.exit_code == 2:  # a usage mistake says where to look
        assert errors[0].endswith(" --help')"), errors[0]


def test_doctor_names_an_unreachable_libvirt_as_a_failed_check(good_site):
    tmp, base = good_site
    (tmp / "site.toml").write_text(config.render({**base, "libvirt_uri": BAD_URI}))
    r = CliRunner().invoke(main, ["--config", str(tmp / "site.toml"), "doctor", "--json"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    [lv] = [c for c in json.loads(r.stdout)["checks"] if c["name"] == "libvirt"]
    assert lv["status"] == "FAIL" and BAD_URI in lv["detail"]


def test_a_closed_pipe_is_not_reported_as_a_mistake():
    """`vmwrap cache list | head`: click's own quiet exit handles EPIPE, so it must reach click as it is."""
    from vmwrap.cli.context import friendly_oserrors

    @friendly_oserrors
    def listing():
        raise BrokenPipeError(32, "Broken pipe")

    @friendly_oserrors
    def unusable():
        raise FileNotFoundError(2, "No such file or directory", "/nonexistent/cache")

    with click.Context(click.Command("x")):
        with pytest.raises(BrokenPipeError):
            listing()
        with pytest.raises(click.ClickException, match="^/nonexistent/cache: No such file or directory$"):
            unusable()


def test_teardown_with_libvirt_unreachable_says_so_and_exits_as_a_node_fault(good_site, capsys):
    """Libvirt down at teardown used to be silent ("42: removed", exit 0) though the VM may still run."""
    from vmwrap import launcher
    from vmwrap.ledger import Ledger
    from vmwrap.payload import EXIT_NODE

    tmp, base = good_site
    (tmp / "site.toml").write_text(config.render({**base, "libvirt_uri": BAD_URI}))
    (tmp / "state" / "jobs" / "42").mkdir(parents=True)
    r = CliRunner().invoke(main, ["--config", str(tmp / "site.toml"), "teardown", "42"])
    assert r.exit_code == EXIT_NODE and r.stdout == "", (r.output, r.exception)
    [line] = r.stderr.splitlines()
    assert line.startswith("Error: job 42: its VM vmwrap-42 was not destroyed") and "cannot connect to libvirt" in line
    s = config.load(str(tmp / "site.toml"))
    [ev] = [e for e in Ledger(s.ledger_path).events("42") if e["event"] == "failed"]
    assert ev["detail"]["kind"] == "node" and ev["detail"]["stage"] == "teardown"
    # From the lifecycle's own callers (no raise): the same line on stderr, the files still go.
    (tmp / "state" / "jobs" / "43").mkdir()
    assert launcher.teardown("43", s) is True
    err = capsys.readouterr().err
    assert "vmwrap teardown: job 43: its VM vmwrap-43 was not destroyed" in err and "cannot connect to libvirt" in err
    assert not (tmp / "state" / "jobs" / "43").exists()
