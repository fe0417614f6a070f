"""Running configurations side by side and showing the outcome: text, CSV, JSON, PNG."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import replace
from pathlib import Path

from .engine import Cluster, Config, Result, simulate
from .workload import Job, Reservation, assign_images, image_mix

COLUMNS = ("config", "end_s", "extra_pct", "utilization", "mean_wait_s", "mean_bsld",
           "ars_accepted", "ars_on_time", "ars_rejected", "suspensions", "cancelled", "transfers", "link_gb", "events")


def compare(jobs: list[Job], ars: list[Reservation], configs: list[Config], cluster: Cluster = Cluster(),
            seed: int = 0, images: str | None = None, check: bool = False) -> tuple[Result, list[Result]]:
    """The baseline (no reservations, no VMs) and each configuration on one workload. Images are
    drawn once per mix with `seed`, so every configuration sees the same jobs."""
    base = simulate(jobs, [], Config("baseline", reservations=False), cluster, check=check)
    out = []
    for cfg in configs:
        j, a = assign_images(jobs, ars, image_mix(images or cfg.images), seed)
        out.append(simulate(j, a, cfg, cluster, check=check))
    return base, out


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


def plot(base: Result, results: list[Result], nodes: int, out_dir: str | Path) -> list[Path]:
    """utilization.png (busy nodes over time, per configuration) and comparison.png (extra time
    to finish the batch work, and mean bounded slowdown)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(10, 4))
    for r in [base, *results]:
        if not r.timeline:
            continue
        ts = [t / 86400 for t, _ in r.timeline]
        ys = [b / nodes * 100 for _, b in r.timeline]
        ax.step(ts, ys, where="post", linewidth=0.6, label=r.config)
    ax.set_xlabel("days")
    ax.set_ylabel("busy nodes (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    p1 = out / "utilization.png"
    fig.savefig(p1, dpi=110)
    plt.close(fig)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    names = [r.config for r in results]
    a1.barh(names, [(r.end / base.end - 1) * 100 for r in results])
    a1.set_xlabel("extra time to finish batch work (%)")
    a2.barh(names, [r.mean_bsld for r in results])
    a2.set_xlabel("mean bounded slowdown")
    a2.set_yticklabels([])
    fig.tight_layout()
    p2 = out / "comparison.png"
    fig.savefig(p2, dpi=110)
    plt.close(fig)
    return [p1, p2]


def with_nodes(cluster: Cluster, **kw) -> Cluster:
    return replace(cluster, **{k: v for k, v in kw.items() if v is not None})
