"""The simulator: parsing, hand-checked schedules, invariants on random mixes, the CLI, the paper's baseline."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmwrap.cli import main
from vmwrap.plan import SaveModel, gap_decision, min_gap
from vmwrap.sim import CONFIGS, Cluster, Config, Job, Reservation, WorkloadError, simulate
from vmwrap.sim.workload import assign_images, read_images, read_lwf, read_swf, synthetic, SKEWED

TRACES = Path(__file__).resolve().parents[2] / "shared" / "traces" / "hpdc08"
SMALL = Cluster(nodes=4, mem_mb=1000, suspend_mb_s=100, bandwidth_mb_s=100, image_mb=1000, cache_mb=2000,
                boot_s=10)


def swf_line(jid, submit, run, nodes, req):
    return f"{jid} {submit} -1 {run} {nodes} -1 -1 {nodes} {req} -1 1 1 -1 -1 1 -1 -1 -1"


# -- parsing ----------------------------------------------------------------------------------------
def test_parse_errors_name_file_and_line(tmp_path):
    p = tmp_path / "t.swf"
    p.write_text("; header\n" + swf_line(1, 0, 10, 1, 20) + "\n1 2 3\n")
    with pytest.raises(WorkloadError, match=r"t\.swf:3: expected 18 SWF fields, got 3"):
        read_swf(p)
    p.write_text(swf_line(1, "x", 10, 1, 20) + "\n")
    with pytest.raises(WorkloadError, match=r"t\.swf:1: submit time is not a number: 'x'"):
        read_swf(p)
    p.write_text(swf_line(1, 0, 10, 9, 20) + "\n")
    with pytest.raises(WorkloadError, match=r"t\.swf:1: job 1 asks for 9 nodes; the cluster has 4"):
        read_swf(p, max_nodes=4)
    lwf = tmp_path / "a.lwf"
    lwf.write_text("0 100 50 50 2 1 1024 0 'x.img' 600\n0 10 50 50 2 1 1024\n")
    with pytest.raises(WorkloadError, match=r"a\.lwf:2: expected 10 LWF fields, got 7"):
        read_lwf(lwf)
    lwf.write_text("200 100 50 50 2 1 1024 0 'x.img' 600\n")
    with pytest.raises(WorkloadError, match=r"a\.lwf:1: starts at 100, before it is requested at 200"):
        read_lwf(lwf)
    lwf.write_text("0 -30 50 50 2 1 1024 0 'x.img' 600\n0 -90 50 50 2 1 1024 0 'x.img' 600\n")
    (r,) = read_lwf(lwf)   # under way when the trace begins: what is left of it; the other is over
    assert (r.start, r.dur) == (0, 20)
    img = tmp_path / "i.images"
    img.write_text("a 4096 1\nb 4096 -2\n")
    with pytest.raises(WorkloadError, match=r"i\.images:2: size must be > 0 and weight >= 0"):
        read_images(img)
    with pytest.raises(WorkloadError, match=r"nope\.swf: cannot read"):
        read_swf(tmp_path / "nope.swf")


def test_swf_cuts_runs_at_request_and_skips_cancelled(tmp_path):
    p = tmp_path / "t.swf"
    p.write_text("\n".join([swf_line(1, 0, 50, 1, 20), swf_line(2, 5, -1, 1, 20), swf_line(3, 6, 7, 2, -1)]))
    jobs = read_swf(p)
    assert [(j.id, j.run, j.req, j.nodes) for j in jobs] == [(1, 20, 20, 1), (3, 7, 7, 2)]


def test_swf_jobs_cancelled_while_waiting_queue_until_their_user_gave_up(tmp_path):
    p = tmp_path / "t.swf"
    cancelled = "4 10 300 -1 -1 -1 -1 2 500 -1 5 1 -1 -1 1 -1 -1 -1"     # waited 300 s, then cancelled
    p.write_text("\n".join([swf_line(1, 0, 0, 1, 20), cancelled]))
    jobs = read_swf(p)
    assert [(j.id, j.run, j.req, j.nodes, j.cancel_at) for j in jobs] == [(1, 1, 20, 1, None), (4, 500, 500, 2, 310)]
    assert [j.id for j in read_swf(p, cancelled="skip")] == [1]
    # started before its user gives up: it runs its requested time; otherwise it leaves the queue
    wide = Job(9, 0, 1000, 1000, 4)
    waits = simulate([wide, Job(4, 10, 500, 500, 2, cancel_at=310)], [], Config("novm"), SMALL, check=True)
    runs = simulate([wide, Job(4, 10, 500, 500, 2, cancel_at=1310)], [], Config("novm"), SMALL, check=True)
    assert 4 not in waits.records and waits.cancelled == 1 and waits.end == 1000
    assert runs.records[4] == (1000, 1500, 0) and runs.cancelled == 0


# -- hand-checked schedules -------------------------------------------------------------------------
def head_and_ar():
    # 4 nodes; an AR on all 4 over [1000, 2000); the queue head wants all 4 for 3000 s.
    jobs = [Job(1, 0, 3000, 3000, 4)]
    ars = [Reservation(100, 0, 1000, 1000, 4)]
    return jobs, ars


def test_without_suspension_the_head_waits_for_the_reservation():
    r = simulate(*head_and_ar(), Config("novm"), SMALL, check=True)
    assert r.records[1] == (2000, 5000, 0)
    assert (r.ars_on_time, r.ars_rejected) == (1, 0)


def test_with_suspension_the_head_runs_before_the_reservation_and_resumes_after():
    r = simulate(*head_and_ar(), Config("novm+suspend", suspend=True), SMALL, check=True)
    save = SMALL.mem_mb / SMALL.suspend_mb_s           # 10 s: the save ends exactly at the AR's start
    worked = 1000 - save                                # work done before the save
    restore = save                                      # same nodes after the AR: no memory copy
    assert r.records[1] == (0, 2000 + restore + (3000 - worked), 1)
    assert r.ars_on_time == 1 and r.suspensions == 1


def test_a_gap_too_short_for_a_save_is_not_used():
    jobs = [Job(1, 0, 3000, 3000, 4)]
    ars = [Reservation(100, 0, 25, 1000, 4)]            # 25 s gap < save 10 s + restore 10 s + save 10 s
    r = simulate(jobs, ars, Config("novm+suspend", suspend=True), SMALL, check=True)
    assert r.records[1][0] == 1025 and r.suspensions == 0


def test_vm_overheads_and_image_transfer():
    jobs = [Job(1, 0, 1000, 1000, 2, image=0), Job(2, 0, 1000, 1000, 2, image=0)]
    r = simulate(jobs, [], Config("vm", vm=True, transfer="fresh"), SMALL, check=True)
    xfer = SMALL.image_mb / SMALL.bandwidth_mb_s        # 10 s, one multicast for both jobs' nodes
    assert r.records[1] == (0, xfer + SMALL.boot_s + 1000 * 1.05, 0)
    assert r.transfers == 1 and r.node_mb == 4 * SMALL.image_mb
    r = simulate(jobs, [], Config("vm", vm=True, transfer="none"), SMALL, check=True)
    assert r.records[1][1] == SMALL.boot_s + 1050 and r.transfers == 0


def test_cache_reuses_images_and_cache_aware_placement_prefers_holders():
    jobs = [Job(i, i * 2000, 1000, 1000, 1, image=i % 2) for i in range(1, 9)]
    fresh = simulate(jobs, [], Config("f", vm=True, transfer="fresh"), SMALL, check=True)
    cached = simulate(jobs, [], Config("c", vm=True, transfer="cache", placement="cache"), SMALL, check=True)
    assert fresh.transfers == 8
    assert cached.transfers == 2                        # one per image, then every start is a hit
    assert cached.end < fresh.end


def test_reservation_rejected_when_nodes_are_committed():
    ars = [Reservation(100, 0, 100, 100, 3), Reservation(101, 0, 150, 100, 3)]
    r = simulate([Job(1, 0, 10, 10, 1)], ars, Config("novm"), SMALL, check=True)
    assert r.ars_accepted == 1 and r.ars_rejected == 1
    assert "only 1 of 3 nodes" in r.rejected[0][1]


def test_conservative_promises_jobs_dominated_by_an_earlier_failure_too():
    # J1 holds 3 of 4 nodes until 1000; J2 (head) wants 4; J3 wants 2 for 5000 s; J4 wants 2 for
    # 6000 s: it cannot start if J3 could not, but it still gets a promise of its own.
    from vmwrap.sim.engine import Simulator
    jobs = [Job(1, 0, 1000, 1000, 3), Job(2, 1, 100, 100, 4), Job(3, 2, 5000, 5000, 2), Job(4, 3, 6000, 6000, 2)]
    sim = Simulator(SMALL, Config("c", backfill="conservative"), jobs, [], check=True)
    promised: dict = {}
    orig = sim._reserve

    def spy(run, now, blocks):
        t, nodes = orig(run, now, blocks)
        promised.setdefault(now, {})[run.job.id] = t
        return t, nodes
    sim._reserve = spy
    r = sim.run()
    assert promised[3] == {2: 1000, 3: 1100, 4: 1100}
    assert r.records[4][0] == 1100


def test_back_to_back_reservations_on_the_same_nodes():
    # the first ends at the very instant the second starts: its nodes are free for it (HPDC'08 has these)
    ars = [Reservation(100, 0, 100, 100, 4), Reservation(101, 0, 200, 100, 4)]
    r = simulate([Job(1, 250, 10, 10, 1)], ars, Config("novm"), SMALL, check=True)
    assert (r.ars_accepted, r.ars_on_time, r.ars_rejected) == (2, 2, 0)
    assert r.records[1] == (300, 310, 0)


def test_conservative_backfilling_keeps_every_promise():
    # J1 holds 3 of 4 nodes until 1000; J2 (head) and J3 each want 2 nodes; J4 wants 1 node for 1500 s.
    # EASY promises only J2, so J4 takes the free node and J3 slips; conservative promises J3 too.
    jobs = [Job(1, 0, 1000, 1000, 3), Job(2, 1, 100, 100, 2), Job(3, 2, 100, 100, 2), Job(4, 3, 1500, 1500, 1)]
    easy = simulate(jobs, [], Config("e"), SMALL, check=True)
    cons = simulate(jobs, [], Config("c", backfill="conservative"), SMALL, check=True)
    assert easy.records[2][0] == cons.records[2][0] == 1000
    assert easy.records[4][0] == 3 and easy.records[3][0] == 1100
    assert cons.records[3][0] == 1000 and cons.records[4][0] >= 1000


# -- invariants on random mixes ---------------------------------------------------------------------
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), share=st.sampled_from([0.0, 0.1, 0.3]),
       cfg=st.sampled_from(sorted(CONFIGS)), load=st.sampled_from([0.5, 0.9, 1.3]))
def test_invariants_hold_on_random_mixes(seed, share, cfg, load):
    """No node over-committed, every AR on time or rejected, work neither lost nor duplicated by
    suspend/resume, every job finishes (the engine raises InvariantError otherwise)."""
    cluster = Cluster(nodes=16, cache_mb=8192, bandwidth_mb_s=100)
    jobs, ars = synthetic(jobs=60, nodes=16, load=load, ar_share=share, ar_nodes=(2, 12), ar_hours=1,
                          mean_run_s=1800, seed=seed)
    jobs, ars = assign_images(jobs, ars, SKEWED, seed)
    r = simulate(jobs, ars, CONFIGS[cfg], cluster, check=True)
    assert r.jobs == len(jobs)
    assert r.ars_accepted + r.ars_rejected <= len(ars)
    assert r.ars_on_time <= r.ars_accepted   # a late start raises InvariantError in the engine
    for job in jobs:
        start, end, _ = r.records[job.id]
        assert job.submit <= start < end


@settings(max_examples=200, deadline=None)
@given(now=st.floats(0, 1e5), gap=st.floats(0, 1e5), remaining=st.floats(1, 1e5), mem=st.floats(1, 1e5),
       rate=st.floats(1, 1e4), margin=st.floats(0, 1), setup=st.floats(0, 600))
def test_planner_decision_agrees_with_its_threshold(now, gap, remaining, mem, rate, margin, setup):
    m = SaveModel(rate, fixed_s=2, margin=margin, margin_s=10)
    d = gap_decision(now, now + gap, remaining, mem, m, setup_s=setup)
    need = min_gap(remaining, mem, m, setup_s=setup)
    if abs(gap - need) > 1e-6 * max(1, gap):
        assert d.start == (gap >= need), d.reason
    if d.start and d.save_at is not None:
        assert d.save_at + m.budget(mem) == pytest.approx(now + gap)
        assert d.run_s > 0


# -- the CLI ----------------------------------------------------------------------------------------
def test_cli_synthetic_json_and_plots(tmp_path):
    r = CliRunner().invoke(main, ["simulate", "--synthetic", "--jobs", "80", "--nodes", "16", "--ar-nodes", "2-8",
                                  "--configs", "novm,novm+suspend,vmwrap-skewed", "--format", "json",
                                  "--plot-dir", str(tmp_path), "--check"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert [x["config"] for x in rows] == ["baseline", "novm", "novm+suspend", "vmwrap-skewed"]
    assert rows[0]["extra_pct"] == 0
    assert (tmp_path / "utilization.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "comparison.png").stat().st_size > 1000


def test_cli_errors_are_specific(tmp_path):
    bad = tmp_path / "bad.swf"
    bad.write_text(swf_line(1, 0, 10, 1, 20) + "\n2 0\n")
    r = CliRunner().invoke(main, ["simulate", "--swf", str(bad)])
    assert r.exit_code != 0 and "bad.swf:2: expected 18 SWF fields" in r.output
    r = CliRunner().invoke(main, ["simulate", "--synthetic", "--configs", "novm,warp"])
    assert r.exit_code != 0 and "unknown configuration(s) warp" in r.output
    r = CliRunner().invoke(main, ["simulate", "--synthetic", "--nodes", "0"])
    assert r.exit_code != 0 and "must be > 0" in r.output


# -- the paper's trace ------------------------------------------------------------------------------
@pytest.mark.skipif(not (TRACES / "30days.swf").exists(), reason="HPDC'08 traces not present")
def test_blue_horizon_baseline_matches_the_paper():
    # without the 437 jobs cancelled while waiting: -0.42 %; with them, as Haizea read the trace: +1.24 %
    skip = simulate(read_swf(TRACES / "30days.swf", 144, cancelled="skip"), [], Config("baseline", reservations=False))
    assert abs(skip.end / 2_674_265 - 1) < 0.01, skip.end
    r = simulate(read_swf(TRACES / "30days.swf", 144), [], Config("baseline", reservations=False))
    assert abs(r.end / 2_674_265 - 1) < 0.015 and r.cancelled > 0, (r.end, r.cancelled)
