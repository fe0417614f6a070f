"""The payload's step service (vmwrap/steps.py) without Slurm or a VM: a test plays the guest's step port
(QEMU's socket in the run dir) and the launcher runs the task command itself instead of srun. What the
real path does is in tests/test_slurm_steps.py; this covers where the service's socket lives."""

from __future__ import annotations

import os
import socket
import stat
import tempfile
import time

from vmwrap import rundir, steps


def _bind(path: str) -> socket.socket:
    """A listening socket at `path`, however long (the fake guest port and a stale task socket)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    fd = os.open(os.path.dirname(path), os.O_PATH | os.O_DIRECTORY)
    try:
        s.bind(f"/proc/self/fd/{fd}/{os.path.basename(path)}")
    finally:
        os.close(fd)
    s.listen(1)
    return s


def _expect(conn: socket.socket, frames: steps.Frames, kinds: set[bytes], got: list) -> list:
    """Frames from the service until one of `kinds` arrived (all of them, in order)."""
    end = time.monotonic() + 30
    while not any(f[0] in kinds for f in got):
        assert time.monotonic() < end, f"no {kinds} from the step service; got {got}"
        data = conn.recv(1 << 16)
        assert data, f"the step service hung up; got {got}"
        got += frames.feed(data)
    return got


def test_a_step_runs_through_a_task_socket_in_the_run_dir_even_past_sun_paths_length(tmp_path, monkeypatch):
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))  # what a /tmp socket dir would land in
    run_dir = tmp_path / ("long-base-" + "d" * (110 - len(str(tmp_path)))) / "jobs" / "42"
    assert len(str(run_dir / steps.SOCKET)) > steps.UNIX_PATH_MAX  # both sockets need the fd path
    user = rundir.user_dir(run_dir)
    user.mkdir(parents=True)
    user.chmod(0o700)
    _bind(str(user / steps.TASKS)).close()  # a SIGKILLed payload's, before a requeue: replaced
    port = _bind(str(run_dir / steps.SOCKET))
    port.settimeout(30)

    server = steps.serve(run_dir, lambda argv, task: (0, task))  # the task itself stands in for srun
    assert server is not None
    try:
        guest, _ = port.accept()
        guest.settimeout(30)
        frames, got = steps.Frames(), []
        _expect(guest, frames, {b"B"}, got)
        guest.sendall(steps.frame(b"Q", 7, 0, b"echo\0hi\0"))
        _expect(guest, frames, {b"R"}, got)  # the task reached the service through its socket
        assert [f[0] for f in got] == [b"B", b"A", b"R"], got
        assert stat.S_ISSOCK(os.lstat(user / steps.TASKS).st_mode)
        assert [s.path for s in server.servers] == [str(user / steps.TASKS)]  # the one port of this VM
        assert list(private_tmp.iterdir()) == []  # nothing outside the run dir
        guest.sendall(steps.frame(b"O", 7, 0, b"hello\n") + steps.frame(b"X", 7, 0, b"exit 3"))
        _expect(guest, frames, {b"Z"}, got)
        assert (b"S", 7, 0, b"hello\n") in got and got[-1] == (b"Z", 7, 0, b"exit 3"), got
    finally:
        server.close()
    assert not os.path.lexists(user / steps.TASKS)
    assert list(private_tmp.iterdir()) == []


def test_each_step_port_is_served_apart_so_steps_run_at_once(tmp_path):
    """A VM with several step ports runs that many steps at once: each port has its own server and task
    socket, and a step in flight on one (its task still running) does not hold up a step on another."""
    run_dir = tmp_path / "jobs" / "43"
    user = rundir.user_dir(run_dir)
    user.mkdir(parents=True)
    user.chmod(0o700)
    ports = [_bind(str(run_dir / rundir.steps_socket(i))) for i in range(rundir.STEPS_PORTS)]
    server = steps.serve(run_dir, lambda argv, task: (0, task))
    assert server is not None
    try:
        assert [s.path for s in server.servers] == [str(user / steps.tasks_socket(i)) for i in range(rundir.STEPS_PORTS)]
        guests, frames, got = [], [], []
        for i, port in enumerate(ports):   # a step on each port, none ended yet
            port.settimeout(30)
            g, _ = port.accept()
            g.settimeout(30)
            guests.append(g)
            frames.append(steps.Frames())
            got.append([])
            _expect(g, frames[i], {b"B"}, got[i])
            g.sendall(steps.frame(b"Q", 100 + i, 0, b"echo\0hi\0"))
        for i, g in enumerate(guests):     # every step's task reached its own port's server
            _expect(g, frames[i], {b"R"}, got[i])
            assert [f[:2] for f in got[i]] == [(b"B", 0), (b"A", 100 + i), (b"R", 100 + i)], got[i]
        for i, g in reversed(list(enumerate(guests))):   # they end in any order
            g.sendall(steps.frame(b"X", 100 + i, 0, b"exit 0"))
            _expect(g, frames[i], {b"Z"}, got[i])
            assert got[i][-1] == (b"Z", 100 + i, 0, b"exit 0"), got[i]
    finally:
        server.close()
        for p in ports:
            p.close()
    assert not [p for p in user.iterdir() if p.name.startswith("tasks")]


def test_the_guest_is_told_where_else_to_put_its_shim_and_only_plain_absolute_dirs(tmp_path, capfd):
    """Tools that look for the launcher outside PATH (Open MPI: $SGE_ROOT/bin/$ARC/qrsh) find the shim
    there too; the marker of dirs lists only plain absolute ones, and is gone when there are none."""
    run_dir = tmp_path / "jobs" / "44"
    user = rundir.user_dir(run_dir)
    user.mkdir(parents=True)
    port = _bind(str(run_dir / steps.SOCKET))
    dirs = ("/usr/share/gridengine/bin/lx-amd64", "relative/bin", "/a/../etc", "/a/.hidden", "/a b", "/x\n/etc")
    server = steps.serve(run_dir, lambda argv, task: (0, task), "qrsh", dirs)
    try:
        assert (user / steps.MARKER).read_bytes() == b"qrsh"
        assert (user / steps.MARKER_DIRS).read_bytes() == b"/usr/share/gridengine/bin/lx-amd64\n"
    finally:
        server.close()
    err = capfd.readouterr().err   # the job is told which were left out, once each
    assert err.count("vmwrap: warning: no qrsh in") == 5 and "'relative/bin'" in err and "'/a/../etc'" in err, err
    server = steps.serve(run_dir, lambda argv, task: (0, task), "qrsh")
    try:
        assert not (user / steps.MARKER_DIRS).exists()   # a requeued payload's earlier dirs do not stay
    finally:
        server.close()
        port.close()
