"""The simulator's compiled engine (vmwrap/sim/native.py, issue 22's sweep time): it is the build of
this very engine.py, it schedules exactly as the Python engine does, and a build anyone but root
could have written is never loaded."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vmwrap.sim import native
from test_sim_schedule import DIGESTS

ROOT = Path(__file__).resolve().parent.parent
SCHEDULES = """
import hashlib, json
from vmwrap.sim import CONFIGS, Cluster, simulate, native
from vmwrap.sim.workload import SKEWED, assign_images, synthetic
jobs, ars = synthetic(jobs=200, nodes=24, load=1.1, ar_share=0.2, ar_nodes=(3, 12), ar_hours=2,
                      mean_run_s=3600, seed=7)
jobs, ars = assign_images(jobs, ars, SKEWED, 7)
out = {}
for name, cfg in sorted(CONFIGS.items()):
    r = simulate(jobs, ars, cfg, Cluster(nodes=24, cache_mb=8192, bandwidth_mb_s=20))
    out[name] = hashlib.sha256(repr(sorted(r.records.items())).encode()).hexdigest()[:16]
print(json.dumps({"native": native.is_native(), "digests": out}))
"""


def _schedules(pure: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != native.PURE_ENV}
    if pure:
        env[native.PURE_ENV] = "1"
    r = subprocess.run([sys.executable, "-c", SCHEDULES], capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def build():
    """The build the install script made (made here if it is missing: Cython is a test dependency)."""
    return native.build(quiet=True)


def test_the_compiled_engine_schedules_every_configuration_as_the_python_one(build):
    assert build == native.built() and build.exists()
    compiled, python = _schedules(pure=False), _schedules(pure=True)
    assert compiled["native"] and not python["native"]
    assert compiled["digests"] == python["digests"] == DIGESTS


def test_only_the_build_of_this_source_is_taken(build, tmp_path, monkeypatch):
    edited = tmp_path / "engine.py"
    edited.write_bytes(native.SOURCE.read_bytes() + b"\n# edited\n")
    monkeypatch.setattr(native, "SOURCE", edited)
    assert native.built() != build and not native.built().exists()   # runs as Python until rebuilt


def test_a_build_anyone_but_root_could_have_written_is_never_loaded(build, tmp_path):
    assert native._trusted(build)
    assert not native._trusted(tmp_path / build.name)          # not there
    shutil.copy(build, tmp_path / build.name)
    assert not native._trusted(tmp_path / build.name)          # under /tmp, which anyone may write
    d = native.NATIVE_DIR.parent / f"sim-test-{os.getpid()}"
    d.mkdir(mode=0o755)
    try:
        copy = d / build.name
        shutil.copy(build, copy)
        copy.chmod(0o644)
        assert native._trusted(copy)
        copy.chmod(0o664)                                        # group-writable
        assert not native._trusted(copy)
        copy.chmod(0o644)
        os.chown(copy, 1234, 1234)                               # not root's
        assert not native._trusted(copy)
        copy.unlink()
        copy.symlink_to(build)                                   # a link, even to the real build
        assert not native._trusted(copy)
        copy.unlink()
        shutil.copy(build, copy)
        d.chmod(0o777)                                           # in a dir anyone may write
        assert not native._trusted(copy)
    finally:
        shutil.rmtree(d)


def test_a_build_that_will_not_load_leaves_the_python_engine(build):
    """A trusted file that is no loadable module for this Python (another interpreter's, cut short):
    the simulator still imports, on its Python engine."""
    d = native.NATIVE_DIR.parent / f"sim-bad-{os.getpid()}"
    d.mkdir(mode=0o755)
    try:
        (d / build.name).write_bytes(b"\x7fELF not really")
        code = ("import os, sys\nfrom vmwrap.sim import native\n"
                f"del sys.modules[native.MODULE]; os.environ.pop(native.PURE_ENV)\n"
                f"print(native.install(native.Path({str(d)!r})), native.MODULE in sys.modules)\n"
                "import vmwrap.sim.engine as e; print(e.__file__.endswith('.py'))\n")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                           env={**os.environ, native.PURE_ENV: "1"}, timeout=120)
        assert r.returncode == 0 and r.stdout.split() == ["False", "False", "True"], (r.stdout, r.stderr)
    finally:
        shutil.rmtree(d)
