"""The node agent's `peer` request (issue 19): on schedulers that run no hook on a job's other nodes
(Grid Engine's slave hosts), the job's first task there asks the agent to boot that node's VM. The
adapter says whether the caller is a task of a job its uid owns, and what the VM gets; the agent boots
once per job and never takes the node out for it."""

import shutil
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


def _job(job_id, uid=1234):
    return Job(job_id=job_id, scheduler="sge", user="u", uid=uid, gid=uid, work_dir="/tmp", script="")


@pytest.fixture
def booted(settings, monkeypatch):
    """lifecycle as the agent sees it: start makes the run dir, end removes it (both recorded)."""
    calls = []

    def start(s, job_id, read_job, scheduler, settle=0.0):
        calls.append(("start", read_job().job_id))
        rundir.path(s, job_id).mkdir(parents=True)
        return lifecycle.Outcome(lifecycle.Verdict.RUN, "", vm=True)

    def end(s, job_id, **kw):
        calls.append(("end", job_id))
        shutil.rmtree(rundir.path(s, job_id), ignore_errors=True)
        return lifecycle.Outcome(lifecycle.Verdict.RUN, "")

    monkeypatch.setattr(lifecycle, "start", start)
    monkeypatch.setattr(lifecycle, "end", end)
    monkeypatch.setattr(agent, "_watch_peer", lambda *a, **k: None)   # its own test below
    return calls


def test_the_vm_is_booted_once_for_a_task_of_the_job_and_never_for_another_caller(settings, monkeypatch, booted):
    asked = []

    def peer_job(s, pid, uid, job_id):
        asked.append((pid, uid, job_id))
        if pid != 4321:
            raise UserError(f"the caller is no task of job {job_id} on this host")
        return adapter.PeerRun(_job(job_id, uid), "run1", lambda: True)

    monkeypatch.setattr(adapter, "scheduler", lambda name: SimpleNamespace(name=name, peer_job=peer_job))
    with pytest.raises(UserError, match="no task of job 7"):
        agent.handle(settings, None, 1234, "peer", "7", 999)
    assert booted == [] and "7" not in agent._peer_locks   # a refused caller leaves nothing behind
    assert agent.handle(settings, None, 1234, "peer", "7", 4321) == {"changed": True}
    assert agent.handle(settings, None, 1234, "peer", "7", 4321) == {"changed": False}
    with pytest.raises(UserError, match="no task of job 7"):   # checked again once it runs
        agent.handle(settings, None, 1234, "peer", "7", 999)
    assert booted == [("start", "7")] and len(asked) == 4
    with pytest.raises(UserError, match="invalid job id"):
        agent.handle(settings, None, 1234, "peer", "../7", 4321)


def test_a_vm_of_an_earlier_run_of_the_job_goes_before_this_runs_boots(settings, monkeypatch, booted):
    """The job restarted on this node: its tasks never land in the earlier run's VM. A VM the agent
    did not boot for tasks (a prolog's) is never taken over."""
    run = ["run1"]
    monkeypatch.setattr(adapter, "scheduler", lambda name: SimpleNamespace(
        name=name, peer_job=lambda s, pid, uid, job_id: adapter.PeerRun(_job(job_id), run[0], lambda: True)))
    assert agent.handle(settings, None, 1234, "peer", "7", 1)["changed"]
    run[0] = "run2"
    assert agent.handle(settings, None, 1234, "peer", "7", 1)["changed"]
    assert booted == [("start", "7"), ("end", "7"), ("start", "7")]
    rundir.path(settings, "8").mkdir(parents=True)   # a VM of job 8 booted by its prolog
    with pytest.raises(UserError, match="job 8's VM on this node was not started for its tasks"):
        agent.handle(settings, None, 1234, "peer", "8", 1)


def test_a_vm_that_did_not_start_is_the_callers_error_not_the_nodes(settings, monkeypatch, booted):
    monkeypatch.setattr(adapter, "scheduler", lambda name: SimpleNamespace(
        name=name, peer_job=lambda *a: adapter.PeerRun(_job("8", 1), "r", lambda: True)))
    monkeypatch.setattr(lifecycle, "start", lambda *a, **k: lifecycle.Outcome(
        lifecycle.Verdict.NODE_FAULT, "libvirt refused", vm=True))
    with pytest.raises(UserError, match="job 8's VM on this node did not start: libvirt refused"):
        agent.handle(settings, None, 1, "peer", "8", 5)
    assert booted == [("end", "8")]   # what the failed start left goes now: no epilog will come


def test_the_vm_goes_once_the_scheduler_no_longer_runs_the_job_here_and_never_on_a_failed_look(settings, monkeypatch):
    """No epilog runs on such a node: the agent watches the adapter's look and ends the VM itself,
    only the VM of the run it watches."""
    import threading

    ended = []
    monkeypatch.setattr(lifecycle, "end", lambda s, job_id, **kw: ended.append((job_id, kw)) or
                        lifecycle.Outcome(lifecycle.Verdict.RUN, ""))
    looks = iter([True, OSError("qmaster unreachable"), True, False])

    def running():
        v = next(looks)
        if isinstance(v, Exception):
            raise v
        return v

    run_dir = rundir.path(settings, "9")
    run_dir.mkdir(parents=True)
    (run_dir / agent.PEER_RUN).write_text("run1")
    t = threading.Thread(target=agent._watch_peer, args=(settings, "sge", "9", "run1", running, 0.01))
    t.start()
    t.join(10)
    assert not t.is_alive() and ended == [("9", {"requeued": False, "restarts": 0, "scheduler": "sge"})]
    assert next(looks, "all used") == "all used"
    (run_dir / agent.PEER_RUN).write_text("run2")   # another run's VM took its place: left alone
    agent._watch_peer(settings, "sge", "9", "run1", lambda: False, 0.01)
    assert len(ended) == 1


def test_a_request_of_a_run_that_ended_meanwhile_touches_nothing(settings, monkeypatch, booted):
    """A task of run 1 that waited behind run 2's start must not end run 2's VM to boot its own."""
    rundir.path(settings, "7").mkdir(parents=True)
    (rundir.path(settings, "7") / agent.PEER_RUN).write_text("run2")
    monkeypatch.setattr(adapter, "scheduler", lambda name: SimpleNamespace(
        name=name, peer_job=lambda s, pid, uid, job_id: adapter.PeerRun(_job(job_id), "run1", lambda: False)))
    with pytest.raises(UserError, match="no longer runs this run on this node"):
        agent.handle(settings, None, 1234, "peer", "7", 1)
    assert booted == [] and (rundir.path(settings, "7") / agent.PEER_RUN).read_text() == "run2"


def test_a_restarted_agent_watches_the_vms_it_finds_again(settings, monkeypatch, booted):
    watched = []
    monkeypatch.setattr(agent, "_watch_peer", lambda s, sched, job_id, run, running: watched.append((job_id, run)))
    monkeypatch.setattr(adapter, "scheduler", lambda name: SimpleNamespace(
        name=name, peer_job=lambda s, pid, uid, job_id: adapter.PeerRun(_job(job_id), "run1", lambda: True)))
    assert agent.handle(settings, None, 1234, "peer", "7", 1)["changed"]
    for t in list(agent._peer_watchers.values()):
        t.join(5)
    agent._peer_watchers.clear()   # as after a restart of the agent: the VM runs, nobody watches it
    assert not agent.handle(settings, None, 1234, "peer", "7", 1)["changed"]
    for t in list(agent._peer_watchers.values()):
        t.join(5)
    assert watched == [("7", "run1"), ("7", "run1")]
