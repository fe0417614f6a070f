"""`vmwrap hooks install DIR`: the root hook scripts, bound to the Python that runs this command.

The shipped hooks (vmwrap/hooks/) name the reference install's interpreter, /opt/vmwrap/venv/bin/python,
so a wheel installed into any other venv or prefix cannot use them where they are. Installing them
writes each one into DIR with that path replaced by the running interpreter (in a PBS hook run by
pbs_server's own Python: its PYTHON constant, or VENV_SITE, the interpreter's site directory). The
hook files themselves stay as they are; a hook that does not name the reference interpreter exactly
once in one of these forms fails the install, so a new hook cannot slip through still pointing at
/opt (condor-wrapper, on the node's own Python, is copied as it is). Root runs these files: DIR, the interpreter and the package must be root's
alone (docs/security.md).
"""

from __future__ import annotations

import os
import re
import stat
import sys
from pathlib import Path

import click

from ..errors import VmwrapError
from .context import friendly_oserrors

REFERENCE_PREFIX = "/opt/vmwrap/venv"
REFERENCE_PYTHON = REFERENCE_PREFIX + "/bin/python"
EXEC_LINE = f"exec {REFERENCE_PYTHON} -I -m "
PBS_SITE_LINE = 'VENV_SITE = "/opt/vmwrap/venv/lib/python%d.%d/site-packages" % sys.version_info[:2]'
PBS_PYTHON_LINE = f'PYTHON = "{REFERENCE_PYTHON}"\n'
# condor-wrapper runs as the job's user on the node's own Python (standard library only): copied as is.
OWN_PYTHON = {"condor-wrapper": "#!/usr/bin/python3 -I\n"}
# Goes unquoted into sh scripts and a Python string literal: plain path characters only.
_SAFE_PATH = re.compile(r"/[A-Za-z0-9._+/-]{0,4095}")


class HookInstallError(VmwrapError):
    """The hooks cannot be installed as asked (unsafe target or interpreter, a hook of unknown shape)."""

    kind = "admin"


def _check_path_text(path: str, what: str) -> None:
    if not _SAFE_PATH.fullmatch(path) or "/../" in path + "/" or "/./" in path + "/":
        raise HookInstallError(f"{what} {path!r}: not a plain absolute path (letters, digits, . _ + - /)")


def check_root_only(path: str, what: str, want_dir: bool = False) -> None:
    """Refuse `path` unless root alone can change it: every directory, symlink (followed) and the
    file it ends in is root's and not writable by group or others (a sticky directory is fine)."""
    todo = [c for c in path.split("/") if c][::-1]
    cur, hops = "/", 0
    while True:
        st = os.lstat(cur)
        if st.st_uid != 0 or (st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX):
            raise HookInstallError(f"{what} {path}: directory {cur} may be changed by others (uid {st.st_uid}, "
                                   f"mode {stat.S_IMODE(st.st_mode):04o}); root does not trust it")
        if not todo:
            if want_dir:
                return
            raise HookInstallError(f"{what} {path}: is a directory")
        name = todo.pop()
        if name in (".", ".."):
            cur = cur if name == "." else os.path.dirname(cur)
            continue
        nxt = os.path.join(cur, name)
        try:
            st = os.lstat(nxt)
        except OSError as e:
            raise HookInstallError(f"{what} {path}: {nxt}: {e.strerror}") from None
        if st.st_uid != 0:
            raise HookInstallError(f"{what} {path}: {nxt} is owned by uid {st.st_uid}, not root")
        if stat.S_ISLNK(st.st_mode):
            hops += 1
            if hops > 40:
                raise HookInstallError(f"{what} {path}: too many symlinks")
            target = os.readlink(nxt)
            cur = "/" if target.startswith("/") else cur
            todo.extend(c for c in reversed(target.split("/")) if c)
            continue
        if stat.S_ISDIR(st.st_mode):
            cur = nxt
            continue
        if todo or want_dir or not stat.S_ISREG(st.st_mode):
            raise HookInstallError(f"{what} {path}: {nxt} is not a {'directory' if todo or want_dir else 'regular file'}")
        if st.st_mode & 0o022:
            raise HookInstallError(f"{what} {path}: {nxt} is writable by group or others "
                                   f"(mode {stat.S_IMODE(st.st_mode):04o}); root does not trust it")
        return


def check_interpreter(python: str) -> None:
    """Root will exec `python`: it and everything on the way to it must be root's alone."""
    _check_path_text(python, "interpreter")
    check_root_only(python, "interpreter")
    if not os.access(python, os.X_OK):
        raise HookInstallError(f"interpreter {python}: not executable")


def check_package() -> Path:
    """The running interpreter's site directory (the PBS hook adds it: it holds vmwrap, its
    dependencies, or an editable install's .pth); it and vmwrap's packages must be root's alone."""
    import sysconfig

    import vmwrap
    import vmwrap_plugins

    for mod in (vmwrap, vmwrap_plugins):
        check_root_only(mod.__file__, f"package {mod.__name__}")
    site = sysconfig.get_paths()["purelib"]
    check_root_only(site, "site directory", want_dir=True)
    return Path(site)


def render_hook(name: str, text: str, python: str, site: Path) -> str:
    """`text` of hook `name` bound to `python` (and `site`); HookInstallError for an unknown shape.

    A hook names the reference install in exactly one of the BINDINGS forms (a shell exec line, a
    PBS hook's PYTHON constant or VENV_SITE line), and nowhere else."""
    if name in OWN_PYTHON:
        if not text.startswith(OWN_PYTHON[name]) or REFERENCE_PREFIX in text:
            raise HookInstallError(f"hook {name}: expected to run {OWN_PYTHON[name].strip()} and name no "
                                   f"{REFERENCE_PREFIX}; its shape changed, update vmwrap/cli/hooks.py")
        return text
    _check_path_text(str(site), "site directory")
    found = [(old, new) for old, new in bindings(python, site) if old in text]
    if len(found) != 1 or text.count(found[0][0]) != 1:
        raise HookInstallError(f"hook {name}: does not name {REFERENCE_PYTHON} exactly once in a known form "
                               f"({' | '.join(repr(old) for old, _ in bindings(python, site))}); cannot bind it "
                               f"to {python} (a new hook? use one of those forms or add one in vmwrap/cli/hooks.py)")
    old, new = found[0]
    out = text.replace(old, new)
    if REFERENCE_PREFIX in out and not (python.startswith(REFERENCE_PREFIX) or str(site).startswith(REFERENCE_PREFIX)):
        raise HookInstallError(f"hook {name}: still names {REFERENCE_PREFIX} elsewhere; cannot bind it to {python}")
    return out


def bindings(python: str, site: Path) -> list[tuple[str, str]]:
    """(what a shipped hook says, what the installed one says instead)."""
    return [(EXEC_LINE, f"exec {python} -I -m "),
            (PBS_PYTHON_LINE, f'PYTHON = "{python}"\n'),
            (PBS_SITE_LINE, f'VENV_SITE = "{site}"')]


def open_target(d: str) -> int:
    """DIR as an O_DIRECTORY fd: absolute, no symlink anywhere, root's, writable by root alone."""
    _check_path_text(d, "hooks dir")
    parent = os.path.dirname(d.rstrip("/")) or "/"
    if not os.path.isdir(parent):
        raise HookInstallError(f"hooks dir {d}: its parent {parent} does not exist")
    check_root_only(parent, "hooks dir's parent", want_dir=True)
    if os.path.islink(d.rstrip("/")):
        raise HookInstallError(f"hooks dir {d}: is a symlink; give the real path")
    try:
        os.mkdir(d, 0o755)
    except FileExistsError:
        pass
    try:
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as e:
        raise HookInstallError(f"hooks dir {d}: {e.strerror}") from None
    st = os.fstat(fd)
    if st.st_uid != 0 or st.st_mode & 0o022:
        os.close(fd)
        raise HookInstallError(f"hooks dir {d}: owned by uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}; "
                               "it must be root's and writable by root alone")
    return fd


def install(target: str, python: str | None = None, source: Path | None = None) -> list[Path]:
    """Write every hook of `source` (the package's) into `target`, bound to `python` (the running one)."""
    from ..resources import HOOKS

    python = python or sys.executable
    source = source or HOOKS
    if os.geteuid() != 0:
        raise HookInstallError("vmwrap hooks install: run it as root (the hooks are root's)")
    if not os.path.isabs(target):
        raise HookInstallError(f"hooks dir {target}: give an absolute path")
    check_interpreter(python)
    site = check_package()
    hooks = sorted(p for p in source.iterdir() if p.is_file() and not p.name.startswith((".", "__")))
    rendered = [(h.name, render_hook(h.name, h.read_text(), python, site),
                 0o755 if os.stat(h).st_mode & stat.S_IXUSR else 0o644) for h in hooks]
    dfd = open_target(target)
    try:
        for name, text, mode in rendered:
            tmp = f".{name}.vmwrap-new"
            try:
                os.unlink(tmp, dir_fd=dfd)
            except FileNotFoundError:
                pass
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=dfd)
            try:
                os.fchown(fd, 0, 0)
                os.fchmod(fd, mode)
                data = memoryview(text.encode())
                while data:
                    data = data[os.write(fd, data):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return [Path(target) / name for name, _, _ in rendered]


@click.group("hooks")
def hooks() -> None:
    """The root hook scripts the schedulers run."""


@hooks.command("install")
@click.argument("target", metavar="DIR")
@friendly_oserrors
def install_cmd(target: str) -> None:
    """Write the hooks into DIR (root's, 0755), bound to this vmwrap's Python. Then point the scheduler
    at DIR: `vmwrap config render SCHEDULER --hooks DIR`."""
    for p in install(target):
        click.echo(str(p))
    click.echo(f"# bound to {sys.executable}", err=True)
