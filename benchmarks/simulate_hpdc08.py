"""The HPDC 2008 sweep: 72 reservation injections x 6 configurations on the 30-day Blue Horizon load.

Prints our Table 1 next to the published one, the worst case over all 72 workloads with and without
suspension, vmwrap's own best configuration against the paper's best VM cell, and the sweep's
wall time and events per second (goal: the whole sweep <= 5 minutes on 2 cores).

Haizea's own image staging (transfers overlap the nodes' earlier work; `@haizea`) runs on the
Table 1 workloads beside ours, also with the constants of Haizea's code (600 MB batch images,
100 Mb/s read as 12.5 MB/s; `/code`): always with --only-table, with --haizea in the full sweep
(they add ~4 min of CPU, mostly vm+noreuse@haizea). Haizea's booking (one future lease, saved
before: novm+suspend@haizea, vm+predeployed@haizea) runs on the Table 1 workloads with
--only-table and on all 72 with --haizea (their worst case is then reported), also with migration
as in Haizea's code of June 2008, af1dfa1c (`/mig`: the memory copy holds no node, it delays the job).
The worst cases are also printed over the 36 injections the profile file runs (its active
`injectionfiles:` line), with Haizea's 2008 rules on them under --haizea.
vmwrap as on Slurm (vmwrap-slurm-*: gap planner, prestage, cache-aware placement, start booked at
the image's arrival) runs on the Table 1 workloads with the paper's costs and with those measured
here (`/here`), next to the best VM cell; `--ablate` turns each of its mechanisms off in turn. `--plot-dir` writes
table1.png and, for the full sweep, sweep.png. The engine is the compiled one where
`python -m vmwrap.sim build` made it (the install script does): the last line says which.

usage: python benchmarks/simulate_hpdc08.py [--traces DIR] [--procs N] [--only-table] [--haizea]
                                           [--ablate] [--plot-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from multiprocessing import Pool
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vmwrap.sim import CONFIGS, MEASURED_HERE, PAPER_BASELINE_S, PAPER_TABLE1  # noqa: E402
from vmwrap.sim import native, report  # noqa: E402
from vmwrap.sim.engine import Cluster, Config, simulate  # noqa: E402
from vmwrap.sim.workload import assign_images, image_mix, read_lwf, read_swf  # noqa: E402

TRACES = Path(__file__).resolve().parent.parent.parent / "shared" / "traces" / "hpdc08"
PAPER = list(PAPER_TABLE1)
OURS = ["vmwrap-uniform", "vmwrap-skewed", "vm+predeployed-noplan"]
HAIZEA = ["vm+noreuse@haizea", "vm+reuse-uniform@haizea", "vm+reuse-skewed@haizea"]
# Haizea's aggressive backfilling (one future lease booked like a reservation), no transfers
BOOKING = ["novm+suspend@haizea", "vm+predeployed@haizea"]
# no VM, no suspension as Haizea ran it: its booking, and reservations cancelling batch jobs
# (requeued, work lost) when they do not fit on idle nodes; on the Table 1 workloads
CANCEL = [n for n, c in CONFIGS.items() if c.cancel]
# vmwrap as on Slurm: gap planner + prestage + cache-aware placement + the start booked at the
# image's arrival (backfill on its nodes until then); with the paper's costs and with this machine's
SLURM = ["vmwrap-slurm-uniform", "vmwrap-slurm-skewed"]
# each of its mechanisms off in turn (--ablate): which one buys the points
EXTRA = {f"{c}-no{what}": replace(CONFIGS[c], name=f"{c}-no{what}", **kw)
         for c in SLURM for what, kw in (("prestage", dict(prestage=False)), ("placement", dict(placement="any")),
                                         ("overlap", dict(staging="hold")), ("suspend", dict(suspend=False)))}
ABLATE = list(EXTRA)
# Haizea's booking configurations with every detail of its spring-2008 code we model: its node
# mapping (slottable.py fitBestEffort), the future lease's place held until its VM ends
# (scheduler.py handleEndVM), run with its migration (/mig: a delay, no node time)
Y2008 = {f"{c}-2008": replace(CONFIGS[c], name=f"{c}-2008", mapping="haizea", future_until="end")
         for c in CANCEL + BOOKING}
EXTRA.update(Y2008)
# the constants in Haizea's code rather than the paper's text: batch images of 600 MB
# (traces/readers.py SWF: vmimagesize = 600), 100 Mb/s divided by 8 (common/utils.py
# estimate_transfer_time)
CODE = dict(image_mb=600.0, bandwidth_mb_s=12.5)
# the gap planner (vmwrap.plan) on / off, the rest equal; the paper has the no-VM pair
PLANNER = [("novm", "novm+suspend"), ("vm+predeployed-noplan", "vm+predeployed")]
_jobs = None


def profile_injections(traces: str) -> list[str]:
    """The injection files the HPDC'08 profile runs: its active `injectionfiles:` line (the 2 h and 3 h
    reservations; the line listing all 72 is commented out). Which ones the published worst case
    covers is not said; this is what the profile file says."""
    try:
        lines = (Path(traces) / "experiment-profiles.conf").read_text().splitlines()
    except OSError:
        return []
    return next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("injectionfiles:")), [])


def _init(traces: str) -> None:
    global _jobs
    _jobs = read_swf(Path(traces) / "30days.swf", 144)


def _one(task):
    traces, lwf, name = task
    t0 = time.perf_counter()
    if lwf is None:
        r = simulate(_jobs, [], Config("baseline", reservations=False), timeline=False)
    else:
        base, _, costs = name.partition("/")
        cfg = {**CONFIGS, **EXTRA}[base]
        cluster = {"": Cluster(), "code": Cluster(**CODE), "here": MEASURED_HERE, "mig": Cluster(migration="delay"),
                   "here0": replace(MEASURED_HERE, overhead=0.0)}[costs]
        ars = read_lwf(Path(traces) / "injected_leases" / lwf, 144)
        j, a = assign_images(_jobs, ars, image_mix(cfg.images), seed=1)
        try:
            r = simulate(j, a, cfg, cluster, timeline=False)
        except Exception as e:   # an invariant broke: report which workload, keep the sweep going
            return lwf, name, f"{type(e).__name__}: {e}"
    return lwf, name, r.end, r.mean_wait, r.mean_bsld, r.utilization, r.events, r.ars_rejected, \
        time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--traces", default=str(TRACES))
    ap.add_argument("--procs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--only-table", action="store_true", help="Only the Table 1 workloads (fast).")
    ap.add_argument("--haizea", action="store_true", help="Haizea's staging on the Table 1 workloads too.")
    ap.add_argument("--ablate", action="store_true",
                    help="vmwrap-slurm-* with each mechanism off, on the Table 1 workloads.")
    ap.add_argument("--plot-dir", help="Write table1.png (and sweep.png for the full sweep) here.")
    a = ap.parse_args()
    lwfs = sorted(p.name for p in (Path(a.traces) / "injected_leases").glob("*.lwf"))
    table_lwfs = [f"work_{r}-dur_3h-size_2medium.lwf" for r in ("10", "20", "30")]
    if a.only_table:
        lwfs = table_lwfs
    tasks = [(a.traces, None, "baseline")] + [(a.traces, l, c) for l in lwfs for c in PAPER]
    haizea = a.only_table or a.haizea
    tasks += [(a.traces, l, c) for l in table_lwfs for c in OURS + SLURM + [c + "/here" for c in SLURM]]
    if a.ablate:
        tasks += [(a.traces, l, c) for l in table_lwfs for c in ABLATE + [c + "/here0" for c in SLURM]]
    if haizea:
        tasks += [(a.traces, l, c) for l in lwfs for c in BOOKING + [c + "/mig" for c in BOOKING]]
        tasks += [(a.traces, l, c) for l in table_lwfs for c in HAIZEA + CANCEL]
        tasks += [(a.traces, l, c + "/mig") for l in table_lwfs for c in Y2008]
        tasks += [(a.traces, l, c + "/code") for l in table_lwfs for c in ["vm+predeployed"] + HAIZEA]
    active = [l for l in profile_injections(a.traces) if l in lwfs]
    if a.haizea and not a.only_table:   # Haizea's 2008 rules on the injections its profile runs
        tasks += [(a.traces, l, c + "/mig") for l in active if l not in table_lwfs for c in Y2008]
    # longest first, so no core idles behind one late, heavy simulation: cost grows with the
    # reservations in the file and with what the configuration models
    weight = {"baseline": 1, "novm": 1, "novm+suspend": 1.5, "vm+predeployed": 1.5, "vm+noreuse": 2,
              "vm+noreuse@haizea": 8, "vm+reuse-uniform@haizea": 5, "vm+reuse-skewed@haizea": 4,
              "novm+suspend@haizea": 2, "vm+predeployed@haizea": 2, "vmwrap-slurm-uniform": 5,
              "vmwrap-slurm-skewed": 4}
    ars = {l: sum(1 for _ in open(Path(a.traces) / "injected_leases" / l)) for l in lwfs}
    tasks.sort(key=lambda t: -(ars.get(t[1], 0) + 300) * weight.get(t[2].partition("/")[0], 3))
    t0 = time.perf_counter()
    with Pool(a.procs, initializer=_init, initargs=(a.traces,)) as pool:
        out = list(pool.imap_unordered(_one, tasks))
    wall = time.perf_counter() - t0
    broken = [o for o in out if len(o) == 3]
    for lwf, name, err in broken:
        print(f"BROKEN {lwf} {name}: {err}")
    if broken:
        raise SystemExit(1)
    res = {(l, c): rest for l, c, *rest in out}
    base = res[(None, "baseline")][0]
    events = sum(r[4] for r in res.values())
    cpu = sum(r[6] for r in res.values())

    def extra(l, c):
        return (res[(l, c)][0] / base - 1) * 100

    def worst_of(configs, suffix: str, over: list[str]) -> str:
        return ", ".join(f"{c} {max(extra(l, c + suffix) for l in over):+.2f} % ({sum(extra(l, c + suffix) > 10 for l in over)} "
                         f"of {len(over)} above +10 %; worst {max(over, key=lambda l: extra(l, c + suffix))})" for c in configs)

    print(f"baseline (no reservations, no VMs): all batch work done at {base:,.0f} s; "
          f"paper {PAPER_BASELINE_S:,} s ({(base / PAPER_BASELINE_S - 1) * 100:+.2f} %)")
    print("\nTable 1 — medium reservations of 3 h: extra time to finish all batch work, ours | paper")
    print(f"{'configuration':22}" + "".join(f"{'rho=' + r + ' %':>22}" for r in ("10", "20", "30")))
    for c in PAPER:
        cells = "".join(f"{extra(l, c):+9.2f} | {p:+7.2f} %  " for l, p in zip(table_lwfs, PAPER_TABLE1[c]))
        print(f"{c:22}{cells}")
    for c in OURS:
        print(f"{c:22}" + "".join(f"{extra(l, c):+9.2f} |      -    " for l in table_lwfs))
    if haizea:
        print("\nAs Haizea schedules: its booking of the future lease (no transfers), its image staging "
              "(transfers overlap earlier work); ours | paper; then with Haizea's code "
              "constants (600 MB images, 12.5 MB/s)")
    for c in CANCEL + BOOKING + [c + "/mig" for c in BOOKING] + HAIZEA if haizea else []:
        p = PAPER_TABLE1[c.removesuffix("/mig").removesuffix("@haizea")]
        print(f"{c:26}" + "".join(f"{extra(l, c):+9.2f} | {v:+7.2f} %" for l, v in zip(table_lwfs, p)))
    for c in [c + "/mig" for c in Y2008] if haizea else []:
        p = PAPER_TABLE1[c.removesuffix("-2008/mig").removesuffix("@haizea")]
        print(f"{c:26}" + "".join(f"{extra(l, c):+9.2f} | {v:+7.2f} %" for l, v in zip(table_lwfs, p)))
    for c in ["vm+predeployed"] + HAIZEA if haizea else []:
        p = PAPER_TABLE1[c.removesuffix("@haizea")]
        print(f"{c + '/code':26}" + "".join(f"{extra(l, c + '/code'):+9.2f} | {v:+7.2f} %" for l, v in zip(table_lwfs, p)))
    print("\nmean wait (s) / mean bounded slowdown, same cells")
    for c in PAPER + OURS + (BOOKING + HAIZEA if haizea else []):
        print(f"{c:22}" + "".join(f"{res[(l, c)][1]:>10,.0f} / {res[(l, c)][2]:<8.1f}" for l in table_lwfs))
    if not a.only_table:
        worst = {c: max(extra(l, c) for l in lwfs) for c in PAPER}
        print(f"\nworst extra time over all {len(lwfs)} workloads: "
              + ", ".join(f"{c} {v:+.2f} %" for c, v in worst.items()))
        if haizea:
            print("with Haizea's booking: " + ", ".join(
                f"{c} {max(extra(l, c) for l in lwfs):+.2f} % ({sum(extra(l, c) > 10 for l in lwfs)} of "
                f"{len(lwfs)} above +10 %)" for c in BOOKING))
            print("same, migration as Haizea's code (no node time, a delay): " + worst_of(BOOKING, "/mig", lwfs))
        if active and len(active) < len(lwfs):
            print(f"over the {len(active)} injections the profile file runs (its active `injectionfiles:` line; "
                  "the 72-file list above it is commented out): " + ", ".join(
                      f"{c} {max(extra(l, c) for l in active):+.2f} %" for c in PAPER))
            if haizea:
                print("  same, with Haizea's booking and its migration: " + worst_of(BOOKING, "/mig", active))
                print("  same, also with Haizea's 2008 node mapping and future-lease rule: "
                      + worst_of(Y2008, "/mig", active))
        print("paper: at most +10 % with suspension, up to +32.97 % without")
    print("\nthe gap planner off -> on (same cluster, same jobs): extra time %, utilization %, mean wait s, "
          "mean bounded slowdown; paper's extra time in brackets")
    for offc, onc in PLANNER:
        for l, r in zip(table_lwfs, ("10", "20", "30")):
            cells = []
            for c in (offc, onc):
                end, wait, bsld, util = res[(l, c)][:4]
                pub = f" [{PAPER_TABLE1[c][int(r) // 10 - 1]:+.2f}]" if c in PAPER_TABLE1 else ""
                cells.append(f"{extra(l, c):+6.2f}{pub:9} {util * 100:5.1f} {wait:8,.0f} {bsld:6.1f}")
            print(f"  {onc:16} rho={r} %: off {cells[0]}  ->  on {cells[1]}")
    best_paper = {l: min(extra(l, c) for c in PAPER[2:]) for l in table_lwfs}
    best_ours = {l: min(extra(l, c) for c in OURS[:2]) for l in table_lwfs}
    print("\nvmwrap's own, nodes held (prestage + cache-aware placement + suspend) vs the best VM cell as vmwrap "
          "runs (ours):")
    for l, r in zip(table_lwfs, ("10", "20", "30")):
        print(f"  rho={r} %: {best_ours[l]:+.2f} % vs {best_paper[l]:+.2f} %")
    print("\nvmwrap as on Slurm (gap planner + prestage + cache-aware placement + start at the image's arrival), "
          "paper's costs / costs measured here; vs the best published VM cell"
          + (" and the best VM cell as Haizea schedules (ours)" if haizea else ""))
    for c in SLURM:
        print(f"  {c:22}" + "".join(f"{extra(l, c):+7.2f} / {extra(l, c + '/here'):+7.2f} %   " for l in table_lwfs))
    pub = [min(PAPER_TABLE1[c][i] for c in PAPER[2:]) for i in range(3)]
    print(f"  {'best published VM cell':22}" + "".join(f"{p:+7.2f}             " for p in pub))
    if haizea:
        print(f"  {'best VM cell @haizea':22}" + "".join(
            f"{min(extra(l, c) for c in ['vm+predeployed@haizea'] + HAIZEA):+7.2f}             " for l in table_lwfs))
    for c in ABLATE + [c + "/here0" for c in SLURM] if a.ablate else []:
        print(f"  {c:34}" + "".join(f"{extra(l, c):+7.2f} %  " for l in table_lwfs))
    if a.plot_dir:
        cells = {"ours, vmwrap (nodes held)": {c: tuple(extra(l, c) for l in table_lwfs) for c in PAPER}}
        if haizea:
            cells["ours, as Haizea (staging, booking)"] = {
                c: tuple(extra(l, c + "@haizea" if c + "@haizea" in HAIZEA + BOOKING else c) for l in table_lwfs)
                for c in PAPER}
            cells["same, Haizea's code constants"] = {
                c: tuple(extra(l, c + "/code") for l in table_lwfs) for c in ["vm+predeployed"] + HAIZEA}
            cells["same, Haizea's code constants"] = {
                c.removesuffix("@haizea"): v for c, v in cells["same, Haizea's code constants"].items()}
        cells["published"] = dict(PAPER_TABLE1)
        print(f"wrote {report.plot_table1(cells, Path(a.plot_dir) / 'table1.png')}")
        if not a.only_table:
            series = {"novm": "no suspension", "novm+suspend": "suspension"}
            if haizea:
                series["novm+suspend@haizea"] = "suspension, Haizea's booking"
            pts = [(l, int(l[5:7]) + 0.25 * ("1h 2h 3h 4h".split().index(l[12:14]) - 1.5), extra(l, c), s)
                   for l in lwfs for c, s in series.items()]
            bounds = {"suspension": 10.0, "no suspension": 32.97}
            print(f"wrote {report.plot_sweep(pts, bounds, Path(a.plot_dir) / 'sweep.png')}")
    rejected = sum(r[5] for r in res.values())
    print(f"\nsweep: {len(tasks)} simulations, {events:,} events, wall {wall:.0f} s on {a.procs} processes "
          f"({events / wall:,.0f} events/s; {cpu:.0f} s of simulation CPU); reservations rejected: {rejected}")
    print("engine: " + ("compiled (vmwrap/sim/native.py)" if native.is_native() else
                        f"Python ({native.PURE_ENV} set, or no build of this engine.py: "
                        "python -m vmwrap.sim build)"))


if __name__ == "__main__":
    main()
