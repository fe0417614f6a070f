"""Site settings: one TOML file (VMWRAP_CONFIG, else /etc/vmwrap/vmwrap.toml); every key has a default.

Root trusts only root's own files: as root, load() refuses a config file or catalog that anyone else
could change (owner, mode, parent directories, symlinks), and scheduler hooks never take the path
from the environment (Grid Engine passes `qsub -v VMWRAP_CONFIG=...` to its root prolog)."""

from __future__ import annotations

import difflib
import math
import os
import re
import stat
import tomllib
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

from .errors import NodeError

DEFAULT_PATH = "/etc/vmwrap/vmwrap.toml"


POSITIVE = {"positive": True}  # field metadata: a number that must be more than 0 (others: 0 or more)
SIZE = {"size": True}  # field metadata: a string that is a size, "20G" (parse_size)


@dataclass
class Settings:
    """Every site setting with its default. load() checks each value against the field's type:
    bool, int (a whole number), float (any finite number), str, or Literal[...] (one of those strings).
    Numbers are 0 or more, more than 0 with POSITIVE metadata. docs/vmwrap.toml.example lists them all."""

    catalog: str = "/etc/vmwrap/images.toml"
    cache_dir: str = "/var/cache/vmwrap/images"
    cache_max_bytes: int = 20 * 1024**3
    state_dir: str = "/var/lib/vmwrap"
    appliance_dir: str = "/var/cache/vmwrap/appliances"
    libvirt_uri: str = "qemu:///system"
    accel: Literal["auto", "kvm", "tcg"] = "auto"
    grace_seconds: float = 30.0
    # The scheduler's timeout for the root prolog (Slurm's PrologEpilogTimeout, Torque's $prologalarm);
    # 0: none known. The prolog then gives up a start (image fetch, restore) in time, fails just the job
    # with the reason and leaves nothing behind, instead of being killed mid-way (docs/admin-guide.md).
    # At most Slurm's own ceiling for PrologEpilogTimeout (a 16-bit field), which the render writes from it.
    prolog_timeout_s: float = field(default=0.0, metadata={"max": 65533})
    verify_on_use: bool = False
    default_memory_mib: int = field(default=256, metadata=POSITIVE)
    default_cpus: int = field(default=1, metadata=POSITIVE)
    # Each VM's QEMU gets a hard memory limit (libvirt memtune, a cgroup) of its guest memory plus
    # this much for QEMU itself (TCG's code cache, device buffers): one job cannot exhaust the node.
    vm_memory_overhead_mib: int = 256
    # Ceiling for any VM's memory in MiB (asked for, the image's or the site's default), on top of the
    # scheduler's allocation and alone where it allocates none (Slurm without memory as a consumable,
    # GE jobs without h_vmem/s_vmem/mem_free/virtual_free); 0: the node's memory is the only limit.
    max_memory_mib: int = 0
    # serial: the work dir is served by vmwrap's 9P server over virtio-serial (the VM can be saved);
    # virtio-9p: QEMU's own 9p device (a little faster, but a mounted share blocks saving the VM).
    workdir_share: Literal["serial", "virtio-9p"] = "serial"
    # Start each job's VM by restoring a pre-booted template of its shape (`vmwrap snapshot prepare`,
    # vmwrap/snapshot.py) instead of booting it; no usable snapshot: a cold boot, as with false.
    fast_start: bool = False
    checkpoint_dir: str = "/var/lib/vmwrap/checkpoints"  # must be storage every node shares
    # HMAC key authenticating checkpoints (root-owned, mode 0600/0400, the same file on every node):
    # a restore refuses a checkpoint whose manifest it did not sign (docs/checkpoint.md).
    checkpoint_key_file: str = "/etc/vmwrap/checkpoint.key"
    # Periodic checkpoints (vmwrap/periodic.py): the interval of a job that gives no
    # --checkpoint-every (0: none), and the shortest one a job may ask for (refused at submit below it).
    checkpoint_every_s: float = 0.0
    checkpoint_min_every_s: float = field(default=300.0, metadata=POSITIVE)
    # The gap planner (`vmwrap plan`, docs/plan.md): off until enabled; jobs already in a gap are
    # always saved in time, enabled or not.
    plan_enabled: bool = False
    plan_partitions: str = ""          # comma-separated; empty: every partition
    plan_users: str = ""               # comma-separated; empty: every user
    plan_max_nodes: int = 0            # nodes running in gaps at once; 0: no cap
    plan_max_gap_s: float = 0.0        # gaps longer than this are left to Slurm's backfill; 0: no cap
    # assumed until saves were measured (then the slowest recent measured rate is used)
    plan_save_rate_mb_s: float = field(default=200.0, metadata=POSITIVE)
    plan_save_fixed_s: float = 15.0    # requeue signal, batch step detach, epilog start, checksums
    plan_save_margin: float = 0.5      # relative margin on the predicted save
    plan_save_margin_s: float = 10.0   # absolute margin on top
    plan_min_run_s: float = 60.0       # work before the save worth a gap at all
    plan_setup_s: float = 15.0         # boot (or restore) before the job's work starts
    plan_teardown_s: float = 15.0      # epilog teardown after Slurm's KillWait
    # Per-job disk limits on what a job's VM writes into its run dir under state_dir (0: no limit).
    # A root watcher stops the VM of a job over one and the job fails naming the setting (exit 153).
    job_output_max_bytes: int = 10 * 1024**3  # stdout + stderr, staged here until delivered
    console_max_bytes: int = 1024**2           # serial console log and status port, each: evidence only
    job_disk_max_bytes: int = 0                # the qcow2 overlay's allocated size; 0: the image's size bounds it
    # `vmwrap image import`: most bytes an imported image's files may hold (and any one archive, layer
    # or partition may be): a hostile archive cannot fill the appliance dir's disk.
    image_import_max_size: str = field(default="20G", metadata=SIZE)
    # Deployment (vmwrap.services, docs/admin-guide.md): the site's scheduler picks each daemon's command;
    # `daemons` lists what `vmwrap daemons start` runs on this node without systemd (comma-separated).
    scheduler: Literal["none", "slurm", "sge", "condor", "torque", "pbs"] = "none"
    daemons: str = ""
    log_file: str = ""                 # daemons append here; empty: stderr (journald under systemd)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Node reports for `vmwrap status` (vmwrap.nodestatus): a directory every node shares, as checkpoint_dir.
    status_dir: str = "/var/lib/vmwrap/status"

    @property
    def jobs_dir(self) -> Path:
        return Path(self.state_dir) / "jobs"

    @property
    def image_import_max_bytes(self) -> int:
        return parse_size(self.image_import_max_size) or 0  # load() checked it

    @property
    def ledger_path(self) -> Path:
        return Path(self.state_dir) / "ledger.sqlite"


def check_root_owned(path: str, what: str = "vmwrap config") -> None:
    """Refuse (NodeError naming `path`) a file root would read although another user could change it.

    The file must be a regular file (not a symlink) owned by root and writable by nobody else; every
    directory on the way to it, symlinks followed, must be root's and not writable by group or
    others (a sticky directory such as /tmp is fine; a symlink in it must be root's). A missing file
    passes: only root could create it there.
    """
    p = os.path.abspath(path)
    todo = [c for c in p.split("/") if c][::-1]  # components still to walk, next one last
    cur = "/"
    _check_dir("/", os.lstat("/"), path, what)
    hops = 0
    while todo:
        name = todo.pop()
        if name == ".":
            continue
        if name == "..":
            cur = os.path.dirname(cur)  # cur is already resolved, its parents already checked
            continue
        nxt = os.path.join(cur, name)
        try:
            st = os.lstat(nxt)
        except FileNotFoundError:
            return
        except OSError as e:
            raise NodeError(f"{what} {path}: cannot check {nxt}: {e.strerror}") from None
        if stat.S_ISLNK(st.st_mode):
            if not todo:
                raise NodeError(f"{what} {path}: is a symlink; as root vmwrap reads only root's own regular files")
            if st.st_uid != 0:
                raise NodeError(f"{what} {path}: symlink {nxt} is owned by uid {st.st_uid}, not root")
            hops += 1
            if hops > 40:
                raise NodeError(f"{what} {path}: too many symlinks")
            target = os.readlink(nxt)
            if target.startswith("/"):
                cur = "/"
            todo.extend(c for c in reversed(target.split("/")) if c)
            continue
        if todo:
            _check_dir(nxt, st, path, what)
            cur = nxt
            continue
        if not stat.S_ISREG(st.st_mode):
            raise NodeError(f"{what} {path}: not a regular file")
        if st.st_uid != 0:
            raise NodeError(f"{what} {path}: owned by uid {st.st_uid}, not root; root does not trust it")
        if st.st_mode & 0o022:
            raise NodeError(f"{what} {path}: writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
                            "root does not trust it")


def _check_dir(d: str, st: os.stat_result, path: str, what: str) -> None:
    if not stat.S_ISDIR(st.st_mode):
        raise NodeError(f"{what} {path}: {d} is not a directory")
    if st.st_uid != 0:
        raise NodeError(f"{what} {path}: directory {d} is owned by uid {st.st_uid}, not root; root does not trust it")
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise NodeError(f"{what} {path}: directory {d} is writable by group or others "
                        f"(mode {stat.S_IMODE(st.st_mode):04o}); root does not trust it")


def load(path: str | None = None, from_env: bool = True) -> Settings:
    """Settings from `path`, else $VMWRAP_CONFIG (unless `from_env` is False: scheduler hooks), else
    DEFAULT_PATH; `%n` in the path is the node name. As root, the file and the catalog it names must
    pass check_root_owned()."""
    path = path or (os.environ.get("VMWRAP_CONFIG") if from_env else None) or DEFAULT_PATH
    if "%n" in path:  # several nodes on one host (tests, Slurm's multiple-slurmd mode)
        path = path.replace("%n", os.environ.get("SLURMD_NODENAME") or os.uname().nodename)
    root = os.geteuid() == 0
    if root:
        check_root_owned(path)
    if not os.path.exists(path):
        s = Settings()
        if root:
            check_root_owned(s.catalog, "vmwrap catalog")
        return s
    try:
        with open(path, "rb", opener=lambda p, fl: os.open(p, fl | (os.O_NOFOLLOW if root else 0))) as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise NodeError(f"cannot read vmwrap config {path}: {e}") from None
    s = Settings(**checked(data, path))
    if 0 < s.checkpoint_every_s < s.checkpoint_min_every_s:
        raise NodeError(f"{path}: checkpoint_every_s must be 0 (off) or at least checkpoint_min_every_s "
                        f"({s.checkpoint_min_every_s:g}), got {s.checkpoint_every_s:g}")
    if root:
        check_root_owned(s.catalog, "vmwrap catalog")
    return s


def checked(data: dict, path: str) -> dict:
    """`data` (a parsed settings file) with each value checked against its Settings field's type:
    NodeError naming `path` and the key for an unknown key or a value of the wrong type or range.
    Whole numbers given for float settings become floats."""
    hints = typing.get_type_hints(Settings)
    known = {f.name: f for f in fields(Settings)}
    out = {}
    for key, value in data.items():
        f = known.get(key)
        if f is None:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise NodeError(f"{path}: unknown setting {key!r}{hint}")
        out[key] = _check(key, hints[key], f.metadata, value, path)
    return out


def _unit(key: str) -> str:
    units = (("_mb_s", "MB per second"), ("_seconds", "seconds"), ("_s", "seconds"), ("_bytes", "bytes"),
             ("_mib", "MiB"))
    for suffix, unit in units:
        if key.endswith(suffix):
            return f" of {unit}"
    return ""


def _check(key: str, typ, meta, value, path: str):
    def bad(what: str):
        return NodeError(f"{path}: {key} must be {what}, got {value!r}")

    if typing.get_origin(typ) is Literal:
        choices = typing.get_args(typ)
        if value not in choices:
            raise bad(" or ".join(filter(None, (", ".join(choices[:-1]), choices[-1]))))
        return value
    if typ is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if typ is str:
        if not isinstance(value, str):
            raise bad("a string")
        if meta.get("size") and parse_size(value) is None:
            raise bad("a size such as 20G (bytes, or a number with K, M, G or T)")
        return value
    if typ not in (int, float):
        raise TypeError(f"Settings.{key}: load() cannot check a setting of type {typ!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (typ is int and not isinstance(value, int)):
        raise bad(("a whole number" if typ is int else "a number") + _unit(key))
    if not math.isfinite(value):
        raise bad("a finite number" + _unit(key))
    if meta.get("positive") and value <= 0:
        raise bad("more than 0")
    if value < 0:
        raise bad("0 or more")
    if meta.get("max") is not None and value > meta["max"]:
        raise bad(f"at most {meta['max']}" + _unit(key).replace(" of ", " ", 1))
    return typ(value)


_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(value: str) -> int | None:
    """Bytes of "20G", "512M", "1T", "4096" (binary units; "GiB"/"GB" spellings too); None if not a
    size above 0."""
    m = re.fullmatch(r"\s*(\d{1,15})\s*([KMGT]?)(?:I?B)?\s*", value, re.IGNORECASE)
    if not m or int(m.group(1)) == 0:
        return None
    return int(m.group(1)) * _SIZE_UNITS[m.group(2).upper()]


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
