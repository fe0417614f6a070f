"""The core job lifecycle driven by a fake scheduler adapter: the policy every scheduler inherits.

No scheduler runs here; libvirt, QEMU and the checkpoint store are real (Slurm and Grid Engine run
the same lifecycle through their adapters in their own test modules)."""

from __future__ import annotations

import dataclasses
import os
import sqlite3

import pytest

from conftest import Site
from vmwrap import adapter, checkpoint, domain, lifecycle
from vmwrap.errors import UserError
from vmwrap.job import Job
from vmwrap.lifecycle import Verdict
from vmwrap.plan import Timing

pytestmark = pytest.mark.vm
HDR = "#!/bin/sh\n#VMWRAP --image=busybox\n"


class FakeScheduler:
    """A scheduler reduced to the adapter contract: facts handed in, node actions recorded."""

    name = "fake"
    root_env = ("FAKE_JOB_ID",)

    def __init__(self, job: Job | None = None, error: Exception | None = None, restarts: int = 0,
                 requeued: bool = False):
        self._job, self.error, self.restarts, self.requeued = job, error, restarts, requeued
        self.taken_out: list[str] = []

    def job_id(self, env) -> str:
        return env["FAKE_JOB_ID"]

    def job(self, env) -> Job | None:
        if self.error is not None:
            raise self.error
        return self._job

    def requeue_state(self, settings, env) -> tuple[bool, int]:
        return self.requeued, self.restarts

    def take_out(self, env, reason: str) -> None:
        self.taken_out.append(reason)

    def still_queued(self):
        return lambda j: False

    def planned_starts(self):
        return None

    def publish_cached(self, node, images):
        return None

    def reservations(self):
        return None   # no advance reservations: the gap planner has nothing to do

    def queue(self, settings, now):
        return []

    def plan_timing(self):
        return Timing(kill_s=0.0, pass_s=1.0, limit_unit_s=1.0)

    def set_time_limit(self, job, seconds) -> None:
        raise RuntimeError("the fake scheduler has no time limits")

    def vacate(self, job) -> None:
        raise RuntimeError("the fake scheduler cannot requeue")

    def render_config(self, settings, **options) -> str:
        return ""


@pytest.fixture
def lsite(tmp_path, appliance, virt_type):
    s = Site(tmp_path, appliance, virt_type, checkpoint_dir=str(tmp_path / "ckpt"),
             checkpoint_key_file=str(tmp_path / "ckpt.key"))
    checkpoint.init_store(tmp_path / "ckpt", checkpoint.keygen(tmp_path / "ckpt.key"))
    yield s
    conn = domain.connect("qemu:///system")
    for name in conn.listDomainsID() and [conn.lookupByID(i).name() for i in conn.listDomainsID()]:
        if name.startswith("vmwrap-lc"):
            domain.destroy(conn, name)
    conn.close()


def job(workdir, job_id: str, restarts: int = 0, lost: str | None = None) -> Job:
    os.chown(workdir, 1234, 1234)
    return Job(job_id=job_id, scheduler="fake", user="vmwrapuser", uid=1234, gid=1234, work_dir=str(workdir),
               script=HDR + "sleep 600\n", image="busybox", restart_count=restarts, on_lost_checkpoint=lost)


def events(settings, job_id: str) -> list[tuple[str, str]]:
    with sqlite3.connect(settings.ledger_path) as db:
        return db.execute("select event, coalesce(json_extract(detail, '$.kind'), '') from events where job_id=?",
                          (job_id,)).fetchall()


def test_installed_adapters_and_the_fake_satisfy_the_contract():
    found = adapter.schedulers()
    assert {"slurm", "sge"} <= set(found)
    for a in [*found.values(), FakeScheduler()]:
        assert isinstance(a, adapter.Scheduler), a


def test_a_users_mistake_fails_the_job_and_keeps_the_node(lsite):
    fake = FakeScheduler(error=UserError("unknown image 'nope'"))
    out = lifecycle.prolog(fake, lsite.settings(), {"FAKE_JOB_ID": "lc-user"})
    assert out.verdict is Verdict.JOB_FAILED and "unknown image" in out.reason
    assert fake.taken_out == []
    assert "unknown image" in (lsite.state / "jobs" / "lc-user" / "error").read_text()


def test_an_unforeseen_exception_is_the_jobs_failure_with_its_traceback_in_the_ledger(lsite):
    fake = FakeScheduler(error=KeyError("SOME_FIELD"))
    out = lifecycle.prolog(fake, lsite.settings(), {"FAKE_JOB_ID": "lc-bug"})
    assert out.verdict is Verdict.JOB_FAILED and "internal error" in out.reason and fake.taken_out == []
    assert ("failed", "internal") in events(lsite.settings(), "lc-bug")


def test_no_vm_requested_runs_the_job_as_usual(lsite):
    out = lifecycle.prolog(FakeScheduler(job=None), lsite.settings(), {"FAKE_JOB_ID": "lc-bare"})
    assert out.verdict is Verdict.RUN and not out.vm


def test_libvirt_unreachable_is_a_node_fault_and_takes_the_node_out(tmp_path, appliance, virt_type, workdir):
    s = Site(tmp_path, appliance, virt_type, libvirt_uri="qemu+unix:///system?socket=/nonexistent/sock")
    fake = FakeScheduler(job=job(workdir, "lc-node"))
    out = lifecycle.prolog(fake, s.settings(), {"FAKE_JOB_ID": "lc-node"})
    assert out.verdict is Verdict.NODE_FAULT and "libvirt" in out.reason
    assert len(fake.taken_out) == 1 and fake.taken_out[0].startswith("vmwrap: ") and "libvirt" in fake.taken_out[0]
    assert not (s.state / "jobs" / "lc-node").exists()   # nothing left that looks like a running VM


def test_requeue_saves_the_restart_restores_and_the_final_end_deletes_the_checkpoint(lsite, workdir):
    s, env = lsite.settings(), {"FAKE_JOB_ID": "lc-save"}
    store = checkpoint.Store(s.checkpoint_dir, s.checkpoint_key_file)
    conn = domain.connect(s.libvirt_uri)
    try:
        first = lifecycle.prolog(FakeScheduler(job=job(workdir, "lc-save")), s, env)
        assert first.verdict is Verdict.RUN and first.facts == {"restored": False}
        assert store.ran("lc-save") and not domain.is_gone(conn, "vmwrap-lc-save")

        out = lifecycle.epilog(FakeScheduler(requeued=True, restarts=1), s, env)
        assert out.verdict is Verdict.RUN and out.facts["saved"] is True
        assert store.exists("lc-save") and domain.is_gone(conn, "vmwrap-lc-save")

        again = lifecycle.prolog(FakeScheduler(job=job(workdir, "lc-save", restarts=1)), s, env)
        assert again.verdict is Verdict.RUN and again.facts["restored"] is True
        assert not domain.is_gone(conn, "vmwrap-lc-save")

        final = lifecycle.epilog(FakeScheduler(requeued=False, restarts=1), s, env)
        assert final.verdict is Verdict.RUN
        assert domain.is_gone(conn, "vmwrap-lc-save") and not store.exists("lc-save") and not store.ran("lc-save")
        assert [e for e, _ in events(s, "lc-save") if e in ("saved", "restored")] == ["saved", "restored"]
    finally:
        domain.destroy(conn, "vmwrap-lc-save")
        conn.close()


def test_a_node_that_cannot_restore_the_job_leaves_its_checkpoint_to_the_next(lsite, workdir):
    """A restart that fails on a node as a node fault (the scheduler takes the node out and starts the
    job elsewhere) must not cost the job its checkpoint: that node's epilog, which has no VM of the job
    and no sign it was requeued, deletes nothing; the next node restores."""
    s, env = lsite.settings(), {"FAKE_JOB_ID": "lc-move"}
    broken = dataclasses.replace(s, state_dir=str(lsite.base / ("d" * 80)))   # too deep for a VM's sockets
    store = checkpoint.Store(s.checkpoint_dir, s.checkpoint_key_file)
    conn = domain.connect(s.libvirt_uri)
    try:
        assert lifecycle.prolog(FakeScheduler(job=job(workdir, "lc-move")), s, env).verdict is Verdict.RUN
        assert lifecycle.epilog(FakeScheduler(requeued=True, restarts=1), s, env).facts["saved"] is True
        fake = FakeScheduler(job=job(workdir, "lc-move", restarts=1))
        out = lifecycle.prolog(fake, broken, env)
        assert out.verdict is Verdict.NODE_FAULT and "too deep" in out.reason and fake.taken_out, out
        lifecycle.epilog(FakeScheduler(requeued=False, restarts=1), broken, env)   # what the scheduler runs next
        assert store.exists("lc-move") and store.ran("lc-move")
        again = lifecycle.prolog(FakeScheduler(job=job(workdir, "lc-move", restarts=1)), s, env)
        assert again.verdict is Verdict.RUN and again.facts["restored"] is True, again
    finally:
        lifecycle.epilog(FakeScheduler(), s, env)
        domain.destroy(conn, "vmwrap-lc-move")
        conn.close()


@pytest.mark.parametrize("policy", ["fail", "restart"])
def test_a_lost_checkpoint_follows_the_jobs_policy(policy, lsite, workdir):
    s, env = lsite.settings(), {"FAKE_JOB_ID": f"lc-lost-{policy}"}
    store = checkpoint.Store(s.checkpoint_dir, s.checkpoint_key_file)
    store.mark_ran(f"lc-lost-{policy}")   # it ran in a VM before, but no checkpoint survived
    store.mark_lost(f"lc-lost-{policy}", "saving its VM on n1 failed: disk full")
    out = lifecycle.prolog(FakeScheduler(job=job(workdir, f"lc-lost-{policy}", restarts=1, lost=policy)), s, env)
    try:
        if policy == "fail":
            assert out.verdict is Verdict.JOB_FAILED and "--on-lost-checkpoint=restart" in out.reason, out
            assert "disk full" in out.reason
        else:
            assert out.verdict is Verdict.RUN and out.facts == {"restored": False}, out
            assert "starting the job again" in (s.jobs_dir / f"lc-lost-{policy}" / "notice").read_text()
    finally:
        lifecycle.epilog(FakeScheduler(), s, env)


def test_a_first_start_drops_an_older_jobs_checkpoint_under_the_same_id(lsite, workdir):
    s, env = lsite.settings(), {"FAKE_JOB_ID": "lc-reused"}
    store = checkpoint.Store(s.checkpoint_dir, s.checkpoint_key_file)
    store.mark_ran("lc-reused")
    store.mark_lost("lc-reused", "an older job's")
    try:
        out = lifecycle.prolog(FakeScheduler(job=job(workdir, "lc-reused", restarts=0)), s, env)
        assert out.verdict is Verdict.RUN
        assert not (store.root / "lc-reused.lost").exists()
    finally:
        lifecycle.epilog(FakeScheduler(), s, env)
