"""Whether a process was started by this host's execd for a given Grid Engine job.

A slave host of a tightly integrated parallel job runs no prolog (execd writes `prolog=none` into
every pe task's config): its VM has to be booted for the job's first `qrsh -inherit` task there, at
the task's request. `qrsh -inherit` is not authenticated (security_mode none), so the node agent
believes only execd's own records: execd gives the job's master and each pe task a supplementary
group of its own (gid_range, sge_conf(5)) and writes it to `addgrpid` in the task's directory under
its spool (`active_jobs/<job>.<array task>/` and its `<n>.<host>/` pe task subdirectories, the GE
admin user's). A user cannot add a group to their own processes, so a process holding one of those
groups is that job's. Which task dir a process is of comes from its shepherd's working dir (execd
starts it there), never from the process's own environment. The caller still checks the process's
uid against the job's owner.
"""

from __future__ import annotations

import os
import pwd
import re
import stat

from vmwrap import procs, safeio

from .hooks import ADMIN_USER

ACTIVE = "active_jobs"
_PETASK = re.compile(r"\d{1,10}\.[A-Za-z0-9_.-]{1,255}")
_GID = re.compile(rb"\d{1,10}\n?")
STATUS_MAX = 64 << 10       # /proc/PID/status is a few KiB


def _trusted_dir(path: str, owners: set[int]) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and not st.st_mode & 0o022 and st.st_uid in owners


def _gid_in(path: str, owners: set[int]) -> int | None:
    """The number in an addgrpid file execd (root or the GE admin user) wrote; never a link."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid not in owners or st.st_mode & 0o022:
            return None
        data = os.read(fd, 16)
    finally:
        os.close(fd)
    return int(data) if _GID.fullmatch(data) else None


def _owners() -> set[int]:
    try:
        return {0, pwd.getpwnam(ADMIN_USER).pw_uid}
    except KeyError:
        return {0}


def trusted_path(path: str, owners: set[int] | None = None) -> bool:
    """Whether every component of `path` (absolute, normalized) is a real directory that root or
    the GE admin user owns and nobody else can write (above it, a root-owned sticky dir will do): a
    user can neither have made it nor swap a link into it later."""
    owners = _owners() if owners is None else owners
    if not path.startswith("/") or os.path.normpath(path) != path:
        return False
    parts = path.split("/")[1:]
    return all(_trusted_dir(c, owners) or _sticky_root_dir(c)
               for c in ("/" + "/".join(parts[:k]) for k in range(len(parts))) if c) \
        and _trusted_dir(path, owners)


def _sticky_root_dir(path: str) -> bool:
    """A root-owned sticky dir (/tmp, /var/tmp): others may add their own entries, never replace
    root's, so a root-owned dir in it stays root's."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and bool(st.st_mode & stat.S_ISVTX)


def _status_ids(pid: int, key: bytes) -> set[int]:
    """The numbers of line `key` (b"Groups:") of /proc/PID/status; empty if it is gone."""
    for ln in (safeio.read_proc(f"/proc/{int(pid)}/status", STATUS_MAX) or b"").splitlines():
        if ln.startswith(key):
            return {int(x) for x in ln[len(key):].split() if x.isdigit()}
    return set()


def process_groups(pid: int) -> set[int]:
    """The supplementary groups of process `pid` (/proc/PID/status `Groups:`); empty if it is gone."""
    return _status_ids(pid, b"Groups:")


SHEPHERD = "sge_shepherd"
ANCESTORS_MAX = 16          # processes walked up from a task to its shepherd


def _stat(pid: int) -> tuple[str, int] | None:
    """(comm, parent pid) of process `pid` from /proc/PID/stat; None if it is gone."""
    text = safeio.read_proc(f"/proc/{int(pid)}/stat", 4096) or b""
    head, _, rest = text.rpartition(b")")   # comm may hold spaces and ')': the last ')' ends it
    fields = rest.split()
    if not head or len(fields) < 2 or not fields[1].isdigit():
        return None
    return head.partition(b"(")[2].decode("utf-8", "replace"), int(fields[1])


def process_uids(pid: int) -> set[int]:
    """The real, effective, saved and file-system uids of process `pid` (/proc/PID/status `Uid:`);
    empty if it is gone."""
    return set(procs.uids(pid) or ())


def shepherd_dir(pid: int) -> str | None:
    """The dir of the task `pid` runs under as execd knows it: the working dir of its nearest
    sge_shepherd above it (execd starts each shepherd in the job's or pe task's dir under its spool,
    where the shepherd reads its config). A user can set their environment, not their ancestors."""
    owners = _owners()
    p = int(pid)
    for _ in range(ANCESTORS_MAX):
        st = _stat(p)
        if st is None:
            return None
        comm, parent = st
        if comm == SHEPHERD:
            uids = process_uids(p)
            if not uids or not uids <= owners:
                return None
            try:
                return os.readlink(f"/proc/{p}/cwd")
            except OSError:
                return None
        if parent <= 1:
            return None
        p = parent
    return None


def holds_group_of(pid: int, task_dir: str) -> bool:
    """Whether process `pid` holds the group execd gave the pe task whose dir is `task_dir`."""
    gid = _gid_in(os.path.join(task_dir, "addgrpid"), _owners())
    return gid is not None and gid in process_groups(pid)


def task_spool(pid: int, job: str, task: str = "1") -> tuple[str, str] | None:
    """(this host's execd spool, execd's name for this host) for process `pid`, a pe task of job
    `job` (array task `task`) by its shepherd's dir (`<spool>/active_jobs/<job>.<task>/<n>.<host>`),
    when every component of it is execd's (trusted_path); the caller must then find the
    process's group in that run's records."""
    path = shepherd_dir(pid)
    if path is None:
        return None
    parts = path.split("/")
    if (len(parts) >= 5 and path.startswith("/") and os.path.normpath(path) == path and parts[-3] == ACTIVE
            and parts[-2] == f"{job}.{task}" and _PETASK.fullmatch(parts[-1]) and trusted_path(path)):
        return "/".join(parts[:-3]), parts[-1].partition(".")[2]
    return None
