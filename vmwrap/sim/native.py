"""The simulator's engine compiled to C by Cython, as plain Python (no types added: the same code, the
same schedules), for sweeps that take ~1.4x less CPU. Optional: without a build the engine runs as
Python.

`python -m vmwrap.sim build` (the install script runs it; needs Cython and a C compiler)
compiles the engine.py beside it. A build is named after the digest of the source it came from and
only the build of this very source is loaded: an edited engine.py runs as Python until rebuilt. A
build is code, so it is loaded only from a dir and file root owns and nobody else can write.
VMWRAP_SIM_PURE=1 keeps the Python engine (what the tests compare the build against).
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

NATIVE_DIR = Path("/var/cache/vmwrap/sim")
PURE_ENV = "VMWRAP_SIM_PURE"
MODULE = "vmwrap.sim.engine"
SOURCE = Path(__file__).with_name("engine.py")
CC = "/usr/bin/gcc"


def digest() -> str:
    """The engine source's digest, with the interpreter's ABI: a build is of one source for one Python."""
    h = hashlib.sha256(SOURCE.read_bytes())
    h.update(sysconfig.get_config_var("EXT_SUFFIX").encode())
    return h.hexdigest()[:20]


def built(native_dir: Path = NATIVE_DIR) -> Path:
    """Where the build of this engine source lives (whether or not it is there)."""
    return Path(native_dir) / f"engine-{digest()}{sysconfig.get_config_var('EXT_SUFFIX')}"


def _trusted(path: Path) -> bool:
    """Root's and writable by nobody else, as is every dir above it (never a link)."""
    p = Path(os.path.abspath(path))
    for q in (p, *p.parents):
        try:
            st = os.lstat(q)
        except OSError:
            return False
        if st.st_uid != 0 or st.st_mode & 0o022 or stat.S_ISLNK(st.st_mode):
            return False
    return True


def install(native_dir: Path = NATIVE_DIR) -> bool:
    """Make `vmwrap.sim.engine` the build of this source, when there is one to trust (called by
    vmwrap.sim before it imports its engine); False: the engine stays Python."""
    if os.environ.get(PURE_ENV) or MODULE in sys.modules:
        return False
    path = built(native_dir)
    if not _trusted(path):
        return False
    try:   # a build that will not load (another Python's, removed meanwhile): the engine stays Python
        loader = importlib.machinery.ExtensionFileLoader(MODULE, str(path))
        spec = importlib.util.spec_from_file_location(MODULE, str(path), loader=loader)
        if spec is None:
            return False
        module = importlib.util.module_from_spec(spec)
        sys.modules[MODULE] = module
        loader.exec_module(module)
    except Exception:
        sys.modules.pop(MODULE, None)
        return False
    parent = sys.modules.get(MODULE.rpartition(".")[0])
    if parent is not None:
        parent.engine = module   # as an import would have set it
    return True


def is_native() -> bool:
    """Whether the engine in use is the compiled one."""
    mod = sys.modules.get(MODULE)
    return mod is not None and isinstance(getattr(mod, "__loader__", None), importlib.machinery.ExtensionFileLoader)


BUILD_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}   # nothing of the caller's reaches Cython or gcc


def build(native_dir: Path = NATIVE_DIR, quiet: bool = False) -> Path:
    """Compile engine.py into `native_dir` (root's, 0755: install() trusts nothing else) unless this
    source's build is there."""
    native_dir = Path(native_dir)
    out = built(native_dir)
    native_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(native_dir, 0o755)
    if not _trusted(native_dir):
        raise OSError(f"{native_dir} is not root's alone (or a dir above it is not): a build there would never load")
    if _trusted(out):
        return out
    with tempfile.TemporaryDirectory(dir=native_dir) as tmp:
        c = Path(tmp) / "engine.c"
        src = Path(tmp) / "engine.py"
        shutil.copyfile(SOURCE, src)
        # annotation_typing off: the annotations are for readers; Cython would enforce them exactly
        subprocess.run([sys.executable, "-I", "-m", "cython", "-3", "-X", "annotation_typing=False", "--module-name",
                        MODULE, str(src), "-o", str(c)], check=True, capture_output=quiet, cwd=tmp, env=BUILD_ENV)
        so = Path(tmp) / out.name
        subprocess.run([CC, "-O2", "-shared", "-fPIC", "-I", sysconfig.get_paths()["include"], str(c), "-o", str(so)],
                       check=True, capture_output=quiet, cwd=tmp, env=BUILD_ENV)
        os.chmod(so, 0o644, follow_symlinks=False)
        os.replace(so, out)
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    for old in native_dir.glob(f"engine-*{suffix}"):   # this Python's builds of earlier sources: never loaded again
        if old != out:
            old.unlink(missing_ok=True)
    return out


def main(argv: list[str]) -> int:
    if argv != ["build"]:
        print("usage: python -m vmwrap.sim build", file=sys.stderr)
        return 2
    try:
        path = build()
    except (OSError, subprocess.CalledProcessError) as e:
        print(f"vmwrap.sim: no compiled engine ({e}); the simulator runs as Python", file=sys.stderr)
        return 1
    print(f"simulator engine compiled: {path}")
    return 0
