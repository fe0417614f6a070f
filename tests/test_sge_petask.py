"""Issue 19 (Grid Engine tight integration, groundwork): a slave host's node agent tells a process
execd started for a job's task from any other, by execd's records only; and where qmaster runs a job
with how many slots per host. Layouts and output as probed on this machine's GE 8.1.9."""

import os
from contextlib import contextmanager
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
      <state>r</state><JAT_start_time>2026-12-07T10:42:34</JAT_start_time>
      <queue_name>vmwrap.q@sgehost2</queue_name><master>MASTER</master><slots>1</slots>
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
    assert facts.start_from_xml(QSTAT_G_T, "301536") == "2026-12-07T10:42:34"
    assert facts.start_from_xml(QSTAT_G_T, "8") == ""


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


@contextmanager
def holding(groups):
    """A process of uid 1234 holding supplementary `groups`, as execd's shepherd leaves a task."""
    p = subprocess.Popen([sys.executable, "-c", f"import os, sys; os.setgroups({list(groups)!r}); "
                          "os.setgid(1234); os.setuid(1234); sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        for _ in range(100):   # until it has dropped to the user
            if petask.process_groups(p.pid) == set(groups):
                break
            time.sleep(0.05)
        yield p.pid
    finally:
        p.communicate(b"")


def test_only_a_process_holding_its_tasks_group_is_that_tasks(tmp_path):
    _, d = _spool(tmp_path, tasks=(("1.vm", 65400), ("2.vm", 65401)))
    with holding([65400]) as holder, holding([1234]) as other:
        assert petask.holds_group_of(holder, str(d / "1.vm"))
        assert not petask.holds_group_of(holder, str(d / "2.vm"))   # another task's group
        assert not petask.holds_group_of(other, str(d / "1.vm"))
        assert not petask.holds_group_of(holder, str(d / "3.vm"))   # no such task
    assert petask.process_groups(holder) == set()                  # gone
    assert not petask.holds_group_of(holder, str(d / "1.vm"))


def test_group_records_a_user_could_have_written_or_linked_are_ignored(tmp_path):
    _, d = _spool(tmp_path, tasks=(("1.vm", 65400),))
    rec = d / "1.vm" / "addgrpid"
    with holding([65400]) as pid:
        assert petask.holds_group_of(pid, str(d / "1.vm"))
        os.chown(rec, 1234, 1234)                                    # not execd's
        assert not petask.holds_group_of(pid, str(d / "1.vm"))
        os.chown(rec, 0, 0)
        rec.chmod(0o666)                                             # writable by anyone
        assert not petask.holds_group_of(pid, str(d / "1.vm"))
        rec.unlink()
        (tmp_path / "forged").write_text("65400\n")
        rec.symlink_to(tmp_path / "forged")                          # a link, even to the right number
        assert not petask.holds_group_of(pid, str(d / "1.vm"))
        rec.unlink()
        rec.write_text("65400 0\n")                                 # not one number
        assert not petask.holds_group_of(pid, str(d / "1.vm"))


def test_pe_settings_reads_the_rule_and_whether_slaves_are_controlled(monkeypatch):
    answers = {("qconf", "-spl"): "make\nmpi\nsmp\n",
               ("qconf", "-sp", "mpi"): "pe_name mpi\nallocation_rule $round_robin\ncontrol_slaves TRUE\n",
               ("qconf", "-sp", "make"): "pe_name make\nallocation_rule $fill_up\ncontrol_slaves FALSE\n"}
    monkeypatch.setattr(facts, "run", lambda *argv, check=True: answers[argv])
    assert facts.pe_settings("m*") == {"make": {"allocation_rule": "$fill_up", "control_slaves": "FALSE"},
                                       "mpi": {"allocation_rule": "$round_robin", "control_slaves": "TRUE"}}
    with pytest.raises(RuntimeError, match="not a parallel environment name"):
        facts.pe_settings("mpi;reboot")


@contextmanager
def under_shepherd(tmp_path, cwd, code="import sys; sys.stdin.read()", env=None):
    """A process (python running `code`) under a stand-in sge_shepherd (a shell by that name, root's,
    started in `cwd` as execd starts its shepherds); yields the process's pid."""
    shepherd = tmp_path / "bin" / petask.SHEPHERD
    if not shepherd.exists():
        shepherd.parent.mkdir(exist_ok=True)
        shutil.copy("/bin/sh", shepherd)
    sh = subprocess.Popen([str(shepherd), "-c", f"{sys.executable} -c '{code}'; :"], cwd=str(cwd),
                          stdin=subprocess.PIPE, env=env or {})
    try:
        child = None
        for _ in range(200):
            try:
                kids = open(f"/proc/{sh.pid}/task/{sh.pid}/children").read().split()
            except OSError:
                kids = []
            if kids and open(f"/proc/{kids[0]}/cmdline", "rb").read().startswith(sys.executable.encode()):
                child = int(kids[0])
                break
            time.sleep(0.01)
        assert child is not None, "the task did not start under its shepherd"
        yield child
    finally:
        sh.communicate(b"")


def test_which_task_a_process_is_comes_from_its_shepherds_dir_never_its_environment(tmp_path):
    spool, d = _spool(tmp_path)
    with under_shepherd(tmp_path, d / "1.vm", env={"SGE_JOB_SPOOL_DIR": "/elsewhere/active_jobs/301536.1/1.x"}) as pid:
        assert petask.shepherd_dir(pid) == f"{d}/1.vm"
        assert petask.task_spool(pid, "301536") == (str(spool), "vm")
        assert petask.task_spool(pid, "301537") is None and petask.task_spool(pid, "301536", "2") is None
    with under_shepherd(tmp_path, d) as pid:   # the master's dir: no pe task
        assert petask.task_spool(pid, "301536") is None
    plain = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE, cwd=d / "1.vm")
    try:
        assert petask.shepherd_dir(plain.pid) is None   # no shepherd above it: no task of anything
    finally:
        plain.communicate(b"")
    # a dir a user could write on the way is never taken: its owner could swap what is under it
    d.chmod(0o777)
    with under_shepherd(tmp_path, d / "1.vm") as pid:
        assert petask.task_spool(pid, "301536") is None


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
    monkeypatch.setattr(hooks, "host_addresses", lambda hosts: [f"10.0.0.{i}" for i, _ in enumerate(hosts)])
    monkeypatch.setattr(facts, "job_run", lambda job, task=None: ([("zeta", 1), (me, 2), ("alpha", 1)],
                                                                 "2026-12-07T10:42:34"))
    with under_shepherd(tmp_path, d / "1.vm", "import os, sys; os.setgroups([65400]); os.setgid(1234); "
                        "os.setuid(1234); sys.stdin.read()") as pid:
        for _ in range(100):
            if petask.process_groups(pid) == {65400}:
                break
            time.sleep(0.05)
        found = hooks.GridEngine().peer_job(Settings(), pid, 1234, "301536")
        for job_id, uid, said in (("301536.1", 1234, "is not an array job"),
                                  ("301536.", 1234, "not a Grid Engine job id"),
                                  ("301536", 1235, "no task of job"), ("301537", 1234, "no task of job")):
            with pytest.raises(UserError, match=said):
                hooks.GridEngine().peer_job(Settings(), pid, uid, job_id)
        monkeypatch.setattr(facts, "job_run", lambda job, task=None: ([(me, 2), ("alpha", 1)], "t"))
        with pytest.raises(UserError, match="master host: its VM is the prolog's"):
            hooks.GridEngine().peer_job(Settings(), pid, 1234, "301536")
    job = found.job
    assert (job.user, job.uid, job.cpus, job.memory_mib, job.image, job.work_dir) == \
        ("vmwrapuser", 1234, 2, 512, "busybox", "/work/t1")
    assert job.nodes.nodes == ("zeta", "alpha", me) and job.nodes.index == 2   # the master, then by name
    assert directives.parse(job.script).memory_mib == 192   # as the master's VM: the script's, by the JSV
    assert found.run.endswith(":2026-12-07T10:42:34")   # a run started again is another run
    assert found.running()
    shutil.rmtree(d)
    assert not found.running()
