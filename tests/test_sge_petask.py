"""Issue 19 (Grid Engine tight integration, groundwork): a slave host's node agent tells a process
execd started for a job's task from any other, by execd's records only; and where qmaster runs a job
with how many slots per host. Layouts and output as probed on this machine's GE 8.1.9."""

import os
import shutil
import subprocess
import sys
import time

import pytest

from vmwrap import directives
from vmwrap_plugins.sge import facts, petask

# `qstat -g t -u '*' -xml` of a 2-slot $round_robin job whose master task ran on the second host
QSTAT_G_T = """<?xml version='1.0'?>
<job_info  xmlns:xsd="http://arc.liv.ac.uk/repos/darcs/sge/source/dist/util/resources/schemas/qstat/qstat.xsd">
  <queue_info>
    <job_list state="running">
      <JB_job_number>301536</JB_job_number><JB_name>job.sh</JB_name><JB_owner>vmwrapuser</JB_owner>
      <state>r</state><queue_name>vmwrap.q@sgehost2</queue_name><master>MASTER</master><slots>1</slots>
    </job_list>
    <job_list state="running">
      <JB_job_number>301536</JB_job_number><JB_name>job.sh</JB_name><JB_owner>vmwrapuser</JB_owner>
      <state>r</state><queue_name>vmwrap.q@vm</queue_name><master>SLAVE</master><slots>1</slots>
    </job_list>
    <job_list state="running">
      <JB_job_number>301536</JB_job_number><JB_name>job.sh</JB_name><JB_owner>vmwrapuser</JB_owner>
      <state>r</state><queue_name>other.q@vm</queue_name><master>SLAVE</master><slots>2</slots>
    </job_list>
    <job_list state="running">
      <JB_job_number>7</JB_job_number><JB_name>x</JB_name><JB_owner>bob</JB_owner>
      <state>r</state><queue_name>vmwrap.q@vm</queue_name><master>MASTER</master><slots>1</slots>
    </job_list>
    <job_list state="running">
      <JB_job_number>9</JB_job_number><JB_name>a</JB_name><JB_owner>bob</JB_owner>
      <state>r</state><queue_name>vmwrap.q@vm</queue_name><master>MASTER</master><slots>2</slots><tasks>1</tasks>
    </job_list>
    <job_list state="running">
      <JB_job_number>9</JB_job_number><JB_name>a</JB_name><JB_owner>bob</JB_owner>
      <state>r</state><queue_name>vmwrap.q@sgehost2</queue_name><master>MASTER</master><slots>4</slots><tasks>2</tasks>
    </job_list>
  </queue_info>
  <job_info></job_info>
</job_info>
"""


def test_allocation_puts_the_master_first_and_sums_a_hosts_queue_instances():
    assert facts.allocation_from_xml(QSTAT_G_T, "301536") == [("sgehost2", 1), ("vm", 3)]
    assert facts.allocation_from_xml(QSTAT_G_T, "7") == [("vm", 1)]
    assert facts.allocation_from_xml(QSTAT_G_T, "8") == []
    # an array job: each task is its own run, with its own hosts and slots
    assert facts.allocation_from_xml(QSTAT_G_T, "9", "2") == [("sgehost2", 4)]
    assert facts.allocation_from_xml(QSTAT_G_T, "9", "1") == [("vm", 2)]
    assert facts.allocation_from_xml(QSTAT_G_T, "9") == []


def test_allocation_refuses_what_does_not_read_as_qstat_wrote_it():
    with pytest.raises(RuntimeError, match="not a job id"):
        facts.allocation_from_xml(QSTAT_G_T, "7; rm")
    bad = QSTAT_G_T.replace("<slots>2</slots>", "<slots>lots</slots>")
    with pytest.raises(RuntimeError, match="unreadable queue instance or slots"):
        facts.allocation_from_xml(bad, "301536")
    with pytest.raises(RuntimeError, match="not XML"):
        facts.allocation_from_xml("<job_info>", "7")


def _spool(tmp_path, job="301536", master_gid=20000, tasks=(("1.vm", 65400),)):
    spool = tmp_path / "execd" / "vm"
    d = spool / petask.ACTIVE / f"{job}.1"
    d.mkdir(parents=True)
    for p in (spool.parent, spool, spool / petask.ACTIVE, d):
        p.chmod(0o755)
    if master_gid is not None:
        (d / "addgrpid").write_text(f"{master_gid}\n")
    for name, gid in tasks:
        (d / name).mkdir(mode=0o755)
        (d / name / "addgrpid").write_text(f"{gid}\n")
    return spool, d


def test_task_groups_are_the_masters_and_each_pe_tasks(tmp_path):
    spool, _ = _spool(tmp_path, tasks=(("1.vm", 65400), ("2.vm", 65401)))
    _spool(tmp_path / "other", job="7", master_gid=30000)
    assert petask.task_groups(str(spool), "301536") == {20000, 65400, 65401}
    assert petask.task_groups(str(spool), "7") == set()          # not on this host
    with pytest.raises(ValueError):
        petask.task_groups(str(spool), "../301536")
    other = spool / petask.ACTIVE / "301536.2"   # another task of an array job proves nothing of this one
    other.mkdir(mode=0o755)
    (other / "addgrpid").write_text("30001\n")
    assert petask.task_groups(str(spool), "301536", "2") == {30001}
    assert 30001 not in petask.task_groups(str(spool), "301536")


def test_records_a_user_could_have_written_or_linked_are_ignored(tmp_path):
    spool, d = _spool(tmp_path)
    os.chown(d / "1.vm" / "addgrpid", 1234, 1234)                # not execd's
    assert petask.task_groups(str(spool), "301536") == {20000}
    (d / "addgrpid").chmod(0o666)                                # writable by anyone
    assert petask.task_groups(str(spool), "301536") == set()
    (d / "addgrpid").unlink()
    (d / "addgrpid").symlink_to(tmp_path / "forged")
    (tmp_path / "forged").write_text("0\n")
    assert petask.task_groups(str(spool), "301536") == set()
    (spool / petask.ACTIVE).chmod(0o777)                         # a spool anyone may write
    assert petask.task_groups(str(spool), "301536") == set()


def test_only_a_process_holding_a_tasks_group_is_the_jobs(tmp_path):
    spool, _ = _spool(tmp_path, tasks=(("1.vm", 65400),))
    holder = subprocess.Popen([sys.executable, "-c", "import os, sys; os.setgroups([65400]); "
                               "os.setgid(1234); os.setuid(1234); sys.stdin.read()"], stdin=subprocess.PIPE)
    other = subprocess.Popen([sys.executable, "-c", "import os, sys; os.setgroups([1234]); "
                              "os.setgid(1234); os.setuid(1234); sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        for _ in range(100):   # until both have dropped to the user
            if petask.process_groups(holder.pid) == {65400} and petask.process_groups(other.pid) == {1234}:
                break
            time.sleep(0.05)
        assert petask.is_task_of(holder.pid, "301536", str(spool))
        assert not petask.is_task_of(other.pid, "301536", str(spool))
        assert not petask.is_task_of(holder.pid, "301537", str(spool))
    finally:
        for p in (holder, other):
            p.communicate(b"")
    assert petask.process_groups(holder.pid) == set()            # gone


def test_pe_settings_reads_the_rule_and_whether_slaves_are_controlled(monkeypatch):
    answers = {("qconf", "-spl"): "make\nmpi\nsmp\n",
               ("qconf", "-sp", "mpi"): "pe_name mpi\nallocation_rule $round_robin\ncontrol_slaves TRUE\n",
               ("qconf", "-sp", "make"): "pe_name make\nallocation_rule $fill_up\ncontrol_slaves FALSE\n"}
    monkeypatch.setattr(facts, "run", lambda *argv, check=True: answers[argv])
    assert facts.pe_settings("m*") == {"make": {"allocation_rule": "$fill_up", "control_slaves": "FALSE"},
                                       "mpi": {"allocation_rule": "$round_robin", "control_slaves": "TRUE"}}
    with pytest.raises(RuntimeError, match="not a parallel environment name"):
        facts.pe_settings("mpi;reboot")


def test_the_spool_a_task_names_is_only_taken_in_execds_shape(tmp_path):
    def claimed(value):
        p = subprocess.Popen(["/bin/sleep", "30"], env={"SGE_JOB_SPOOL_DIR": value})
        try:
            for _ in range(200):   # until it has exec'd (before, its environment is this process's)
                if open(f"/proc/{p.pid}/cmdline", "rb").read().startswith(b"/bin/sleep"):
                    break
                time.sleep(0.01)
            return petask.claimed_spool(p.pid, "301536")
        finally:
            p.kill()
            p.wait()

    spool, d = _spool(tmp_path)
    assert claimed(f"{d}/1.vm") == str(spool)
    for bad in (f"{spool}/active_jobs/301537.1/1.vm", str(d), f"{spool}/../vm/active_jobs/301536.1/1.vm",
                f"{str(d)[1:]}/1.vm", f"{spool}/jobs/301536.1/1.vm", f"{spool}/active_jobs/301536.2/1.vm"):
        assert claimed(bad) is None, bad
    # a path through a link or a dir a user could write is never taken: its owner could swap it later
    user_dir = tmp_path / "home"
    user_dir.mkdir(mode=0o777)
    user_dir.chmod(0o777)
    (user_dir / "link").symlink_to(spool)
    assert claimed(f"{user_dir}/link/active_jobs/301536.1/1.vm") is None
    d.chmod(0o777)
    assert claimed(f"{d}/1.vm") is None


QSTAT_J = ("job_number:                 301536\nowner:                      vmwrapuser\n"
           "sge_o_home:                 /home/vmwrapuser\ncwd:                        /work/t1\n"
           "hard resource_list:         h_vmem=256M\nenv_list:                   owner: root\n"
           "context:                    vmwrap_image=busybox,vmwrap_memory=192\n")


def test_a_slave_hosts_vm_is_its_tasks_run_sized_by_qmaster_and_runs_while_execd_keeps_that_runs_dir(
        tmp_path, monkeypatch, test_user):
    """GridEngine.peer_job: the caller must hold a group execd gave a task in that run's dir, run as
    the uid asking, which must own the job; the id names the run exactly once (123, or 123.4 for an
    array task); the VM's hosts are in the one order all hosts compute, its size qmaster's. Its look
    says running while execd keeps that run's dir, and not once execd removed it."""
    import socket

    from vmwrap.config import Settings
    from vmwrap.errors import UserError
    from vmwrap_plugins.sge import hooks

    spool, d = _spool(tmp_path, tasks=(("1.vm", 65400),))
    me = socket.gethostname().split(".")[0]
    monkeypatch.setattr(hooks, "qstat_job", lambda jid: QSTAT_J)
    monkeypatch.setattr(facts, "job_allocation", lambda job, task=None: [("zeta", 1), (me, 2), ("alpha", 1)])
    monkeypatch.setattr(hooks, "host_addresses", lambda hosts: [f"10.0.0.{i}" for i, _ in enumerate(hosts)])
    task = subprocess.Popen([sys.executable, "-c", "import os, sys; os.setgroups([65400]); "
                             "os.setgid(1234); os.setuid(1234); sys.stdin.read()"], stdin=subprocess.PIPE,
                            env={"SGE_JOB_SPOOL_DIR": f"{d}/1.vm"})
    try:
        for _ in range(100):
            if petask.process_groups(task.pid) == {65400}:
                break
            time.sleep(0.05)
        found = hooks.GridEngine().peer_job(Settings(), task.pid, 1234, "301536")
        for job_id, uid, said in (("301536.1", 1234, "is not an array job"),
                                  ("301536.", 1234, "not a Grid Engine job id"),
                                  ("301536", 1235, "no task of job"), ("301537", 1234, "no task of job")):
            with pytest.raises(UserError, match=said):
                hooks.GridEngine().peer_job(Settings(), task.pid, uid, job_id)
    finally:
        task.communicate(b"")
    job = found.job
    assert (job.user, job.uid, job.cpus, job.memory_mib, job.image, job.work_dir) == \
        ("vmwrapuser", 1234, 2, 512, "busybox", "/work/t1")
    assert job.nodes.nodes == ("zeta", "alpha", me) and job.nodes.index == 2   # the master, then by name
    assert directives.parse(job.script).memory_mib == 192   # as the master's VM: the script's, by the JSV
    assert found.running()
    shutil.rmtree(d)
    assert not found.running()
