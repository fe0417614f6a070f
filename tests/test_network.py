"""Guest networks with real guests: an image's catalog `network` decides whether its VMs have one.

"none" (the default): no network device at all. "nat": QEMU's user-mode NAT inside the job's own QEMU,
so the guest's connections leave the node as the job's user (the host sees that uid on the socket) and
nothing on the host listens for the guest. A saved VM with a network restores with its network."""

from __future__ import annotations

import copy
import os
import subprocess
import time
from pathlib import Path

import pytest

from harness.netprobe import Host, get, host_ip

pytestmark = pytest.mark.vm

WAIT = 180


@pytest.fixture
def host():
    h = Host()
    yield h
    h.close()


@pytest.fixture
def nat(site, appliance):
    """The site's catalog gains busybox-nat: the test appliance with network = "nat"."""
    from vmwrap.catalog import register

    img = copy.deepcopy(appliance)
    img.name, img.network = "busybox-nat", "nat"
    register(str(site.catalog), img)
    return site


def _listening_inodes() -> set[str]:
    """Socket inodes listening on TCP, or bound on UDP, anywhere on the host."""
    out = set()
    for name in ("tcp", "tcp6", "udp", "udp6"):
        for line in Path(f"/proc/net/{name}").read_text().splitlines()[1:]:
            f = line.split()
            if name.startswith("udp") or f[3] == "0A":
                out.add(f[9])
    return out


def _qemu_of(domain: str) -> int:
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                argv = Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and b"qemu-system" in argv[0] and f"guest={domain},".encode() in b",".join(argv) + b",":
                return int(p)
    raise AssertionError(f"no QEMU for {domain}")


def test_nat_reaches_the_host_network_as_the_jobs_user(nat, workdir, test_user, host):
    os.chown(workdir, test_user.pw_uid, test_user.pw_gid)
    ip = host_ip()
    script = ("#!/bin/sh\n#VMWRAP --image=busybox-nat\n"
              "ip -4 -o addr show eth0 | grep -o 'inet [0-9./]*'\n"
              "cat /etc/resolv.conf\n"
              + get("10.0.2.2", host.port, "loopback"))
    if ip:
        script += get(ip, host.port, "address")
    r = nat.run(script, workdir, "--user", test_user.pw_name, timeout=WAIT)
    want = ["inet 10.0.2.15/24", "nameserver 10.0.2.3", "got loopback"] + (["got address"] if ip else [])
    assert (r.returncode, r.stdout.decode().splitlines()) == (0, want), r.stderr
    # Each connection came from the job's QEMU, which runs as the job's user: the site's rules for that
    # user apply to what its VM does on the network, as to a bare job of theirs.
    assert sorted(host.seen) == sorted([("/loopback", test_user.pw_uid)]
                                       + ([("/address", test_user.pw_uid)] if ip else []))
    assert nat.leftovers() == []


def test_no_network_is_the_default(site, workdir, host):
    r = site.run("#!/bin/sh\n#VMWRAP --image=busybox\nls /sys/class/net\n"
                 f"nc -w 3 10.0.2.2 {host.port} < /dev/null || echo unreachable\n", workdir, timeout=WAIT)
    assert (r.returncode, r.stdout.decode().splitlines()) == (0, ["lo", "unreachable"]), r.stderr
    assert host.seen == []


def test_nothing_on_the_host_listens_for_a_nat_guest(nat, workdir, test_user):
    os.chown(workdir, test_user.pw_uid, test_user.pw_gid)
    p = nat.popen("#!/bin/sh\n#VMWRAP --image=busybox-nat\necho up\nsleep 600\n", workdir,
                  "--user", test_user.pw_name, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert p.stdout.readline() == b"up\n"
        doms = nat.domains()
        assert len(doms) == 1, doms
        qemu = _qemu_of(doms[0])
        xml = subprocess.run(["virsh", "-c", "qemu:///system", "dumpxml", doms[0]], capture_output=True,
                             text=True).stdout
        assert "<interface type='user'>" in xml and "hostfwd" not in xml and "guestfwd" not in xml
        assert os.stat(f"/proc/{qemu}").st_uid == test_user.pw_uid
        fds = set()
        for fd in os.listdir(f"/proc/{qemu}/fd"):
            try:
                t = os.readlink(f"/proc/{qemu}/fd/{fd}")
            except OSError:
                continue
            if t.startswith("socket:["):
                fds.add(t[8:-1])
        assert fds, "the QEMU has sockets (its monitor, its ports): the check below must see them"
        assert fds & _listening_inodes() == set()
    finally:
        p.terminate()
        p.wait(timeout=WAIT)
    assert nat.leftovers() == []


def test_a_saved_vm_with_a_network_restores_with_it(nat, workdir, test_user, host):
    from vmwrap import checkpoint, launcher, payload
    from vmwrap.job import Job

    os.chown(workdir, test_user.pw_uid, test_user.pw_gid)
    settings = nat.settings()
    store = checkpoint.Store(Path(settings.checkpoint_dir), Path(settings.checkpoint_key_file))
    script = ("#!/bin/sh\n#VMWRAP --image=busybox-nat\n"
              + get("10.0.2.2", host.port, "before") +
              "while [ ! -e go ]; do sleep 0.1; done\n"
              + get("10.0.2.2", host.port, "after") +
              "ip -4 -o addr show eth0 | grep -o 'inet [0-9./]*'\n")

    def job(restarts):
        return Job("net1", "test", test_user.pw_name, test_user.pw_uid, test_user.pw_gid, str(workdir), script,
                   restart_count=restarts)

    def wait_for(text: bytes, run_dir):
        end = time.time() + WAIT
        while text not in (run_dir / "stdout").read_bytes():
            assert time.time() < end, [(f, (run_dir / f).read_bytes()[-1500:]) for f in
                                       ("stdout", "stderr", "console.log") if (run_dir / f).exists()]
            time.sleep(0.05)

    lx = launcher.Launcher(job(0), settings)
    try:
        lx.prepare()
        lx.boot()
        att = payload.Attachment(lx.run_dir, "net1", conn=lx.conn)
        att.start(script, {"PATH": "/bin:/usr/bin"}, [])
        wait_for(b"got before\n", lx.run_dir)
        att.control.close()
        checkpoint.save("net1", lx.run_dir, store, lx.conn, 1)
        launcher.teardown("net1", settings)
        lx = launcher.Launcher(job(1), settings)
        lx.prepare()
        lx.restore(store)
        xml = lx.conn.lookupByName(lx.job.domain_name).XMLDesc()
        assert "<interface type='user'>" in xml
        (workdir / "go").touch()
        wait_for(b"inet ", lx.run_dir)
        assert (lx.run_dir / "stdout").read_bytes() == b"got before\ngot after\ninet 10.0.2.15/24\n"
        assert [p for p, _ in host.seen] == ["/before", "/after"]
        assert {uid for _, uid in host.seen} == {test_user.pw_uid}
    finally:
        launcher.teardown("net1", settings)
        store.delete("net1")
