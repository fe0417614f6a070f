"""Checkpoints: a job's whole VM saved to shared storage and restored on any node.

One directory per job in the store (`checkpoint_dir`, on storage every node shares):

    memory.save      libvirt's save image (device state + guest RAM)
    overlay.qcow2    the job's copy-on-write disk (its base is found again by checksum)
    share.json       the work dir server's fid table and queued requests
    stdout stderr status   everything the guest wrote so far (the restore resumes the stream)
    job.json         who/what, and the VM's shape (memory, CPUs, accelerator, devices) to render again
    manifest.json    size and SHA-256 of every file above and an HMAC-SHA256 over it; written last

It is built under a temporary name, fsynced, then renamed into place: a directory named after the
job always holds a complete checkpoint, and a half-written one is never taken for a good one. The
checksums are taken as the save writes the files (the save image by a thread following libvirt as
it writes, checked against the finished file), so the seal covers what the save wrote and reading
the checkpoint back is not on the save's critical path.

The store is shared storage other nodes (or a misconfigured export) can write, so a restore trusts
nothing in it that the site key does not authenticate: the manifest carries a MAC made with a
root-only key every node holds (`checkpoint_key_file`), each file is hashed as it is read, and the
domain XML is rendered again from vmwrap's own template (the XML inside memory.save is never used).
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import json
import os
import secrets
import shutil
import socket
import stat
import subprocess
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import __version__, domain, rundir, share
from .errors import CheckpointError, GuestStalledError, NodeError
from .catalog import NETWORKS
from .job import Job

FILES = ("memory.save", "overlay.qcow2", "share.json", "stdout", "stderr", "status", "job.json")
STREAMS = ("stdout", "stderr", "status")
# How big the job's output files were when `delivered` was recorded (periodic checkpoints): a restart
# after a crash cuts them back to these sizes (vmwrap/periodic.py).
OUTPUT_SIZES = ("stdout_size", "stderr_size")
RUN_MAX = 64                        # bytes of a run token (Store.mark_ran)
VERSION = 2
KEY_FILE = "/etc/vmwrap/checkpoint.key"
QEMU_IMG = "/usr/bin/qemu-img"
MAC_CONTEXT = b"vmwrap checkpoint manifest v2\0"
# The store's identity stamp (`vmwrap checkpoints init`): tells the shared store from the empty
# directory a node has at that path when the shared storage is not mounted there.
STAMP = ".vmwrap-store"
STAMP_MAX = 4096
STAMP_CONTEXT = b"vmwrap checkpoint store v1\0"
JSON_MAX = 1 << 20          # manifest.json, job.json, spec.json
SHARE_MAX = share.STATE_MAX # share.json: the work dir server's state, as share.state() bounds it
DELIVERED_MAX = 4096        # the user's delivered.json
CHUNK = 1 << 20
_RO = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


@dataclass
class Info:
    job_id: str
    bytes: int
    created: float
    node: str
    restarts: int
    image: str


def _fsync_path(path: Path, mode: int | None = None) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        os.fsync(fd)
    finally:
        os.close(fd)


def _open_regular(path: Path) -> int:
    """An fd of a regular file, never through a symlink and never blocking on a FIFO; OSError else."""
    fd = os.open(path, _RO)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_capped(path: Path, cap: int) -> bytes:
    """A small file's bytes (OSError if it is not a regular file or holds more than `cap` bytes)."""
    fd = _open_regular(path)
    try:
        data = b""
        while len(data) <= cap and (buf := os.read(fd, cap + 1 - len(data))):
            data += buf
    finally:
        os.close(fd)
    if len(data) > cap:
        raise OSError(errno.EFBIG, f"larger than {cap} bytes", str(path))
    return data


def _write_new(path: Path, data: bytes, mode: int = 0o600) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


SPARSE_SLACK = 64 * 1024 * 1024


def _copy_out(src: Path, dst: Path) -> tuple[int, str]:
    """Copy a run dir file into the staging dir (0600, no symlinks followed on either side); returns
    the size and SHA-256 of what was written (hashed as copied: `Store.commit(known=...)` seals it
    without reading the copy again).

    The job's uid owns these files (QEMU writes them): it may grow one while it is copied, or make it
    a petabyte hole with `truncate`. Only the bytes present when it was opened are copied, and a file
    whose size is mostly a hole (a qcow2 overlay or a stream never is) fails the save."""
    sfd = _open_regular(src)
    try:
        st = os.fstat(sfd)
        if st.st_size > st.st_blocks * 512 + SPARSE_SLACK:
            raise NodeError(f"{src.name} claims {st.st_size} bytes but holds {st.st_blocks * 512}: "
                            "not saving a file the job made sparse")
        dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        h = hashlib.sha256()
        try:
            n = _pump(sfd, dfd, st.st_size, h)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)
    return n, h.hexdigest()


def _write_sealed(path: Path, data: bytes) -> tuple[int, str]:
    """_write_new, returning the size and SHA-256 of what was written (for `Store.commit(known=...)`)."""
    _write_new(path, data)
    return len(data), hashlib.sha256(data).hexdigest()


def _pump(sfd: int, dfd: int, limit: int, h=None) -> int:
    """Copy at most `limit` bytes from sfd to dfd (hashing them into `h`); returns how many."""
    n = 0
    while n < limit and (buf := os.read(sfd, min(CHUNK, limit - n))):
        if h is not None:
            h.update(buf)
        n += len(buf)
        view = memoryview(buf)
        while view:
            view = view[os.write(dfd, view):]
    return n


def _hash_file(path: Path, on_bytes: Callable[[int], None] | None = None) -> tuple[int, str]:
    fd = _open_regular(path)
    h = hashlib.sha256()
    n = 0
    try:
        while buf := os.read(fd, CHUNK):
            h.update(buf)
            n += len(buf)
            if on_bytes:
                on_bytes(len(buf))
    finally:
        os.close(fd)
    return n, h.hexdigest()


# libvirt's save image (qemu_saveimage.c, libvirt 9.0) starts with a header whose magic says
# "incomplete" while the save runs; once QEMU's stream is in the file libvirt rewrites that header
# with the final magic. Nothing else is written twice: the rest is appended in order (libvirt's
# iohelper, O_DIRECT, which pads its last block and truncates the file back).
SAVE_PARTIAL, SAVE_MAGIC = b"LibvirtQemudPart", b"LibvirtQemudSave"
FOLLOW_LAG = 8 << 20    # the follower stays this far behind the end of the file while the save runs
FOLLOW_HEAD = 1 << 16   # bytes of the start it keeps, to compare with the finished file
FOLLOW_SAMPLES = 8      # pieces of the rest kept (chosen at random) to compare likewise
FOLLOW_NICE = 19        # the follower thread's priority (Linux: a thread's own nice value)


class _Follower:
    """Hashes libvirt's save image while libvirt writes it, so the seal needs no second pass over it.

    A thread reads the file behind the writer (FOLLOW_LAG) and hashes it, the header as it will read
    once libvirt marks it complete. After the save, `finish` hashes the tail and checks the finished
    file against what was hashed: the same file (inode), the same length, the same first FOLLOW_HEAD
    bytes and the same bytes at FOLLOW_SAMPLES random places read again (a writer that rewrote or
    preallocated would differ there). If anything differs, or the thread failed, it returns None and
    the caller hashes the file in a pass of its own, as before. Its result is only what the seal
    covers: were it ever wrong, the restore would refuse the checkpoint as corrupt, never accept
    other bytes."""

    def __init__(self, path: Path):
        self.path = path
        self.done = threading.Event()
        self.h = hashlib.sha256()
        self.n = 0
        self.head = b""
        self.samples: list[tuple[int, bytes]] = []
        self.pieces = 0
        self.ident: tuple[int, int] | None = None
        self.failed: BaseException | None = None
        self.abandoned = False
        self.thread = threading.Thread(target=self._run, name="vmwrap-save-hash", daemon=True)
        self.thread.start()

    def _take(self, buf: bytes) -> None:
        if self.n < FOLLOW_HEAD:
            keep = buf[:FOLLOW_HEAD - self.n]
            if self.n == 0 and keep.startswith(SAVE_PARTIAL):
                keep = SAVE_MAGIC + keep[len(SAVE_PARTIAL):]
                buf = keep + buf[len(keep):]
            self.head += keep
        else:  # reservoir sampling: each piece is kept with the same chance
            self.pieces += 1
            if len(self.samples) < FOLLOW_SAMPLES:
                self.samples.append((self.n, buf))
            elif (i := secrets.randbelow(self.pieces)) < FOLLOW_SAMPLES:
                self.samples[i] = (self.n, buf)
        self.h.update(buf)
        self.n += len(buf)

    def _run(self) -> None:
        try:  # QEMU and libvirt's iohelper come first (measured: at the default priority, the save
            # took 0.03-0.1 s longer on 2 cores); it still keeps up, hashing while they wait on I/O
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), FOLLOW_NICE)
        except OSError:
            pass
        fd = None
        try:
            while fd is None:
                try:
                    fd = _open_regular(self.path)
                except FileNotFoundError:
                    if self.done.wait(0.005):
                        return
            st = os.fstat(fd)
            self.ident = (st.st_dev, st.st_ino)
            while True:
                finished = self.done.is_set()  # before the size: once the save returned, all is final
                end = os.fstat(fd).st_size - (0 if finished else FOLLOW_LAG)
                while self.n < end and not self.abandoned:
                    buf = os.pread(fd, min(CHUNK, end - self.n), self.n)
                    if not buf:
                        break
                    self._take(buf)
                if self.abandoned:
                    return
                if finished:
                    if os.pread(fd, 1, self.n):  # grew after its size was taken: not what was hashed
                        raise OSError(errno.EAGAIN, "the save image grew after the save", str(self.path))
                    return
                self.done.wait(0.01)
        except BaseException as e:  # noqa: BLE001 - finish() reports None: the caller hashes again
            self.failed = e
        finally:
            if fd is not None:
                os.close(fd)

    def stop(self) -> None:
        self.done.set()
        self.thread.join()

    def abandon(self) -> None:
        """The save failed (or ran out of time): stop now, without reading what is left of the file."""
        self.abandoned = True
        self.stop()

    def finish(self) -> tuple[int, str] | None:
        """(size, sha256) of the finished file, or None if the caller must hash it itself."""
        self.stop()
        if self.failed is not None or self.ident is None:
            return None
        try:
            fd = _open_regular(self.path)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != self.ident or st.st_size != self.n:
                return None
            for offset, want in [(0, self.head), *self.samples]:
                if _pread_all(fd, len(want), offset) != want:
                    return None
        except OSError:
            return None
        finally:
            os.close(fd)
        return self.n, self.h.hexdigest()


def _pread_all(fd: int, n: int, offset: int) -> bytes:
    out = b""
    while len(out) < n and (buf := os.pread(fd, n - len(out), offset + len(out))):
        out += buf
    return out


def _canonical(body: dict) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _mac(key: bytes, body: dict) -> str:
    return hmac.new(key, MAC_CONTEXT + _canonical(body), hashlib.sha256).hexdigest()


def load_key(path: str | os.PathLike) -> bytes:
    """The site's checkpoint key; NodeError unless it is a root-owned regular file, mode 0600/0400."""
    where = f"the checkpoint key {path}"
    try:
        fd = os.open(path, _RO)
    except FileNotFoundError:
        raise NodeError(f"{where} does not exist: create it once (`vmwrap checkpoints keygen` or "
                        "`(umask 077; head -c 32 /dev/urandom > KEYFILE)`) and copy it to every node "
                        "(docs/checkpoint.md)") from None
    except OSError as e:
        raise NodeError(f"cannot read {where}: {os.strerror(e.errno)}"
                        + (" (it is a symlink)" if e.errno == errno.ELOOP else "")) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NodeError(f"{where} is not a regular file")
        if st.st_uid != 0 or stat.S_IMODE(st.st_mode) not in (0o600, 0o400):
            raise NodeError(f"{where} must be owned by root with mode 0600 or 0400 (it is uid {st.st_uid}, "
                            f"mode {stat.S_IMODE(st.st_mode):04o}): whoever reads it can forge checkpoints")
        data = os.read(fd, 4097)
    finally:
        os.close(fd)
    key = data.strip()
    if len(data) > 4096 or len(key) < 32:
        raise NodeError(f"{where} must hold 32 to 4096 bytes of random data")
    return key


def keygen(path: str | os.PathLike) -> Path:
    """Create a new random site key (root, 0600); refuses to replace an existing one."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    try:
        _write_new(p, (secrets.token_hex(32) + "\n").encode(), 0o600)
    except FileExistsError:
        raise NodeError(f"the checkpoint key {p} already exists (every node must keep the same one)") from None
    return p


class StoreUnverified(NodeError):
    """The checkpoint store is missing, not initialised or another site's: on a node, its shared
    storage is not there. A start is the node's fault; a save fails like a full store (the job's
    --on-lost-checkpoint decides, the node stays up)."""


def _stamp_mac(key: bytes, store_id: str) -> str:
    return hmac.new(key, STAMP_CONTEXT + store_id.encode(), hashlib.sha256).hexdigest()


def _not_initialised(root: Path, why: str) -> StoreUnverified:
    # Short: a scheduler keeps about 200 characters of a drained node's reason (Slurm: vmwrap's cut).
    return StoreUnverified(f"the checkpoint store {root} {why}: shared storage not mounted on this node, or never "
                           "initialised (`vmwrap checkpoints init`, once per site)")


def read_stamp(root: Path) -> dict:
    """The store's stamp as written (not yet authenticated); StoreUnverified if there is none usable.
    Never through a link, at most STAMP_MAX bytes, root's file that only root may change."""
    p = Path(root) / STAMP
    try:
        fd = _open_regular(p)
    except FileNotFoundError:
        raise _not_initialised(root, f"has no {STAMP} stamp") from None
    except OSError as e:
        raise StoreUnverified(f"the checkpoint store's stamp {p} is unusable: {os.strerror(e.errno or 0)}"
                              + (" (it is a symlink)" if e.errno == errno.ELOOP else "")) from None
    try:
        st = os.fstat(fd)
        if st.st_uid != 0 or st.st_mode & 0o022:
            raise StoreUnverified(f"the checkpoint store's stamp {p} must be owned by root and writable only by "
                                  f"root (it is uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o})")
        data = os.read(fd, STAMP_MAX + 1)
    finally:
        os.close(fd)
    try:
        if len(data) > STAMP_MAX:
            raise ValueError(f"larger than {STAMP_MAX} bytes")
        stamp = json.loads(data)
        if not isinstance(stamp, dict) or not isinstance(stamp.get("store_id"), str) \
                or not isinstance(stamp.get("mac"), str):
            raise ValueError("no store_id and mac")
    except ValueError as e:
        raise StoreUnverified(f"the checkpoint store's stamp {p} is unusable ({e}): run `vmwrap checkpoints "
                              "init` again where the shared storage is mounted") from None
    return stamp


def verify_stamp(root: Path, key: bytes, key_file: str) -> dict:
    """The store's stamp once its MAC proves this site's key made it; StoreUnverified otherwise."""
    stamp = read_stamp(root)
    if not hmac.compare_digest(stamp["mac"].encode(), _stamp_mac(key, stamp["store_id"]).encode()):
        raise StoreUnverified(
            f"the checkpoint store {root} belongs to another site or was initialised with another checkpoint key "
            f"(its stamp {STAMP} does not verify with {key_file}): mount this site's store there, or copy the "
            "site's key to this node")
    return stamp


def init_store(root: str | os.PathLike, key_file: str | os.PathLike = KEY_FILE) -> tuple[str, Path]:
    """Stamp the shared store with this site's identity (`vmwrap checkpoints init`, run once per site
    where the store is mounted). Returns (what happened, the stamp's path): "created" (a new or
    empty store), "adopted" (an older vmwrap's store, kept as it is) or "already" (stamped, verifies:
    nothing done). NodeError for a store another site's key stamped, or one root alone cannot own."""
    root = Path(root)
    key_file = str(key_file)
    key = load_key(key_file)
    try:
        st = os.lstat(root)
    except FileNotFoundError:
        root.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(root, 0o700)
        os.chown(root, 0, 0)
        os.chmod(root, 0o700)
        st = os.lstat(root)
    if stat.S_ISLNK(st.st_mode):
        raise NodeError(f"the checkpoint store {root} is a symbolic link: give checkpoint_dir the real path")
    store = Store(root, key_file)
    store.check_root()
    p = root / STAMP
    if os.path.lexists(p):
        verify_stamp(root, key, key_file)
        return "already", p
    adopted = any(e.name != STAMP for e in os.scandir(root))
    store_id = secrets.token_hex(16)
    body = {"store_id": store_id, "created": time.time(), "host": socket.gethostname(), "vmwrap": __version__,
            "mac": _stamp_mac(key, store_id)}
    tmp = root / f"{STAMP}.{os.getpid()}.{secrets.token_hex(3)}"
    try:
        _write_new(tmp, json.dumps(body).encode() + b"\n", 0o644)
        _fsync_path(tmp, 0o644)
        os.link(tmp, p)  # never replaces a stamp another init wrote meanwhile
    except FileExistsError:
        verify_stamp(root, key, key_file)
        return "already", p
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_path(root)
    return ("adopted" if adopted else "created"), p


def record_spec(run_dir: Path, spec: domain.Spec) -> None:
    """Keep the VM's shape beside it (root-only) so a save can record what a restore must render again."""
    shape = {"virt_type": spec.virt_type, "memory_mib": spec.memory_mib, "cpus": spec.cpus,
             "cmdline": spec.cmdline, "work_dir": spec.work_dir, "disk": spec.disk is not None,
             "ninep": spec.ninep_socket is not None, "steps": spec.steps, "steps_ports": spec.steps_ports,
             "shell": spec.shell, "shell_ports": spec.shell_ports, "network": spec.network}
    p = Path(run_dir) / rundir.SPEC
    p.unlink(missing_ok=True)
    _write_new(p, json.dumps(shape).encode())


def _remove_entry(p: Path) -> bool:
    """Remove `p` without following a link; False if nothing was there. A failure is a NodeError naming it."""
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise NodeError(f"cannot remove {p} from the checkpoint store: {os.strerror(e.errno)}") from None
    try:
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(p)  # fd-based on Linux: links inside are unlinked, never followed
        else:
            os.unlink(p)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise NodeError(f"cannot remove {getattr(e, 'filename', None) or p} from the checkpoint store: "
                        f"{os.strerror(e.errno) if e.errno else e}") from None
    return True


class Store:
    """The shared checkpoint store; `key_file` is the site's `checkpoint_key_file` (needed to save,
    restore or verify; listing and deleting work without it)."""

    def __init__(self, root: str | os.PathLike, key_file: str | os.PathLike = KEY_FILE):
        self.root = Path(root)
        self.key_file = str(key_file)
        self.last_commit: dict[str, float | int] = {}

    def key(self) -> bytes:
        return load_key(self.key_file)

    def check_root(self) -> None:
        """Refuse a store someone other than root could write: its checkpoints could be anyone's."""
        try:
            st = os.stat(self.root)
        except OSError as e:
            raise NodeError(f"the checkpoint store {self.root} is not reachable: {os.strerror(e.errno)} "
                            "(is the shared storage mounted?)") from None
        if not stat.S_ISDIR(st.st_mode):
            raise NodeError(f"the checkpoint store {self.root} is not a directory")
        if st.st_uid != 0 or st.st_mode & 0o022:
            raise NodeError(f"the checkpoint store {self.root} must be owned by root and writable only by root "
                            f"(it is uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}); refusing to save "
                            "or restore checkpoints there")

    def check_identity(self) -> dict:
        """The store is this site's shared store: root's, private, stamped (`vmwrap checkpoints init`)
        with this site's key. Never creates anything: where the store's path is missing or an
        unstamped directory, the shared storage is not mounted (StoreUnverified, a NodeError)."""
        if not os.path.lexists(self.root):
            raise _not_initialised(self.root, "does not exist")
        self.check_root()
        return verify_stamp(self.root, self.key(), self.key_file)

    def dir(self, job_id: str) -> Path:
        Job.check_id(job_id)
        return self.root / job_id

    def exists(self, job_id: str) -> bool:
        return (self.dir(job_id) / "manifest.json").exists()

    # Markers beside the checkpoints: whether the job ever ran in a VM (so a restart without a
    # checkpoint is a lost checkpoint, not a first start) and why a save failed.
    def mark_ran(self, job_id: str, run: str = "") -> None:
        """This run (its token) is the job's current one: a save of any other run is refused."""
        self.check_identity()
        p = self.root / f"{self.dir(job_id).name}.ran"
        tmp = self.root / f".{p.name}.{os.urandom(3).hex()}"
        try:
            _write_new(tmp, run.encode()[:RUN_MAX])
            os.rename(tmp, p)   # a new inode: its mtime is this start's (_await_checkpoint reads it)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise NodeError(f"cannot write to the checkpoint store {self.root}: {e}") from None

    def ran(self, job_id: str) -> bool:
        return (self.root / f"{self.dir(job_id).name}.ran").exists()

    def current_run(self, job_id: str) -> str | None:
        """The token of the job's latest start (None: none recorded, or by a vmwrap before tokens)."""
        try:
            raw = _read_capped(self.root / f"{self.dir(job_id).name}.ran", RUN_MAX)
        except OSError:
            return None
        return raw.decode(errors="replace").strip() or None

    def check_current(self, job_id: str, run: str | None) -> None:
        """StaleRunError when the job has started again since `run` did (a node cut off from its
        scheduler ran on while the job was restarted elsewhere): its saves would replace the new
        run's checkpoint with older work, and its end would delete it."""
        current = self.current_run(job_id)
        if run and current and current != run:
            raise StaleRunError(f"job {job_id} was started again elsewhere since this run began (run "
                                f"{current[:16]}, this one {run[:16]}): its checkpoint is the new run's")

    def mark_lost(self, job_id: str, reason: str) -> None:
        """Best effort: a store that is not this site's (not mounted here) gets nothing; the restart
        then reports the checkpoint as not saved."""
        try:
            self.check_identity()
        except NodeError:
            return
        try:
            p = self.root / f"{self.dir(job_id).name}.lost"
            p.unlink(missing_ok=True)
            _write_new(p, reason.encode(errors="replace")[:DELIVERED_MAX])
        except OSError:
            pass

    # Shared records the gap planner reads: measured save throughput, and a save's deadline (the
    # reservation's start), written by the planner before it requeues a job.
    def record_rate(self, nbytes: int, seconds: float) -> None:
        line = json.dumps({"ts": time.time(), "bytes": nbytes, "seconds": seconds}) + "\n"
        try:  # never through a link someone planted in the store
            fd = os.open(self.root / ".save-rates", os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)
        except OSError:
            pass

    def measured_save_rate(self, last: int = 10) -> float | None:
        """MB/s of the slowest of the last saves (None before any): what the planner predicts with."""
        try:
            lines = _read_capped(self.root / ".save-rates", 16 << 20).decode(errors="replace").splitlines()[-last:]
        except OSError:
            return None
        rates = []
        for ln in lines:
            try:
                r = json.loads(ln)
                if r["seconds"] > 0 and r["bytes"] > 0:
                    rates.append(r["bytes"] / 1e6 / r["seconds"])
            except (ValueError, KeyError, TypeError):
                continue
        return min(rates) if rates else None

    def set_deadline(self, job_id: str, when: float) -> None:
        """OSError where the store is missing (it is never created here)."""
        p = self.root / f"{self.dir(job_id).name}.deadline"
        p.unlink(missing_ok=True)
        _write_new(p, f"{when:.3f}\n".encode())

    def deadline(self, job_id: str) -> float | None:
        try:
            return float(_read_capped(self.root / f"{self.dir(job_id).name}.deadline", 64))
        except (OSError, ValueError):
            return None

    def clear_deadline(self, job_id: str) -> None:
        (self.root / f"{self.dir(job_id).name}.deadline").unlink(missing_ok=True)

    def lost_reason(self, job_id: str) -> str | None:
        try:
            return _read_capped(self.root / f"{self.dir(job_id).name}.lost", DELIVERED_MAX).decode(
                errors="replace").strip()
        except OSError:
            return None

    def list(self) -> list[Info]:
        """What the store holds (not authenticated: for display only)."""
        out = []
        if not self.root.exists():
            return out
        for d in sorted(self.root.iterdir()):
            if d.name.startswith(".") or not d.is_dir() or d.is_symlink():
                continue
            try:
                m = json.loads(_read_capped(d / "manifest.json", JSON_MAX))
                j = json.loads(_read_capped(d / "job.json", JSON_MAX))
                out.append(Info(d.name, sum(int(f["bytes"]) for f in m["files"].values()), float(m["created"]),
                                str(m["node"]), int(j.get("restarts", 0)), str(j.get("image", ""))))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue
        return out

    def delete(self, job_id: str) -> bool:
        """Remove the job's checkpoint, markers and temporaries; True when something stood at its dir.

        Whatever is at the job's dir goes, never followed: a dir by rmtree's fd-based walk, a link or a
        plain file (a half-written store, a hand-made entry) unlinked, not left to confuse the next save."""
        d = self.dir(job_id)
        gone = _remove_entry(d)
        for marker in ("ran", "lost", "deadline"):
            (self.root / f"{d.name}.{marker}").unlink(missing_ok=True)
        for tmp in self.root.glob(f".{job_id}.*") if self.root.exists() else ():
            _remove_entry(tmp)
        return gone

    def jobs(self) -> set[str]:
        """Every job with a checkpoint or a marker in the store."""
        if not self.root.exists():
            return set()
        out = set()
        for p in self.root.iterdir():
            if p.name.startswith("."):
                continue
            out.add(p.name.rsplit(".", 1)[0] if p.suffix in (".ran", ".lost", ".deadline") else p.name)
        return out

    def gc(self, still_queued) -> list[str]:
        """Delete what belongs to jobs the scheduler no longer has queued or running (e.g. a saved
        job cancelled while it waited: no epilog runs for it)."""
        removed = []
        for job_id in sorted(self.jobs()):
            if not still_queued(job_id):
                self.delete(job_id)
                removed.append(job_id)
        return removed

    def staging(self, job_id: str) -> Path:
        """A private temporary directory in the store to build a checkpoint in (never listed)."""
        self.check_identity()
        tmp = self.root / f".{self.dir(job_id).name}.{os.getpid()}.{os.urandom(3).hex()}"
        tmp.mkdir(mode=0o700)
        return tmp

    def commit(self, tmp: Path, job_id: str, known: dict[str, tuple[int, str]] | None = None,
               run: str | None = None) -> dict:
        """Seal a staged checkpoint (checksums, MAC, fsync) and rename it into place; returns the manifest.

        `known` holds the (size, sha256) of files the caller hashed as it wrote them: those are sealed
        as written, without reading them back; every other file is hashed here. `run`: the saving
        run's token; the checkpoint is not put in place if the job has started again since."""
        self.check_identity()  # still this site's store (not unmounted under the save)
        key = self.key()
        known = known or {}
        files = {}
        t0 = time.monotonic()
        for f in FILES:
            _fsync_path(tmp / f, 0o600)
        t1 = time.monotonic()
        reread = 0
        for f in FILES:
            if f in known:
                n, digest = known[f]
            else:
                n, digest = _hash_file(tmp / f)
                reread += n
            files[f] = {"bytes": n, "sha256": digest}
        # reread_bytes: what was read back to be hashed (a save hashes as it writes: 0 unless its
        # follower of libvirt's image gave up)
        self.last_commit = {"fsync_s": t1 - t0, "hash_s": time.monotonic() - t1, "reread_bytes": reread}
        manifest = {"version": VERSION, "vmwrap": __version__, "job_id": job_id, "created": time.time(),
                    "node": socket.gethostname(), "files": files}
        _write_new(tmp / "manifest.json", json.dumps({**manifest, "mac": _mac(key, manifest)}).encode())
        _fsync_path(tmp / "manifest.json")
        _fsync_path(tmp)
        self.check_current(job_id, run)  # again just before it replaces anything
        final = self.dir(job_id)
        old = None
        if final.exists() or final.is_symlink():  # an older checkpoint of the same job: swap, then drop
            old = self.root / f".{job_id}.old.{os.urandom(3).hex()}"
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync_path(self.root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return manifest

    def manifest(self, job_id: str) -> dict:
        """The checkpoint's manifest once its MAC (site key) proves vmwrap wrote it for this job.

        CheckpointError if missing or not authentic; NodeError if the store or the key is unfit."""
        self.check_identity()
        d = self.dir(job_id)
        try:
            raw = _read_capped(d / "manifest.json", JSON_MAX)
        except FileNotFoundError:
            why = self.lost_reason(job_id) or "it was not saved when the job was requeued (node failure?)"
            raise CheckpointError(f"job {job_id} has no checkpoint to continue from: {why}") from None
        except OSError as e:
            raise CheckpointError(f"the checkpoint of job {job_id} is unreadable: {e}") from None
        key = self.key()
        try:
            m = json.loads(raw)
            mac = m.pop("mac", None) if isinstance(m, dict) else None
        except ValueError:
            m, mac = None, None
        if isinstance(m, dict) and m.get("version") != VERSION:
            # Before the MAC: the MAC's context names the format, so another format never authenticates.
            raise CheckpointError(
                f"the checkpoint of job {job_id} has format {m.get('version')!r} (saved by vmwrap "
                f"{m.get('vmwrap') or 'before 0.1.0'}); this vmwrap {__version__} restores format {VERSION} only")
        if not isinstance(mac, str) or not hmac.compare_digest(mac.encode(), _mac(key, m).encode()):
            raise CheckpointError(f"the checkpoint of job {job_id} is not authenticated (no valid MAC under this "
                                  f"site's key {self.key_file}): refusing to restore it")
        files = m.get("files")
        if (m.get("version") != VERSION or m.get("job_id") != job_id or not isinstance(files, dict)
                or set(files) != set(FILES)):
            raise CheckpointError(f"the checkpoint in {d} was not made for job {job_id}")
        return m

    def verify(self, job_id: str, on_bytes: Callable[[int], None] | None = None) -> dict:
        """The authenticated manifest, after checking every file's size and checksum (`on_bytes`
        hears the bytes hashed: an admin's progress bar)."""
        m = self.manifest(job_id)
        for name in FILES:
            _check(self.dir(job_id) / name, m["files"][name], job_id, on_bytes)
        return m


def _bad(job_id: str, name: str) -> CheckpointError:
    return CheckpointError(f"checkpoint of job {job_id}: {name} is corrupt (checksum mismatch)")


def _check(p: Path, want: dict, job_id: str, on_bytes: Callable[[int], None] | None = None) -> None:
    try:
        n, digest = _hash_file(p, on_bytes)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint of job {job_id}: {p.name} is missing") from None
    except OSError as e:
        raise CheckpointError(f"checkpoint of job {job_id}: {p.name} is unreadable: {e.strerror}") from None
    if n != want["bytes"] or not hmac.compare_digest(digest, str(want["sha256"])):
        raise _bad(job_id, p.name)


def _read_verified(d: Path, name: str, m: dict, job_id: str, cap: int) -> bytes:
    """A checkpoint file's bytes, checked against the manifest as read (no second read to race with)."""
    want = m["files"][name]
    if want["bytes"] > cap:
        raise CheckpointError(f"checkpoint of job {job_id}: {name} is larger than {cap} bytes")
    try:
        data = _read_capped(d / name, cap)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint of job {job_id}: {name} is missing") from None
    except OSError as e:
        raise CheckpointError(f"checkpoint of job {job_id}: {name} is unreadable: {e.strerror}") from None
    if len(data) != want["bytes"] or not hmac.compare_digest(hashlib.sha256(data).hexdigest(), str(want["sha256"])):
        raise _bad(job_id, name)
    return data


def _copy_verified(d: Path, name: str, m: dict, job_id: str, dst: Path, uid: int, gid: int, mode: int) -> None:
    """Copy a checkpoint file to a new `dst` (owner uid:gid, `mode`), hashing what was copied."""
    want = m["files"][name]
    try:
        sfd = _open_regular(d / name)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint of job {job_id}: {name} is missing") from None
    except OSError as e:
        raise CheckpointError(f"checkpoint of job {job_id}: {name} is unreadable: {e.strerror}") from None
    dst.unlink(missing_ok=True)
    h = hashlib.sha256()
    try:
        dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.fchown(dfd, uid, gid)
            os.fchmod(dfd, mode)
            n = _pump(sfd, dfd, want["bytes"] + 1, h)  # one byte more than signed: a longer file is caught
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)
    if n != want["bytes"] or not hmac.compare_digest(h.hexdigest(), str(want["sha256"])):
        dst.unlink(missing_ok=True)
        raise _bad(job_id, name)


class StaleRunError(CheckpointError):
    """This run of the job is no longer its current one (Store.check_current)."""


class NotSaveable(CheckpointError):
    """The job's image may not be saved (`checkpoint = false` in the catalog): the job's restart
    follows its --on-lost-checkpoint policy, with this as the reason."""


def refuse_by_policy(run_dir: Path) -> None:
    """NotSaveable when the image the VM booted says its jobs may not be saved. The launcher wrote the
    flag into the run dir (root's) from the catalog at boot: the image that really runs decides."""
    try:
        meta = json.loads(_read_capped(run_dir / rundir.JOB, JSON_MAX))
    except (OSError, ValueError):
        return  # _save reports a run dir without its record
    if isinstance(meta, dict) and meta.get("checkpoint") is False:
        raise NotSaveable(f"its VM was not saved: image {meta.get('image')} may not be saved "
                          "(checkpoint = false in the site's image catalog)")


def save(job_id: str, run_dir: Path, store: Store, conn, restarts: int, deadline: float | None = None) -> dict:
    """Quiesce the work dir server, save the VM into the store, and leave the node with no VM.

    Returns timings; raises NodeError (the VM is then destroyed by the caller's teardown, and the
    restart follows the job's --on-lost-checkpoint policy). With a `deadline` (epoch seconds: a
    reservation needs the node then) a save still running at that time is aborted, so the node is
    free on time and the job's checkpoint counts as lost, with that reason. A failed save also drops
    an older checkpoint of the job: the VM ran on since, so that one would replay work and output.
    """
    store.check_current(job_id, run_token(run_dir))  # a stale run must not drop the current run's checkpoint
    try:
        refuse_by_policy(run_dir)
        return _save(job_id, run_dir, store, conn, restarts, deadline)
    except StaleRunError:
        raise
    except BaseException:
        shutil.rmtree(store.dir(job_id), ignore_errors=True)
        raise


def mark_current(store: Store, job_id: str, run_dir: Path, run: str) -> None:
    """This run is now the job's current one: in the store for every node, in its run dir for itself.
    A run that never got this far (its start failed first) is nobody's stale copy."""
    store.mark_ran(job_id, run)
    (Path(run_dir) / rundir.RUN).write_text(run)


def run_token(run_dir: Path) -> str | None:
    """The token of the run whose run dir this is (root's; None: it never became current, or an
    older vmwrap's run)."""
    try:
        run = _read_capped(Path(run_dir) / rundir.RUN, RUN_MAX).decode(errors="replace").strip()
    except OSError:
        return None
    return run or None


def running_vm(job_id: str, run_dir: Path, conn, what: str) -> tuple:
    """The job's running domain and what a checkpoint records of it: the run dir's job record with the
    VM's shape (for the restore's XML) and the domain's UUID. NodeError when either is missing."""
    dom = domain.lookup(conn, rundir.domain_name(job_id))
    if dom is None or not dom.isActive():
        raise NodeError(f"job {job_id} has no running VM on this node to {what}")
    try:
        meta = json.loads(_read_capped(run_dir / rundir.JOB, JSON_MAX))
        shape = json.loads(_read_capped(run_dir / rundir.SPEC, JSON_MAX))
    except (OSError, ValueError) as e:
        raise NodeError(f"job {job_id}: its run dir does not record the VM's shape (booted by an older "
                        f"vmwrap?): {e}") from None
    shape["uuid"] = dom.UUIDString()
    meta["spec"] = shape
    return dom, meta


def _save(job_id: str, run_dir: Path, store: Store, conn, restarts: int, deadline: float | None) -> dict:
    import libvirt

    if deadline is not None and time.time() >= deadline:
        raise NodeError(f"no time left to save: the node is needed at {time.strftime('%H:%M:%S', time.localtime(deadline))}")
    store.check_identity()  # fail before pausing the VM and writing GBs: no key, or not this site's store
    t0 = time.monotonic()
    name = rundir.domain_name(job_id)
    dom, meta = running_vm(job_id, run_dir, conn, "save")
    serial = (run_dir / share.CONTROL).exists()
    if serial:
        share.drain(run_dir)
    try:
        if dom.info()[0] != libvirt.VIR_DOMAIN_PAUSED:
            domain.guarded(conn, name, "pause for its save", dom.suspend)
        state = share.state(run_dir) if serial else None
    except Exception:
        if serial:
            try:
                share.resume(run_dir)
            except NodeError:
                pass  # the server is gone with its VM (destroyed by domain.guarded?): keep the cause
        raise
    t_quiesced = time.monotonic()
    tmp = store.staging(job_id)
    follower = None
    try:
        # The save image is hashed while libvirt writes it (no second pass over it before the seal).
        follower = _Follower(tmp / "memory.save")
        try:
            # O_DIRECT: measured 2-3x faster than through the page cache, and already on disk.
            _save_by(dom, str(tmp / "memory.save"), libvirt.VIR_DOMAIN_SAVE_BYPASS_CACHE, deadline)
        except libvirt.libvirtError as e:
            raise NodeError(f"libvirt could not save the VM of job {job_id}: {e.get_error_message()}") from None
        os.chmod(tmp / "memory.save", 0o600)
        t_saved = time.monotonic()
        known = {}
        followed = follower.finish()
        if followed is not None:
            known["memory.save"] = followed
        t_followed = time.monotonic()
        if (run_dir / rundir.OVERLAY).exists():
            known["overlay.qcow2"] = _copy_out(run_dir / rundir.OVERLAY, tmp / "overlay.qcow2")
        else:
            known["overlay.qcow2"] = _write_sealed(tmp / "overlay.qcow2", b"")
        known["share.json"] = _write_sealed(tmp / "share.json", json.dumps(state).encode())
        for s in STREAMS:
            src = run_dir / s
            known[s] = _copy_out(src, tmp / s) if src.exists() else _write_sealed(tmp / s, b"")
        meta.update(restarts=restarts, delivered=_delivered(run_dir))
        known["job.json"] = _write_sealed(tmp / "job.json", json.dumps(meta).encode())
        manifest = store.commit(tmp, job_id, known, run=run_token(run_dir))
    except BaseException:
        if follower is not None:
            follower.abandon()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    t_done = time.monotonic()
    timings = {"quiesce_s": t_quiesced - t0, "save_s": t_saved - t_quiesced, "seal_s": t_done - t_saved,
               **store.last_commit, "total_s": t_done - t0,
               "memory_bytes": manifest["files"]["memory.save"]["bytes"]}
    # What hashing still cost after the save: the follower's tail and check, and any file hashed again.
    timings["hash_s"] += t_followed - t_saved
    return timings


def _delivered(run_dir: Path) -> dict[str, int]:
    """How much of each stream the job's step delivered. The file is in a dir the job's user writes:
    read it without following links or blocking on a FIFO, at most 4 KiB; anything odd counts as 0."""
    try:
        raw = json.loads(_read_capped(rundir.user_dir(run_dir) / rundir.DELIVERED, DELIVERED_MAX))
    except (OSError, ValueError):
        return {}
    if not isinstance(raw, dict):
        return {}
    return {k: v for k, v in raw.items() if k in STREAMS + OUTPUT_SIZES and type(v) is int and 0 <= v < 1 << 62}


def _save_by(dom, path: str, flags: int, deadline: float | None) -> None:
    """virDomainSaveFlags, aborted (virDomainAbortJob) if it is still running at `deadline`; a QEMU
    its user stopped meanwhile gets the VM destroyed (domain.guarded), never a hung epilog."""
    import libvirt

    def too_late() -> NodeError:
        return NodeError(f"the save did not finish by {time.strftime('%H:%M:%S', time.localtime(deadline))}, "
                         "when a reservation needs the node: stopped so the reservation starts on time")

    if deadline is not None and time.time() >= deadline:
        # Pausing took all the time left (a busy node): do not start a save that an abort may no
        # longer catch (libvirt then finishes it after the deadline, and the reservation waits).
        raise too_late()
    aborted = []

    def abort():
        aborted.append(True)
        threading.Thread(target=dom.abortJob, daemon=True).start()  # needs QEMU's answer: may hang too
    timeout = domain.CALL_TIMEOUT if deadline is None else max(0.0, deadline - time.time())
    try:
        domain.guarded(dom.connect(), dom.name(), "save", lambda: dom.saveFlags(path, None, flags),
                       timeout=timeout, on_timeout=abort if deadline is not None else None)
        return
    except (GuestStalledError, libvirt.libvirtError):
        if not aborted:
            raise
    raise too_late()


def check_owner(meta: dict, job: Job, image: str | None) -> None:
    """The checkpoint must be this job's: same id, user, group and image (CheckpointError otherwise)."""
    want = {"job_id": job.job_id, "uid": job.uid, "gid": job.gid, "image": image}
    for k, v in want.items():
        if meta.get(k) != v or type(meta.get(k)) is not type(v):
            raise CheckpointError(f"the checkpoint of job {job.job_id} was made for another {k} "
                                  f"({meta.get(k)!r}, this job has {v!r}): refusing to restore it")


def check_base(meta: dict, job_id: str, paths: dict[str, Path]) -> None:
    """The saved overlay only makes sense on the very base disk it was written over: an image the
    admin replaced under the same name since the save would restore as a corrupt file system.

    `paths["disk"]` is the cache's content-addressed blob (its name is its sha256). A checkpoint
    from before this record (no `disk_sha256`) is restored as before."""
    saved = meta.get("disk_sha256")
    if saved is None or "disk" not in paths:
        return
    now = Path(paths["disk"]).name
    if not isinstance(saved, str) or saved != now:
        raise CheckpointError(f"the checkpoint of job {job_id} holds a disk written over image "
                              f"{meta.get('image')!r} with base sha256 {str(saved)[:12]}..., which the catalog has "
                              f"since replaced (now {now[:12]}...): its disk cannot be restored on another base")


def restore_xml(meta: dict, job: Job, run_dir: Path, paths: dict[str, Path]) -> tuple[str, domain.Spec]:
    """The restored VM's domain XML: vmwrap's template with this node's paths and the job's identity.

    Only the VM's validated shape comes from the (authenticated) checkpoint: memory, CPUs, accelerator,
    kernel arguments, which devices exist, the domain UUID. libvirt then checks that it is
    ABI-compatible with the saved VM; nothing of the XML inside memory.save is used."""
    from .sizing import MIN_MEMORY_MIB, host_memory_mib

    s = meta.get("spec")
    if not isinstance(s, dict):
        raise CheckpointError(f"the checkpoint of job {job.job_id} does not record the VM's shape")

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"the checkpoint of job {job.job_id} records an unusable VM {what}: {s.get(what)!r}")

    mem, cpus, vt, cmdline = s.get("memory_mib"), s.get("cpus"), s.get("virt_type"), s.get("cmdline")
    if type(mem) is not int or not MIN_MEMORY_MIB <= mem <= host_memory_mib():
        raise bad("memory_mib")
    if type(cpus) is not int or not 1 <= cpus <= (os.cpu_count() or 1):
        raise bad("cpus")
    if vt not in ("kvm", "qemu"):  # libvirt's domain types: KVM, or QEMU's TCG
        raise bad("virt_type")
    if not isinstance(cmdline, str) or len(cmdline) > 4096 or not cmdline.isprintable():
        raise bad("cmdline")
    for flag in ("disk", "ninep"):
        if type(s.get(flag)) is not bool:
            raise bad(flag)
    steps = s.get("steps", False)  # not recorded: saved by a vmwrap whose VMs had no step port
    if type(steps) is not bool:
        raise bad("steps")
    shell = s.get("shell", False)  # not recorded: saved by a vmwrap whose VMs had no shell port
    if type(shell) is not bool:
        raise bad("shell")
    shell_ports = s.get("shell_ports", 1)  # not recorded: saved by a vmwrap whose VMs had one
    if type(shell_ports) is not int or not 1 <= shell_ports <= 16:
        raise bad("shell_ports")
    steps_ports = s.get("steps_ports", 1)  # likewise
    if type(steps_ports) is not int or not 1 <= steps_ports <= 16:
        raise bad("steps_ports")
    network = s.get("network", "none")  # not recorded: saved by a vmwrap whose VMs had no network
    if network not in NETWORKS:
        raise bad("network")
    if s["disk"] != bool(paths.get("disk")):
        raise bad("disk")
    if s.get("work_dir") != job.work_dir:
        raise CheckpointError(f"the checkpoint of job {job.job_id} was made with work dir {s.get('work_dir')!r}, "
                              f"this job has {job.work_dir!r}")
    try:
        uid = str(uuid.UUID(s.get("uuid")))
    except (TypeError, ValueError, AttributeError):
        raise bad("uuid") from None
    if uid != s["uuid"]:
        raise bad("uuid")
    ids = domain.qemu_identity(job.uid, job.gid)  # QEMU runs as the job's user, as at boot
    spec = domain.Spec(
        name=job.domain_name, job_id=job.job_id, virt_type=vt, memory_mib=mem, cpus=cpus,
        kernel=str(paths["kernel"]), initrd=str(paths["initrd"]),
        disk=str(run_dir / rundir.OVERLAY) if s["disk"] else None,
        ctl_dir=str(rundir.ctl(run_dir)), work_dir=job.work_dir, run_dir=str(run_dir), cmdline=cmdline,
        ninep_socket=str(run_dir / share.SOCKET) if s["ninep"] else None,
        uid=ids[0], gid=ids[1], steps=steps, steps_ports=steps_ports, shell=shell, shell_ports=shell_ports,
        network=network)
    root = ET.fromstring(domain.render(spec))
    el = ET.Element("uuid")
    el.text = uid
    root.insert(list(root).index(root.find("name")) + 1, el)
    return ET.tostring(root, encoding="unicode"), spec


def restore(job_id: str, run_dir: Path, store: Store, conn, job: Job, paths: dict[str, Path],
            image: str | None = None, memory_overhead_mib: int | None = None, network: str | None = None) -> dict:
    """Bring the saved VM back on this node: streams, disk, work dir server, then the VM itself.

    `paths` are this node's cached kernel/initrd/disk of the job's image (the caller fetched them);
    `image` the image name the caller resolved for the job (default `job.image`); `network` that
    image's network in the catalog now: a VM saved with a network the site has since taken away
    from the image is not restored with it (the job's --on-lost-checkpoint decides).
    """
    import libvirt

    t0 = time.monotonic()
    if job.job_id != job_id:
        raise CheckpointError(f"asked to restore job {job_id} for job {job.job_id}")
    m = store.manifest(job_id)
    d = store.dir(job_id)
    try:
        meta = json.loads(_read_verified(d, "job.json", m, job_id, JSON_MAX))
        if not isinstance(meta, dict):
            raise ValueError("not an object")
    except ValueError as e:
        raise CheckpointError(f"checkpoint of job {job_id}: job.json is unusable: {e}") from None
    check_owner(meta, job, image or job.image)
    check_base(meta, job_id, paths)
    xml, spec = restore_xml(meta, job, run_dir, paths)
    if network is not None and spec.network != network and spec.network != "none":
        raise CheckpointError(f"the checkpoint of job {job_id} has network {spec.network!r}, which image "
                              f"{image or job.image} no longer has (its catalog entry says network = {network!r})")
    fmt = meta.get("disk_format") or "qcow2"
    if spec.disk and fmt not in ("qcow2", "raw"):
        raise CheckpointError(f"checkpoint of job {job_id}: unknown disk format {fmt!r}")
    delivered = meta.get("delivered", {})
    if not isinstance(delivered, dict) or not all(k in STREAMS + OUTPUT_SIZES and type(v) is int and v >= 0
                                                  for k, v in delivered.items()):
        raise CheckpointError(f"checkpoint of job {job_id}: unusable delivered offsets")
    try:
        state = json.loads(_read_verified(d, "share.json", m, job_id, SHARE_MAX))
    except ValueError as e:
        raise CheckpointError(f"checkpoint of job {job_id}: share.json is unusable: {e}") from None
    if (spec.ninep_socket is not None) != isinstance(state, dict):
        raise CheckpointError(f"checkpoint of job {job_id}: the work dir server's state does not match the VM")
    t_verified = time.monotonic()
    for s in STREAMS:  # QEMU (spec.uid) appends to these: the stream continues where the saved guest left it
        _copy_verified(d, s, m, job_id, run_dir / s, spec.uid, spec.gid, 0o600)
    if spec.disk:
        # QEMU's own (the job's user's) disk, as at boot. The job's user could write to it while the VM
        # ran: qemu-img parses it as that user, not as root (-u: the base is not opened).
        ov = run_dir / rundir.OVERLAY
        _copy_verified(d, "overlay.qcow2", m, job_id, ov, spec.uid, spec.gid, 0o600)
        r = subprocess.run([QEMU_IMG, "rebase", "-u", "-F", fmt, "-b", str(paths["disk"]), str(ov)],
                           capture_output=True, text=True, cwd="/", env={"PATH": "/usr/bin:/bin"},
                           user=spec.uid, group=spec.gid, extra_groups=[])
        if r.returncode != 0:
            raise NodeError(f"cannot attach the restored disk to its base image: {r.stderr.strip()}")
    record_spec(run_dir, spec)
    # libvirtd opens the save image by path: restore from a copy in the run dir (root's, 0711) made
    # while hashing it, so a node that can write the store cannot swap it after the check.
    saved = run_dir / rundir.MEMORY_SAVE
    _copy_verified(d, "memory.save", m, job_id, saved, 0, 0, 0o600)
    if state is not None:
        sf = run_dir / rundir.SHARE_STATE
        sf.unlink(missing_ok=True)
        _write_new(sf, json.dumps(state).encode())
        share.start(run_dir, job, sf)
        os.chown(run_dir / share.SOCKET, spec.uid, spec.gid)  # QEMU connects to it
    try:
        domain.guarded(conn, job.domain_name, "restore",
                       lambda: conn.restoreFlags(str(saved), xml, libvirt.VIR_DOMAIN_SAVE_PAUSED))
    except libvirt.libvirtError as e:
        share.stop(run_dir)
        raise CheckpointError(f"libvirt could not restore the VM of job {job_id}: {e.get_error_message()}") from None
    finally:
        saved.unlink(missing_ok=True)
    # As at boot: the hard memory limit holds before the restored guest runs again.
    limit = spec.memory_mib + memory_overhead_mib if memory_overhead_mib is not None else None
    domain.start_limited(conn.lookupByName(job.domain_name), limit)
    rundir.own_ports(run_dir, job.uid, job.gid)  # as at boot
    (run_dir / rundir.RESTORED).write_text(json.dumps({"delivered": delivered,
                                                       "restarts": meta.get("restarts", 0)}))
    t_done = time.monotonic()
    return {"verify_s": t_verified - t0, "restore_s": t_done - t_verified, "total_s": t_done - t0,
            "from_node": str(m.get("node", "?"))}
