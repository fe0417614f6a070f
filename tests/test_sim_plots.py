"""What an admin sees from `vmwrap simulate`: plots worth looking at, progress on a terminal only."""

import subprocess
import sys

from harness.terminal import run_on_pty
from vmwrap.sim import CONFIGS, Cluster
from vmwrap.sim import report
from vmwrap.sim.workload import synthetic

PNG = b"\x89PNG"


def small_run():
    cluster = Cluster(nodes=16, cache_mb=8192, bandwidth_mb_s=100)
    jobs, ars = synthetic(jobs=60, nodes=16, load=0.9, ar_share=0.2, ar_nodes=(2, 8), ar_hours=1,
                          mean_run_s=1800, seed=3)
    base, results = report.compare(jobs, ars, [CONFIGS[n] for n in ("novm", "novm+suspend", "vm+reuse-skewed")],
                                   cluster, seed=3)
    return jobs, base, results


def test_utilization_work_and_comparison_plots(tmp_path):
    jobs, base, results = small_run()
    paths = report.plot(base, results, 16, tmp_path, jobs=jobs, paper={"novm": 3.91})
    assert [p.name for p in paths] == ["utilization.png", "work.png", "comparison.png"]
    for p in paths:
        assert p.read_bytes()[:4] == PNG and p.stat().st_size > 10_000


def test_binned_utilization_averages_the_steps():
    # 2 of 4 nodes busy for the first half of a 2-hour run, all 4 in the second
    edges, ys = report._binned([(0, 2), (3600, 4)], 4, 7200, 3600)
    assert edges == [0, 3600 / 86400, 7200 / 86400] and ys[:2] == [50, 100]
    edges, ys = report._binned([(0, 2), (1800, 4)], 4, 7200, 7200)
    assert ys[0] == 87.5


def test_work_done_reaches_all_batch_work_at_the_end():
    jobs, base, results = small_run()
    work = {j.id: float(j.run * j.nodes) for j in jobs}
    xs, ys = report._work_done(results[0], work)
    assert ys[-1] == 100 and xs[-1] == results[0].end / 86400 and ys == sorted(ys)


def test_table1_and_sweep_plots(tmp_path):
    cells = {"ours": {"novm": (3.4, 11.5, 24.6), "vm+noreuse": (9.0, 18.9, 33.9)},
             "published": {"novm": (3.91, 8.66, 23.93), "vm+noreuse": (0.60, 3.95, 12.21)}}
    p = report.plot_table1(cells, tmp_path / "table1.png")
    assert p.read_bytes()[:4] == PNG
    pts = [(f"w{i}", r, r * 0.8 + i % 3, s) for i, r in enumerate((5, 10, 15, 20, 25, 30))
           for s in ("no suspension", "suspension")]
    p = report.plot_sweep(pts, {"suspension": 10.0, "no suspension": 32.97}, tmp_path / "sweep.png")
    assert p.read_bytes()[:4] == PNG and p.stat().st_size > 10_000


def test_published_cells_only_for_the_table1_workloads():
    assert report.published("x/work_20-dur_3h-size_2medium.lwf")["vm+noreuse@haizea"] == 3.95
    assert report.published("work_20-dur_2h-size_2medium.lwf") == {}


def _on_pty(argv):
    return run_on_pty(argv, timeout=60)


def test_progress_on_a_terminal_not_a_pipe_nor_with_quiet():
    argv = [sys.executable, "-m", "vmwrap.cli", "simulate", "--synthetic", "--jobs", "40", "--nodes", "8",
            "--ar-nodes", "2-4", "--configs", "novm,novm+suspend", "--format", "csv"]
    code, out, err = _on_pty(argv)
    assert code == 0 and out.startswith("config,")
    assert b"novm+suspend done" in err and b"simulating 40 jobs" in err
    assert b"\x1b[" not in out.encode()                 # the table stays clean
    assert _on_pty(argv + ["--quiet"])[2] == b""
    piped = subprocess.run(argv, capture_output=True, timeout=60)
    assert piped.returncode == 0 and piped.stderr == b""
