"""`vmwrap hooks install DIR` binds the root hooks to the running interpreter, and refuses what root
must not trust (docs/security.md). No daemons: the installed hooks run in tests/test_wheel.py."""

from __future__ import annotations

import os
import shutil
import stat
import sys
import sysconfig
from pathlib import Path

import pytest
from click.testing import CliRunner

from vmwrap import config, resources
from vmwrap.cli import main
from vmwrap.cli.hooks import EXEC_LINE, HookInstallError, bindings, install

SHIPPED = sorted(p for p in resources.HOOKS.iterdir() if p.is_file() and not p.name.startswith((".", "__")))
OTHER_PYTHON = "/usr/bin/python3"  # root's, not the reference /opt/vmwrap/venv/bin/python


def test_every_hook_is_written_root_owned_bound_to_the_interpreter(tmp_path):
    target = tmp_path / "hooks"
    written = install(str(target), python=OTHER_PYTHON)
    assert sorted(p.name for p in written) == [p.name for p in SHIPPED]
    site = sysconfig.get_paths()["purelib"]
    for src in SHIPPED:
        dst = target / src.name
        st = os.lstat(dst)
        assert stat.S_ISREG(st.st_mode) and (st.st_uid, st.st_gid) == (0, 0), dst
        shipped_mode = 0o755 if os.stat(src).st_mode & stat.S_IXUSR else 0o644
        assert stat.S_IMODE(st.st_mode) == shipped_mode, dst
        text, orig = dst.read_text(), src.read_text()
        if src.name == "condor-wrapper":  # the job user's own Python, standard library only
            assert text == orig
            continue
        expected = orig
        for old, new in bindings(OTHER_PYTHON, Path(site)):
            expected = expected.replace(old, new)
        assert text == expected != orig, dst
        if EXEC_LINE in orig:
            assert f"exec {OTHER_PYTHON} -I -m " in text and "/opt/vmwrap/venv" not in text, dst
        if "VENV_SITE" in orig:  # the running interpreter's site dir (this test's venv)
            assert f'VENV_SITE = "{site}"\n' in text, dst
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o755
    assert stat.S_IMODE(os.stat(target / "pbs-queuejob.py").st_mode) == 0o644


def test_reinstall_replaces_a_planted_symlink_instead_of_writing_through_it(tmp_path):
    target = tmp_path / "hooks"
    target.mkdir(mode=0o755)
    victim = tmp_path / "victim"
    victim.write_text("keep\n")
    (target / "sge-prolog").symlink_to(victim)
    install(str(target))
    assert victim.read_text() == "keep\n"
    assert not (target / "sge-prolog").is_symlink()


def test_symlinked_dir_is_refused(tmp_path):
    real = tmp_path / "real"
    real.mkdir(mode=0o755)
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(HookInstallError, match="is a symlink"):
        install(str(tmp_path / "link"))
    assert not list(real.iterdir())


@pytest.mark.parametrize("mode", [0o775, 0o757, 0o1777])
def test_dir_writable_by_others_is_refused(tmp_path, mode):
    d = tmp_path / "hooks"
    d.mkdir()
    d.chmod(mode)
    with pytest.raises(HookInstallError, match="writable by root alone"):
        install(str(d))
    assert not list(d.iterdir())


def test_dir_owned_by_another_user_is_refused(tmp_path):
    d = tmp_path / "hooks"
    d.mkdir(mode=0o755)
    os.chown(d, 65534, 65534)
    with pytest.raises(HookInstallError, match="uid 65534"):
        install(str(d))


def test_dir_under_a_group_writable_parent_is_refused(tmp_path):
    parent = tmp_path / "shared"
    parent.mkdir()
    parent.chmod(0o775)
    with pytest.raises(HookInstallError, match="may be changed by others"):
        install(str(parent / "hooks"))
    assert not (parent / "hooks").exists()


def test_relative_dir_is_refused():
    with pytest.raises(HookInstallError, match="absolute"):
        install("hooks")


@pytest.mark.parametrize("body", ["#!/bin/sh\nexec /usr/bin/python3 -I -m vmwrap.cli sge new\n",
                                  "#!/bin/sh\n" + EXEC_LINE + "vmwrap.cli a\n" + EXEC_LINE + "vmwrap.cli b\n"],
                         ids=["no-interpreter-line", "two-lines"])
def test_a_hook_without_exactly_one_interpreter_line_fails_the_install(tmp_path, body):
    source = tmp_path / "src"
    source.mkdir()
    shutil.copy2(resources.HOOKS / "sge-prolog", source / "sge-prolog")
    (source / "new-hook").write_text(body)
    target = tmp_path / "hooks"
    with pytest.raises(HookInstallError, match="new-hook.*exactly once"):
        install(str(target), source=source)
    assert not target.exists() or not list(target.iterdir())  # nothing half-installed


@pytest.mark.parametrize("case", ["not-root", "group-writable", "dir-writable", "space", "relative"])
def test_untrusted_interpreter_is_refused(tmp_path, case):
    d = tmp_path / "py"
    d.mkdir(mode=0o755)
    py = d / "python"
    shutil.copy2(sys._base_executable if hasattr(sys, "_base_executable") else OTHER_PYTHON, py)
    py.chmod(0o755)
    if case == "not-root":
        os.chown(py, 65534, 65534)
    elif case == "group-writable":
        py.chmod(0o775)
    elif case == "dir-writable":
        d.chmod(0o777)
    elif case == "space":
        py = py.rename(d / "py thon")
    arg = "py/python" if case == "relative" else str(py)
    with pytest.raises(HookInstallError):
        install(str(tmp_path / "hooks"), python=arg)
    assert not (tmp_path / "hooks").exists()


def test_interpreter_through_a_symlink_owned_by_others_is_refused(tmp_path):
    d = tmp_path / "bin"
    d.mkdir(mode=0o755)
    (d / "python").symlink_to(OTHER_PYTHON)
    os.chown(d / "python", 65534, 65534, follow_symlinks=False)
    with pytest.raises(HookInstallError, match="uid 65534"):
        install(str(tmp_path / "hooks"), python=str(d / "python"))


@pytest.fixture
def cfg(tmp_path):
    path = tmp_path / "vmwrap.toml"
    (tmp_path / "images.toml").write_text("")
    path.write_text(config.render({"catalog": str(tmp_path / "images.toml"), "state_dir": str(tmp_path / "state")}))
    return path


def test_cli_install_then_render_points_at_the_installed_dir(tmp_path, cfg):
    target = tmp_path / "hooks"
    r = CliRunner().invoke(main, ["--config", str(cfg), "hooks", "install", str(target)])
    assert r.exit_code == 0, r.output
    assert str(target / "sge-prolog") in r.stdout
    r = CliRunner().invoke(main, ["--config", str(cfg), "config", "render", "sge", "--hooks", str(target)])
    assert r.exit_code == 0, r.output
    assert f"root@{target / 'sge-prolog'} $job_owner" in r.stdout and f"-jsv {target / 'sge-jsv'}" in r.stdout
    assert f"migr_command         {target / 'sge-method'} migrate" in r.stdout
    assert str(resources.HOOKS) not in r.stdout
    r = CliRunner().invoke(main, ["--config", str(cfg), "config", "render", "slurm", "--hooks", str(target),
                                  "--lua-out", str(tmp_path / "job_submit.lua")])
    assert r.exit_code == 0, r.output
    assert f"Prolog={target / 'slurm-prolog'}\n" in r.stdout and str(resources.HOOKS) not in r.stdout


def test_render_default_still_names_the_package_hooks(tmp_path, cfg):
    r = CliRunner().invoke(main, ["--config", str(cfg), "config", "render", "sge"])
    assert r.exit_code == 0, r.output
    assert f"root@{resources.HOOKS / 'sge-prolog'} $job_owner" in r.stdout


def test_render_refuses_a_hooks_dir_without_the_hooks_or_a_renderer_ignoring_it(tmp_path, cfg):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = CliRunner().invoke(main, ["--config", str(cfg), "config", "render", "sge", "--hooks", str(empty)])
    assert r.exit_code == 2 and "vmwrap hooks install" in r.output, r.output
    target = tmp_path / "hooks"
    install(str(target))
    r = CliRunner().invoke(main, ["--config", str(cfg), "config", "render", "torque", "--hooks", str(target)])
    assert r.exit_code == 2 and "does not take --hooks" in r.output, r.output
