"""Haizea's image staging (`staging="overlap"`): the transfer uses the link, not the nodes."""

from vmwrap.sim import Cluster, Config, Job, Reservation, simulate

SMALL = Cluster(nodes=4, mem_mb=1000, suspend_mb_s=100, bandwidth_mb_s=100, image_mb=1000, cache_mb=2000,
                boot_s=10)
HOLD = Config("hold", vm=True, suspend=True, transfer="cache")
OVERLAP = Config("overlap", vm=True, suspend=True, transfer="cache", staging="overlap")


def test_a_job_is_mapped_at_its_images_arrival_onto_nodes_busy_until_then():
    # J1 holds all 4 nodes until 125 (requested); at 120 (a reservation's submission makes a pass)
    # J2's image can arrive by 130: Haizea books J2 there on J1's nodes; holding waits for 125.
    jobs = [Job(1, 0, 100, 100, 4, image=0), Job(2, 1, 100, 100, 4, image=1)]
    ars = [Reservation(100, 120, 10_000, 10, 1, image=0)]
    hold = simulate(jobs, ars, HOLD, SMALL, check=True)
    over = simulate(jobs, ars, OVERLAP, SMALL, check=True)
    assert hold.records[1][1] == over.records[1][1] == 10 + 10 + 105
    assert hold.records[2][1] == 125 + 10 + 10 + 105
    assert over.records[2][1] == 130 + 10 + 105


def test_a_reservation_takes_the_nodes_of_a_booked_start_and_the_job_still_runs():
    jobs = [Job(1, 0, 100, 100, 4, image=0), Job(2, 1, 100, 100, 4, image=1)]
    ars = [Reservation(100, 120, 200, 50, 4, image=0)]
    r = simulate(jobs, ars, OVERLAP, SMALL, check=True)
    assert r.ars_on_time == 1 and r.jobs == 2
    assert r.records[2][1] > 250     # after the reservation, not at its booked 130


def test_vmwrap_on_slurm_books_the_start_at_the_images_arrival():
    # vmwrap's own as on Slurm (gap planner, prestage, cache-aware placement, overlap staging):
    # J2 starts when its image arrives (130) on J1's nodes; vmwrap's own holding waits for 125
    from vmwrap.sim import CONFIGS
    jobs = [Job(1, 0, 100, 100, 4, image=0), Job(2, 1, 100, 100, 4, image=1)]
    ars = [Reservation(100, 120, 10_000, 10, 1, image=0)]
    slurm = simulate(jobs, ars, CONFIGS["vmwrap-slurm-uniform"], SMALL, check=True)
    held = simulate(jobs, ars, CONFIGS["vmwrap-uniform"], SMALL, check=True)
    assert held.records[2][1] == 125 + 10 + 10 + 105
    assert slurm.records[2][1] == 130 + 10 + 105
    assert CONFIGS["vmwrap-slurm-skewed"].prestage and CONFIGS["vmwrap-slurm-skewed"].placement == "cache"


def test_haizea_books_a_reservations_image_even_without_lead_time():
    # imagetransfer.py __get_last_transfer_slot never checks the slot against now; we reject
    ars = [Reservation(100, 0, 0, 50, 2, image=3)]
    jobs = [Job(1, 0, 10, 10, 1)]
    assert simulate(jobs, ars, HOLD, SMALL, check=True).ars_rejected == 1
    assert simulate(jobs, ars, OVERLAP, SMALL, check=True).ars_rejected == 0


def test_list_shows_which_configurations_stage_as_haizea():
    from click.testing import CliRunner

    from vmwrap.cli import main
    r = CliRunner().invoke(main, ["simulate", "--list"])
    lines = {ln.split()[0]: ln for ln in r.output.splitlines()}
    assert "staging=overlap" in lines["vm+reuse-skewed@haizea"] and "staging" not in lines["vm+reuse-skewed"]
    assert max(map(len, lines.values())) <= 100


# Haizea's aggressive backfilling (backfill="haizea"): one future lease, booked like a reservation
NOVM = Cluster(nodes=4, mem_mb=1000, suspend_mb_s=100)
EASY = Config("easy", suspend=True)
FUTURE = Config("future", suspend=True, backfill="haizea")


def test_a_job_runs_into_the_future_lease_and_is_saved_before_it():
    # J1 holds 2 of 4 nodes until 1000; J2 (4 nodes) is booked there; J3 (2 nodes, 5000 s) would
    # delay EASY's promise to J2 so waits, while Haizea starts it and saves it before J2's booking
    jobs = [Job(1, 0, 1000, 1000, 2), Job(2, 1, 100, 100, 4), Job(3, 2, 5000, 5000, 2)]
    easy = simulate(jobs, [], EASY, NOVM, check=True)
    fut = simulate(jobs, [], FUTURE, NOVM, check=True)
    assert easy.records[2][0] == fut.records[2][0] == 1000
    assert easy.records[3][0] >= 1100 and easy.records[3][2] == 0
    assert fut.records[3][0] == 2 and fut.records[3][2] == 1


def test_the_future_lease_is_booked_again_when_a_job_ends_early():
    # J1 asks for 1000 s and ends at 100: J2's booking at 1000 is redone and it starts at 100
    jobs = [Job(1, 0, 100, 1000, 2), Job(2, 1, 100, 100, 4)]
    assert simulate(jobs, [], FUTURE, NOVM, check=True).records[2][0] == 100



def test_haizea_2008_migration_holds_no_node():
    # J1 is saved before a reservation on its nodes (the save ends at 300) and resumed on J3's
    # nodes, free since 200. nodes: the 100 s memory copy holds them, J2 waits; delay (Haizea's
    # code of June 2008): J1 is back in line only at 400 and J2 uses the nodes meanwhile
    jobs = [Job(3, 0, 200, 2000, 2), Job(1, 0, 1000, 1000, 2), Job(2, 301, 50, 50, 2)]
    ars = [Reservation(100, 1, 300, 100, 2)]
    held = simulate(jobs, ars, EASY, NOVM, check=True)
    delay = simulate(jobs, ars, EASY, Cluster(nodes=4, mem_mb=1000, suspend_mb_s=100, migration="delay"),
                     check=True)
    assert held.records[2][0] == 400 and delay.records[2][0] == 301
    assert held.records[1] == delay.records[1] == (0, 300 + 10 + 100 + 710, 1)


def test_migration_must_be_nodes_or_delay():
    import pytest
    with pytest.raises(ValueError, match="migration must be nodes or delay, not 'fast'"):
        Cluster(migration="fast")


def test_cli_takes_haizeas_migration():
    from click.testing import CliRunner

    from vmwrap.cli import main
    args = ["simulate", "--synthetic", "--jobs", "60", "--nodes", "16", "--ar-share", "0.3", "--ar-nodes", "4-8",
            "--configs", "novm+suspend", "--format", "json", "--quiet", "--seed", "3"]
    held = CliRunner().invoke(main, args)
    delay = CliRunner().invoke(main, args + ["--migration", "delay"])
    assert held.exit_code == delay.exit_code == 0, delay.output
    assert held.output != delay.output      # the copies no longer hold nodes: another schedule
    bad = CliRunner().invoke(main, args + ["--migration", "fast"])
    assert bad.exit_code == 2 and "'fast' is not one of 'nodes', 'delay'" in bad.output


# Haizea without suspension (novm@haizea): a reservation may take nodes running batch jobs, which
# are cancelled and requeued, their work lost (scheduler.py scheduleExactLease -> preempt)
def test_a_reservation_cancels_the_job_on_its_nodes_and_it_runs_again_from_scratch():
    from vmwrap.sim import CONFIGS
    # J1 holds all 4 nodes 0-1000; at 100 a reservation asks for 2 nodes at 500-600. Default:
    # rejected (no node free at 500). Haizea: J1 is cancelled at 100 (400 node-s lost), requeued
    # and run again whole after the reservation (check=True: work done == run time)
    jobs = [Job(1, 0, 1000, 1000, 4)]
    ars = [Reservation(100, 100, 500, 100, 2)]
    old = simulate(jobs, ars, Config("novm"), NOVM, check=True)
    assert old.ars_rejected == 1 and old.killed == 0 and old.records == {1: (0, 1000, 0)}
    new = simulate(jobs, ars, CONFIGS["novm@haizea"], NOVM, check=True)
    assert new.ars_accepted == new.ars_on_time == 1 and new.ars_rejected == 0
    assert new.killed == 1 and new.killed_work == 100 * 4
    assert new.records == {1: (600, 1600, 0)}
    # J2 (4 nodes, 1000 s) queues at 50. With EASY J1 goes back before it (enqueueInOrder sorts
    # by lease id: its original place). Haizea's booking: J2 is already the one future lease, at
    # 1000, which the reservation (500-600) does not touch, so it keeps it and J1 runs after it
    jobs.append(Job(2, 50, 1000, 1000, 4))
    easy = simulate(jobs, ars, Config("easy-cancel", cancel=True), NOVM, check=True)
    assert easy.killed == 1 and easy.records == {1: (600, 1600, 0), 2: (1600, 2600, 0)}
    new = simulate(jobs, ars, CONFIGS["novm@haizea"], NOVM, check=True)
    assert new.killed == 1 and new.records == {1: (2000, 3000, 0), 2: (1000, 2000, 0)}
    assert simulate(jobs, ars, Config("novm"), NOVM).records == {1: (0, 1000, 0), 2: (1000, 2000, 0)}


def test_cancelling_keeps_every_invariant_on_a_busy_mix():
    from vmwrap.sim import CONFIGS
    from vmwrap.sim.workload import synthetic
    jobs, ars = synthetic(jobs=150, nodes=16, load=1.2, ar_share=0.3, ar_nodes=(4, 12), ar_hours=1,
                          ar_lead_s=600, mean_run_s=3600, seed=5)
    r = simulate(jobs, ars, CONFIGS["novm@haizea"], Cluster(nodes=16), check=True)
    assert r.killed > 0 and r.jobs + r.cancelled == len(jobs) and r.ars_on_time == r.ars_accepted


def test_cancel_is_for_configurations_without_suspension():
    import pytest
    with pytest.raises(ValueError, match="cancel is for configurations without suspension"):
        Config("x", suspend=True, cancel=True)


def test_haizeas_mapping_runs_a_job_whole_where_best_fit_saves_it():
    # A reservation takes 1 of 4 nodes from 500. The 1000 s job fits on all 4 now: best fit (our
    # model) takes the node the reservation needs soonest and saves the job at 490; Haizea's
    # mapping (slottable.py, spring 2008) takes the lowest-numbered node free until the job's end
    jobs = [Job(1, 1, 1000, 1000, 1)]
    ars = [Reservation(100, 0, 500, 100, 1)]
    fit = simulate(jobs, ars, EASY, NOVM, check=True)
    mapped = simulate(jobs, ars, Config("mapped", suspend=True, mapping="haizea"), NOVM, check=True)
    assert fit.records[1][2] == 1
    assert mapped.records == {1: (1, 1001, 0)}


def test_haizeas_mapping_runs_a_saved_job_to_the_latest_end_k_nodes_allow():
    # Reservations take 1 node from 200 and 2 from 400, each for 1000 s; the 2-node job must be
    # saved either way. Best fit starts it on the node needed at 200 (saved at 190, resumed at 200,
    # saved again at 390); Haizea's mapping on two nodes free until 400 at least (saved at 390 only)
    # and resumed at 1200 with a 100 s memory copy: 1200 + 10 + 100 + 611 left
    jobs = [Job(1, 1, 1000, 1000, 2)]
    ars = [Reservation(100, 0, 200, 1000, 1), Reservation(101, 0, 400, 1000, 2)]
    fit = simulate(jobs, ars, EASY, NOVM, check=True)
    mapped = simulate(jobs, ars, Config("mapped", suspend=True, mapping="haizea"), NOVM, check=True)
    assert fit.records == {1: (1, 2041, 2)}
    assert mapped.records == {1: (1, 1921, 1)}


def test_the_future_lease_holds_its_place_until_its_vm_ends_as_in_haizeas_2008_code():
    # J1 holds 3 of 4 nodes until 1000; J2 (2 nodes) is the future lease, booked at 1000 and run to
    # 1500. start (Haizea since 2009): when J2 starts, J3 (4 nodes) is booked at 1500, and J4 starts
    # on the 2 free nodes and is saved before J3. end (scheduler.py handleEndVM, 2008): no booking
    # while J2 runs, so J4 runs whole from 1000, and J3 is booked at J4's end
    jobs = [Job(1, 0, 1000, 1000, 3), Job(2, 1, 500, 500, 2), Job(3, 2, 100, 100, 4), Job(4, 3, 1000, 1000, 2)]
    start = simulate(jobs, [], FUTURE, NOVM, check=True)
    end = simulate(jobs, [], Config("end", suspend=True, backfill="haizea", future_until="end"), NOVM, check=True)
    assert start.records[2] == end.records[2] == (1000, 1500, 0)
    assert start.records[3][0] == 1500 and start.records[4][2] == 1
    assert end.records[4] == (1000, 2000, 0) and end.records[3][0] == 2000


def test_mapping_and_future_until_are_checked():
    import pytest
    with pytest.raises(ValueError, match="mapping must be fit or haizea, not 'best'"):
        Config("x", mapping="best")
    with pytest.raises(ValueError, match="future_until must be start or end, not 'never'"):
        Config("x", future_until="never")
