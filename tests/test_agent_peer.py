"""The node agent's `peer` request (issue 19): on schedulers that run no hook on a job's other nodes
(Grid Engine's slave hosts), the job's first task there asks the agent to boot that node's VM. The
adapter says whether the caller is a task of a job its uid owns, and what the VM gets; the agent boots
once per job and never takes the node out for it."""

from types import SimpleNamespace

import pytest

from vmwrap import adapter, agent, lifecycle, rundir
from vmwrap.config import Settings
from vmwrap.errors import UserError
from vmwrap.job import Job


@pytest.fixture
def settings(tmp_path):
    return Settings(state_dir=str(tmp_path / "state"), scheduler="sge")


def test_a_scheduler_that_starts_every_nodes_vm_itself_refuses(settings, monkeypatch):
    monkeypatch.setattr(adapter, "scheduler", lambda name: SimpleNamespace(name=name))
    with pytest.raises(UserError, match="starts each node's VM of a job itself"):
        agent.handle(settings, None, 1234, "peer", "7", 4321)


def test_the_vm_is_booted_once_for_a_task_of_the_job_and_never_for_another_caller(settings, monkeypatch):
    asked, started = [], []

    def peer_job(s, pid, uid, job_id):
        asked.append((pid, uid, job_id))
        if pid != 4321:
            raise UserError(f"the caller is no task of job {job_id} on this host")
        return Job(job_id=job_id, scheduler="sge", user="u", uid=uid, gid=uid, work_dir="/tmp", script="")

    def start(s, job_id, read_job, scheduler, settle=0.0):
        started.append(read_job().job_id)
        rundir.path(s, job_id).mkdir(parents=True)
        return lifecycle.Outcome(lifecycle.Verdict.RUN, "", vm=True)

    monkeypatch.setattr(adapter, "scheduler", lambda name: SimpleNamespace(
        name=name, peer_job=peer_job, peer_running=lambda *a: lambda: True))
    monkeypatch.setattr(lifecycle, "start", start)
    with pytest.raises(UserError, match="no task of job 7"):
        agent.handle(settings, None, 1234, "peer", "7", 999)
    assert started == []
    assert agent.handle(settings, None, 1234, "peer", "7", 4321) == {"changed": True}
    assert agent.handle(settings, None, 1234, "peer", "7", 4321) == {"changed": False}
    with pytest.raises(UserError, match="no task of job 7"):   # checked again once it runs
        agent.handle(settings, None, 1234, "peer", "7", 999)
    assert started == ["7"] and len(asked) == 4
    with pytest.raises(UserError, match="invalid job id"):
        agent.handle(settings, None, 1234, "peer", "../7", 4321)


def test_a_vm_that_did_not_start_is_the_callers_error_not_the_nodes(settings, monkeypatch):
    job = Job(job_id="8", scheduler="sge", user="u", uid=1, gid=1, work_dir="/tmp", script="")
    monkeypatch.setattr(adapter, "scheduler",
                        lambda name: SimpleNamespace(name=name, peer_job=lambda *a: job,
                                                     peer_running=lambda *a: lambda: True))
    monkeypatch.setattr(lifecycle, "start", lambda *a, **k: lifecycle.Outcome(
        lifecycle.Verdict.NODE_FAULT, "libvirt refused", vm=True))
    with pytest.raises(UserError, match="job 8's VM on this node did not start: libvirt refused"):
        agent.handle(settings, None, 1, "peer", "8", 5)


def test_the_vm_goes_once_the_scheduler_no_longer_runs_the_job_here_and_never_on_a_failed_look(settings, monkeypatch):
    """No epilog runs on such a node: the agent watches the adapter's look and ends the VM itself."""
    import threading

    ended = []
    monkeypatch.setattr(lifecycle, "end", lambda s, job_id, **kw: ended.append((job_id, kw)))
    looks = iter([True, OSError("qmaster unreachable"), True, False])

    def running():
        v = next(looks)
        if isinstance(v, Exception):
            raise v
        return v

    t = threading.Thread(target=agent._watch_peer, args=(settings, "sge", "9", running, 0.01))
    t.start()
    t.join(10)
    assert not t.is_alive() and ended == [("9", {"requeued": False, "restarts": 0, "scheduler": "sge"})]
    assert next(looks, "all used") == "all used"
