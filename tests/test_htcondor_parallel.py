"""HTCondor's parallel universe in VMs (issue 19): `universe = parallel`, `machine_count = N` with an
image gives every node its own VM, all joined by the job's private network, each running the job's
executable as HTCondor runs it on every node (`_CONDOR_PROCNO`, `_CONDOR_NPROCS`); the job's exit is
node 0's. A real HTCondor 23.9 pool whose two startds serve the schedd's dedicated scheduler
(harness.condor_pool, `dedicated=True`); both share this host, so the nodes share its libvirtd, its
bridge and the job network's Linux bridge, as two slots of one machine would.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from harness.condor_pool import ROOT, VmwrapSite
from harness.pbs_standin import node_agent
from vmwrap import jobnet
from vmwrap.errors import NodeError, UserError, VmwrapError
from vmwrap_plugins.htcondor.facts import node_job_id, split_node_id
from vmwrap_plugins.htcondor.hooks import HTCondor, find_node, job_from_ad, parallel_plan

HAVE_ROOT = (ROOT / ".vmwrap-condor-root").exists()


# -- without a pool: which node a starter is, and what its VM is told -----------------------------

AD = {"ClusterId": 12, "ProcId": 0, "JobUniverse": 11, "VmwrapImage": "busybox", "RequestCpus": 1,
      "RequestMemory": 256, "RemoteHosts": "slot1_1@node2@localhost,slot1_1@node1@localhost,slot1_2@node2@localhost"}


def test_a_starter_is_the_node_its_slot_is_in_the_schedds_node_order():
    here = {"node1@localhost", "node2@localhost"}
    local = lambda h: h.split("@", 1)[1] in here  # noqa: E731
    assert find_node(AD, "slot1_2", local, None) == 2            # one slot of that name here: the claim is not asked
    assert find_node(AD, "slot1_2", local, "0") == 2             # nor believed
    # two startds of this host each have a slot1_1: the starter's _CONDOR_PROCNO picks among the job's own
    assert find_node(AD, "slot1_1", local, "1") == 1
    assert find_node(AD, "slot1_1", local, "0") == 0
    with pytest.raises(UserError, match="_CONDOR_PROCNO '2' is none of its nodes in slot slot1_1 here"):
        find_node(AD, "slot1_1", local, "2")
    with pytest.raises(UserError, match="has no node in slot slot1_1 of this host"):
        find_node(AD, "slot1_1", lambda h: False, "0")
    with pytest.raises(NodeError, match="names no slot"):
        find_node(AD, "slot1_1@x", local, "0")
    with pytest.raises(UserError, match="_CONDOR_PROCNO"):
        find_node(AD, "slot1_1", local, "\u00b9")                  # a digit to str.isdigit, not to int()
    with pytest.raises(NodeError, match="no node list"):
        find_node({**AD, "RemoteHosts": None}, "slot1_1", local, "0")
    with pytest.raises(NodeError, match="no node list"):         # refused whole, never cut to a shorter list
        find_node({**AD, "RemoteHosts": AD["RemoteHosts"] + "," + "x" * 70000 + "@h"}, "slot1_1", local, "0")


def test_each_node_is_a_job_of_its_own_on_the_jobs_one_network(tmp_path, test_user):
    jobs = [job_from_ad(AD, test_user.pw_uid, str(tmp_path), node=k) for k in range(3)]
    assert [j.job_id for j in jobs] == ["12.0", "12.0.1", "12.0.2"]
    assert [j.domain_name for j in jobs] == ["vmwrap-12.0", "vmwrap-12.0.1@1", "vmwrap-12.0.2@2"]
    plan = jobs[1].nodes
    assert (plan.job_id, plan.nodes, plan.addrs, plan.index, plan.peers_run_script) == \
        ("12.0", ("node0", "node1", "node2"), ("127.0.0.1",) * 3, 1, True)
    assert job_from_ad(AD, test_user.pw_uid, str(tmp_path)).nodes is None   # vanilla: no network
    with pytest.raises(VmwrapError, match="cannot resolve host 'no-such-host.invalid'"):
        parallel_plan({**AD, "RemoteHosts": "slot1@no-such-host.invalid"}, 0)
    assert [split_node_id(j) for j in ("12.0", "12.0.1")] == [("12.0", 0), ("12.0", 1)]
    for bad in ("12", "12.0.0", "12.0.x", "12.0.1.1", "../12.0"):
        with pytest.raises(UserError):
            split_node_id(bad)
    assert node_job_id("12.0", 0) == "12.0" and node_job_id("12.0", 2) == "12.0.2"


def test_the_bridge_serves_one_request_per_vm_at_a_time(monkeypatch):
    """A second request for the same VM waits for the first to end (then says it waited: the caller
    verifies its job again); one for another VM does not; one still waiting after SERVE_WAIT goes back
    to the queue (NodeError: requeue), never racing the first to boot."""
    import threading

    from vmwrap_plugins.htcondor import bridge

    b = bridge.Bridge(settings=None, config_path=None, schedd=None)
    order, first_in, release = [], threading.Event(), threading.Event()

    def first():
        with b._alone("7.0.1") as waited:
            order.append(("first", waited))
            first_in.set()
            release.wait(10)
        order.append("first out")

    def second():
        with b._alone("7.0.1") as waited:
            order.append(("second", waited))

    t1 = threading.Thread(target=first)
    t1.start()
    first_in.wait(10)
    with b._alone("7.0") as waited:            # node 0 of the same job: its own VM, not held up
        assert waited is False
    t2 = threading.Thread(target=second)
    t2.start()
    t2.join(0.5)
    assert t2.is_alive() and order == [("first", False)]
    release.set()
    t1.join(10)
    t2.join(10)
    assert order == [("first", False), "first out", ("second", True)] and not b._serving
    monkeypatch.setattr(bridge, "SERVE_WAIT", 0.2)
    with b._alone("7.0.1"):
        t3_error = []

        def third():
            try:
                with b._alone("7.0.1"):
                    pass
            except NodeError as e:
                t3_error.append(str(e))
        t3 = threading.Thread(target=third)
        t3.start()
        t3.join(5)
    assert t3_error and "still being served on this node" in t3_error[0] and not b._serving


def test_the_gc_keeps_the_nodes_of_a_job_the_schedd_still_has():
    class Schedd:
        def job_ids(self):
            return {"12.0"}
    queued = HTCondor(schedd=Schedd()).still_queued()
    assert queued("12.0") and queued("12.0.1") and queued("12.0.7")
    assert not queued("13.0.1") and not queued("12.1") and not queued("1.0.1")


# -- a real pool --------------------------------------------------------------------------------

needs_pool = pytest.mark.skipif(not HAVE_ROOT, reason=f"no HTCondor root at {ROOT} (scripts/build-condor-root.sh)")


@pytest.fixture(scope="module")
def pool(appliance, virt_type, test_user, libvirtd):
    with VmwrapSite(Path(f"/var/tmp/vmwrap-condorpar-{os.getpid()}"), appliance, virt_type, dedicated=True) as site:
        yield site


@pytest.fixture
def condor(pool):
    """The pool, with nothing of a test's left for the next (a failed test's job would hold both slots)."""
    yield pool
    pool.pool.run("/usr/bin/condor_rm", "-all", user=pool.user)


# Every node runs it (HTCondor's parallel universe). Node 1 listens and answers; node 0 says hello
# through the job network under node 1's name, prints the answer, and its exit is the job's.
PAIR = """#!/bin/sh
echo "node $_CONDOR_PROCNO of $_CONDOR_NPROCS on $(hostname)"
if [ "$_CONDOR_PROCNO" = 1 ]; then
    echo "ack from $(hostname)" | timeout 120 nc -l -p 5000
    exit 5
fi
i=0
until echo "hello from $(hostname)" | nc -w 5 node1 5000; do
    i=$((i + 1)); [ $i -lt 90 ] || exit 9; sleep 1
done
sleep 3
exit 3
"""


def _submit(condor, script: str, nodes: int = 2) -> tuple[int, Path]:
    d = condor.jobdir()
    (d / "job.sh").write_text(script)
    os.chown(d / "job.sh", 1234, 1234)
    (d / "job.sh").chmod(0o755)
    cluster, r = condor.submit(d, "\n".join([
        "universe = parallel", "executable = job.sh", f"machine_count = {nodes}", "request_memory = 256",
        "should_transfer_files = NO", "output = out.$(Node)", "error = err.$(Node)", "log = log.txt",
        '+VmwrapImage = "busybox"', "queue", ""]))
    assert cluster > 0, r.stdout + r.stderr
    return cluster, d


def _vms(cluster: int) -> list[str]:
    out = subprocess.run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"], capture_output=True,
                         text=True).stdout.split()
    return [n for n in out if re.fullmatch(rf"vmwrap-{cluster}\.0(\.\d+@\d+)?", n)]


def _gone(condor, cluster: int) -> None:
    """No VM, run dir or job network of the job is left on the host."""
    end = time.monotonic() + 60
    while time.monotonic() < end and (_vms(cluster) or list((condor.state / "jobs").glob(f"{cluster}.0*"))):
        time.sleep(0.5)
    assert not _vms(cluster)
    assert not list((condor.state / "jobs").glob(f"{cluster}.0*"))
    assert not os.path.lexists(f"/sys/class/net/{jobnet.bridge_name(f'{cluster}.0')}")


@needs_pool
@pytest.mark.vm
def test_every_node_runs_in_its_own_vm_and_they_talk_over_the_jobs_network(condor):
    cluster, d = _submit(condor, PAIR)
    ad = condor.pool.wait_job(cluster, 0, (4, 5), 240, ["ExitCode", "HoldReason", "RemoteHosts"])
    out0, out1 = ((d / f"out.{k}").read_text() if (d / f"out.{k}").exists() else "" for k in (0, 1))
    assert ad["JobStatus"] == 4, (ad, out0, out1, condor.logs())
    assert ad["ExitCode"] == 3                     # node 0's, as for a bare parallel job
    assert out0.splitlines() == ["node 0 of 2 on node0", "ack from node1"], out0
    assert out1.splitlines() == ["node 1 of 2 on node1", "hello from node0"], out1
    for node in (f"{cluster}.0", f"{cluster}.0.1"):   # each node really ran in a VM of its own
        assert "created" in [e for e, _ in condor.ledger(node)], node
    _gone(condor, cluster)


@needs_pool
@pytest.mark.vm
def test_a_nodes_vm_takes_its_users_shell_and_condor_rm_takes_every_vm_and_the_network(condor):
    cluster, d = _submit(condor, "#!/bin/sh\necho up $_CONDOR_PROCNO\nsleep 600\n")
    end = time.monotonic() + 180
    while time.monotonic() < end and not all((d / f"out.{k}").exists() and "up" in (d / f"out.{k}").read_text()
                                             for k in (0, 1)):
        time.sleep(1)
    assert len(_vms(cluster)) == 2, (_vms(cluster), condor.logs())
    assert os.path.lexists(f"/sys/class/net/{jobnet.bridge_name(f'{cluster}.0')}")
    # What the bridge believes of the running job is the schedd's and the shadow's: not its owner's to edit
    for attr, value in (("RemoteHosts", f'"slot1_1@node1@{os.uname().nodename},slot1_1@node1@{os.uname().nodename}"'),
                        ("RemoteHost", '"slot9@elsewhere"'), ("CpusProvisioned", "64")):
        r = condor.pool.run("/usr/bin/condor_qedit", str(cluster), attr, value, user=condor.user)
        assert r.returncode != 0 and "No attributes were set" in r.stdout + r.stderr, (attr, r)
        said = condor.pool.local("log", "SchedLog").read_text(errors="replace")
        assert f"SetAttribute of protected attribute denied, RealOwner={condor.user}" in said and f"Attr={attr} " in said
    assert condor.pool.job(cluster, 0, ["RemoteHosts"])["RemoteHosts"].count(",") == 1
    # `vmwrap shell C.P.K`: node K's VM, for the job's user only (the node agent checks)
    agent = node_agent(condor.cfg, condor.state)
    try:
        def shell(user: str) -> subprocess.CompletedProcess:
            return subprocess.run(["runuser", "-u", user, "--", "vmwrap", "--config", str(condor.cfg), "shell",
                                   f"{cluster}.0.1", "hostname; echo $_CONDOR_PROCNO"], capture_output=True,
                                  text=True, timeout=60, stdin=subprocess.DEVNULL, cwd="/")
        mine = shell(condor.user)
        assert (mine.returncode, mine.stdout.split()) == (0, ["node1", "1"]), mine
        other = shell("nobody")
        assert other.returncode == 255 and "node1" not in other.stdout, other
    finally:
        agent.kill()
        agent.wait()
    condor.pool.run("/usr/bin/condor_rm", str(cluster), user=condor.user, check=True)
    _gone(condor, cluster)


@needs_pool
@pytest.mark.vm
@pytest.mark.parametrize("policy", ["fail", "restart"])
def test_a_parallel_job_started_again_follows_its_lost_checkpoint_policy(condor, policy):
    """HTCondor starts a stopped parallel job again on all its nodes; vmwrap saves none of its VMs, so
    its next start says why and follows --on-lost-checkpoint: held (the default), or from the beginning.
    Stopped by condor_hold + condor_release: after condor_vacate_job, HTCondor 23.9's dedicated scheduler
    did not match the job again within minutes here, bare or not ("claim id not found for new dynamic
    slot": the slots are partitionable)."""
    directive = "#VMWRAP --on-lost-checkpoint=restart\n" if policy == "restart" else ""
    cluster, d = _submit(condor, "#!/bin/sh\n" + directive +
                         "echo run $_CONDOR_PROCNO\n[ -e again ] || sleep 600\necho done $_CONDOR_PROCNO\n")
    end = time.monotonic() + 180
    while time.monotonic() < end and len(_vms(cluster)) < 2:
        time.sleep(1)
    assert len(_vms(cluster)) == 2, (_vms(cluster), condor.logs())
    time.sleep(3)
    (d / "again").write_text("")
    assert condor.pool.run("/usr/bin/condor_hold", str(cluster), user=condor.user).returncode == 0
    condor.pool.wait_job(cluster, 0, (5,), 60)
    _gone(condor, cluster)
    assert condor.pool.run("/usr/bin/condor_release", str(cluster), user=condor.user).returncode == 0
    end = time.monotonic() + 60
    while time.monotonic() < end and (condor.pool.job(cluster, 0, ["JobStatus"]) or {}).get("JobStatus") == 5:
        time.sleep(0.5)
    ad = condor.pool.wait_job(cluster, 0, (4, 5), 240, ["ExitCode", "HoldReason", "JobRunCount"])
    if policy == "fail":
        assert ad["JobStatus"] == 5, (ad, condor.logs())
        assert "its VMs span 2 nodes, which vmwrap does not save" in ad["HoldReason"], ad
        assert "--on-lost-checkpoint=restart" in ad["HoldReason"], ad
        condor.pool.run("/usr/bin/condor_rm", str(cluster), user=condor.user)
    else:
        assert (ad["JobStatus"], ad["ExitCode"], ad["JobRunCount"]) == (4, 0, 2), (ad, condor.logs())
        said = (d / "out.0").read_text() + (d / "err.0").read_text()
        assert "starting the job again from the beginning" in said and "done 0" in said, said
    _gone(condor, cluster)


# Bare twins (the parity harness's idea, docs/parity.md): the same parallel job with and without its
# image, one after the other on the same pool; what the schedd and the user see of each node must match.
PARITY = {
    "exits": '[ "$_CONDOR_PROCNO" = 0 ] || { echo "out $_CONDOR_PROCNO/$_CONDOR_NPROCS"; echo "err 1" >&2; exit 5; }\n'
             'sleep 4\necho "out 0/$_CONDOR_NPROCS"\necho "err 0" >&2\nexit 3\n',
    "node0-killed-by-a-signal": '[ "$_CONDOR_PROCNO" = 0 ] || { echo started; sleep 600; echo never; }\n'
                                'sleep 4\necho going\nkill -SEGV $$\n',
}


@needs_pool
@pytest.mark.vm
@pytest.mark.parametrize("case", sorted(PARITY))
def test_a_parallel_vm_job_looks_like_its_bare_twin(condor, case):
    seen = {}
    for vm in (False, True):
        d = condor.jobdir()
        (d / "job.sh").write_text("#!/bin/sh\n" + PARITY[case])
        os.chown(d / "job.sh", 1234, 1234)
        (d / "job.sh").chmod(0o755)
        cluster, r = condor.submit(d, "\n".join([
            "universe = parallel", "executable = job.sh", "machine_count = 2", "request_memory = 256",
            "should_transfer_files = NO", "output = out.$(Node)", "error = err.$(Node)", "log = log.txt",
            *(['+VmwrapImage = "busybox"'] if vm else []), "queue", ""]))
        assert cluster > 0, r.stdout + r.stderr
        ad = condor.pool.wait_job(cluster, 0, (3, 4, 5), 240, ["ExitCode", "ExitBySignal", "ExitSignal", "HoldReason"])
        seen[vm] = ({k: ad.get(k) for k in ("JobStatus", "ExitCode", "ExitBySignal", "ExitSignal", "HoldReason")},
                    {f: (d / f).read_bytes() for f in ("out.0", "err.0", "out.1", "err.1")})
        ran = condor.ledger(f"{cluster}.0") if (condor.state / "ledger.sqlite").exists() else []
        assert ("created" in [e for e, _ in ran]) == vm
        _gone(condor, cluster)
    assert seen[False][0]["JobStatus"] == 4 and seen[False][1]["out.0"], seen[False]
    assert seen[True] == seen[False]
