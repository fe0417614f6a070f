"""Per-job disk limits (issue 14, finding 9): the root watcher, without a VM (a stand-in QEMU process)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vmwrap import launcher, limits
from vmwrap.config import Settings
from vmwrap.limits import Limits


def _files(d: Path, **sizes: int) -> None:
    for name, n in sizes.items():
        with open(d / name.replace("_", "."), "wb") as f:
            f.write(b"x" * n)


def test_check_names_the_setting_over_its_limit(tmp_path):
    _files(tmp_path, stdout=600, stderr=500, console_log=10, status=10)
    assert limits.check(tmp_path, Limits(output=2000, console=100)) is None
    msg = limits.check(tmp_path, Limits(output=1000, console=100))
    assert msg.startswith("the job's output exceeded job_output_max_bytes = 1000 (1000 bytes)")
    assert "1100 bytes" in msg
    _files(tmp_path, console_log=101)
    assert "console_max_bytes = 100" in limits.check(tmp_path, Limits(output=0, console=100))
    _files(tmp_path, console_log=1, status=1 << 20)
    assert "status port output exceeded console_max_bytes = 1024 (1.0 KiB)" in limits.check(
        tmp_path, Limits(console=1024))
    assert limits.check(tmp_path, Limits()) is None  # 0: no limit


def test_check_disk_counts_allocated_bytes(tmp_path):
    with open(tmp_path / "overlay.qcow2", "wb") as f:
        f.truncate(1 << 30)  # sparse: a large virtual size costs nothing
        f.write(b"y" * (1 << 20))
        os.fsync(f.fileno())
    assert limits.check(tmp_path, Limits(disk=100 << 20)) is None
    assert "job_disk_max_bytes = 524288 (512.0 KiB)" in limits.check(tmp_path, Limits(disk=512 << 10))


def test_check_never_follows_links(tmp_path):
    big = tmp_path / "elsewhere"
    _files(tmp_path, elsewhere=5000)
    (tmp_path / "stdout").symlink_to(big)
    assert limits.check(tmp_path, Limits(output=100)) is None


def test_settings_defaults():
    s = Settings()
    assert (s.job_output_max_bytes, s.console_max_bytes, s.job_disk_max_bytes) == (10 << 30, 1 << 20, 0)
    assert Limits.from_settings(s) == Limits(10 << 30, 1 << 20, 0)


@pytest.fixture
def fake_qemu():
    """A process whose command line says it runs guest vmwrap-lim1, as QEMU's does (`-name guest=...`)."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "-name", "guest=vmwrap-lim1,debug-threads=on"])
    yield p
    p.kill()
    p.wait()


def test_watch_kills_the_vm_and_records_why(tmp_path, fake_qemu):
    """A guest flooding its console (which the job's own processes cannot stop) is stopped by root."""
    assert limits.qemu_pid("vmwrap-lim1") == fake_qemu.pid
    _files(tmp_path, console_log=10, stdout=0, stderr=0, status=0)
    t0 = time.monotonic()
    grow = subprocess.Popen(["sh", "-c", f"sleep 0.5; head -c 200000 /dev/zero >> '{tmp_path}/console.log'"])
    msg = limits.watch(tmp_path, "vmwrap-lim1", fake_qemu.pid, Limits(console=100_000), interval=0.05)
    grow.wait()
    assert fake_qemu.wait(5) == -9
    assert 0.4 < time.monotonic() - t0 < 5
    assert "console_max_bytes = 100000" in msg
    assert limits.reason(tmp_path) == f"vmwrap: {msg}\n"
    assert (tmp_path / "limit").stat().st_uid == os.geteuid()


def test_watch_returns_when_qemu_exits(tmp_path, fake_qemu):
    _files(tmp_path, stdout=0)
    t0 = time.monotonic()
    subprocess.Popen(["sh", "-c", f"sleep 0.3; kill {fake_qemu.pid}"])
    assert limits.watch(tmp_path, "vmwrap-lim1", fake_qemu.pid, Limits(output=100), interval=0.05) is None
    assert time.monotonic() - t0 < 3
    assert limits.reason(tmp_path) is None


def test_watch_refuses_a_process_that_is_not_the_vms(tmp_path):
    p = subprocess.Popen(["sleep", "30"])
    try:
        _files(tmp_path, stdout=1000)
        assert limits.watch(tmp_path, "vmwrap-lim1", p.pid, Limits(output=10)) is None
        assert p.poll() is None  # never kill what is not that VM's QEMU
    finally:
        p.kill()
        p.wait()


def test_started_watcher_is_root_and_stops_with_teardown(tmp_path, fake_qemu):
    """What boot() starts: a separate process in its own session (the batch step cannot signal it)."""
    s = Settings(state_dir=str(tmp_path), job_output_max_bytes=1000)
    run_dir = s.jobs_dir / "lim1"
    run_dir.mkdir(parents=True)
    _files(run_dir, stdout=0, stderr=0)
    pid = limits.start(run_dir, "vmwrap-lim1", s)
    assert os.getsid(pid) == pid
    _files(run_dir, stdout=5000)
    assert fake_qemu.wait(10) == -9
    assert "job_output_max_bytes = 1000" in limits.reason(run_dir)
    launcher.teardown("lim1", s)
    assert not run_dir.exists()
    time.sleep(0.2)
    assert not os.path.exists(f"/proc/{pid}") or b"vmwrap.limits" not in Path(f"/proc/{pid}/cmdline").read_bytes()


def _stand_in(marker: str) -> subprocess.Popen:
    """A process whose command line holds `marker`, as another job's helper's would."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", marker])
    for _ in range(500):  # just after exec, /proc may show an empty command line for a moment
        if marker.encode() in Path(f"/proc/{p.pid}/cmdline").read_bytes():
            break
        time.sleep(0.01)
    return p


def test_stop_kills_only_the_process_the_pidfile_recorded(tmp_path):
    """After pid reuse the pid in limits.pid may be another VM's watcher (the same command line):
    stop() kills only a process with the recorded start time and uid, never on a bare pid."""
    from vmwrap import procs

    p = _stand_in("vmwrap.limits")
    pidfile = tmp_path / limits.PIDFILE
    try:
        start = procs.start_time(p.pid)
        for text in (f"{p.pid}\n",                                  # an older vmwrap's: cannot be verified
                     f"{p.pid} {start + 1} {os.geteuid()}\n",       # that pid, a later process
                     f"{p.pid} {start} {os.geteuid() + 1}\n",       # another uid
                     f"{p.pid} {start} {os.geteuid()} x\n"):
            pidfile.write_text(text)
            limits.stop(tmp_path)
            assert not pidfile.exists()
            time.sleep(0.05)
            assert p.poll() is None, text
        pidfile.write_text(f"{p.pid} {start} {os.geteuid()}\n")
        limits.stop(tmp_path)
        assert not os.path.exists(f"/proc/{p.pid}") and not pidfile.exists()  # killed, and reaped (our child)
    finally:
        p.kill()
        p.wait()


def test_start_time_is_read_after_the_last_parenthesis(tmp_path):
    """A process names itself (comm, field 2 of /proc/<pid>/stat): ') R 1 2 3' in it must not shift
    the fields root reads."""
    from vmwrap import procs

    code = ("import ctypes, time; ctypes.CDLL(None).prctl(15, b') R 1 2 3 4 5', 0, 0, 0); "
            "open(__import__('sys').argv[1], 'w').close(); time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "ready")])
    try:
        for _ in range(200):
            if (tmp_path / "ready").exists():
                break
            time.sleep(0.01)
        stat = Path(f"/proc/{p.pid}/stat").read_bytes()
        assert b"() R 1 2 3 4 " in stat
        assert procs.start_time(p.pid) == int(stat[stat.rindex(b")") + 2:].split()[19])
        procs.record(tmp_path / "x.pid", p.pid, os.geteuid())
        assert procs.read(tmp_path / "x.pid") == (p.pid, procs.start_time(p.pid), os.geteuid())
    finally:
        p.kill()
        p.wait()


def test_no_watcher_when_no_limit_is_set(tmp_path):
    s = Settings(state_dir=str(tmp_path), job_output_max_bytes=0, console_max_bytes=0)
    assert limits.start(tmp_path, "vmwrap-none", s) is None


def test_no_watcher_for_a_vm_that_already_ended(tmp_path):
    """A restored job may finish before the launcher looks: that is not a node fault."""
    s = Settings(state_dir=str(tmp_path), job_output_max_bytes=1000)
    assert limits.start(tmp_path, "vmwrap-gone-already", s) is None
