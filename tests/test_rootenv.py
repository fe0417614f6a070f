"""Root entry points start clean: isolated Python, a whitelisted environment, root-owned config only."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vmwrap import config
from vmwrap.config import render
from vmwrap.errors import NodeError
from vmwrap.rootenv import BASE, SAFE_PATH, clean_environment

ROOT = Path(__file__).resolve().parent.parent
HOOKS = ROOT / "vmwrap" / "hooks"
USER = 1234  # tests/conftest.py's test user

# Runs the real CLI with the hooks replaced by a spy that records what they were handed.
SPY = r"""
import json, os, sys
import vmwrap_plugins.slurm.hooks as sh, vmwrap_plugins.sge.hooks as gh
out = sys.argv[1]
def spy(settings, *rest, **kw):
    with open(out, "w") as f:
        json.dump({"environ": dict(os.environ), "rest": [r for r in rest if isinstance(r, (dict, str, list))],
                   "state_dir": settings.state_dir}, f)
    return 0
sh.prolog = sh.epilog = sh.attach = gh.prolog = gh.epilog = gh.starter = spy
from vmwrap.cli import main
main(sys.argv[2:])
"""

JUNK = {"PATH": "/home/evil/bin:/usr/bin:/bin", "PYTHONPATH": "/home/evil/py", "LD_PRELOAD": "/home/evil/x.so",
        "GCONV_PATH": "/home/evil/gconv", "LIBVIRT_LOG_OUTPUTS": "1:file:/etc/passwd", "HOME": "/home/evil",
        "LANG": "xx_XX.EVIL", "FOO": "bar"}


@pytest.fixture
def base():
    """A root-owned 0755 dir the test user can traverse (pytest's own tmp dirs are 0700)."""
    d = Path(f"/var/tmp/vmwrap-rootenv-{os.getpid()}-{os.urandom(3).hex()}")
    d.mkdir(mode=0o755)
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _site(d: Path, name: str = "vmwrap.toml", **extra) -> Path:
    (d / "images.toml").write_text("")
    cfg = d / name
    cfg.write_text(render({"catalog": str(d / "images.toml"), "state_dir": str(d / "state"), **extra}))
    return cfg


def _spy(tmp_path: Path, env: dict, *argv: str) -> dict:
    out = tmp_path / f"spy-{os.urandom(3).hex()}.json"
    r = subprocess.run([sys.executable, "-I", "-c", SPY, str(out), *argv], env=env, capture_output=True,
                       text=True, timeout=60, cwd="/")
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(out.read_text())


def test_clean_environment_keeps_only_the_whitelist(monkeypatch):
    for k, v in {**JUNK, "SLURM_JOB_ID": "7", "SLURM_JOB_COMMENT": "c"}.items():
        monkeypatch.setenv(k, v)
    saved = dict(os.environ)
    try:
        got = clean_environment(["SLURM_JOB_ID", "SLURM_JOB_COMMENT", "PATH", "NOT_SET"], {"SGE_CELL": "default"})
        assert dict(os.environ) == got == {**BASE, "SLURM_JOB_ID": "7", "SLURM_JOB_COMMENT": "c",
                                           "SGE_CELL": "default"}
        assert got["PATH"] == SAFE_PATH == "/usr/sbin:/usr/bin:/sbin:/bin"  # `keep` cannot let PATH through
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.mark.parametrize("argv,facts", [
    (["slurm", "prolog"], {"SLURM_JOB_ID": "42", "SLURMD_NODENAME": "c2", "SLURM_JOB_COMMENT": "vmwrap:image=x"}),
    (["slurm", "epilog"], {"SLURM_JOB_ID": "42", "SLURMD_NODENAME": "c2", "SLURM_JOB_EXIT_CODE2": "0:0"}),
    (["sge", "prolog", "vmwrapuser"], {"JOB_ID": "42", "SGE_TASK_ID": "undefined", "NSLOTS": "1",
                                       "JOB_SCRIPT": "/var/spool/gridengine/execd/h/job_scripts/42"}),
    (["sge", "epilog"], {"JOB_ID": "42", "SGE_TASK_ID": "3"}),
])
def test_root_hooks_replace_the_environment_first(tmp_path, argv, facts):
    """What the hook sees: fixed PATH and locale, the scheduler's facts, GE's cell; nothing of the job's."""
    fixed = {"SGE_ROOT": "/var/lib/gridengine", "SGE_CELL": "default"} if argv[0] == "sge" else {}
    env = {**JUNK, **facts, "VMWRAP_CONFIG": "/home/evil/vmwrap.toml", "SGE_ROOT": "/home/evil/ge"}
    seen = _spy(tmp_path, env, *argv)
    assert seen["environ"] == {**BASE, **facts, **fixed}
    assert seen["rest"][0] == seen["environ"]  # the hook's env argument is the clean one too


def test_root_hooks_take_config_from_the_command_line_with_node_name(tmp_path):
    """%n in --config is slurmd's node name (whitelisted); $VMWRAP_CONFIG is never read by a hook."""
    for n in ("c1", "c2"):
        (tmp_path / f"vmwrap-{n}.toml").write_text(render({"state_dir": f"/var/tmp/state-{n}"}))
    user = tmp_path / "user.toml"
    user.write_text(render({"state_dir": "/home/evil/state"}))
    env = {"SLURM_JOB_ID": "1", "SLURMD_NODENAME": "c2", "VMWRAP_CONFIG": str(user)}
    seen = _spy(tmp_path, env, "--config", str(tmp_path / "vmwrap-%n.toml"), "slurm", "prolog")
    assert seen["state_dir"] == "/var/tmp/state-c2"
    for argv in (["slurm", "prolog"], ["sge", "epilog"], ["sge", "starter", "/bin/true"], ["slurm", "attach", "x"]):
        seen = _spy(tmp_path, {**env, "JOB_ID": "1"}, *argv)
        assert seen["state_dir"] == config.load(config.DEFAULT_PATH).state_dir != "/home/evil/state", argv


def test_slurm_prolog_script_runs_isolated_python(base, tmp_path, test_user):
    """The real entry script, started as slurmd would but from a hostile cwd and environment: the
    planted PYTHONPATH module, cwd package and PATH binaries never run, the --config site is used."""
    site = base / "site"
    site.mkdir(mode=0o755)
    cfg = _site(site)
    evil = base / "evil"
    evil.mkdir(mode=0o777)
    marks = base / "marks"
    marks.mkdir(mode=0o777)
    plant = f"import os\nopen(os.path.join({str(marks)!r}, '%s-' + str(os.getuid())), 'w').close()\n"
    for mod in ("sitecustomize", "usercustomize"):
        (evil / f"{mod}.py").write_text(plant % mod)
    for pkg in ("vmwrap", "vmwrap_plugins"):
        (evil / pkg).mkdir()
        (evil / pkg / "__init__.py").write_text(plant % f"cwd-{pkg}")
    user_state = base / "userstate"
    (evil / "user.toml").write_text(render({"catalog": str(site / "images.toml"), "state_dir": str(user_state)}))
    job = str(900000 + int.from_bytes(os.urandom(2), "big"))
    env = {"PATH": f"{evil}:/usr/bin:/bin", "PYTHONPATH": str(evil),
           "VMWRAP_CONFIG": str(evil / "user.toml"),
           "SLURM_JOB_ID": job, "SLURM_JOB_USER": test_user.pw_name, "SLURM_JOB_UID": str(test_user.pw_uid),
           "SLURM_JOB_GID": str(test_user.pw_gid), "SLURM_JOB_WORK_DIR": str(evil), "SLURMD_NODENAME": "c1",
           "SLURM_JOB_COMMENT": "vmwrap:image=nosuch,memory=,cpus=,lost="}
    r = subprocess.run([str(HOOKS / "slurm-prolog"), "--config", str(cfg)], env=env, cwd=str(evil),
                       capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    try:
        assert r.returncode == 0, r.stdout + r.stderr
        assert sorted(os.listdir(marks)) == []
        assert not user_state.exists()
        # The job's failure (no slurmctld here, or the unknown image) was recorded where the --config
        # site keeps its jobs: that site was used.
        assert (site / "state" / "jobs" / job / "error").read_text().startswith(("user\n", "image\n", "error\n"))
    finally:
        subprocess.run([str(HOOKS / "slurm-epilog"), "--config", str(cfg)], env={"SLURM_JOB_ID": job},
                       capture_output=True, timeout=120)


# --- config.load as root: only root's own files ------------------------------------------------------

def test_root_loads_a_root_owned_config_in_root_owned_and_sticky_dirs(base):
    sticky = base / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)
    d = sticky / "site"
    d.mkdir(mode=0o755)
    assert config.load(str(_site(d, grace_seconds=7.0))).grace_seconds == 7.0
    link = base / "link"  # a root-owned symlink to a directory, in a root-owned directory
    link.symlink_to(d)
    assert config.load(str(link / "vmwrap.toml")).grace_seconds == 7.0
    assert config.load(str(base / "missing.toml")).state_dir == config.Settings().state_dir


@pytest.mark.parametrize("attack", ["file-owner", "group-writable", "world-writable", "symlink", "dir-owner",
                                    "dir-world-writable", "dir-group-writable", "symlink-in-sticky",
                                    "symlink-dir-in-user-dir", "missing-in-user-dir", "catalog-owner",
                                    "catalog-symlink", "catalog-dir-writable"])
def test_root_refuses_config_others_could_change(base, attack):
    d = base / "site"
    d.mkdir(mode=0o755)
    cfg = _site(d)
    path, culprit = cfg, str(cfg)
    if attack == "file-owner":
        os.chown(cfg, USER, USER)
    elif attack == "group-writable":
        cfg.chmod(0o664)
    elif attack == "world-writable":
        cfg.chmod(0o646)
    elif attack == "symlink":
        path = d / "link.toml"
        path.symlink_to(cfg)
        culprit = str(path)
    elif attack == "dir-owner":
        os.chown(d, USER, USER)
        culprit = str(d)
    elif attack == "dir-world-writable":
        d.chmod(0o777)
        culprit = str(d)
    elif attack == "dir-group-writable":
        d.chmod(0o775)
        culprit = str(d)
    elif attack == "symlink-in-sticky":  # /tmp/x -> site, but x is the user's: they can re-point it
        sticky = base / "tmp"
        sticky.mkdir()
        sticky.chmod(0o1777)
        (sticky / "x").symlink_to(d)
        os.lchown(sticky / "x", USER, USER)
        path, culprit = sticky / "x" / "vmwrap.toml", str(sticky / "x")
    elif attack == "symlink-dir-in-user-dir":
        u = base / "user"
        u.mkdir()
        os.chown(u, USER, USER)
        (u / "x").symlink_to(d)
        path, culprit = u / "x" / "vmwrap.toml", str(u)
    elif attack == "missing-in-user-dir":  # the user could create it before the next prolog
        u = base / "user"
        u.mkdir()
        os.chown(u, USER, USER)
        path, culprit = u / "vmwrap.toml", str(u)
    elif attack == "catalog-owner":
        os.chown(d / "images.toml", USER, USER)
        culprit = f"vmwrap catalog {d / 'images.toml'}"
    elif attack == "catalog-symlink":
        (d / "real.toml").write_text("")
        (d / "images.toml").unlink()
        (d / "images.toml").symlink_to(d / "real.toml")
        culprit = f"vmwrap catalog {d / 'images.toml'}: is a symlink"
    elif attack == "catalog-dir-writable":
        c = base / "cat"
        c.mkdir()
        c.chmod(0o777)
        (c / "images.toml").write_text("")
        cfg.write_text(render({"catalog": str(c / "images.toml")}))
        culprit = str(c)
    with pytest.raises(NodeError) as e:
        config.load(str(path))
    assert culprit in str(e.value), str(e.value)
    assert "root" in str(e.value)


def test_users_may_use_their_own_config(base):
    """The checks are root's: a user running vmwrap as themselves reads their own file."""
    u = base / "user"
    u.mkdir()
    os.chown(u, USER, USER)
    cfg = u / "mine.toml"
    cfg.write_text(render({"state_dir": "/var/tmp/mine"}))
    os.chown(cfg, USER, USER)
    cfg.chmod(0o664)
    r = subprocess.run([sys.executable, "-I", "-c", "import sys; from vmwrap import config; "
                        "print(config.load(sys.argv[1]).state_dir)", str(cfg)],
                       capture_output=True, text=True, user=USER, group=USER, cwd="/", timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "/var/tmp/mine", r.stdout + r.stderr


@pytest.mark.parametrize("argv", [["condor", "gc", "--once"], ["condor", "prestage", "--once", "--cached-ad", "/dev/null"]])
def test_htcondor_root_daemons_start_from_a_clean_environment(monkeypatch, tmp_path, argv):
    """They run as root and delete or fetch: PYTHONPATH, LD_PRELOAD or a stray config from the admin's
    shell must not reach them; the pool's CONDOR_CONFIG does."""
    from click.testing import CliRunner

    from vmwrap import daemons
    from vmwrap.cli import main

    seen = {}
    monkeypatch.setattr(daemons, "gc", lambda *a, **k: seen.update(os.environ) or 0)
    monkeypatch.setattr(daemons, "prestage", lambda *a, **k: seen.update(os.environ) or 0)
    cfg = tmp_path / "vmwrap.toml"
    cfg.write_text(f'catalog = "{tmp_path}/images.toml"\nstate_dir = "{tmp_path}/state"\n')
    saved = dict(os.environ)
    try:
        os.environ.update({"LD_PRELOAD": "/tmp/evil.so", "PYTHONPATH": "/tmp/evil", "CONDOR_CONFIG": "/etc/pool"})
        r = CliRunner().invoke(main, ["--config", str(cfg), *argv])
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert r.exit_code == 0, r.output
    assert "LD_PRELOAD" not in seen and "PYTHONPATH" not in seen and seen["CONDOR_CONFIG"] == "/etc/pool", seen
