"""The node agent obeys a job's owner (and root) only, as the kernel reports the caller's uid."""

import os
import re
import subprocess
import sys
import threading
import time

import pytest

from vmwrap import agent
from vmwrap.config import Settings
from vmwrap.errors import NodeError


@pytest.fixture
def running_agent(libvirtd, test_user):
    import shutil
    import socket
    import tempfile
    from pathlib import Path

    tmp_path = Path(tempfile.mkdtemp(prefix="vmwrap-agent-", dir="/var/tmp"))
    s = Settings(state_dir=str(tmp_path / "state"), libvirt_uri="test:///default")
    t = threading.Thread(target=agent.serve, args=(s,), daemon=True)
    t.start()
    # listening, not only bound: a test connecting between the agent's bind and listen was refused
    # (ConnectionRefusedError, seen once on a loaded host)
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.socket(socket.AF_UNIX) as probe:
                probe.settimeout(30)
                probe.connect(str(agent.socket_path(s)))
                probe.sendall(b'{"op": "ping", "job": ""}\n')
                assert b'"ok": true' in probe.makefile("rb").readline()
            break
        except (FileNotFoundError, ConnectionRefusedError):
            assert time.monotonic() < deadline, "the agent never listened"
            time.sleep(0.05)
    (s.jobs_dir / "77" / "ctl").mkdir(parents=True)
    # job 77 belongs to the test user, whatever uid it got (the demo creates it without a fixed one)
    (s.jobs_dir / "77" / "ctl" / "ids").write_text(f"{test_user.pw_uid} {test_user.pw_gid} - 22\n")
    os.chmod(tmp_path, 0o755)
    yield s
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_refuses_unknown_job_and_bad_op(running_agent):
    with pytest.raises(NodeError, match="no VM for job 99"):
        agent.request(running_agent, "pause", "99")
    with pytest.raises(NodeError, match="unknown operation"):
        agent.request(running_agent, "reboot", "77")
    with pytest.raises(NodeError, match="invalid job id"):
        agent.request(running_agent, "pause", "../77")


def test_refuses_a_user_who_does_not_own_the_job(running_agent, test_user):
    code = ("import sys; from vmwrap import agent; from vmwrap.config import Settings\n"
            f"s = Settings(state_dir={str(running_agent.state_dir)!r})\n"
            "try:\n    agent.request(s, 'pause', '77')\nexcept Exception as e:\n    print(e)\n")
    other = subprocess.run(["runuser", "-u", "nobody", "--", sys.executable, "-c", code], capture_output=True,
                           text=True, env=dict(os.environ, PYTHONPATH=os.getcwd()))
    assert "does not own job 77" in other.stdout, other.stderr
    owner = subprocess.run(["runuser", "-u", test_user.pw_name, "--", sys.executable, "-c", code],
                           capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=os.getcwd()))
    assert "no VM for job 77" in owner.stdout  # authorised; there is simply no domain on the test driver


def _ask_raw(settings, data: bytes, timeout: float = 10.0):
    """Send raw bytes to the agent; its one-line answer as JSON (None if it closed without one)."""
    import json
    import socket

    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(str(agent.socket_path(settings)))
        if data:
            s.sendall(data)
        line = s.makefile("rb").readline()
    return json.loads(line) if line else None


def test_malformed_requests_get_an_error_answer_not_a_traceback(running_agent, capsys):
    """A JSON list or number made req.get raise AttributeError, deep nesting RecursionError: the client
    got no answer and the agent printed a traceback. Each now gets {"ok": false} saying what is wrong."""
    cases = {
        b"[]\n": "a JSON list, not an object",
        b"5\n": "a JSON int, not an object",
        b'"pause"\n': "a JSON str, not an object",
        b"null\n": "a JSON NoneType, not an object",
        b"[" * 4000 + b"\n": "not JSON",
        b"\xff\xfe{}\n": "not JSON",
        b"\n": "not JSON",
        b'{"op": 1, "job": "77"}\n': '"op" must be a string',
        b'{"op": "pause", "job": ["77"]}\n': '"job" must be a string',
        b'{"op": "pause"}\n': '"job" must be a string',
        b'{"op": "pause", "job": "' + b"7" * 1000 + b'"}\n': '"job" is longer than 128 characters',
        b'{"op": "pause", "job": "' + b"7" * 5000 + b'"}\n': "longer than 4096 bytes",
    }
    for data, why in cases.items():
        reply = _ask_raw(running_agent, data)
        assert reply is not None and reply["ok"] is False and why in reply["error"], (data[:40], reply)
    with pytest.raises(NodeError, match="no VM for job 99"):  # and it still serves
        agent.request(running_agent, "pause", "99")
    assert "Traceback" not in capsys.readouterr().err


def test_a_silent_or_dribbling_client_is_cut_off(running_agent, monkeypatch):
    """Anyone may connect: a client that sends nothing, or a byte now and then, held a thread forever.
    The request line has one deadline for all of it."""
    import socket

    monkeypatch.setattr(agent, "REQUEST_TIMEOUT", 1.0)
    t0 = time.monotonic()
    reply = _ask_raw(running_agent, b"", timeout=8)
    assert reply == {"ok": False, "error": reply["error"]} and "no complete request within 1 s" in reply["error"]
    assert time.monotonic() - t0 < 5  # not the client's 8 s (a loaded host answers late)
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(8)
        s.connect(str(agent.socket_path(running_agent)))
        t0 = time.monotonic()
        got = b""
        for _ in range(20):  # 6 s of dribble at most
            try:
                s.sendall(b" ")
            except OSError:
                break
            time.sleep(0.3)
            s.setblocking(False)
            try:
                got = s.recv(4096)
                break
            except BlockingIOError:
                pass
            finally:
                s.settimeout(8)
        assert b"no complete request within 1 s" in got
        assert time.monotonic() - t0 < 5  # cut off, not left to dribble its 6 s


def test_connections_are_bounded_per_uid_and_in_all(running_agent, monkeypatch, test_user):
    """Idle connections of one user could take every thread and descriptor of the agent: beyond
    MAX_CLIENTS_PER_UID (and MAX_CLIENTS in all) a connection is refused at once; others are served."""
    import socket

    monkeypatch.setattr(agent, "REQUEST_TIMEOUT", 30.0)
    monkeypatch.setattr(agent, "MAX_CLIENTS_PER_UID", 3)
    idle = []
    try:
        for _ in range(3):
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(agent.socket_path(running_agent)))
            idle.append(s)
        time.sleep(0.2)
        t0 = time.monotonic()
        reply = _ask_raw(running_agent, b"", timeout=5)  # sends nothing: refused without waiting for it
        assert reply["ok"] is False and "busy (uid 0 already has 3 requests open)" in reply["error"], reply
        assert time.monotonic() - t0 < 10  # not after the 30 s request deadline (a loaded host is slow)
        with pytest.raises(agent.Busy, match="busy"):   # what a caller that may ask again tells apart
            agent.request(running_agent, "pause", "77", timeout=5)
        code = ("from vmwrap import agent; from vmwrap.config import Settings\n"
                f"s = Settings(state_dir={str(running_agent.state_dir)!r})\n"
                "try:\n    agent.request(s, 'pause', '77')\nexcept Exception as e:\n    print(e)\n")
        owner = subprocess.run(["runuser", "-u", test_user.pw_name, "--", sys.executable, "-c", code],
                               capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=os.getcwd()))
        assert "no VM for job 77" in owner.stdout, owner  # another user is still served
        monkeypatch.setattr(agent, "MAX_CLIENTS_PER_UID", 8)
        monkeypatch.setattr(agent, "MAX_CLIENTS", 3)
        reply = _ask_raw(running_agent, b"", timeout=5)
        # the owner's request may count for a moment after its answer (its thread ends after replying)
        assert reply["ok"] is False and re.search(r"busy \([34] requests are open\)", reply["error"]), reply
    finally:
        for s in idle:
            s.close()
    for _ in range(50):  # the closed ones free their slots
        try:
            agent.request(running_agent, "pause", "99")
        except NodeError as e:
            if "no VM for job 99" in str(e):
                break
        time.sleep(0.1)
    else:
        pytest.fail("the agent never served again")


def test_a_pause_or_resume_asked_again_after_a_lost_answer_is_no_error(running_agent, test_user):
    """An agent killed between doing a request and answering it leaves its caller asking again (the
    payload retries a resume until the agent is back): the repeat finds the VM already so and succeeds,
    without a second ledger event."""
    import libvirt

    from vmwrap.ledger import Ledger

    conn = libvirt.open("test:///default")   # the agent's connection shares this in-process driver
    xml = conn.lookupByName("test").XMLDesc().replace("<name>test</name>", "<name>vmwrap-78</name>")
    xml = "\n".join(ln for ln in xml.splitlines() if "<uuid>" not in ln)
    dom = conn.defineXML(xml)
    dom.create()
    try:
        (running_agent.jobs_dir / "78" / "ctl").mkdir(parents=True)
        (running_agent.jobs_dir / "78" / "ctl" / "ids").write_text(f"{test_user.pw_uid} {test_user.pw_gid} - 22\n")
        replies = [agent.request(running_agent, op, "78")["changed"] for op in ("pause", "pause", "resume", "resume")]
        assert replies == [True, False, True, False]
        assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
        events = [e["event"] for e in Ledger(running_agent.ledger_path).events("78")]
        assert events == ["paused", "resumed"]
    finally:
        dom.destroy()
        dom.undefine()


def test_each_shell_session_gets_a_free_port_of_the_vm_with_its_lock_until_all_are_taken(running_agent):
    """The agent hands out a shell port no session holds, with its lock (SCM_RIGHTS), which the caller
    holds as long as the session lasts: sessions run side by side up to the VM's ports, one more is
    "busy" at once, and a session's end frees its port. Ports the guest has not opened are skipped."""
    import fcntl
    import socket

    from vmwrap import rundir, shell
    from vmwrap.errors import BusyError, NotReadyError

    run_dir = rundir.path(running_agent, "77")
    listeners = []
    for i in range(rundir.SHELL_PORTS):   # as QEMU binds them: root's 0600, in the run dir
        ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        ls.bind(str(run_dir / rundir.shell_socket(i)))
        os.chmod(run_dir / rundir.shell_socket(i), 0o600)
        ls.listen(4)
        ls.setblocking(False)
        listeners.append(ls)

    def which() -> int:   # the port a session reached
        for i, ls in enumerate(listeners):
            try:
                ls.accept()[0].close()
                return i
            except BlockingIOError:
                pass
        raise AssertionError("no port was connected")

    try:
        ports = []
        for _ in range(rundir.SHELL_PORTS):
            ports.append(shell.request_port(running_agent, "77"))
            # the caller's copy of the lock is read-only: no writing into a file of root's
            assert fcntl.fcntl(ports[-1].lock, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
        assert sorted(which() for _ in ports) == list(range(rundir.SHELL_PORTS))
        with pytest.raises(BusyError, match=f"{rundir.SHELL_PORTS} sessions of job 77 are open"):
            shell.request_port(running_agent, "77")
        ports.pop(2).close()        # a session ends: its port is the one free
        ports.append(shell.request_port(running_agent, "77"))
        assert which() == 2
        for p in ports:
            p.close()
        # the guest has opened only ports 1 and 3 (a VM still starting, an older guest agent)
        opened = {shell.channel(i): i in (1, 3) for i in range(rundir.SHELL_PORTS)}
        first, lock = shell.connect_port(running_agent, "77", opened)
        assert which() == 1
        second, lock2 = shell.connect_port(running_agent, "77", opened)
        assert which() == 3
        with pytest.raises(BusyError):
            shell.connect_port(running_agent, "77", opened)
        for p, fd in ((first, lock), (second, lock2)):
            p.close()
            os.close(fd)
        with pytest.raises(NotReadyError, match="has not opened its shell port yet"):
            shell.connect_port(running_agent, "77", {shell.channel(i): False for i in range(rundir.SHELL_PORTS)})
        # a VM of one port (an older vmwrap): no lock, the session waits in QEMU's queue as before
        for i in range(1, rundir.SHELL_PORTS):
            os.unlink(run_dir / rundir.shell_socket(i))
        port, lock = shell.connect_port(running_agent, "77")
        assert lock is None and which() == 0
        port.close()
    finally:
        for ls in listeners:
            ls.close()
