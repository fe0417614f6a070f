"""Grid Engine jobs spanning hosts (issue 19, tight integration): a VM job in a parallel environment
with control_slaves TRUE gets a VM on each of its hosts, joined by the job's private network. The
master host's VM comes from the prolog, with the hosts and its slots from execd's pe_hostfile.
A real two-host Grid Engine 8.1.9 cell (harness.sge_cell)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from harness.polling import wait_for
from harness.sge_cell import HOST2, qconf
from harness.sge_jobs import fresh_jobdir, module_cell

pytestmark = pytest.mark.vm
HDR = "#!/bin/sh\n#VMWRAP --image=busybox --memory=128M\n"
PE = ("pe_name {name}\nslots 8\nuser_lists NONE\nxuser_lists NONE\nstart_proc_args NONE\nstop_proc_args NONE\n"
      "allocation_rule $round_robin\ncontrol_slaves {control}\njob_is_first_task TRUE\nurgency_slots min\n"
      "accounting_summary FALSE\nqsort_args NONE\n")


@pytest.fixture(scope="module")
def cell(appliance, mpi_appliance, virt_type, test_user):
    with module_cell("sgemulti", appliance, virt_type, hosts=2, shared_jobnet=True, scheduler="sge",
                     images=(mpi_appliance,)) as c:
        for name, control in (("tight", "TRUE"), ("loose", "FALSE")):
            f = c.base / f"{name}.pe"
            f.write_text(PE.format(name=name, control=control))
            qconf("-Mp" if qconf("-sp", name, check=False).returncode == 0 else "-Ap", str(f))
            qconf("-aattr", "queue", "pe_list", name, "vmwrap.q", check=False)
        yield c


@pytest.fixture
def jobdir(cell, test_user):
    with fresh_jobdir(cell, test_user) as d:
        yield d


def qsub(cell, jobdir, script: str, *args: str):
    path = jobdir / f"job-{os.urandom(3).hex()}.sh"
    path.write_text(script)
    os.chown(path, 1234, 1234)
    return cell.run("qsub", "-terse", "-cwd", "-q", "vmwrap.q", *args, str(path), user="vmwrapuser", cwd=str(jobdir))


def finished(cell, job: str, timeout: float = 240) -> dict:
    wait_for(lambda: cell.run("qstat", "-j", job).returncode != 0, f"job {job} to end", timeout)

    def record():
        text = cell.run("qacct", "-j", job).stdout
        return dict(re.findall(r"^(\w+)\s+(.*?)\s*$", text, re.M)) if "exit_status" in text else None

    return wait_for(record, f"job {job}'s accounting record", 30)


def run(cell, jobdir, script: str, *args: str, timeout: float = 240) -> tuple[str, dict, str, str]:
    """(job id, accounting record, stdout, stderr) of a job run to its end."""
    r = qsub(cell, jobdir, script, *args)
    assert r.returncode == 0, r.stdout + r.stderr
    job = r.stdout.strip()
    acct = finished(cell, job, timeout)
    out = next(jobdir.glob(f"*.o{job}")).read_text()
    err = next(jobdir.glob(f"*.e{job}")).read_text()
    print(acct, out, err)
    return job, acct, out, err


def test_a_pe_without_control_slaves_is_refused_at_qsub_and_one_with_it_is_accepted(cell, jobdir):
    r = qsub(cell, jobdir, HDR + "echo never\n", "-h", "-pe", "loose", "2")
    assert r.returncode != 0 and "control_slaves FALSE" in r.stdout + r.stderr, r.stdout + r.stderr
    r = qsub(cell, jobdir, HDR + "echo never\n", "-h", "-pe", "tight", "2", "-ckpt", "vmwrap")
    assert r.returncode != 0 and "never saved: drop -ckpt vmwrap" in r.stdout + r.stderr, r.stdout + r.stderr
    r = qsub(cell, jobdir, HDR + "echo held\n", "-h", "-pe", "tight", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    cell.run("qdel", r.stdout.strip())


def test_the_masters_vm_joins_the_job_network_with_every_host_named(cell, jobdir):
    script = HDR + "echo \"on $(hostname)\"; grep -E ' (vm|" + HOST2 + ")$' /etc/hosts | sort\necho err >&2; exit 3\n"
    job, acct, out, err = run(cell, jobdir, script, "-pe", "tight", "2", "-masterq", f"vmwrap.q@{cell.host}")
    assert acct["exit_status"] == "3" and err == "err\n", (acct, out, err)
    master = acct["hostname"]
    lines = out.splitlines()
    assert lines[0] == f"on {master}", out
    assert sorted(ln.split()[1] for ln in lines[1:]) == sorted([cell.host, HOST2]), out
    assert all(ln.startswith("10.77.0.") for ln in lines[1:]), out
    left = subprocess.run(["pgrep", "-f", f"guest=vmwrap-{job}"], capture_output=True, text=True).stdout
    assert not left, left


def test_qrsh_inherit_in_the_vm_runs_a_task_of_the_job_as_bare_qrsh_would(cell, jobdir):
    """The guest's `qrsh -inherit HOST CMD` (what MPI launchers run) goes through the host's qrsh to
    HOST; on the master's own host the task is run by the master's VM. Other qrsh uses, and hosts not
    the job's, are refused with the reason and fail as qrsh fails."""
    script = (HDR + "qrsh -inherit -nostdin -V " + cell.host + " 'echo \"task on $(hostname) as $(id -u)\";' "
              "'echo task-err >&2; exit 4'; echo \"rc=$?\"\n"
              "qrsh -inherit -noshell " + cell.host + " printf '%s|\\n' 'a  b' '$HOME'; echo \"rc=$?\"\n"
              "qrsh -inherit nosuchhost true; echo \"rc=$?\"\nqrsh hostname; echo \"rc=$?\"\n")
    # 4 slots, round robin: 2 on each host, the master task holds one of its host's, the task the other
    job, acct, out, err = run(cell, jobdir, script, "-pe", "tight", "4", "-masterq", f"vmwrap.q@{cell.host}")
    assert out == f"task on {cell.host} as 1234\nrc=4\na  b|\n$HOME|\nrc=0\nrc=1\nrc=1\n", (out, err)
    assert "task-err\n" in err, err
    assert "qrsh: error: vmwrap: host 'nosuchhost' is not one of this job's hosts" in err, err
    assert "only `qrsh -inherit HOST COMMAND` runs inside a vmwrap VM" in err, err


def test_the_masters_vm_boots_on_the_second_host_too(cell, jobdir):
    """The master task on the harness's second host (its own network namespace): its VM's job bridge
    must be where libvirtd is (Cell(shared_jobnet=True))."""
    job, acct, out, err = run(cell, jobdir, HDR + "echo \"on $(hostname)\"\n", "-pe", "tight", "2",
                              "-masterq", f"vmwrap.q@{HOST2}")
    assert (acct["hostname"], acct["exit_status"], out, err) == (HOST2, "0", f"on {HOST2}\n", ""), (acct, out, err)
    from vmwrap import jobnet   # the epilog there took the job's network down with its VM

    wait_for(lambda: not os.path.lexists(f"/sys/class/net/{jobnet.bridge_name(job)}"), "the job's bridge gone", 60)


def test_a_task_on_the_other_host_runs_in_that_hosts_vm_booted_for_it(cell, jobdir):
    """No prolog runs on a slave host: the job's first `qrsh -inherit` task there has its node agent
    boot that host's VM of the job (checked: the task holds a group execd gave the job's task there,
    its uid owns the job; sized by qmaster's slots there). The task runs in it, its output and exit
    code come back through qrsh; the two VMs share the job's network. Once the job ended there
    (execd removed its dir), the slave host's agent removes its VM: no epilog runs there either."""
    script = (HDR + "qrsh -inherit " + HOST2 + " 'echo \"task on $(hostname) cpus $(nproc)\";' "
              "'echo task-err >&2; exit 5'; echo \"rc=$?\"\n"
              "qrsh -inherit " + HOST2 + " 'nc -l -p 5000 > got; cat got' &\n"
              "sleep 3; echo \"hello from $(hostname)\" | nc -w 5 " + HOST2 + " 5000; wait\n")
    job, acct, out, err = run(cell, jobdir, script, "-pe", "tight", "2", "-masterq", f"vmwrap.q@{cell.host}",
                              timeout=300)
    assert out == f"task on {HOST2} cpus 1\nrc=5\nhello from {cell.host}\n", (out, err)
    assert "task-err\n" in err, err
    # the VM's QEMU goes first, its run dir after it (the same teardown, an instant later)
    wait_for(lambda: not subprocess.run(["pgrep", "-f", f"guest=vmwrap-{job}"], capture_output=True).stdout
             and not (cell.node_dir(HOST2) / "state" / "jobs" / job).exists(), "the job's VMs to go", 60)


MPI = """#!/bin/sh
#VMWRAP --image=mpi
echo "hosts $(sort "$PE_HOSTFILE" | cut -d' ' -f1,2 | tr '\\n' ' ')"
mpirun -np 2 --map-by node ./mpi_pingpong 200 4 > mpi.out
echo "mpirun rc=$?"
cat mpi.out
"""


def test_an_mpi_program_runs_across_the_vms_of_two_hosts(cell, jobdir, test_user):
    """Debian's OpenMPI in the appliance, as it runs under Grid Engine bare: it reads the job's hosts
    from $PE_HOSTFILE (the VM's copy of execd's) and starts its daemon on the other host with
    `qrsh -inherit` ($SGE_ROOT/bin/$ARC/qrsh, where it looks: the guest's shim there too), which boots
    that host's VM; the two ranks talk over the job's network."""
    exe = jobdir / "mpi_pingpong"
    r = subprocess.run(["mpicc", "-O2", "-o", str(exe), str(Path(__file__).resolve().parent.parent / "benchmarks" /
                                                             "mpi_pingpong.c")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    shutil.chown(exe, test_user.pw_name, test_user.pw_gid)
    job, acct, out, err = run(cell, jobdir, MPI, "-pe", "tight", "2", "-masterq", f"vmwrap.q@{cell.host}",
                              timeout=400)
    assert acct["exit_status"] == "0", (acct, out, err)
    assert f"hosts {' '.join(f'{h} 1' for h in sorted([cell.host, HOST2]))} " in out, (out, err)
    assert f"rank 0 of 2 on {cell.host}" in out and f"rank 1 of 2 on {HOST2}" in out, (out, err)
    assert "mpi latency_us " in out and "mpirun rc=0" in out, (out, err)
