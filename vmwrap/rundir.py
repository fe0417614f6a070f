"""A job's run dir (`<state_dir>/jobs/<job>`) and its VM's libvirt name, spelled once.

Root writes the run dir, QEMU writes the guest's streams into it, the job's payload reads them, and
checkpoints, evidence, the limit watcher and the node agent look things up in it: every one of them
names a file through this module, so a rename cannot leave one side looking in the wrong place.
The work dir server's files (share.SOCKET, ...) and the limit watcher's (limits.REASON, ...) are
named by those modules, which own them.
"""

from __future__ import annotations

from pathlib import Path

from .config import Settings

DOMAIN_PREFIX = "vmwrap-"

# Root writes these.
ERROR = "error"            # "<kind>\n<message>\n": the payload prints it and exits with its code
NOTICE = "notice"          # a line the payload prints before the job's own output
JOB = "job.json"           # who and what the VM is for (read by checkpoints, evidence, the epilog)
SPEC = "spec.json"         # the VM's shape, what a restore renders again (root-only)
OVERLAY = "overlay.qcow2"  # the job's copy-on-write disk (QEMU's, as the job's user)
RESTORED = "restored.json" # present when the VM was restored: where each stream continues
MEMORY_SAVE = "memory.save"
SHARE_STATE = "share-state.json"

# QEMU writes these for the (hostile) guest: read them through vmwrap/safeio.py only.
STDOUT, STDERR, STATUS, CONSOLE = "stdout", "stderr", "status", "console.log"
GUEST_FILES = (STDOUT, STDERR, STATUS, CONSOLE)
CONTROL_SOCKET = "control.sock"  # the guest agent's control port (libvirtd makes it)

# ctl/: shared read-only into the guest. Root-owned facts at its top, the job's user's hand-over in ctl/user.
CTL = "ctl"
CTL_WORKDIR, CTL_IDS, CTL_HOSTNAME, CTL_USER = "workdir", "ids", "hostname", "user"
CTL_IMAGE_ENV = "image-env"  # the image's default environment, NUL-separated NAME=value (payload.job_environment)
USER_SCRIPT, USER_ENV, USER_ARGS = "script", "env", "args"
# The job's process facts the guest reproduces: its resource limits, and whether its stdout and stderr
# are one file (then the guest sends both over one port, which keeps their order).
USER_LIMITS, USER_MERGED = "limits", "merged"
DELIVERED = "delivered.json"  # in ctl/user: how much of each stream the job's step delivered


def domain_name(job_id: str) -> str:
    """The libvirt name of a job's VM (teardown finds leftovers by it)."""
    return DOMAIN_PREFIX + job_id


def path(settings: Settings, job_id: str) -> Path:
    return settings.jobs_dir / job_id


def ctl(run_dir: Path) -> Path:
    return Path(run_dir) / CTL


def user_dir(run_dir: Path) -> Path:
    """ctl/user: the job's user writes here (never trust, never follow links in it)."""
    return Path(run_dir) / CTL / CTL_USER
