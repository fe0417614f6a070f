"""The one job description the whole core uses; plugins fill it from their scheduler's facts."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import rundir
from .errors import UserError

if TYPE_CHECKING:
    from .jobnet import Plan

_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass
class Job:
    job_id: str
    scheduler: str
    user: str
    uid: int
    gid: int
    work_dir: str
    script: str
    environment: dict[str, str] = field(default_factory=dict)
    cpus: int | None = None
    memory_mib: int | None = None
    time_limit_s: int | None = None
    image: str | None = None
    restart_count: int = 0
    on_lost_checkpoint: str | None = None  # restart | fail (None: fail), when the directive is not in the script
    groups: list[int] = field(default_factory=list)
    # A job spanning several nodes: all of them, their hosts' addresses and this node's place (one VM
    # on each, joined by the job's private network, vmwrap/jobnet.py). None: a one-node job.
    nodes: Plan | None = None

    def __post_init__(self) -> None:
        self.check_id(self.job_id)
        validate_host_path(self.work_dir, "work dir")

    @staticmethod
    def check_id(job_id: str) -> None:
        """Job ids become file and domain names: refuse anything that is not a plain name."""
        if not _JOB_ID.match(job_id or ""):
            raise UserError(f"invalid job id {job_id!r}: use letters, digits, '.', '_', '-' (max 64)")

    @property
    def index(self) -> int:
        """This node's place among the job's nodes (0: the first, where the batch script runs)."""
        return self.nodes.index if self.nodes else 0

    @property
    def domain_name(self) -> str:
        return rundir.domain_name(self.job_id, self.index)


def validate_host_path(path: str, what: str) -> None:
    """Refuse paths that could confuse the guest's mount code or escape via '..'."""
    if not path.startswith("/"):
        raise UserError(f"{what} must be an absolute path, got {path!r}")
    if any(ord(c) < 32 or c == "\x7f" for c in path):
        raise UserError(f"{what} {path!r} contains a control character (newline, tab, ...)")
    if any(part == ".." for part in path.split("/")):
        raise UserError(f"{what} {path!r} contains '..'")
    if len(path) > 1024:
        raise UserError(f"{what} is longer than 1024 characters")
