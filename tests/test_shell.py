"""`vmwrap shell JOBID` with a real guest: a terminal in the running job's VM for the job's own user only,
through the node agent (the kernel's word for the caller's uid)."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
import threading
import time

import pytest

from harness.terminal import read_until_exit
from vmwrap import agent

pytestmark = pytest.mark.vm
WAIT = 120


def _as(user, site, argv, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vmwrap.cli", *argv], env=site.env(TERM="xterm-256color"),
                            user=user.pw_uid, group=user.pw_gid, extra_groups=[], **kw)


def test_a_jobs_user_gets_a_terminal_in_its_vm_and_nobody_else_does(site, workdir, test_user):
    import pwd

    os.chown(workdir, test_user.pw_uid, test_user.pw_gid)
    settings = site.settings()
    threading.Thread(target=agent.serve, args=(settings,), daemon=True).start()
    job = site.popen("#!/bin/sh\n#VMWRAP --image=busybox\necho up\nsleep 300\necho never\n", workdir,
                     "--user", test_user.pw_name, "--job-id", "sh1", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert job.stdout.readline() == b"up\n"
        # Interactive, on a terminal of 33 x 101: the guest's terminal has that size, the caller's TERM,
        # the job's user and work dir; the shell's exit status is vmwrap shell's.
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 101, 0, 0))
        p = _as(test_user, site, ["shell", "sh1"], stdin=slave, stdout=slave, stderr=slave)
        os.close(slave)
        out = read_until_exit(master, p, [(b"$ ", b"stty size; id -u; tty; stat -c U=%u $(tty); echo T=$TERM; pwd; echo $((6*7))\r"),
                                           (b"42", b"exit 3\r")])
        os.close(master)
        text = out.decode(errors="replace").replace("\r", "")
        assert p.returncode == 3, text
        for want in ("33 101\n", f"\n{test_user.pw_uid}\n", "/dev/pts/", f"U={test_user.pw_uid}\n", "T=xterm-256color\n",
                     f"{workdir}\n", "42\n"):
            assert want in text, (want, text)
        # One command, no terminal on our side: its output and status.
        r = _as(test_user, site, ["shell", "sh1", "echo hi from $(hostname); exit 4"], stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        o, e = r.communicate(timeout=WAIT)
        assert (r.returncode, o) == (4, f"hi from {os.uname().nodename}\n".encode()), e
        # Without a terminal the command gets pipes: bytes pass untouched, the end of stdin ends its input,
        # and input it does not read yet waits without stopping its output.
        data = bytes(range(256)) * 2048  # 512 KiB, every byte value (^C, ^D, \r included)
        r = _as(test_user, site, ["shell", "sh1", "echo first; sleep 2; cat; echo last >&2"], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        o, e = r.communicate(data, timeout=WAIT)
        assert (r.returncode, o[:6], o[6:-5], o[-5:]) == (0, b"first\n", data, b"last\n"), (len(o), e)
        # Another user: refused by the agent, naming why; nothing reaches the VM.
        nobody = pwd.getpwnam("nobody")
        r = _as(nobody, site, ["shell", "sh1", "echo leaked"], stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        o, e = r.communicate(timeout=WAIT)
        assert r.returncode == 255 and o == b"" and f"uid {nobody.pw_uid} does not own job sh1".encode() in e, e
        port = site.state / "jobs" / "sh1" / "shell.sock"
        st = os.stat(port)
        assert (st.st_uid, st.st_mode & 0o777) == (0, 0o600)  # only root (the agent) opens it
        # The job itself ran on, untouched by the sessions.
        assert job.poll() is None
    finally:
        job.terminate()
        job.communicate(timeout=WAIT)
    r = _as(test_user, site, ["shell", "sh1", "true"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE)
    o, e = r.communicate(timeout=WAIT)
    assert r.returncode == 255 and b"no VM for job sh1 on this node" in e, e
    assert site.leftovers() == []


def test_a_session_asked_for_before_the_vm_opened_its_shell_port_waits_for_it(site, workdir, test_user):
    """A VM still starting (a multi-node job's step can reach a node before its VM booted): the agent
    says "not yet" until the guest has opened its shell port; the session waits for that, and gives up
    after a bound with the reason instead of waiting for ever on a guest that never opens it."""
    import libvirt

    from vmwrap import domain, errors, rundir, shell

    os.chown(workdir, test_user.pw_uid, test_user.pw_gid)
    settings = site.settings()
    threading.Thread(target=agent.serve, args=(settings,), daemon=True).start()
    job = site.popen("#!/bin/sh\n#VMWRAP --image=busybox\necho up\nsleep 300\n", workdir,
                     "--user", test_user.pw_name, "--job-id", "sh2", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    conn = libvirt.open("qemu:///system")
    try:
        deadline = time.monotonic() + WAIT
        while True:  # frozen long before its guest gets to open any port (a boot takes seconds); the
            try:       # launcher creates it paused and resumes it once it is in its limits
                dom = conn.lookupByName(rundir.vm_name(settings, "sh2"))
                if dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING:
                    dom.suspend()
                    break
            except libvirt.libvirtError:
                pass
            assert time.monotonic() < deadline and job.poll() is None, job.communicate()
            time.sleep(0.02)
        assert domain.channel_open(dom, shell.CHANNEL) is False
        with pytest.raises(errors.NotReadyError, match="has not opened its shell port yet"):
            shell.request_port(settings, "sh2").close()
        null = os.open(os.devnull, os.O_RDONLY)
        with pytest.raises(errors.UserError, match=r"has not opened its shell port yet .*after 1 s: giving up"):
            shell.run(settings, "sh2", "true", stdin=null, ready_wait_s=1.0)
        os.close(null)
        r = _as(test_user, site, ["shell", "sh2", "echo hello from the vm; exit 5"], stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(1.0)
        assert r.poll() is None  # waiting for the VM, not failed
        dom.resume()
        o, e = r.communicate(timeout=WAIT)
        assert (r.returncode, o) == (5, b"hello from the vm\n"), e
        assert job.stdout.readline() == b"up\n"
    finally:
        job.terminate()
        job.communicate(timeout=WAIT)
        conn.close()
    assert site.leftovers() == []


def test_back_to_back_sessions_into_a_busy_vm_each_end_with_their_status(site, workdir, test_user):
    """The guest's virtio driver learns that a host connected or left from control messages it handles
    after the data that follows them. With the guest's CPU busy, a session's O frame could be read before
    its host counted as connected, or the previous host's leaving learnt after the next one's O frame: the
    session was taken for abandoned (its command killed, no status sent) and the caller waited for ever,
    as a multi-node job's step did under load. Measured before the fix: 15 of 100 such sessions hung."""
    os.chown(workdir, test_user.pw_uid, test_user.pw_gid)
    settings = site.settings()
    threading.Thread(target=agent.serve, args=(settings,), daemon=True).start()
    job = site.popen("#!/bin/sh\n#VMWRAP --image=busybox\n(while :; do :; done) &\n(while :; do :; done) &\n"
                     "echo up\nsleep 300\n", workdir, "--user", test_user.pw_name, "--job-id", "sh3",
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert job.stdout.readline() == b"up\n"
        for i in range(30):
            r = _as(test_user, site, ["shell", "sh3", f"echo s{i}; exit 7"], stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            try:
                o, e = r.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                r.kill()
                pytest.fail(f"session {i} never ended (its status lost)")
            assert (r.returncode, o) == (7, f"s{i}\n".encode()), (i, e)
    finally:
        job.terminate()
        job.communicate(timeout=WAIT)
    assert site.leftovers() == []


def test_sessions_run_side_by_side_up_to_the_vms_ports_and_a_killed_one_frees_its_port(site, workdir, test_user):
    """A VM serves rundir.SHELL_PORTS sessions at once (a multi-node step's tasks on one node wait for each
    other, as MPI ranks do): each session here waits until all have started, which one port would never
    let happen. One more is refused at once ("busy"), and a session whose caller is killed (SIGKILL: it
    cannot clean up) leaves its port to the next."""
    from vmwrap import rundir

    k = rundir.SHELL_PORTS
    os.chown(workdir, test_user.pw_uid, test_user.pw_gid)
    settings = site.settings()
    threading.Thread(target=agent.serve, args=(settings,), daemon=True).start()
    job = site.popen("#!/bin/sh\n#VMWRAP --image=busybox\necho up\nsleep 300\n", workdir, "--user", test_user.pw_name,
                     "--job-id", "sh4", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # each session says it is in, waits (60 s at most in all) for the others to be, then holds its port
    # until `go` (else the first to leave would free a port before the fifth asks)
    meet = ("touch in.{i}; n=0; while [ $(ls in.* | wc -l) -lt {k} ] && [ $n -lt 300 ]; do sleep 0.2; n=$((n+1)); "
            "done; m=$(ls in.* | wc -l); while [ ! -e go ] && [ $n -lt 300 ]; do sleep 0.2; n=$((n+1)); done; "
            "echo {i}:$m; exit {i}")
    try:
        assert job.stdout.readline() == b"up\n"
        ps = [_as(test_user, site, ["shell", "sh4", meet.format(i=i, k=k)], stdin=subprocess.DEVNULL,
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(k)]
        deadline = time.monotonic() + WAIT
        while len(list(workdir.glob("in.*"))) < k and time.monotonic() < deadline and all(p.poll() is None for p in ps):
            time.sleep(0.2)
        # all ports held: one more is refused at once, saying why
        r = _as(test_user, site, ["shell", "sh4", "echo extra"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE)
        o, e = r.communicate(timeout=WAIT)
        assert r.returncode == 255 and f"{k} sessions of job sh4 are open".encode() in e, (o, e)
        (workdir / "go").touch()
        for i, p in enumerate(ps):
            o, e = p.communicate(timeout=WAIT)
            assert (p.returncode, o) == (i, f"{i}:{k}\n".encode()), (i, o, e)
        # a caller killed mid-session: its port is free again for the next sessions (all k at once; `go`
        # is there: they end once they have met)
        for f in workdir.glob("in.*"):
            f.unlink()
        killed = _as(test_user, site, ["shell", "sh4", "sleep 300"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE)
        time.sleep(3)
        killed.kill()
        killed.communicate(timeout=WAIT)
        ps = [_as(test_user, site, ["shell", "sh4", meet.format(i=i, k=k)], stdin=subprocess.DEVNULL,
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(k)]
        for i, p in enumerate(ps):
            o, e = p.communicate(timeout=WAIT)
            assert (p.returncode, o) == (i, f"{i}:{k}\n".encode()), (i, o, e)
        assert job.poll() is None
    finally:
        job.terminate()
        job.communicate(timeout=WAIT)
    assert site.leftovers() == []
