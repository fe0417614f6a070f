"""The payload sends GO again until the guest says it started: a GO that arrives as the guest agent
closes its polled control port is lost, and the job would wait in its VM until its time limit.
The guest here is a thread on the control socket; the run dir is a plain directory."""

import os
import signal
import socket
import threading
import time
from pathlib import Path

import guest_port
from vmwrap import payload, rundir


def run_dir(tmp_path: Path) -> Path:
    d = tmp_path / "run"
    d.mkdir()
    for n in (rundir.STDOUT, rundir.STDERR, rundir.STATUS):
        (d / n).write_bytes(b"")
    return d


def guest(d: Path, go_lost: int) -> tuple[threading.Thread, list[str]]:
    """Drop the first `go_lost` GO lines; on the next, start, exit 0 and power off (close the port)."""
    seen: list[str] = []
    srv = guest_port.listen(d)

    def serve():
        c, _ = srv.accept()
        with c, c.makefile("r") as f:
            for line in f:
                seen.append(line.strip())
                if seen.count("GO") == go_lost + 1:
                    with open(d / rundir.STATUS, "a") as st:
                        st.write("started 1.0\nexit 0\n")
                    break
        srv.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t, seen


def attachment(d: Path, tmp_path: Path, **kw) -> payload.Attachment:
    """The job's step on run dir `d`, both streams into one output file."""
    out = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT, 0o600)
    return payload.Attachment(d, "j1", out_fd=out, err_fd=out, **kw)


def attach_and_stream(d: Path, tmp_path: Path) -> tuple[list[int], threading.Thread]:
    a = attachment(d, tmp_path)
    assert a.control.connect(timeout=5.0) and a.control.send("GO")  # as start() does
    a.timeline["go"] = time.monotonic()
    rc: list[int] = []
    t = threading.Thread(target=lambda: rc.append(a.stream()), daemon=True)
    t.start()
    return rc, t


def test_a_lost_go_is_sent_again_and_the_job_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(payload, "GO_RESEND_S", 0.3)
    d = run_dir(tmp_path)
    g, seen = guest(d, go_lost=2)
    rc, t = attach_and_stream(d, tmp_path)
    t.join(20)
    g.join(5)
    assert rc == [0], (rc, seen)
    assert seen == ["GO", "GO", "GO"], seen


def test_no_go_after_the_guest_started(tmp_path, monkeypatch):
    monkeypatch.setattr(payload, "GO_RESEND_S", 0.1)
    d = run_dir(tmp_path)
    (d / rundir.STATUS).write_text("booted 1.0\nready 1.1\nstarted 1.2\n")
    seen: list[str] = []
    srv = guest_port.listen(d)

    def serve():
        c, _ = srv.accept()
        c.settimeout(1.5)
        buf = b""
        try:
            while chunk := c.recv(4096):
                buf += chunk
        except socket.timeout:
            pass
        seen.extend(buf.decode().split())
        with open(d / rundir.STATUS, "a") as st:
            st.write("exit 0\n")
        c.close()
        srv.close()

    threading.Thread(target=serve, daemon=True).start()
    rc, t = attach_and_stream(d, tmp_path)
    t.join(20)
    assert rc == [0] and seen == ["GO"], (rc, seen)


def restored_run_dir(tmp_path: Path, status: str) -> Path:
    d = run_dir(tmp_path)
    rundir.user_dir(d).mkdir(parents=True)
    (d / rundir.RESTORED).write_text('{"delivered": {}}')
    (d / rundir.STATUS).write_text(status)
    return d


def test_a_guest_restored_before_it_started_gets_its_files_and_go(tmp_path):
    """Saved while it booted: it waits for GO and reads the job's script from this run dir."""
    d = restored_run_dir(tmp_path, "booted 1.0\n")
    g, seen = guest(d, go_lost=0)
    a = attachment(d, tmp_path)
    a.start("#!/bin/sh\necho hi\n", {"PATH": "/bin"}, [])
    assert (rundir.user_dir(d) / rundir.USER_SCRIPT).read_text() == "#!/bin/sh\necho hi\n"
    assert a.stream() == 0
    g.join(5)
    assert seen == ["GO"], seen


def test_a_guest_restored_while_it_ran_the_job_gets_no_go(tmp_path):
    d = restored_run_dir(tmp_path, "booted 1.0\nready 1.1\nstarted 1.2\n")
    srv = guest_port.listen(d)
    seen: list[bytes] = []

    def serve():
        c, _ = srv.accept()
        c.settimeout(1.0)
        try:
            while chunk := c.recv(4096):
                seen.append(chunk)
        except socket.timeout:
            pass
        with open(d / rundir.STATUS, "a") as st:
            st.write("exit 0\n")
        c.close()
        srv.close()

    threading.Thread(target=serve, daemon=True).start()
    a = attachment(d, tmp_path)
    a.start("#!/bin/sh\necho hi\n", {"PATH": "/bin"}, [])
    assert not (rundir.user_dir(d) / rundir.USER_SCRIPT).exists()
    assert a.control.connect(timeout=5.0)   # as a restored job's step is attached for TERM/KILL
    assert a.stream() == 0
    assert b"".join(seen) == b"", seen


def test_no_periodic_checkpoint_before_the_job_started(tmp_path):
    """A checkpoint of a booting guest would restore into one that waits for a GO: none until `started`."""
    d = run_dir(tmp_path)
    (d / rundir.STATUS).write_text("booted 1.0\nready 1.1\n")
    srv = guest_port.listen(d)

    def serve():
        c, _ = srv.accept()
        time.sleep(1.0)
        with open(d / rundir.STATUS, "a") as st:
            st.write("started 2.0\n")
        time.sleep(1.0)
        with open(d / rundir.STATUS, "a") as st:
            st.write("exit 0\n")
        c.close()
        srv.close()

    threading.Thread(target=serve, daemon=True).start()
    a = attachment(d, tmp_path)
    a.checkpoint_every = 0.1
    calls: list[bool] = []
    a._checkpoint = lambda: calls.append("started" in a.timeline)
    assert a.control.connect(timeout=5.0)
    a.timeline["go"] = time.monotonic()
    assert a.stream() == 0
    assert calls and all(calls), calls   # checkpoints came, each after the guest said `started`


def test_a_term_that_arrived_with_go_is_sent_again_once_the_job_started(tmp_path):
    """scancel/condor_rm while the guest still boots: GO and TERM wait together on the port; the agent
    reads GO and closes it (the lines behind are dropped). The job must still get its TERM, not
    only the KILL after the grace period (a CI run: condor_rm 2 s after the start, the VM lived on)."""
    d = run_dir(tmp_path)
    srv = guest_port.listen(d)
    seen: list[str] = []

    def serve():
        c, _ = srv.accept()
        time.sleep(1.0)   # booting: GO and TERM both wait in the port
        f = c.makefile("r")
        first = c.recv(4096).decode()
        seen.extend(first.split())
        assert first.startswith("GO\n")   # read GO; what came with it is dropped as the port closes
        with open(d / rundir.STATUS, "a") as st:
            st.write("started 1.0\n")
        for line in f:
            seen.append(line.strip())
            if line.strip() in ("TERM", "KILL"):
                with open(d / rundir.STATUS, "a") as st:
                    st.write("exit 143\n" if line.strip() == "TERM" else "exit 137\n")
                break
        c.close()
        srv.close()

    threading.Thread(target=serve, daemon=True).start()
    a = attachment(d, tmp_path, grace=3.0)
    assert a.control.connect(timeout=5.0) and a.control.send("GO")
    a.timeline["go"] = time.monotonic()
    a._signals.append(signal.SIGTERM)
    assert a.stream() == 143, seen
    assert seen == ["GO", "TERM", "TERM"], seen


def test_a_copy_restarted_elsewhere_stops_at_its_checkpoint_and_delivers_nothing_more(tmp_path, monkeypatch):
    """The agent answers a periodic checkpoint with `stale` (the job runs again elsewhere; it stopped
    this VM): the step ends at once as one the scheduler stopped (143), and what the VM wrote after
    the output delivered for that checkpoint never reaches the job's files, which the new run writes."""
    from vmwrap import agent

    d = run_dir(tmp_path)
    (d / rundir.STATUS).write_text("booted 1.0\nready 1.1\nstarted 1.2\n")
    (d / rundir.STDOUT).write_text("before\n")
    srv = guest_port.listen(d)

    def guest_runs_on():   # the job goes on in the VM; left alone, it would end 3 s later
        c, _ = srv.accept()
        time.sleep(3.0)
        with open(d / rundir.STATUS, "a") as st:
            st.write("exit 0\n")
        c.close()

    threading.Thread(target=guest_runs_on, daemon=True).start()

    def request(settings, op, job_id, timeout=2.0):
        assert op == "checkpoint"
        with open(d / rundir.STDOUT, "a") as f:
            f.write("after\n")   # written by the VM after the step delivered for this checkpoint
        return {"saved": False, "stale": True, "error": "job j1 was started again elsewhere"}

    monkeypatch.setattr(agent, "request", request)
    a = attachment(d, tmp_path)
    a.checkpoint_every = 0.2
    assert a.control.connect(timeout=5.0)
    t0 = time.monotonic()
    assert a.stream() == 143
    assert time.monotonic() - t0 < 2.5
    assert (tmp_path / "out").read_text() == "before\n"
    srv.close()
