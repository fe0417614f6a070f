"""Issue 19 (Grid Engine tight integration, groundwork): a slave host's node agent tells a process
execd started for a job's task from any other, by execd's records only; and where qmaster runs a job
with how many slots per host. Layouts and output as probed on this machine's GE 8.1.9."""

import os
import shutil
import subprocess
import sys
import time

import pytest

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
  </queue_info>
  <job_info></job_info>
</job_info>
"""


def test_allocation_puts_the_master_first_and_sums_a_hosts_queue_instances():
    assert facts.allocation_from_xml(QSTAT_G_T, "301536") == [("sgehost2", 1), ("vm", 3)]
    assert facts.allocation_from_xml(QSTAT_G_T, "7") == [("vm", 1)]
    assert facts.allocation_from_xml(QSTAT_G_T, "8") == []


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

    assert claimed("/var/spool/gridengine/execd/vm/active_jobs/301536.1/1.vm") == "/var/spool/gridengine/execd/vm"
    for bad in ("/var/spool/x/active_jobs/301537.1/1.vm", "/var/spool/x/active_jobs/301536.1",
                "/var/spool/../x/active_jobs/301536.1/1.vm", "var/active_jobs/301536.1/1.vm",
                "/var/spool/x/jobs/301536.1/1.vm"):
        assert claimed(bad) is None, bad


def test_a_slave_hosts_vm_runs_while_execd_keeps_the_jobs_dir_of_that_run(tmp_path):
    """The agent's look for a slave host's VM (GridEngine.peer_running): the job's dir under execd's
    spool; once execd removed it (the job ended here), the VM goes."""
    from vmwrap.config import Settings
    from vmwrap_plugins.sge.hooks import GridEngine

    spool, d = _spool(tmp_path)
    p = subprocess.Popen(["/bin/sleep", "30"], env={"SGE_JOB_SPOOL_DIR": str(d / "1.vm")})
    try:
        for _ in range(200):
            if open(f"/proc/{p.pid}/cmdline", "rb").read().startswith(b"/bin/sleep"):
                break
            time.sleep(0.01)
        running = GridEngine().peer_running(Settings(), p.pid, "301536")
    finally:
        p.kill()
        p.wait()
    assert running()
    shutil.rmtree(d)
    assert not running()
