"""Multi-node VM jobs on real Slurm 22.05: a VM on each of the job's nodes, joined by the job's private
network (vmwrap/jobnet.py), steps spread over them, nothing of it visible to other jobs or the host.

The 3 nodes share this host (and its libvirtd): a job's VMs on c1 and c2 are vmwrap-ID and vmwrap-ID@1
and share one bridge; across real hosts the bridges are joined by VXLAN (not exercised here).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest

from harness.slurm_jobs import jobdir as make_jobdir
from harness.slurm_jobs import module_cluster, submit
from vmwrap import jobnet

pytestmark = pytest.mark.vm
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}

SPREAD = """#!/bin/sh
#VMWRAP --image=busybox
echo "batch on $(hostname)"
srun -N 2 -n 2 -l sh -c 'echo "$(hostname) $(uname -r) uid=$(id -u) node=$SLURM_NODEID of $SLURM_NNODES"' | sort
echo "srun rc=$?"
nc -l -p 5000 > got &
me=$(hostname)
srun -N 2 -n 2 sh -c 'if [ "$SLURM_NODEID" = 1 ]; then echo "hello from $(hostname)" | nc -w 5 '"$me"' 5000; fi'
echo "send rc=$?"
wait
echo "received: $(cat got)"
srun -N 2 -n 2 sh -c 'exit $((SLURM_NODEID + 3))'
echo "exit rc=$?"
srun -N 2 -n 8 -O sh -c 'touch meet.$SLURM_NODEID.$SLURM_PROCID; n=0
  while [ $(ls meet.$SLURM_NODEID.* | wc -l) -lt 4 ] && [ $n -lt 300 ]; do sleep 0.2; n=$((n+1)); done
  echo "many $SLURM_PROCID $(hostname) $(ls meet.$SLURM_NODEID.* | wc -l)"' | sort
echo "many rc=$?"
echo "wide $(srun -N 2 -n 12 -O sh -c 'sleep 1; echo "$SLURM_PROCID"' | sort -n | tr '\n' ' ')"
srun -N 2 -n 2 sh -c 'echo "out $SLURM_NODEID"; echo "err $SLURM_NODEID" >&2' | sort
"""


@pytest.fixture(scope="module")
def cluster(appliance, mpi_appliance, virt_type, test_user):
    nat = replace(appliance, name="busybox-nat", network="nat")
    with module_cluster("multinode", appliance, virt_type, images=(nat, mpi_appliance)) as c:
        yield c


@pytest.fixture
def jobdir(cluster, test_user):
    return make_jobdir(cluster, test_user)


def _domains() -> set[str]:
    r = subprocess.run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"], capture_output=True, text=True)
    return set(r.stdout.split())


def _wait(cond, what: str, timeout: float = 120) -> None:
    end = time.time() + timeout
    while not cond():
        if time.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def test_a_two_node_job_gets_a_vm_on_each_node_and_steps_across_them(cluster, jobdir, test_user):
    job = submit(cluster, jobdir, SPREAD, "-N", "2", "-e", "slurm-%j.err")
    info = cluster.wait_state(job, FINAL, 240)
    out = (jobdir / f"slurm-{job}.out").read_text()
    err = (jobdir / f"slurm-{job}.err").read_text()
    assert info["JobState"] == "COMPLETED", out
    nodes = subprocess.run(["scontrol", "show", "hostnames", info["NodeList"]], capture_output=True, text=True,
                           env=cluster.env).stdout.split()
    assert len(nodes) == 2, info
    lines = out.splitlines()
    assert lines[0] == f"batch on {nodes[0]}", out
    host_kernel = os.uname().release
    tasks = [ln for ln in lines if ln[:3] in ("0: ", "1: ")]
    assert len(tasks) == 2, out
    for k, ln in enumerate(tasks):   # each task in its own node's VM, as the job's user
        name, kernel, uid, where, _, count = ln[3:].split()
        assert (name, uid, where, count) == (nodes[k], f"uid={test_user.pw_uid}", f"node={k}", "2"), out
        assert kernel != host_kernel, out
    assert "srun rc=0" in lines and "send rc=0" in lines, out
    # the second node's VM reached the first's by its node name, over the job's own network
    assert f"received: hello from {nodes[1]}" in lines, out
    assert "exit rc=4" in lines, out   # the step's exit code is its worst task's, as bare
    # four tasks per node, each waiting until all four of its node have started: they run side by side,
    # on the second node too (a session each, on the VM's shell ports)
    assert [ln for ln in lines if ln.startswith("many ")] == [
        f"many {i} {nodes[i // 4]} 4" for i in range(8)] + ["many rc=0"], out
    # six tasks per node: on the second node, two wait for a free session and then run
    assert f"wide {' '.join(map(str, range(12)))} " in lines, out
    # each task's errors reach the job's error file, on the second node too (not its output)
    assert [ln for ln in lines if ln[:4] in ("out ", "err ")] == ["out 0", "out 1"], out
    assert sorted(ln for ln in err.splitlines() if ln.startswith("err ")) == ["err 0", "err 1"], err
    # every VM and the network are gone with the job
    _wait(lambda: not {f"vmwrap-{job}", f"vmwrap-{job}@1"} & _domains(), "the job's VMs to go")
    _wait(lambda: not os.path.lexists(f"/sys/class/net/{jobnet.bridge_name(job)}"), "the job's bridge to go")


HOLD = """#!/bin/sh
#VMWRAP --image=busybox
nc -l -p 5000 > got &
touch ready-$SLURM_JOB_ID
while [ ! -e intruder-done ] || [ ! -e host-done ]; do sleep 1; done
echo self | nc -w 3 127.0.0.1 5000
wait
echo "received: $(cat got)"
"""

INTRUDER = """#!/bin/sh
#VMWRAP --image=busybox-nat
while [ -z "$(ls ready-* 2>/dev/null)" ]; do sleep 1; done
echo intruder | nc -w 3 10.77.0.1 5000; echo "intruder rc=$?"
touch intruder-done
"""


def test_no_other_job_nor_the_host_reaches_a_jobs_network(cluster, jobdir):
    """Job A (2 nodes) listens on its network; job B on the third node, whose VM has NAT to the host's
    network, cannot reach it, nor can the host itself: the bridge has no address of the host's."""
    a = submit(cluster, jobdir, HOLD, "-N", "2")
    b = submit(cluster, jobdir, INTRUDER)
    try:
        _wait(lambda: (jobdir / f"ready-{a}").exists(), "job A's listener", 180)
        br = jobnet.bridge_name(a)
        # A's two VMs' cards, nobody else's (the batch script may start before the other node's VM)
        _wait(lambda: len(os.listdir(f"/sys/class/net/{br}/brif")) == 2, "job A's second VM", 60)
        time.sleep(2)
        assert len(os.listdir(f"/sys/class/net/{br}/brif")) == 2
        addrs = subprocess.run(["ip", "-o", "addr", "show", "dev", br], capture_output=True, text=True).stdout
        assert addrs.strip() == "", addrs
        # The host has no route into the segment; its packets for 10.77.0.1 leave by its own network,
        # whose answer (a connect may even succeed, as this machine's upstream accepts any) is not A's.
        route = subprocess.run(["ip", "route", "get", "10.77.0.1"], capture_output=True, text=True).stdout
        assert f"dev {br}" not in route, route
        try:
            with socket.create_connection(("10.77.0.1", 5000), timeout=3) as s:
                s.sendall(b"host\n")
        except OSError:
            pass
        (jobdir / "host-done").touch()
        info = cluster.wait_state(a, FINAL, 240)
        out_a = (jobdir / f"slurm-{a}.out").read_text()
        # A's listener took one connection: its own, last; neither B's nor the host's bytes arrived
        assert info["JobState"] == "COMPLETED" and "received: self" in out_a.splitlines(), out_a
        assert cluster.wait_state(b, FINAL, 120)["JobState"] == "COMPLETED"
        assert "intruder rc=" in (jobdir / f"slurm-{b}.out").read_text()
    finally:
        cluster.run("scancel", a, b)
    _wait(lambda: not os.path.lexists(f"/sys/class/net/{jobnet.bridge_name(a)}"), "job A's bridge to go")


def test_a_requeued_multi_node_job_is_not_saved_and_fails_rather_than_start_over(cluster, jobdir):
    """Its VMs are never saved: the restart fails the job with the reason (the default
    --on-lost-checkpoint); it is neither half-restored nor silently run again from the start."""
    job = submit(cluster, jobdir, "#!/bin/sh\n#VMWRAP --image=busybox\necho started\nsleep 600\n",
                 "-N", "2", "-p", "requeue", "--open-mode=append")
    out = jobdir / f"slurm-{job}.out"
    _wait(lambda: out.exists() and "started" in out.read_text(), "the job to start", 180)
    assert cluster.run("scontrol", "requeue", job).returncode == 0
    info = cluster.wait_state(job, FINAL, 180)
    text = out.read_text()
    assert info["JobState"] != "COMPLETED" and info["Restarts"] == "1", info
    assert text.count("started") == 1, text
    assert (f"job {job} was requeued, but its VMs span 2 nodes, which vmwrap does not save; not starting it "
            "again from the beginning (add '#VMWRAP --on-lost-checkpoint=restart' to allow that)") in text, text
    _wait(lambda: not {f"vmwrap-{job}", f"vmwrap-{job}@1"} & _domains(), "the job's VMs to go")


PARITY = """#!/bin/sh
srun -N 2 -n 2 -l sh -c 'echo "node $SLURM_NODEID proc $SLURM_PROCID of $SLURM_NTASKS on $SLURMD_NODENAME nodes $SLURM_NNODES"' \\
  | sort
echo "rc=$?"
srun -N 2 -n 2 sh -c 'exit $((SLURM_NODEID + 5))'; echo "rc=$?"
srun -N 2 -n 2 -l sh -c '[ "$SLURM_NODEID" = 1 ] && echo only-the-second'; echo "rc=$?"
"""


def test_a_multi_node_vm_job_prints_what_the_bare_job_prints(cluster, jobdir):
    """The parity harness's multi-node case: the same script bare and with #VMWRAP, on 2 nodes each; the
    step variables, output lines and exit codes match. (The bare tasks' host name is this host's for
    every node here: the nodes share it. The VMs are named after their nodes: the first test checks.)
    The tasks' stderr and stdout interleave in the one output file as their timing has it: lines are
    compared as a multiset, the script's own lines in order."""
    bare = submit(cluster, jobdir, PARITY, "-N", "2")
    vm = submit(cluster, jobdir, PARITY.replace("#!/bin/sh\n", "#!/bin/sh\n#VMWRAP --image=busybox\n"), "-N", "2")
    outs = {}
    for job in (bare, vm):
        info = cluster.wait_state(job, FINAL, 240)
        assert info["JobState"] == "COMPLETED", info
        nodes = subprocess.run(["scontrol", "show", "hostnames", info["NodeList"]], capture_output=True, text=True,
                               env=cluster.env).stdout.split()
        text = (jobdir / f"slurm-{job}.out").read_text()
        for k, n in enumerate(nodes):
            text = text.replace(f" on {n} ", f" on NODE{k} ")
        # srun's own word that a step waited for the previous one's cleanup, bare or not, as load has it
        outs[job] = re.sub(r"(?m)^srun: (Job \d+ step creation temporarily disabled, retrying .*|Step created for job \d+)\n",
                           "", text)
    assert sorted(outs[vm].splitlines()) == sorted(outs[bare].splitlines()), (outs[bare], outs[vm])
    assert [ln for ln in outs[vm].splitlines() if ln.startswith("rc=")] == ["rc=0", "rc=6", "rc=1"], outs[vm]
    assert "1: node 1 proc 1 of 2 on NODE1 nodes 2" in outs[vm] and "rc=6" in outs[vm], outs[vm]


MPI = """#!/bin/sh
#VMWRAP --image=mpi
mpirun -np 2 --map-by node ./mpi_pingpong 200 4 > mpi.out
echo "mpirun rc=$?"
cat mpi.out
"""


def test_an_mpi_program_runs_across_two_vms(cluster, jobdir, test_user):
    """Debian's OpenMPI in the appliance: mpirun in the first node's VM starts its daemon on the second
    through Slurm (`srun --nodelist=...`, run in that node's VM), and the two ranks talk over the job's
    network. The program is built on the host against the same Debian release's OpenMPI."""
    exe = jobdir / "mpi_pingpong"
    r = subprocess.run(["mpicc", "-O2", "-o", str(exe), str(Path(__file__).resolve().parent.parent / "benchmarks" /
                                                             "mpi_pingpong.c")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    shutil.chown(exe, test_user.pw_name, test_user.pw_gid)
    job = submit(cluster, jobdir, MPI, "-N", "2")
    info = cluster.wait_state(job, FINAL, 300)
    out = (jobdir / f"slurm-{job}.out").read_text()
    nodes = subprocess.run(["scontrol", "show", "hostnames", info["NodeList"]], capture_output=True, text=True,
                           env=cluster.env).stdout.split()
    assert info["JobState"] == "COMPLETED", out
    assert f"rank 0 of 2 on {nodes[0]}" in out and f"rank 1 of 2 on {nodes[1]}" in out, out
    assert "mpi latency_us " in out and "mpirun rc=0" in out, out
