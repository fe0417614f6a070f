"""The gap planner's pass (vmwrap.plan.plan_pass) on hand-made cluster states: no scheduler needed.

The same state machine drives `vmwrap plan` on Slurm (tests/test_slurm_plan.py proves it there).
"""

from __future__ import annotations

import json
import math

import pytest

from vmwrap.plan import Policy, QueuedJob, Reservation, SaveModel, plan_pass

NODES = frozenset({"c1", "c2", "c3"})
AR = Reservation("ar", start=1000.0, end=1600.0, nodes=NODES)
# save budget for 256 MiB: (10 + 256/128) * 1.5 + 5 = 23 s
POL = Policy(model=SaveModel(128.0, 10.0, 0.5, 5.0), setup_s=10, stop_s=20, slack_s=10, min_run_s=60)


def job(jid="1", state="pending", limit=3600.0, **kw) -> QueuedJob:
    base = dict(job=jid, user="u", partition="p", nodes=1, limit_s=limit, mem_mb=256.0, saveable=True,
                state=state, idle=NODES if state == "pending" else frozenset())
    base.update(kw)
    return QueuedJob(**base)


def kinds(acts, jid="1"):
    return [(a.kind, a.seconds) for a in acts if a.job == jid and a.kind != "note"]


def test_head_gets_a_limit_that_ends_before_the_reservation_then_is_requeued_and_gets_the_rest():
    st: dict = {}
    acts = plan_pass(0.0, [AR], [job()], POL, st)
    # gap closes at 1000 - 20 (the scheduler's own kill must be over by the start); whole minutes
    assert kinds(acts) == [("limit", 960.0)]
    # the requeue must come before the scheduler's own kill at the lowered limit
    assert st["1"]["phase"] == "offered" and st["1"]["save_at"] == 960 - 10


def test_saved_when_the_budget_says_requeued_then_given_the_rest_of_its_time():
    pol = Policy(model=SaveModel(8.0, 10.0, 0.5, 5.0), setup_s=10, stop_s=20, slack_s=10)   # 68 s save
    st: dict = {}
    assert kinds(plan_pass(0.0, [AR], [job()], pol, st)) == [("limit", 960.0)]
    assert kinds(plan_pass(5.0, [AR], [job(state="running", start=3.0)], pol, st)) == []
    assert st["1"]["phase"] == "running"
    assert kinds(plan_pass(931.0, [AR], [job(state="running", start=3.0)], pol, st)) == []
    acts = plan_pass(932.0, [AR], [job(state="running", start=3.0)], pol, st)
    assert kinds(acts) == [("requeue", 0.0)] and "saving its VM now (68s before)" in acts[0].reason
    assert kinds(plan_pass(934.0, [AR], [job(state="other")], pol, st)) == []      # completing
    acts = plan_pass(936.0, [AR], [job(eligible=False)], pol, st)
    # ran 929 s: 15 whole minutes are charged, the rest of its hour is given back
    assert kinds(acts) == [("limit", 3600.0 - 15 * 60)]
    assert st["1"]["phase"] == "done"
    assert kinds(plan_pass(1700.0, [], [job(state="running", start=1650.0)], pol, st)) == []
    assert st == {}


def test_the_save_must_fit():
    slow = Policy(model=SaveModel(0.5), setup_s=10, stop_s=20, slack_s=10, min_run_s=60)   # 512 s save
    st: dict = {}
    acts = plan_pass(500.0, [AR], [job()], slow, st)
    assert kinds(acts) == [] and st == {}
    assert any("needs" in a.reason and "save" in a.reason for a in acts)


def test_not_started_in_time_the_limit_goes_back_but_a_late_start_is_still_saved():
    st: dict = {}
    plan_pass(0.0, [AR], [job()], POL, st)
    acts = plan_pass(11.0, [AR], [job()], POL, st)
    assert kinds(acts) == [("limit", 3600.0)] and st["1"]["phase"] == "withdrawn"
    # the scheduler started it at the last moment anyway: it is adopted and saved in time
    plan_pass(12.0, [AR], [job(state="running", start=11.5)], POL, st)
    assert st["1"]["phase"] == "running"
    assert kinds(plan_pass(950.0, [AR], [job(state="running", start=11.5)], POL, st)) == [("requeue", 0.0)]


def test_who_is_never_put_into_a_gap():
    cases = {
        "not in a saveable VM": job(saveable=False),
        "partition p is not planned": job(),
        "user u is not planned": job(),
        "its VMs span several nodes and are not saved": job(nodes=2),
        "needs 1 nodes, 0 idle": job(idle=frozenset()),
        "not eligible": job(eligible=False),
        "ends before ar as it is": job(limit=600.0),
        "outside every reservation": job(idle=NODES | {"c9"}),
    }
    cases["over the 900s cap: left to the scheduler's own backfilling"] = job()
    pols = {"partition p is not planned": Policy(model=POL.model, partitions=frozenset({"q"})),
            "user u is not planned": Policy(model=POL.model, users=frozenset({"v"})),
            "over the 900s cap: left to the scheduler's own backfilling": Policy(model=POL.model, max_gap_s=900)}
    for why, j in cases.items():
        st: dict = {}
        acts = plan_pass(0.0, [AR], [j], pols.get(why, POL), st)
        assert kinds(acts) == [] and st == {}, why
        assert any(why in a.reason for a in acts), (why, [a.reason for a in acts])


def test_disabled_offers_nothing_but_still_saves_a_job_already_in_a_gap():
    st: dict = {}
    plan_pass(0.0, [AR], [job()], POL, st)
    plan_pass(5.0, [AR], [job(state="running", start=3.0)], POL, st)
    off = Policy(model=POL.model, enabled=False, setup_s=10, stop_s=20, slack_s=10)
    assert kinds(plan_pass(950.0, [AR], [job(state="running", start=3.0)], off, st)) == [("requeue", 0.0)]
    assert kinds(plan_pass(0.0, [AR], [job("2")], off, {}), "2") == []


def test_one_offer_at_a_time_in_priority_order_and_a_node_cap():
    st: dict = {}
    acts = plan_pass(0.0, [AR], [job("1"), job("2")], POL, st)
    assert kinds(acts, "1") == [("limit", 960.0)] and kinds(acts, "2") == []
    capped = Policy(model=POL.model, max_nodes=1, setup_s=10, stop_s=20, slack_s=10, min_run_s=60)
    acts = plan_pass(5.0, [AR], [job("1", state="running", start=3.0), job("2")], capped, st)
    assert kinds(acts, "2") == [] and any("cap of 1 nodes" in a.reason for a in acts)
    acts = plan_pass(6.0, [AR], [job("1", state="running", start=3.0), job("2")], POL, st)
    assert kinds(acts, "2") == [("limit", 960.0)]


def test_unlimited_jobs_get_unlimited_back():
    st: dict = {}
    plan_pass(0.0, [AR], [job(limit=math.inf)], POL, st)
    plan_pass(5.0, [AR], [job(state="running", start=3.0)], POL, st)
    plan_pass(950.0, [AR], [job(state="running", start=3.0)], POL, st)
    acts = plan_pass(955.0, [AR], [job(limit=960.0)], POL, st)
    assert kinds(acts) == [("limit", math.inf)]


# --- `vmwrap plan` on Slurm: users' job records never fail a planner pass (issue 14) -----------------------

def _fake_slurm(monkeypatch, squeue_json: str, calls: list):
    from vmwrap_plugins.slurm import planner

    def run(*argv):
        calls.append(argv)
        if argv[:2] == ("squeue", "--json"):
            return squeue_json
        if argv[:3] == ("scontrol", "show", "config"):
            return "KillWait                = 30 sec\nSchedulerParameters     = bf_interval=2\n"
        if argv[:3] == ("scontrol", "show", "reservation"):
            return ("ReservationName=ar StartTime=2030-01-01T00:16:40 EndTime=2030-01-01T00:26:40 "
                    "Nodes=c1 Users=alice\n")
        if argv[:3] == ("scontrol", "show", "hostnames"):
            return "c1\n"
        if argv[0] == "sinfo":
            return "c1 debug*\n"
        return ""
    monkeypatch.setattr(planner, "_run", run)
    return planner


def _sq(**kw):
    base = {"job_id": 5, "job_state": "PENDING", "comment": "", "partition": "debug", "priority": 100,
            "user_name": "bob", "node_count": 1, "time_limit": 60, "eligible_time": 0, "start_time": 0}
    base.update(kw)
    return base


def test_a_planner_pass_survives_what_users_put_in_their_jobs(monkeypatch, tmp_path):
    from vmwrap.config import Settings

    huge = "9" * 5000
    jobs = [
        _sq(job_id=1, comment=f"vmwrap:image=busybox,memory={huge},cpus=,lost="),   # int() would raise
        _sq(job_id=2, comment="vmwrap:image=busybox,memory=,cpus=,lost=bogus"),
        _sq(job_id=3, priority="high"),                                              # not a number
        _sq(job_id=4, partition={"x": 1}),                                           # not a string
        {"job_state": "PENDING"},                                                    # no id
        _sq(job_id=6, comment="vmwrap:image=busybox,memory=300,cpus=,lost="),
    ]
    planner = _fake_slurm(monkeypatch, json.dumps({"jobs": jobs}), [])
    s = Settings(state_dir=str(tmp_path), catalog=str(tmp_path / "none.toml"), checkpoint_dir=str(tmp_path / "c"))
    got = {q.job: q for q in planner.jobs(s, {"debug": {"c1"}}, 0.0)}
    assert set(got) == {"1", "2", "3", "6"}
    assert not got["1"].saveable and not got["2"].saveable and got["6"].saveable  # malformed: a plain job
    assert got["6"].mem_mb == 300.0 and not got["3"].eligible
    planner.Planner(s, dry_run=True).pass_once(now=0.0)   # the whole pass, as `vmwrap plan --once` runs it


def test_a_planner_pass_with_broken_squeue_output_says_so(monkeypatch, tmp_path):
    from vmwrap.config import Settings

    planner = _fake_slurm(monkeypatch, '{"jobs": [' + "1" * 5000 + "]}", [])
    with pytest.raises(RuntimeError, match="squeue --json: not JSON"):
        planner.jobs(Settings(catalog=str(tmp_path / "none.toml")), {}, 0.0)


# --- `vmwrap sge plan`/`prestage` on what users put in their Grid Engine jobs (issue 15) ----------------

def _ge_job(num, state="qw", name="j", hard=(), queue="vmwrap.q"):
    reqs = "".join(f'<hard_request name="{k}" resource_contribution="0.0">{v}</hard_request>' for k, v in hard)
    return (f'<job_list state="pending"><JB_job_number>{num}</JB_job_number><JAT_prio>0.5</JAT_prio>'
            f"<JB_name>{name}</JB_name><JB_owner>bob</JB_owner><state>{state}</state>"
            f"<JB_submission_time>2030-01-01T00:00:00</JB_submission_time><queue_name></queue_name>"
            f"<slots>1</slots>{reqs}<hard_req_queue>{queue}</hard_req_queue></job_list>")


def _ge_detail(num, context=(), hard=()):
    ctx = "".join(f"<context_list><VA_variable>{k}</VA_variable><VA_value>{v}</VA_value></context_list>"
                  for k, v in context)
    req = "".join(f"<qstat_l_requests><CE_name>{k}</CE_name><CE_valtype>3</CE_valtype><CE_stringval>{v}"
                  f"</CE_stringval></qstat_l_requests>" for k, v in hard)
    return (f"<element><JB_job_number>{num}</JB_job_number><JB_ar>0</JB_ar><JB_ja_tasks><JATASK:       {num}.>"
            f"<JAT_status>0</JAT_status></JATASK:       {num}.></JB_ja_tasks><JB_env_list><job_sublist>"
            f"<VA_variable>vmwrap_image</VA_variable><VA_value>from-the-env</VA_value></job_sublist></JB_env_list>"
            f"<JB_hard_resource_list>{req}</JB_hard_resource_list><JB_context>{ctx}</JB_context></element>")


def _fake_ge(monkeypatch, jobs: list[str], details: list[str], calls: list):
    from vmwrap_plugins.sge import facts

    def run(*argv, check=True):
        calls.append(argv)
        if argv[:4] == ("qstat", "-xml", "-r", "-u"):
            return f"<?xml version='1.0'?><job_info><queue_info></queue_info><job_info>{''.join(jobs)}</job_info></job_info>"
        if argv[:3] == ("qstat", "-xml", "-j"):
            return f"<?xml version='1.0'?><detailed_job_info><djob_info>{''.join(details)}</djob_info></detailed_job_info>"
        if argv[:3] == ("qstat", "-xml", "-f"):
            return ("<job_info><queue_info><Queue-List><name>vmwrap.q@n1</name><slots_used>0</slots_used>"
                    "<slots_resv>0</slots_resv><slots_total>1</slots_total></Queue-List></queue_info></job_info>")
        if argv[0] == "qrstat":
            return "<qrstat></qrstat>"
        if argv[:2] == ("qconf", "-ssconf"):
            return "schedule_interval                 0:0:1\nparams                            MONITOR=1,DURATION_OFFSET=5\n"
        if argv[:2] == ("qconf", "-sconf"):
            return "load_report_time             00:00:05\n"
        return ""
    monkeypatch.setattr(facts, "run", run)
    return facts


def test_a_grid_engine_planner_pass_survives_what_users_put_in_their_jobs(monkeypatch, tmp_path):
    from vmwrap.config import Settings
    from vmwrap_plugins.sge.hooks import GridEngine

    jobs = [_ge_job(1, hard=[("h_rt", "9" * 5000)]),                 # not a time GE prints
            _ge_job(2, hard=[("h_vmem", "lots")]),                     # not a memory size
            _ge_job(3, name="a&lt;b&amp;c"),                            # escaped by qstat: just a name
            _ge_job("x1"),                                             # not a job number
            _ge_job(4, hard=[("h_rt", "600"), ("h_vmem", "1G")]),
            _ge_job(5)]
    details = [_ge_detail(1, [("vmwrap_image", "busybox")], [("h_rt", "9" * 5000)]),
               _ge_detail(2, [("vmwrap_image", "busybox")], [("h_vmem", "lots")]),
               _ge_detail(3, [("vmwrap_image", "../etc")]),            # not an image name: a plain job
               _ge_detail(4, [("vmwrap_image", "busybox")], [("h_rt", "600"), ("h_vmem", "1G")]),
               _ge_detail(5, [("vmwrap_image", "a"), ("vmwrap_image", "b")])]   # two images: plain
    calls: list = []
    facts = _fake_ge(monkeypatch, jobs, details, calls)
    s = Settings(state_dir=str(tmp_path), catalog=str(tmp_path / "none.toml"), checkpoint_dir=str(tmp_path / "c"),
                 plan_enabled=True)
    got = {q.job: q for q in facts.queue(s, 0.0)}
    assert set(got) == {"3", "4", "5"}
    assert got["4"].saveable and got["4"].limit_s == 600 and got["4"].idle == {"n1"} and got["4"].partition == "vmwrap.q"
    assert not got["3"].saveable and not got["5"].saveable      # malformed context: a job without a VM
    assert facts.image_of("4", facts.job_details(["4"])["4"]) == "busybox"   # the context's, never the env's
    from vmwrap.planner import Planner

    Planner(GridEngine(), s, dry_run=True).pass_once(now=0.0)    # the whole pass, as `vmwrap sge plan --once`


def test_grid_engine_time_limits_keep_the_other_requests_or_refuse(monkeypatch):
    calls: list = []
    facts = _fake_ge(monkeypatch, [], [_ge_detail(4, hard=[("h_rt", "600"), ("h_vmem", "1G")]),
                                       _ge_detail(6, hard=[("h_rt", "600"), ("arch", "lx*,x=1")])], calls)
    facts.set_time_limit("4", 90.0)
    assert calls[-1] == ("qalter", "-l", "h_vmem=1G,h_rt=90", "4")
    facts.set_time_limit("4", math.inf)
    assert calls[-1] == ("qalter", "-l", "h_vmem=1G,h_rt=INFINITY", "4")
    with pytest.raises(RuntimeError, match="cannot be passed back"):
        facts.set_time_limit("6", 90.0)
    with pytest.raises(RuntimeError, match="not a Grid Engine job id"):
        facts.set_time_limit("4 -u root", 90.0)


def test_grid_engine_planned_starts_come_from_its_reservations_in_the_schedule_file(monkeypatch, tmp_path):
    sched = tmp_path / "schedule"
    sched.write_text("::::::::\n7:1:RESERVING:1000:60:Q:vmwrap.q@old:slots:1.000000\n::::::::\n"
                     "7:1:RESERVING:2000:60:Q:vmwrap.q@n1:slots:1.000000\n"
                     "7:1:RESERVING:2000:60:G:global:slots:1.000000\n"
                     "0:0:RESERVING:1800:60:Q:vmwrap.q@n1:slots:1.000000\n"      # an advance reservation
                     "8:1:RUNNING:500:60:Q:vmwrap.q@n1:slots:1.000000\n"
                     "9:1:RESERVING:2000:60:H:n2:h_vmem:1000.000000\n"
                     "x:1:RESERVING:2000:60:Q:vmwrap.q@n1:slots:1.000000\n::::::::\n"
                     "10:1:RESERVING:3000:60:Q:vmwrap.q@n1:slots:1.000000\n")   # interval being written
    facts = _fake_ge(monkeypatch, [], [_ge_detail(7, [("vmwrap_image", "busybox")]), _ge_detail(9)], [])
    monkeypatch.setattr(facts, "SCHEDULE", str(sched))
    assert facts.reserved_starts(facts.schedule_tail(str(sched)), 1500.0) == {"7": (2000.0, {"n1"}),
                                                                               "9": (2000.0, {"n2"})}
    assert facts.pending(now=1500.0) == [{"job": "7", "image": "busybox", "start": 2000.0, "nodes": ["n1"]}]


def test_a_scheduler_without_reservations_is_not_planned(tmp_path):
    from vmwrap.config import Settings
    from vmwrap.planner import Planner

    class NoReservations:
        name = "none"

        def reservations(self):
            return None

        def plan_timing(self):
            raise AssertionError("not asked: there is nothing to plan")

    s = Settings(state_dir=str(tmp_path), checkpoint_dir=str(tmp_path / "c"), plan_enabled=True)
    assert Planner(NoReservations(), s).pass_once(now=0.0) == []


def test_a_grid_engine_reservation_that_ends_during_the_pass_is_left_out(monkeypatch):
    from vmwrap_plugins.sge import facts

    def run(*argv, check=True):
        if argv == ("qrstat", "-xml", "-u", "*"):
            return "<qrstat><ar_summary><id>8</id></ar_summary><ar_summary><id>9</id></ar_summary></qrstat>"
        if argv == ("qrstat", "-xml", "-ar", "8"):
            raise RuntimeError("qrstat -xml -ar 8: gone")     # ended between the two calls
        if argv == ("qrstat", "-xml", "-ar", "9"):
            return ("<qrstat><ar_summary><id>9</id><name>m&lt;x</name><start_time>2030-01-01T00:00:00</start_time>"
                    "<end_time>2030-01-01T00:01:00</end_time><granted_slots_list><granted_slots "
                    "queue_instance=\"vmwrap.q@n1\" slots=\"1\"/></granted_slots_list></ar_summary></qrstat>")
        raise AssertionError(argv)
    monkeypatch.setattr(facts, "run", run)
    (r,) = facts.reservations()
    assert (r.name, r.nodes, r.end - r.start) == ("m_x", {"n1"}, 60.0)
