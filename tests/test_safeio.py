"""Root reads of files a user or a guest writes: no links, no blocking, bounded memory (issue 14)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vmwrap import payload, safeio

ROOT = Path(__file__).resolve().parent.parent
HUGE = 64 << 30  # sparse: costs no disk, but reading it whole would need 64 GiB of memory


def _bounded(code: str, timeout: float = 30.0, mem: int = 512 << 20) -> subprocess.CompletedProcess:
    """Run `code` in a child limited to `mem` bytes of address space: an unbounded read fails there
    (MemoryError) instead of taking the test machine down; a blocked open times out."""
    pre = f"import resource; resource.setrlimit(resource.RLIMIT_AS, ({mem}, {mem}))\n"
    return subprocess.run([sys.executable, "-c", pre + code], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))


def test_symlink_is_not_followed(tmp_path):
    target = tmp_path / "secret"
    target.write_text("root only")
    (tmp_path / "link").symlink_to(target)
    assert safeio.read_capped(tmp_path / "link", 100) is None
    assert safeio.tail_capped(tmp_path / "link", 100) is None
    assert safeio.open_stream(tmp_path / "link") is None
    assert safeio.read_capped(target, 100) == b"root only"


def test_fifo_does_not_block(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    t0 = time.monotonic()
    assert safeio.read_capped(tmp_path / "fifo", 100) is None
    assert safeio.tail_capped(tmp_path / "fifo", 100) is None
    assert time.monotonic() - t0 < 1


def test_devices_and_dirs_are_not_regular_files(tmp_path):
    assert safeio.read_capped("/dev/zero", 100) is None
    assert safeio.tail_capped("/dev/zero", 100) is None
    assert safeio.read_capped(tmp_path, 100) is None
    assert safeio.read_capped(tmp_path / "absent", 100) is None


def test_huge_sparse_file_is_read_capped(tmp_path):
    f = tmp_path / "big"
    with open(f, "wb") as fh:
        fh.write(b"head\n")
        fh.truncate(HUGE)
        fh.seek(HUGE - 5)
        fh.write(b"tail\n")
    assert safeio.read_capped(f, 5) == b"head\n"
    assert len(safeio.read_capped(f, 1 << 16)) == 1 << 16
    assert safeio.tail_capped(f, 5) == b"tail\n"
    assert safeio.tail_capped(tmp_path / "big", 1 << 16)[-5:] == b"tail\n"
    small = tmp_path / "small"
    small.write_bytes(b"abc")
    assert safeio.tail_capped(small, 100) == b"abc"


def _sparse_status(path: Path, head: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(head)
        fh.truncate(HUGE)


def test_guest_timeline_of_a_64gib_status_file(tmp_path):
    """The epilog reads it as root: a guest that makes it huge must not exhaust the node's memory."""
    _sparse_status(tmp_path / "status", b"booted 1.5\nready 2.0\nstarted 2.5\nexit 3\n")
    r = _bounded(f"import json; from vmwrap import payload; t = payload.guest_timeline({str(tmp_path)!r}); "
                 "print(json.dumps(t))")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout) == {"booted": 1.5, "ready": 2.0, "started": 2.5, "exit": 3}


def test_guest_timeline_ignores_hostile_values(tmp_path):
    (tmp_path / "status").write_text("booted inf\nready nan\nstarted 1e5\nexit " + "9" * 5000 + "\n")
    assert payload.guest_timeline(tmp_path) == {"started": 1e5}


def test_guest_timeline_on_a_fifo_returns(tmp_path):
    os.mkfifo(tmp_path / "status")
    r = _bounded(f"from vmwrap import payload; print(payload.guest_timeline({str(tmp_path)!r}))", timeout=10)
    assert r.stdout.strip() == "{}"


def test_console_tail_of_a_64gib_console_log(tmp_path):
    with open(tmp_path / "console.log", "wb") as fh:
        fh.truncate(HUGE)
    with open(tmp_path / "console.log", "ab") as fh:
        fh.write(b"Kernel panic - not syncing\n")
    r = _bounded(f"from pathlib import Path; from vmwrap import payload; "
                 f"print(payload._tail(Path({str(tmp_path)!r}) / 'console.log'))")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Kernel panic - not syncing" in r.stdout
    assert len(r.stdout) < 2 * payload.CONSOLE_TAIL + 100


def _stream_code(run_dir: Path) -> str:
    """Attach to a run dir whose VM is already gone (no control socket): parse its status, exit."""
    return (f"import sys; from pathlib import Path; from vmwrap import payload\n"
            f"a = payload.Attachment(Path({str(run_dir)!r}), 'j1', out_fd=1, err_fd=2)\n"
            f"sys.exit(a.stream())\n")


def _run_dir(tmp_path: Path) -> Path:
    d = tmp_path / "run"
    d.mkdir()
    for n in ("stdout", "stderr"):
        (d / n).write_bytes(b"")
    return d


def test_stream_survives_a_huge_exit_value(tmp_path):
    d = _run_dir(tmp_path)
    (d / "status").write_text("booted 1.0\nexit " + "7" * 5000 + "\n")
    r = _bounded(_stream_code(d))
    assert r.returncode == payload.EXIT_GUEST, r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_stream_bounds_a_status_line_without_newline(tmp_path):
    """1 GiB (sparse) of status without a newline, then the real exit line: bounded memory."""
    d = _run_dir(tmp_path)
    with open(d / "status", "wb") as fh:
        fh.write(b"booted 1.0\n")
        fh.truncate(1 << 30)
    with open(d / "status", "ab") as fh:
        fh.write(b"\nexit 5\n")
    r = _bounded(_stream_code(d), timeout=120, mem=768 << 20)
    assert "MemoryError" not in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.returncode in (5, payload.EXIT_GUEST)


def test_write_private_replaces_a_fifo_instead_of_blocking(tmp_path):
    """Root writes the script into the user's ctl/user dir: a FIFO planted there must not hang it."""
    os.mkfifo(tmp_path / "script")
    r = _bounded(f"from pathlib import Path; from vmwrap import payload; "
                 f"payload._write_private(Path({str(tmp_path)!r}) / 'script', b'echo hi', 0o700)", timeout=10)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "script").read_bytes() == b"echo hi"


def test_write_private_replaces_a_symlink(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (tmp_path / "args").symlink_to(victim)
    payload._write_private(tmp_path / "args", b"a\0", 0o600)
    assert victim.read_text() == "keep" and (tmp_path / "args").read_bytes() == b"a\0"
    assert not (tmp_path / "args").is_symlink()


def test_attach_reads_error_and_notice_capped(tmp_path, capfd):
    (tmp_path / "error").write_bytes(b"user\nbad request\n" + b"x" * (1 << 20))
    assert payload.attach(tmp_path, "j1", "", {}) == payload.EXIT_USER
    err = capfd.readouterr().err
    assert "vmwrap: error: bad request" in err and len(err) <= payload.SMALL_FILE_MAX + 100


def test_attach_ignores_an_error_symlink(tmp_path, capfd):
    """Not a regular file: no error to report (it is root-written; anything else is not ours)."""
    target = tmp_path / "elsewhere"
    target.write_text("user\nfrom a link\n")
    (tmp_path / "error").symlink_to(target)
    with pytest.raises(FileNotFoundError):  # it goes on to hand the job over: no ctl dir here
        payload.attach(tmp_path, "j1", "", {})
    assert "from a link" not in capfd.readouterr().err


def test_a_proc_file_of_a_process_that_exits_while_read_reads_as_gone(monkeypatch):
    """A process reaped between the open of its /proc file and the read fails the read with ESRCH (seen:
    libvirtd reaping a saved VM's QEMU while vmwrap's guard looked at it, failing the save): that is
    the process gone, never an error of the caller."""
    from vmwrap import domain

    child = subprocess.Popen(["sleep", "100"])
    opened = safeio.open_regular

    def open_then_reap(path, dir_fd=None):
        fd = opened(path, dir_fd)
        child.kill()
        child.wait()
        return fd

    monkeypatch.setattr(safeio, "open_regular", open_then_reap)
    with pytest.raises(ProcessLookupError):
        safeio.read_capped(f"/proc/{child.pid}/stat", 4096)
    child = subprocess.Popen(["sleep", "100"])
    assert safeio.read_proc(f"/proc/{child.pid}/stat", 4096) is None
    child = subprocess.Popen(["sleep", "100"])
    monkeypatch.setattr(domain, "_qemu_pid", lambda name: child.pid)
    assert domain.qemu_state("vmwrap-1") is None
