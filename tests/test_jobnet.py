"""A multi-node job's private network on this host (vmwrap/jobnet.py): real bridges and VXLAN devices
made with iproute2, as the prolog makes them (root)."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from vmwrap import jobnet
from vmwrap.errors import NodeError, UserError, VmwrapError


def _job() -> str:
    return f"t{os.urandom(4).hex()}"


def _link(name: str) -> str:
    return subprocess.run(["ip", "-d", "link", "show", name], capture_output=True, text=True).stdout


def test_a_job_gets_one_bridge_per_host_and_a_tunnel_only_to_its_other_hosts():
    job = _job()
    here = jobnet.Plan(job, ("c1", "c2", "c3"), ("127.0.0.1", "192.0.2.77", "127.0.0.1"), 0)
    br, vx = jobnet.bridge_name(job), jobnet.vxlan_name(job)
    try:
        assert jobnet.join(here) == br
        assert jobnet.join(jobnet.Plan(job, here.nodes, here.addrs, 2)) == br   # the host's other node: same bridge
        assert "bridge" in _link(br) and f"vxlan id {jobnet.vni(job)} " in _link(vx)
        assert f"master {br}" in _link(vx)
        fdb = subprocess.run(["bridge", "fdb", "show", "dev", vx], capture_output=True, text=True).stdout
        assert "dst 192.0.2.77" in fdb and "dst 127.0.0.1" not in fdb, fdb
        # the host is not on the segment: no address, IPv6 off
        assert subprocess.run(["ip", "-o", "addr", "show", "dev", br], capture_output=True, text=True).stdout == ""
        assert open(f"/proc/sys/net/ipv6/conf/{br}/disable_ipv6").read().strip() == "1"
        assert not jobnet.leave(job, 0)   # node 2 of the job still holds it
        assert jobnet.leave(job, 2) and not os.path.lexists(f"/sys/class/net/{br}")
        assert not os.path.lexists(f"/sys/class/net/{vx}")
        assert not jobnet.leave(job, 2)   # idempotent
    finally:
        subprocess.run(["ip", "link", "del", vx], capture_output=True)
        subprocess.run(["ip", "link", "del", br], capture_output=True)


def test_nodes_on_one_host_need_no_tunnel_and_the_bridge_stays_while_a_node_holds_it():
    job = _job()
    plan = jobnet.Plan(job, ("c1", "c2"), ("127.0.0.1", "127.0.0.1"), 1)
    br = jobnet.bridge_name(job)
    tap = f"vmwt{os.urandom(4).hex()}"
    try:
        jobnet.join(plan)
        assert not os.path.lexists(f"/sys/class/net/{jobnet.vxlan_name(job)}")
        # the host's other node clearing its leftovers before it boots: node 1 has joined, its VM not yet
        assert not jobnet.leave(job, 0) and os.path.lexists(f"/sys/class/net/{br}")
        subprocess.run(["ip", "tuntap", "add", tap, "mode", "tap"], check=True)
        subprocess.run(["ip", "link", "set", tap, "master", br], check=True)
        jobnet.join(jobnet.Plan(job, plan.nodes, plan.addrs, 0))
        assert not jobnet.leave(job, 1) and not jobnet.leave(job, 0)   # a VM's card is still on it
        subprocess.run(["ip", "link", "del", tap], check=True)
        assert jobnet.leave(job, 0) and not os.path.lexists(f"/sys/class/net/{br}")
    finally:
        subprocess.run(["ip", "link", "del", tap], capture_output=True)
        subprocess.run(["ip", "link", "del", br], capture_output=True)


def test_the_guest_learns_its_card_address_and_every_nodes_name():
    plan = jobnet.Plan("123", ("c1", "c2"), ("10.0.0.1", "10.0.0.2"), 1)
    assert plan.guest_config() == "52:54:01:00:00:01 10.77.0.2/16\n10.77.0.1 c1\n10.77.0.2 c2\n"
    assert jobnet.address(0) == "10.77.0.1/16" and jobnet.address(254) == "10.77.1.1/16"
    assert jobnet.vni("123") == 124 and 1 <= jobnet.vni("a.b") <= 0xFFFFFF
    assert len(jobnet.bridge_name("x" * 64)) <= 15 and jobnet.bridge_name("1") != jobnet.bridge_name("2")


@pytest.mark.parametrize("nodes, addrs, why, node_fault", [
    (("c1", "c2"), ("10.0.0.1", "not-an-ip"), "is not an IP address", False),
    (("c1", "-x"), ("10.0.0.1", "10.0.0.2"), "is not a plain host name", False),
    (("c1", "c2;reboot"), ("10.0.0.1", "10.0.0.2"), "is not a plain host name", False),
    (("c1", "a" * 64), ("10.0.0.1", "10.0.0.2"), "is not a plain host name", False),
    (("c1",), ("10.0.0.1", "10.0.0.2"), "inconsistent node list", True),
])
def test_node_names_and_addresses_from_the_scheduler_are_checked(nodes, addrs, why, node_fault):
    """A name or address vmwrap cannot use fails the job (a user may choose the hosts: PBS's
    `-l select=...:host=X`), never the node; an inconsistent list is the adapter's (a node fault)."""
    with pytest.raises(VmwrapError, match=why) as e:
        jobnet.Plan("123", nodes, addrs, 0)
    assert isinstance(e.value, NodeError) is node_fault


def test_a_host_that_does_not_resolve_fails_the_job():
    with pytest.raises(VmwrapError, match="cannot resolve host") as e:
        jobnet.resolve(["a" * 70 + ".example"], "the job's exec_host")   # a label over 63 bytes
    assert not isinstance(e.value, NodeError)


def test_more_nodes_than_addresses_exist_is_the_jobs_error():
    with pytest.raises(UserError, match="at most"):
        jobnet.address(jobnet.MAX_NODES)


def test_doctor_says_whether_multi_node_jobs_can_get_their_network(monkeypatch):
    from vmwrap import hostcheck
    assert hostcheck.job_networks()[0] == "ok"
    monkeypatch.setattr(jobnet, "BRIDGE", "/nonexistent/bridge")
    level, text = hostcheck.job_networks()
    assert level == "WARN" and "/nonexistent/bridge missing (Debian: iproute2)" in text


def test_a_multi_node_jobs_vm_is_never_checkpointed_on_its_users_request(tmp_path):
    """The agent's `checkpoint` op (vmwrap.periodic.handle): a job on several nodes is refused before
    anything is paused or written (its VMs are never saved: docs/multinode.md)."""
    import json

    from vmwrap import periodic, rundir
    from vmwrap.config import Settings
    settings = Settings(state_dir=str(tmp_path), workdir_share="serial")
    run_dir = rundir.path(settings, "55")
    run_dir.mkdir(parents=True)
    (run_dir / rundir.JOB).write_text(json.dumps({"job_id": "55", "node_index": 1, "nodes": 2, "uid": 1234}))
    with pytest.raises(UserError, match="job 55 runs on several nodes: its VMs are not saved"):
        periodic.handle(settings, None, "55", 1234)
    assert rundir.placement(run_dir) == (1, 2)
    (run_dir / rundir.JOB).write_text(json.dumps({"node_index": 3, "nodes": 2}))
    assert rundir.placement(run_dir) == (0, 1)   # nonsense in the record: as if one node


def test_reconcile_removes_the_network_an_ended_job_left_and_no_other(tmp_path):
    """A multi-node job whose VMs and run dirs went without its epilog (slurmd killed, then its node
    cleaned by hand, or a test cluster stopped mid-job) leaves its bridge and tunnel: reconcile finds them
    by the site recorded with them and removes those of jobs the scheduler no longer has. Another site's
    (several test clusters share a host) and a live job's stay."""
    from vmwrap import reconcile
    from vmwrap.config import Settings

    settings = Settings(state_dir=str(tmp_path / "state"), cache_dir=str(tmp_path / "cache"),
                        checkpoint_dir=str(tmp_path / "ckpt"), libvirt_uri="test:///default")
    ended, live, other = _job(), _job(), _job()
    addrs = ("127.0.0.1", "192.0.2.77")
    try:
        for job, site in ((ended, settings.jobs_dir), (live, settings.jobs_dir), (other, "/elsewhere/jobs")):
            jobnet.join(jobnet.Plan(job, ("c1", "c2"), addrs, 0), site=str(site))
        jobnet.join(jobnet.Plan(ended, ("c1", "c2"), addrs, 1))   # the host's other node: same record
        assert {ended, live} <= set(jobnet.networks(str(settings.jobs_dir)))
        assert other not in jobnet.networks(str(settings.jobs_dir))
        said: list[str] = []
        found = reconcile.reconcile(settings, lambda: (lambda j: j != ended), say=said.append)
        assert [(x.job_id, x.what) for x in found] == [(ended, ["network"])], said
        assert not os.path.lexists(f"/sys/class/net/{jobnet.bridge_name(ended)}")
        assert not os.path.lexists(f"/sys/class/net/{jobnet.vxlan_name(ended)}")
        assert ended not in jobnet.networks(str(settings.jobs_dir))
        for job in (live, other):
            assert os.path.lexists(f"/sys/class/net/{jobnet.bridge_name(job)}")
        assert f"job {ended}: removed network" in said
        assert reconcile.find(settings, lambda: (lambda j: False)) == [
            reconcile.Leftover(live, ["network"])]   # once ended, the live one's would go too
    finally:
        for job in (ended, live, other):
            jobnet.clear(job)
            subprocess.run(["ip", "link", "del", jobnet.vxlan_name(job)], capture_output=True)
            subprocess.run(["ip", "link", "del", jobnet.bridge_name(job)], capture_output=True)


def test_a_stopped_test_clusters_job_networks_go_with_it(tmp_path):
    """The harness's cluster stop (no epilog runs) removes the networks its sites made, and only those."""
    from harness.host_share import clear_job_networks_under

    mine, other = _job(), _job()
    plan = ("c1", "c2"), ("127.0.0.1", "127.0.0.1")
    try:
        jobnet.join(jobnet.Plan(mine, *plan, 1), site=str(tmp_path / "nodes" / "c2" / "state" / "jobs"))
        jobnet.join(jobnet.Plan(other, *plan, 1), site=str(tmp_path) + "-other/jobs")
        assert clear_job_networks_under(tmp_path) == [mine]
        assert not os.path.lexists(f"/sys/class/net/{jobnet.bridge_name(mine)}")
        assert os.path.lexists(f"/sys/class/net/{jobnet.bridge_name(other)}")
    finally:
        for job in (mine, other):
            jobnet.clear(job)


# One host of the test below: jobnet with its own lock and holders (hosts share nothing but the wire).
_HOST = """
import sys
from pathlib import Path
from vmwrap import jobnet
jobnet.LOCK, jobnet.HOLDERS = Path(sys.argv[1] + ".lock"), Path(sys.argv[1])
op, job, index = sys.argv[2], sys.argv[3], int(sys.argv[4])
plan = jobnet.Plan(job, ("c1", "c2"), ("10.99.0.1", "10.99.0.2"), index)
print(jobnet.join(plan) if op == "join" else jobnet.leave(job, index))
"""
_SERVE = """
import socket, sys
s = socket.create_server((sys.argv[1], 5000)); s.settimeout(30)
c, _ = s.accept(); c.sendall(b"hello from " + sys.argv[1].encode()); c.close()
"""
_ASK = """
import socket, sys
try:
    print(socket.create_connection((sys.argv[1], 5000), timeout=3).recv(100).decode())
except OSError as e:
    print("unreachable:", e)
"""


def test_two_hosts_join_a_jobs_segment_over_vxlan_and_another_jobs_vms_do_not_reach_it(tmp_path):
    """Across real hosts the job's bridges are joined by VXLAN (one host here: each host is a network
    namespace of its own, wired to the other by a veth pair on 10.99.0.0/24, each VM's card a veth end in a
    namespace of its own). Job 1's VM on host A reaches job 1's VM on host B through the tunnel, the only
    path; job 2, on the same hosts and the same addresses, does not reach it. Both hosts' leave() remove
    the bridge and the tunnel."""
    import sys
    from pathlib import Path

    tag = os.urandom(3).hex()
    ns = {k: f"vmw{k}{tag}" for k in ("hA", "hB", "g1A", "g1B", "g2A")}
    job1, job2 = f"9{os.urandom(3).hex()}", f"8{os.urandom(3).hex()}"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))

    def run(n: str, *cmd: str) -> str:
        r = subprocess.run(["ip", "netns", "exec", ns[n], *cmd], capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode == 0, (cmd, r.stderr)
        return r.stdout.strip()

    def host(n: str, op: str, job: str, index: int) -> str:
        return run(n, sys.executable, "-c", _HOST, str(tmp_path / n), op, job, str(index))

    def vm(guest: str, on: str, job: str, index: int, ip: str) -> None:
        """A VM's card: a veth whose one end is on the job's bridge of host `on`, the other the guest's."""
        v = f"v{guest}{tag}"[:15]
        run(on, "ip", "link", "add", v, "type", "veth", "peer", "name", "card", "netns", ns[guest])
        run(on, "ip", "link", "set", v, "master", jobnet.bridge_name(job), "up")
        run(guest, "ip", "link", "set", "card", "address", jobnet.mac(index), "up")
        run(guest, "ip", "addr", "add", f"{ip}/16", "dev", "card")

    try:
        for n in ns.values():
            subprocess.run(["ip", "netns", "add", n], check=True)
        run("hA", "ip", "link", "add", "wire", "type", "veth", "peer", "name", "wire", "netns", ns["hB"])
        for n, a in (("hA", "10.99.0.1"), ("hB", "10.99.0.2")):
            run(n, "ip", "addr", "add", f"{a}/24", "dev", "wire")
            run(n, "ip", "link", "set", "wire", "up")
            run(n, "ip", "link", "set", "lo", "up")
        assert host("hA", "join", job1, 0) == host("hB", "join", job1, 1) == jobnet.bridge_name(job1)
        assert host("hA", "join", job2, 0) == host("hB", "join", job2, 1) == jobnet.bridge_name(job2)
        # each host tunnels to the other only
        assert "dst 10.99.0.2" in run("hA", "bridge", "fdb", "show", "dev", jobnet.vxlan_name(job1))
        assert "dst 10.99.0.1" in run("hB", "bridge", "fdb", "show", "dev", jobnet.vxlan_name(job1))
        vm("g1A", "hA", job1, 0, "10.77.0.1")
        vm("g1B", "hB", job1, 1, "10.77.0.2")
        vm("g2A", "hA", job2, 0, "10.77.0.1")
        server = subprocess.Popen(["ip", "netns", "exec", ns["g1B"], sys.executable, "-c", _SERVE, "10.77.0.2"])
        try:
            time.sleep(0.5)
            assert run("g2A", sys.executable, "-c", _ASK, "10.77.0.2").startswith("unreachable:")   # another job
            assert run("g1A", sys.executable, "-c", _ASK, "10.77.0.2") == "hello from 10.77.0.2"   # over the tunnel
        finally:
            server.kill()
            server.wait()
        # the VMs gone (their cards with them), each host's leave removes its bridge and tunnel
        for guest in ("g1A", "g1B", "g2A"):
            subprocess.run(["ip", "netns", "del", ns.pop(guest)], check=True)
        for n, i in (("hA", 0), ("hB", 1)):
            for job in (job1, job2):
                assert host(n, "leave", job, i) == "True"
            assert run(n, "ip", "-o", "link", "show", "type", "bridge") == ""
            assert run(n, "ip", "-o", "link", "show", "type", "vxlan") == ""
    finally:
        for n in ns.values():
            subprocess.run(["ip", "netns", "del", n], capture_output=True)
