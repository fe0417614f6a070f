"""A job's run dir (`<state_dir>/jobs/<job>`) and its VM's libvirt name, spelled once.

Root writes the run dir, QEMU writes the guest's streams into it, the job's payload reads them, and
checkpoints, evidence, the limit watcher and the node agent look things up in it: every one of them
names a file through this module, so a rename cannot leave one side looking in the wrong place.
The work dir server's files (share.SOCKET, ...) and the limit watcher's (limits.REASON, ...) are
named by those modules, which own them.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from . import __version__
from .config import Settings
from .errors import NodeError, VmwrapError

DOMAIN_PREFIX = "vmwrap-"

# The run dir's format: job.json's "format" (and the "vmwrap" that wrote it). A run dir written before
# formats were versioned has neither and is format 1. A vmwrap reads every format up to its own and
# refuses a newer one (a node downgraded under running jobs) with both formats named: the job fails
# with that reason, the node stays up. Raise it when a reader of the run dir changes incompatibly.
FORMAT = 1
JOB_MAX = 1 << 20  # job.json is root-written; capped anyway
_NETWORK_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # a job id (Job.check_id)

# Root writes these.
ERROR = "error"            # "<kind>\n<message>\n": the payload prints it and exits with its code
NOTICE = "notice"          # a line the payload prints before the job's own output
JOB = "job.json"           # who and what the VM is for (read by checkpoints, evidence, the epilog)
SPEC = "spec.json"         # the VM's shape, what a restore renders again (root-only)
OVERLAY = "overlay.qcow2"  # the job's copy-on-write disk (QEMU's, as the job's user)
RESTORED = "restored.json" # present when the VM was restored: where each stream continues
RUN = "run"                # this run's token, once the store records it as the job's current run
MEMORY_SAVE = "memory.save"
SHARE_STATE = "share-state.json"

# QEMU writes these for the (hostile) guest: read them through vmwrap/safeio.py only.
STDOUT, STDERR, STATUS, CONSOLE = "stdout", "stderr", "status", "console.log"
GUEST_FILES = (STDOUT, STDERR, STATUS, CONSOLE)
CONTROL_SOCKET = "control.sock"  # the guest agent's control port (libvirtd makes it)

# ctl/: shared read-only into the guest. Root-owned facts at its top, the job's user's hand-over in ctl/user.
CTL = "ctl"
CTL_WORKDIR, CTL_IDS, CTL_HOSTNAME, CTL_USER = "workdir", "ids", "hostname", "user"
CTL_JOBNET = "jobnet"  # a multi-node job's network for the guest (jobnet.Plan.guest_config)
CTL_PEER = "peer"      # present on a multi-node job's other nodes: no script here, serve sessions only
CTL_IMAGE_ENV = "image-env"  # the image's default environment, NUL-separated NAME=value (payload.job_environment)
USER_SCRIPT, USER_ENV, USER_ARGS = "script", "env", "args"
# The job's process facts the guest reproduces: its resource limits, and whether its stdout and stderr
# are one file (then the guest sends both over one port, which keeps their order).
USER_LIMITS, USER_MERGED = "limits", "merged"
DELIVERED = "delivered.json"  # in ctl/user: how much of each stream the job's step delivered


# AF_UNIX socket paths end at 107 bytes; libvirtd and QEMU make the run dir's sockets by path.
SOCKET_PATH_MAX = 107
STEPS_SOCKET = "steps.sock"      # the guest's step port (vmwrap/steps.py)
SHELL_SOCKET = "shell.sock"      # the guest's first shell port (vmwrap/shell.py)
# Sessions a VM serves at once, a shell port each: a multi-node step's tasks on one node run side by
# side (MPI ranks, tasks that wait for each other), and a user's `vmwrap shell` next to them.
SHELL_PORTS = 4


def numbered(name: str, i: int) -> str:
    """The i-th of several sockets named like `name` (the first keeps the name VMs of one port had):
    shell.sock, shell1.sock, ..."""
    stem, _, ext = name.partition(".")
    return name if i == 0 else f"{stem}{i}.{ext}"


def shell_socket(i: int) -> str:
    """The run dir's socket of shell port i."""
    return numbered(SHELL_SOCKET, i)


SHELL_SOCKETS = tuple(shell_socket(i) for i in range(SHELL_PORTS))
# Steps a VM runs at once, a step port each (`srun a & srun b`, one feeding the other).
STEPS_PORTS = 4


def steps_socket(i: int) -> str:
    """The run dir's socket of step port i."""
    return numbered(STEPS_SOCKET, i)


STEPS_SOCKETS = tuple(steps_socket(i) for i in range(STEPS_PORTS))
RUN_DIR_SOCKETS = (CONTROL_SOCKET, "9p.sock", *STEPS_SOCKETS, *SHELL_SOCKETS)  # "9p.sock": share.SOCKET


def own_ports(run_dir: Path, uid: int, gid: int) -> None:
    """After a boot or a restore (libvirtd made the port sockets as root): the job's own batch step talks
    to the control and step ports; the shell port stays root's alone, for the node agent to open."""
    for name, ids in ((CONTROL_SOCKET, (uid, gid)), *((n, (uid, gid)) for n in STEPS_SOCKETS),
                      *((n, (0, 0)) for n in SHELL_SOCKETS)):
        f = Path(run_dir) / name
        if f.exists():
            os.chown(f, *ids)
            f.chmod(0o600)


def check_socket_room(run_dir: Path) -> None:
    """Refuse a run dir whose sockets could not be made: QEMU would fail to start with a message that
    reads like a killed guest. Only the state dir (the site's) can make it that long."""
    longest = max(len(os.fsencode(Path(run_dir) / name)) for name in RUN_DIR_SOCKETS)
    if longest > SOCKET_PATH_MAX:
        raise NodeError(f"the run dir {run_dir} is too deep for its VM's sockets ({longest} bytes; AF_UNIX "
                        f"allows {SOCKET_PATH_MAX}): set a shorter state_dir in the node's config")


def domain_name(job_id: str, index: int = 0) -> str:
    """The libvirt name of a job's VM (teardown finds leftovers by it). A multi-node job's VM on its
    k-th node (k >= 1) is `vmwrap-JOB@k`: nodes sharing a host (and its libvirtd) keep theirs apart."""
    return DOMAIN_PREFIX + job_id + (f"@{index}" if index else "")


def split_domain_name(name: str) -> tuple[str, int] | None:
    """(job id, node index) of a job VM's libvirt name, or None if it is not one (the id unchecked)."""
    if not name.startswith(DOMAIN_PREFIX):
        return None
    job_id, at, k = name[len(DOMAIN_PREFIX):].partition("@")
    if at and not (k.isdigit() and k[0] != "0" and len(k) <= 6):
        return None
    return job_id, int(k) if at else 0


def path(settings: Settings, job_id: str) -> Path:
    return settings.jobs_dir / job_id


def ctl(run_dir: Path) -> Path:
    return Path(run_dir) / CTL


def user_dir(run_dir: Path) -> Path:
    """ctl/user: the job's user writes here (never trust, never follow links in it)."""
    return Path(run_dir) / CTL / CTL_USER


class FormatError(VmwrapError):
    """A run dir written by a newer vmwrap than this one: fail the job, keep the node."""

    kind = "user"  # the payload's exit code for "the job cannot run as asked", never the node's


def stamp(meta: dict) -> dict:
    """job.json's content with this vmwrap's format and version added."""
    return {**meta, "format": FORMAT, "vmwrap": __version__}


def check(meta: dict, job_id: str) -> dict:
    """`meta` (a job.json) if this vmwrap reads its format; FormatError naming both formats if not."""
    fmt = meta.get("format", 1) if isinstance(meta, dict) else None
    if type(fmt) is not int or fmt < 1:
        raise FormatError(f"the run dir of job {job_id} has no valid format ({str(fmt)[:20]!r})")
    if fmt > FORMAT:
        wrote = str(meta.get("vmwrap", "?"))[:40]
        raise FormatError(f"the run dir of job {job_id} has format {fmt} (written by vmwrap {wrote}); "
                          f"this vmwrap {__version__} reads formats up to {FORMAT}: run the job on a node "
                          f"with vmwrap {wrote} or newer")
    return meta


def _record(run_dir: Path) -> dict:
    """The run dir's job record (root's job.json) as a mapping; {} when there is none or it is unreadable."""
    from . import safeio

    try:
        rec = json.loads(safeio.read_capped(Path(run_dir) / JOB, JOB_MAX) or b"{}")
    except (OSError, ValueError):
        return {}
    return rec if isinstance(rec, dict) else {}


def placement(run_dir: Path) -> tuple[int, int]:
    """(this node's index, how many nodes) of the job whose run dir this is, as its job record (root's)
    says: a multi-node job's VM name and whether it may be saved; (0, 1) without a record."""
    rec = _record(run_dir)
    k, n = rec.get("node_index", 0), rec.get("nodes", 1)
    ok = isinstance(k, int) and isinstance(n, int) and 0 <= k < n <= 1 << 20
    return (k, n) if ok else (0, 1)


def network(run_dir: Path) -> str | None:
    """The id of the job network this node's VM joined, as its job record says, when it is not the
    node's own job id: HTCondor's parallel nodes each have a job id (`C.P.K`) but share `C.P`'s network."""
    net = _record(run_dir).get("network")
    return net if isinstance(net, str) and _NETWORK_ID.match(net) else None


def vm_name(settings: Settings, job_id: str) -> str:
    """The libvirt name of the job's VM on this node, as its run dir records the node's place."""
    return domain_name(job_id, placement(path(settings, job_id))[0])


def read_job(run_dir: Path, job_id: str) -> dict | None:
    """The run dir's job.json, format-checked; None when there is none (no VM was prepared here).
    ValueError for a file that is not JSON, FormatError for one this vmwrap cannot read."""
    from . import safeio

    raw = safeio.read_capped(Path(run_dir) / JOB, JOB_MAX)
    if raw is None:
        return None
    return check(json.loads(raw), job_id)
