"""Site settings: one TOML file (VMWRAP_CONFIG, else /etc/vmwrap/vmwrap.toml); every key has a default."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from .errors import NodeError

DEFAULT_PATH = "/etc/vmwrap/vmwrap.toml"


@dataclass
class Settings:
    catalog: str = "/etc/vmwrap/images.toml"
    cache_dir: str = "/var/cache/vmwrap/images"
    cache_max_bytes: int = 20 * 1024**3
    state_dir: str = "/var/lib/vmwrap"
    appliance_dir: str = "/var/cache/vmwrap/appliances"
    libvirt_uri: str = "qemu:///system"
    accel: str = "auto"  # auto | kvm | tcg
    grace_seconds: float = 30.0
    verify_on_use: bool = False
    default_memory_mib: int = 256
    default_cpus: int = 1
    # Ceiling for any VM's memory in MiB (asked for, the image's or the site's default), on top of the
    # scheduler's allocation and alone where it allocates none (Slurm without memory as a consumable,
    # GE jobs without h_vmem/s_vmem/mem_free/virtual_free); 0: the node's memory is the only limit.
    max_memory_mib: int = 0
    # serial: the work dir is served by vmwrap's 9P server over virtio-serial (the VM can be saved);
    # virtio-9p: QEMU's own 9p device (a little faster, but a mounted share blocks saving the VM).
    workdir_share: str = "serial"
    checkpoint_dir: str = "/var/lib/vmwrap/checkpoints"  # must be storage every node shares
    # The gap planner (`vmwrap plan`, docs/plan.md): off until enabled; jobs already in a gap are
    # always saved in time, enabled or not.
    plan_enabled: bool = False
    plan_partitions: str = ""          # comma-separated; empty: every partition
    plan_users: str = ""               # comma-separated; empty: every user
    plan_max_nodes: int = 0            # nodes running in gaps at once; 0: no cap
    plan_max_gap_s: float = 0.0        # gaps longer than this are left to Slurm's backfill; 0: no cap
    plan_save_rate_mb_s: float = 200.0  # until saves were measured (then the slowest recent one)
    plan_save_fixed_s: float = 15.0    # requeue signal, batch step detach, epilog start, checksums
    plan_save_margin: float = 0.5      # relative margin on the predicted save
    plan_save_margin_s: float = 10.0   # absolute margin on top
    plan_min_run_s: float = 60.0       # work before the save worth a gap at all
    plan_setup_s: float = 15.0         # boot (or restore) before the job's work starts
    plan_teardown_s: float = 15.0      # epilog teardown after Slurm's KillWait

    @property
    def jobs_dir(self) -> Path:
        return Path(self.state_dir) / "jobs"

    @property
    def ledger_path(self) -> Path:
        return Path(self.state_dir) / "ledger.sqlite"


def load(path: str | None = None) -> Settings:
    path = path or os.environ.get("VMWRAP_CONFIG") or DEFAULT_PATH
    if "%n" in path:  # several nodes on one host (tests, Slurm's multiple-slurmd mode)
        path = path.replace("%n", os.environ.get("SLURMD_NODENAME") or os.uname().nodename)
    if not os.path.exists(path):
        return Settings()
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise NodeError(f"cannot read vmwrap config {path}: {e}") from None
    known = {f.name: f.type for f in fields(Settings)}
    unknown = set(data) - set(known)
    if unknown:
        raise NodeError(f"{path}: unknown setting(s): {', '.join(sorted(unknown))}")
    s = Settings(**data)
    if s.accel not in ("auto", "kvm", "tcg"):
        raise NodeError(f"{path}: accel must be auto, kvm or tcg, not {s.accel!r}")
    if s.workdir_share not in ("serial", "virtio-9p"):
        raise NodeError(f"{path}: workdir_share must be serial or virtio-9p, not {s.workdir_share!r}")
    return s


def toml_value(v) -> str:
    """A TOML literal for a setting value (bool, number or string)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def render(settings: dict) -> str:
    """Settings file text for `settings` (used by test sites, the local cluster and benchmarks)."""
    return "".join(f"{k} = {toml_value(v)}\n" for k, v in settings.items())
