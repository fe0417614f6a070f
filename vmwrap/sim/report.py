"""Running configurations side by side and showing the outcome: text, CSV, JSON, PNG."""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from .engine import Cluster, Config, Result, simulate
from .workload import Job, Reservation, assign_images, image_mix

DAY = 86400.0
COLUMNS = ("config", "end_s", "extra_pct", "utilization", "mean_wait_s", "mean_bsld",
           "ars_accepted", "ars_on_time", "ars_rejected", "suspensions", "cancelled", "transfers", "link_gb", "events")


def compare(jobs: list[Job], ars: list[Reservation], configs: list[Config], cluster: Cluster = Cluster(),
            seed: int = 0, images: str | None = None, check: bool = False,
            on_done: Callable[[str], None] | None = None) -> tuple[Result, list[Result]]:
    """The baseline (no reservations, no VMs) and each configuration on one workload. Images are
    drawn once per mix with `seed`, so every configuration sees the same jobs. `on_done` hears
    each finished configuration's name (a terminal's progress bar)."""
    base = simulate(jobs, [], Config("baseline", reservations=False), cluster, check=check)
    if on_done:
        on_done("baseline")
    out = []
    for cfg in configs:
        j, a = assign_images(jobs, ars, image_mix(images or cfg.images), seed)
        out.append(simulate(j, a, cfg, cluster, check=check))
        if on_done:
            on_done(cfg.name)
    return base, out


def published(lwf: str | Path | None) -> dict[str, float]:
    """The paper's Table 1 cell for each configuration when `lwf` is one of its three workloads."""
    from . import PAPER_TABLE1
    m = re.fullmatch(r"work_(10|20|30)-dur_3h-size_2medium\.lwf", Path(lwf).name) if lwf else None
    if not m:
        return {}
    k = {"10": 0, "20": 1, "30": 2}[m.group(1)]
    out = {}
    for name, cells in PAPER_TABLE1.items():
        out[name] = cells[k]
        out[name + "@haizea"] = cells[k]
    return out


def rows(base: Result, results: list[Result]) -> list[dict]:
    out = []
    for r in [base, *results]:
        out.append({
            "config": r.config, "end_s": round(r.end), "extra_pct": round((r.end / base.end - 1) * 100, 2),
            "utilization": round(r.utilization, 4), "mean_wait_s": round(r.mean_wait),
            "mean_bsld": round(r.mean_bsld, 2), "ars_accepted": r.ars_accepted, "ars_on_time": r.ars_on_time,
            "ars_rejected": r.ars_rejected, "suspensions": r.suspensions, "cancelled": r.cancelled,
            "transfers": r.transfers,
            "link_gb": round(r.link_mb / 1024, 1), "events": r.events})
    return out


def render(table: list[dict], fmt: str = "text") -> str:
    if fmt == "json":
        return json.dumps(table, indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, COLUMNS)
        w.writeheader()
        w.writerows(table)
        return buf.getvalue()
    widths = {c: max(len(c), *(len(str(r[c])) for r in table)) for c in COLUMNS}
    lines = ["  ".join(c.ljust(widths[c]) for c in COLUMNS)]
    for r in table:
        lines.append("  ".join(str(r[c]).ljust(widths[c]) for c in COLUMNS))
    return "\n".join(lines)


def _binned(timeline: list, nodes: int, end: float, width: float) -> tuple[list[float], list[float]]:
    """Busy nodes (%) averaged over bins of `width` s: the raw steps change every few seconds.
    Returns step edges in days (one more than values, for where="post")."""
    bins = max(1, math.ceil(end / width))
    acc = [0.0] * bins
    for (t0, b), (t1, _) in zip(timeline, [*timeline[1:], (end, 0)]):
        t0, t1 = min(t0, end), min(t1, end)
        while t1 - t0 > 1e-9:
            d = min(int(t0 // width), bins - 1)
            seg = min(t1, (d + 1) * width) - t0
            if seg <= 0:
                break
            acc[d] += b * seg
            t0 += seg
    spans = [min(width, end - d * width) or width for d in range(bins)]
    ys = [a / (nodes * s) * 100 for a, s in zip(acc, spans)]
    edges = [min(d * width, end) / DAY for d in range(bins + 1)]
    return edges, ys + ys[-1:]


def _work_done(r: Result, work: dict) -> tuple[list[float], list[float]]:
    """Share of all batch node-seconds finished by each moment (the paper's 'work done' curve)."""
    ends = sorted((e, work[j]) for j, (_, e, _) in r.records.items() if j in work)
    total = sum(work.values()) or 1.0
    xs, ys, acc = [0.0], [0.0], 0.0
    for e, w in ends:
        acc += w
        xs.append(e / DAY)
        ys.append(acc / total * 100)
    return xs, ys


def plot(base: Result, results: list[Result], nodes: int, out_dir: str | Path,
         jobs: list[Job] | None = None, paper: dict[str, float] | None = None) -> list[Path]:
    """utilization.png (daily busy nodes, one panel per configuration, the baseline dashed in
    each), work.png (cumulative batch work done; needs `jobs`) and comparison.png (extra time to
    finish the batch work, with the published value beside ours where `paper` has one, and mean
    bounded slowdown)."""
    plt = _pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    runs = [r for r in [base, *results] if r.timeline]
    if runs:
        ncols = 2 if len(runs) > 1 else 1
        nrows = math.ceil(len(runs) / ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(10, 1.9 * nrows + 0.8), sharex=True, sharey=True,
                                 squeeze=False)
        end = max(r.end for r in runs)
        width, unit = (DAY, "Daily") if end >= 10 * DAY else (3600.0, "Hourly")
        bx, by = _binned(base.timeline, nodes, base.end, width) if base.timeline else ([], [])
        for ax, r in zip(axes.flat, runs):
            xs, ys = _binned(r.timeline, nodes, r.end, width)
            ax.fill_between(xs, ys, step="post", alpha=0.25, color="tab:blue")
            ax.step(xs, ys, where="post", color="tab:blue", linewidth=1.2)
            if r is not base and bx:
                ax.step(bx, by, where="post", color="0.3", linewidth=0.9, linestyle="--")
            ax.set_title(f"{r.config}: {r.utilization * 100:.1f} % useful", fontsize=9, loc="left")
            ax.set_ylim(0, 105)
            ax.set_xlim(0, end / DAY)
            ax.grid(alpha=0.3)
        for k, ax in enumerate(axes.flat):
            if k >= len(runs):
                ax.set_visible(False)
            elif k + ncols >= len(runs):   # the lowest panel of its column carries the day axis
                ax.xaxis.set_tick_params(labelbottom=True)
                ax.set_xlabel("day")
        for ax in axes[:, 0]:
            ax.set_ylabel("busy nodes (%)")
        fig.suptitle(f"{unit} utilization per configuration (dashed: baseline, no reservations, no VMs)",
                     fontsize=10)
        fig.tight_layout()
        written.append(_save(fig, out / "utilization.png"))
    if jobs:
        work = {j.id: float(j.run * j.nodes) for j in jobs}
        fig, ax = plt.subplots(figsize=(10, 4.2))
        for r in [base, *results]:
            xs, ys = _work_done(r, work)
            ax.step(xs, ys, where="post", linewidth=1.3 if r is base else 1.0,
                    color="black" if r is base else None, label=r.config)
        ax.set_xlabel("day")
        ax.set_ylabel("batch work done (% of node-seconds)")
        ax.set_ylim(0, 102)
        ax.set_title("Cumulative batch work done (the last step is when all batch work is done)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right", frameon=True)
        fig.tight_layout()
        written.append(_save(fig, out / "work.png"))
    names = [r.config for r in results]
    if names:
        paper = paper or {}
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 0.55 * len(names) + 1.6), sharey=True,
                                     gridspec_kw={"width_ratios": [3, 2]})
        ys = list(range(len(names)))
        ours = [(r.end / base.end - 1) * 100 for r in results]
        has = [n in paper for n in names]
        h = 0.38 if any(has) else 0.7
        a1.barh([y - (h / 2 if p else 0) for y, p in zip(ys, has)], ours, height=h, color="tab:blue", label="ours")
        for y, v, p in zip(ys, ours, has):
            a1.annotate(f"{v:+.2f}", (v, y - (h / 2 if p else 0)), xytext=(3, 0), textcoords="offset points",
                        va="center", fontsize=7)
        if any(has):
            pv = [(y, paper[n]) for y, n in zip(ys, names) if n in paper]
            a1.barh([y + h / 2 for y, _ in pv], [v for _, v in pv], height=h, color="tab:orange",
                    label="published (HPDC'08)")
            for y, v in pv:
                a1.annotate(f"{v:+.2f}", (v, y + h / 2), xytext=(3, 0), textcoords="offset points",
                            va="center", fontsize=7)
            a1.legend(fontsize=8, loc="lower right")
        a1.axvline(0, color="0.3", linewidth=0.8)
        a1.set_yticks(ys, names, fontsize=8)
        a1.invert_yaxis()
        a1.set_xlabel("extra time to finish all batch work (% over baseline)")
        a1.margins(x=0.15)
        a2.barh(ys, [r.mean_bsld for r in results], color="tab:gray", height=0.6)
        a2.set_xlabel("mean bounded slowdown (10 s bound)")
        for ax in (a1, a2):
            ax.grid(axis="x", alpha=0.3)
        fig.suptitle("Each configuration against the baseline", fontsize=10)
        fig.tight_layout()
        written.append(_save(fig, out / "comparison.png"))
    return written


def plot_table1(cells: dict[str, dict[str, tuple[float, ...]]], out: str | Path) -> Path:
    """Table 1 side by side: `cells[label][config]` = extra % at rho 10/20/30 (label 'published'
    among them), one panel per rho."""
    plt = _pyplot()
    labels = list(cells)
    configs = list(next(iter(cells.values())))
    fig, axes = plt.subplots(1, 3, figsize=(12, 0.5 * len(configs) * len(labels) / 2 + 2.2), sharey=True)
    h = 0.8 / len(labels)
    colors = {"published": "tab:orange"}
    palette = iter(["tab:blue", "tab:green", "tab:purple", "tab:red"])
    for lab in labels:
        colors.setdefault(lab, next(palette))
    for k, (ax, rho) in enumerate(zip(axes, (10, 20, 30))):
        for i, lab in enumerate(labels):
            ys = [c + (i - (len(labels) - 1) / 2) * h for c in range(len(configs))]
            vals = [cells[lab].get(c, (math.nan,) * 3)[k] for c in configs]
            ax.barh(ys, vals, height=h, color=colors[lab], label=lab)
            for y, v in zip(ys, vals):
                if not math.isnan(v):
                    ax.annotate(f"{v:+.1f}", (max(v, 0), y), xytext=(2, 0), textcoords="offset points",
                                va="center", fontsize=6)
        ax.set_title(f"rho = {rho} %", fontsize=10)
        ax.axvline(0, color="0.3", linewidth=0.8)
        ax.grid(axis="x", alpha=0.3)
        ax.margins(x=0.18)
        ax.set_xlabel("extra time to finish batch work (%)")
    axes[0].set_yticks(range(len(configs)), configs, fontsize=8)
    axes[0].invert_yaxis()
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle("HPDC'08 Table 1 (medium 3 h reservations): ours beside the published cells", fontsize=11)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return _save(fig, Path(out))


def plot_sweep(points: list[tuple[str, float, float, str]], bounds: dict[str, float], out: str | Path) -> Path:
    """Every workload of a sweep: `points` = (workload, rho %, ours extra %, series); `bounds` =
    the paper's published worst case per series (its per-workload values are not published)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 5))
    series = sorted({p[3] for p in points})
    colors = dict(zip(series, ["tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange"]))
    for k, s in enumerate(series):
        pts = [p for p in points if p[3] == s]
        off = (k - (len(series) - 1) / 2) * 0.6
        ax.scatter([p[1] + off for p in pts], [p[2] for p in pts], s=14, alpha=0.7, color=colors[s],
                   label=f"ours: {s} (worst {max(p[2] for p in pts):+.1f} %)")
        if s in bounds:
            ax.axhline(bounds[s], color=colors[s], linestyle="--", linewidth=1,
                       label=f"paper's worst case, {s}: {bounds[s]:+.2f} %")
    ax.set_xlabel("reservations' share of all work, rho (%)")
    ax.set_ylabel("extra time to finish all batch work (%)")
    ax.set_title(f"All {len({p[0] for p in points})} workloads: ours against the paper's published worst cases",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", framealpha=0.9)
    ax.set_ylim(top=max([p[2] for p in points] + list(bounds.values())) * 1.45 + 1)
    fig.tight_layout()
    return _save(fig, Path(out))


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    fig.clf()
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path


def with_nodes(cluster: Cluster, **kw) -> Cluster:
    return replace(cluster, **{k: v for k, v in kw.items() if v is not None})
