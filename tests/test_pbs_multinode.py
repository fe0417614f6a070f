"""PBS jobs over several hosts in VMs: every mom of the job boots its host's VM (execjob_begin runs on
sisters too), joined by the job's network; `pbs_tmrsh HOST CMD` in the VM runs CMD in HOST's VM
through the host's pbs_tmrsh and the TM interface.

No PBS server can be installed here: harness/pbs_standin.py plays the moms and the TM interface at
the points the OpenPBS sources give (each cited there), and the `pbs_tmrsh` it installs keeps
pbs_tmrsh.c's contract (argv, environment, node choice, exit value). The VMs, libvirt, QEMU, the
node agents and the job network are real."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

import pytest

from harness.pbs_standin import ND_OFFLINE, Mom, Tm, clean_up, hook_config, node_agent, output, site_dirs, wait_for
from vmwrap.config import render
from vmwrap.errors import UserError, VmwrapError
from vmwrap.resources import HOOKS
from vmwrap_plugins.pbs import mom as mom_mod
from vmwrap_plugins.pbs.job import node_hosts
from vmwrap_plugins.pbs.steps import tmrsh_command

HOOK = HOOKS / "pbs-mom.py"


def test_exec_host_and_exec_vnode_give_each_hosts_chunks():
    assert mom_mod.exec_chunks("hA/0*2+hB/0*4+hA/1") == [("hA", 2), ("hB", 4), ("hA", 1)]
    assert mom_mod.exec_chunks("") == [] and mom_mod.exec_chunks(None) == []
    assert mom_mod.chunk_memory("(hA:ncpus=2:mem=1048576kb)+(hB:ncpus=4)+(hA[0]:mem=1gb+hA[1]:mem=512mb)") == \
        [1024, None, 1536]


def test_every_mom_numbers_the_hosts_alike_and_sizes_its_vm_by_its_own_chunks(monkeypatch):
    from vmwrap import jobnet

    monkeypatch.setattr(jobnet, "resolve", lambda hosts, what: [f"10.0.0.{i + 1}" for i, _ in enumerate(hosts)])
    facts = {"exec_host": "hA/0*2+hB/0*4+hA/1*2", "exec_vnode": "(hA:ncpus=2:mem=1gb)+(hB:ncpus=4:mem=2gb)+(hA:ncpus=2:mem=1gb)"}
    plan, cpus, mem = mom_mod.host_plan({**facts, "node": "hA"}, "7.srv")
    assert (plan.nodes, plan.addrs, plan.index, cpus, mem) == (("hA", "hB"), ("10.0.0.1", "10.0.0.2"), 0, 4, 2048)
    plan, cpus, mem = mom_mod.host_plan({**facts, "node": "hB"}, "7.srv")
    assert (plan.nodes, plan.index, cpus, mem) == (("hA", "hB"), 1, 4, 2048)
    plan, cpus, mem = mom_mod.host_plan({"exec_host": "hA/0*2+hB/0*4", "exec_vnode": "(hA:ncpus=2)+(hB:ncpus=4)",
                                         "node": "hB"}, "7.srv")
    assert (cpus, mem) == (4, None)   # no mem in its chunks: the job's request decides
    assert mom_mod.host_plan({"exec_host": "hA/0*2+hA/1*2", "node": "hA"}, "7.srv") == (None, None, None)
    with pytest.raises(VmwrapError, match="this mom \\('hC'\\) is not one of job 7.srv's hosts"):
        mom_mod.host_plan({**facts, "node": "hC"}, "7.srv")


def test_a_guests_pbs_tmrsh_becomes_the_hosts_on_one_of_the_jobs_hosts():
    me = __import__("pwd").getpwuid(os.getuid()).pw_name
    task = ["/x/pbs-job", "task", "/run/s", "tok", "7.srv"]
    hosts = ["hA", "hB"]
    assert tmrsh_command(["hB", "hostname", "-s"], task, hosts, "/opt/pbs/bin/pbs_tmrsh") == \
        (1, ["/opt/pbs/bin/pbs_tmrsh", "hB", *task, "--", "hostname", "-s"])
    assert tmrsh_command(["-n", "-l", me, "hA", "-n", f"-l{me}", "a.out", "-n"], task, hosts, "/t")[0] == 6
    for argv, why in [(["hC", "x"], "host 'hC' is not one of this job's hosts (hA hB)"),
                      (["hA"], "no command given"), ([], "no host given"), (["-x", "hA", "y"], "option '-x'"),
                      (["-l", "nobody", "hA", "id"], "-l 'nobody': a task runs as the job's user"),
                      (["hA", "-l", "someone", "id"], "-l 'someone'"),
                      (["hA"] + ["x"] * 1100, "more than 1024 arguments")]:
        with pytest.raises(UserError, match=why.replace("(", "\\(").replace(")", "\\)")):
            tmrsh_command(argv, task, hosts, "/t")


def test_the_nodefile_gives_the_hosts_once_in_order():
    assert node_hosts(b"hA\nhA\nhB\n\nhA\nhC\n") == ["hA", "hB", "hC"]
    assert node_hosts(None) == []


# --- real VMs on two moms of one host ----------------------------------------------------------------

HOSTS = ("pbsvm1", "pbsvm2")   # two moms of the job on this host (named in /etc/hosts while the tests run)
HOSTS_LINE = "127.0.0.1 " + " ".join(HOSTS) + "  # vmwrap tests/test_pbs_multinode.py\n"


def _etc_hosts(add: bool) -> None:
    """The moms' names resolve as a real cluster's (the job network resolves every host of a job)."""
    text = Path("/etc/hosts").read_text()
    kept = "".join(ln for ln in text.splitlines(keepends=True) if ln != HOSTS_LINE)
    Path("/etc/hosts").write_text(kept + (HOSTS_LINE if add else ""))


def _mom_config(base: Path, images, virt_type: str, name: str) -> Path:
    from vmwrap.catalog import register

    d = base / name
    d.mkdir(parents=True, exist_ok=True)
    for img in images:
        register(str(d / "images.toml"), img)
    cfg = d / "vmwrap.toml"
    cfg.write_text(render({"catalog": str(d / "images.toml"), "accel": virt_type, "grace_seconds": 5.0,
                           "state_dir": str(d / "state"), "cache_dir": str(d / "cache")}))
    return cfg


@pytest.fixture(scope="module")
def pbs_pair(appliance, mpi_appliance, virt_type, test_user):
    """A primary mom and a sister, each with its own vmwrap (config, state, node agent), and the TM
    interface their pbs_tmrsh reaches."""
    _etc_hosts(True)
    assert all(socket.gethostbyname(h) == "127.0.0.1" for h in HOSTS)
    base = Path(f"/var/tmp/vmwrap-pbsmn-{os.getpid()}")
    work = site_dirs(base, test_user, fresh=True)
    tm = Tm(base)
    tm.install(base / "pbs")
    moms, agents = [], []
    for i, name in enumerate(HOSTS):
        cfg = _mom_config(base, (appliance, mpi_appliance), virt_type, f"m{i}")
        agents.append(node_agent(cfg, cfg.parent / "state"))
        moms.append(Mom(base / f"m{i}", name, HOOK, hook_config(cfg.parent / "hook.json", cfg), pbs_exec=base / "pbs"))
    moms[1].seq = moms[0].seq + 5000   # one server's job ids: the sister never makes its own
    yield moms, tm, work, base
    tm.close()
    clean_up(base, moms, agents)
    _etc_hosts(False)


def _vms_gone(base: Path, job) -> bool:
    """No VM of the job, no run dir on any mom, no job network left."""
    from vmwrap import jobnet

    r = subprocess.run(["pgrep", "-f", f"guest=vmwrap-{job.id}"], capture_output=True)
    return r.returncode != 0 and not any(base.glob(f"*/state/jobs/{job.id}")) and \
        not os.path.lexists(f"/sys/class/net/{jobnet.bridge_name(job.id)}")


@pytest.mark.vm
def test_qdel_of_a_job_on_two_hosts_leaves_no_vm_and_no_network(pbs_pair, test_user):
    moms, tm, work, base = pbs_pair
    job = moms[0].job(test_user, "#!/bin/sh\necho started\nsleep 300\n", work, name="del",
                      resources={"vmwrap_image": "busybox", "ncpus": "1"}, sisters=[moms[1]])
    tm.add(job, moms[0])
    assert moms[0].start(job) == "running", job.history
    wait_for(lambda: "started" in moms[0].spool_out(job), "the job to run", 120)
    assert subprocess.run(["pgrep", "-f", f"guest=vmwrap-{job.id}@1,"], capture_output=True).returncode == 0
    moms[0].qdel(job)
    moms[0].wait(job, timeout=120)
    wait_for(lambda: _vms_gone(base, job), "both VMs and the job's network gone", 60)


@pytest.mark.vm
def test_a_rerun_job_on_two_hosts_starts_again_on_both_as_its_script_allows(pbs_pair, test_user):
    """qrerun: no VM of a multi-node job is saved; the primary's script allows a fresh start
    (--on-lost-checkpoint=restart), and the sister, which never sees the script, starts its VM again
    too, so the second run's tasks reach it (never half a job)."""
    moms, tm, work, base = pbs_pair
    h1 = HOSTS[1]
    d = work / "rerun"
    d.mkdir()
    os.chown(d, test_user.pw_uid, test_user.pw_gid)
    script = f"""#!/bin/sh
#VMWRAP --on-lost-checkpoint=restart
cd {d}
if [ -e ran ]; then pbs_tmrsh {h1} sh -c 'echo "again on $(hostname)"'; echo "task $?"; exit 0; fi
touch ran; echo first; sleep 300
"""
    job = moms[0].job(test_user, script, work, name="rr", resources={"vmwrap_image": "busybox", "ncpus": "1"},
                      sisters=[moms[1]])
    tm.add(job, moms[0])
    assert moms[0].start(job) == "running", job.history
    wait_for(lambda: "first" in moms[0].spool_out(job), "the first run", 120)
    moms[0].qrerun(job)
    moms[0].wait(job, timeout=120)
    assert job.state == "Q"
    assert moms[0].start(job) == "running", job.history
    assert moms[0].wait(job, timeout=300) == 0, output(job)
    out, err = output(job)
    assert f"again on {h1}" in out and "task 0" in out, (out, err)
    assert "starting the job again from the beginning (--on-lost-checkpoint=restart)" in err, err
    wait_for(lambda: _vms_gone(base, job), "both VMs gone", 60)


@pytest.mark.vm
def test_a_sister_that_cannot_join_requeues_the_job_and_the_primary_tears_its_vm_down(pbs_pair, test_user):
    """A sister whose vmwrap cannot run rejects its begin and goes offline (its fault); the job is
    aborted on the primary (execjob_abort), whose VM goes with it, and requeued."""
    moms, tm, work, base = pbs_pair
    broken = Mom(base / "broken", HOSTS[1], HOOK, hook_config(base / "broken.json", base / "no-such.toml"),
                 pbs_exec=base / "pbs")
    job = moms[0].job(test_user, "#!/bin/sh\necho never\n", work, name="nojoin",
                      resources={"vmwrap_image": "busybox", "ncpus": "1"}, sisters=[broken])
    assert moms[0].start(job) == "requeued", job.history
    assert broken.vnode.state == ND_OFFLINE and "vmwrap" in broken.vnode.comment
    assert moms[0].vnode.state == 0
    wait_for(lambda: _vms_gone(base, job), "the primary's VM gone", 60)


@pytest.mark.vm
def test_a_job_on_two_hosts_runs_tasks_in_each_hosts_vm_through_pbs_tmrsh(pbs_pair, test_user):
    """`-l select=2:ncpus=1 -l vmwrap_image=busybox`: each mom's execjob_begin boots its host's VM (the
    sister's `vmwrap-JOB@1`); in the first, $PBS_NODEFILE lists both hosts and `pbs_tmrsh HOST CMD`
    runs CMD in that host's VM, with the task's exit value, its output in the job's .o/.e as for a
    bare task (demux); the VMs reach each other by the hosts' names on the job's network; the guest
    does not get the TM credentials; execjob_end on each mom leaves no VM."""
    moms, tm, work, base = pbs_pair
    h0, h1 = HOSTS
    script = f"""#!/bin/sh
cat "$PBS_NODEFILE"
echo "cookie ${{PBS_JOBCOOKIE:-none}} ${{PBS_MOMPORT:-none}}"
pbs_tmrsh {h1} sh -c 'echo "task on $(hostname) uid $(id -u)"; echo task-err >&2; exit 5'
echo "remote exit $?"
pbs_tmrsh {h0} sh -c 'echo "task here on $(hostname)"'
echo "local exit $?"
timeout 120 nc -l -p 5000 > got &
pbs_tmrsh -n {h1} sh -c 'echo "hello from $(hostname)" | nc -w 5 {h0} 5000'
echo "send exit $?"
wait
echo "received: $(cat got)"
pbs_tmrsh nowhere true
echo "bad host $?"
{base}/pbs/bin/pbs_tmrsh {h1} true
echo "at PBS_EXEC $?"
exit 3
"""
    job = moms[0].job(test_user, script, work, name="mn", resources={"vmwrap_image": "busybox", "ncpus": "1"},
                      sisters=[moms[1]])
    tm.add(job, moms[0])
    assert moms[0].start(job) == "running", job.history
    wait_for(lambda: (base / "m1" / "state" / "jobs" / job.id).exists(), "the sister's VM", 60)
    assert moms[0].wait(job, timeout=600) == 3, output(job)
    out, err = output(job)
    lines = out.splitlines()
    assert lines[:3] == [h0, h1, "cookie none none"], out + err   # TM's credentials stay on the host
    assert f"task on {h1} uid {test_user.pw_uid}" in lines, out + err
    assert "remote exit 5" in lines and "task-err" in err.splitlines(), out + err
    assert f"task here on {h0}" in lines and "local exit 0" in lines, out + err
    assert "send exit 0" in lines and f"received: hello from {h1}" in lines, out + err
    assert "bad host 1" in lines and "pbs_tmrsh: error: vmwrap: host 'nowhere' is not one of this job's hosts" in err
    assert "at PBS_EXEC 0" in lines, out + err
    wait_for(lambda: _vms_gone(base, job), "both VMs gone", 60)


MPI = """#!/bin/sh
echo "hosts $(sort -u "$PBS_NODEFILE" | tr '\\n' ' ')"
# Open MPI's rsh launcher sends its daemon's command as shell words (ssh and rsh hand them to a shell);
# pbs_tmrsh runs a program with its arguments: the agent gives them to one
printf '#!/bin/sh\\nh=$1; shift\\nexec pbs_tmrsh "$h" /bin/sh -c "$*"\\n' > tmrsh-sh
chmod +x tmrsh-sh
mpirun --mca plm_rsh_agent "$PWD/tmrsh-sh" --hostfile "$PBS_NODEFILE" -np 2 --map-by node ./mpi_pingpong 200 4 > mpi.out
echo "mpirun rc=$?"
cat mpi.out
"""


@pytest.mark.vm
def test_an_mpi_program_runs_across_the_vms_of_two_hosts_through_pbs_tmrsh(pbs_pair, test_user):
    """Debian's Open MPI in the appliance, as it runs under PBS bare without TM support: its rsh
    launcher with pbs_tmrsh as the agent (through a shell, as its words need) and the job's
    $PBS_NODEFILE as the host file starts its daemon on the other host's VM; the two ranks talk over
    the job's network."""
    moms, tm, work, base = pbs_pair
    exe = work / "mpi_pingpong"
    r = subprocess.run(["mpicc", "-O2", "-o", str(exe), str(ROOT / "benchmarks" / "mpi_pingpong.c")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    shutil.chown(exe, test_user.pw_name, test_user.pw_gid)
    job = moms[0].job(test_user, MPI, work, name="mpi", resources={"vmwrap_image": "mpi", "ncpus": "1"},
                      sisters=[moms[1]])
    tm.add(job, moms[0])
    assert moms[0].start(job) == "running", job.history
    assert moms[0].wait(job, timeout=600) == 0, output(job)
    out, err = output(job)
    assert f"hosts {HOSTS[0]} {HOSTS[1]} " in out, (out, err)
    assert f"rank 0 of 2 on {HOSTS[0]}" in out and f"rank 1 of 2 on {HOSTS[1]}" in out, (out, err)
    assert "mpi latency_us " in out and "mpirun rc=0" in out, (out, err)
    wait_for(lambda: _vms_gone(base, job), "both VMs gone", 60)
