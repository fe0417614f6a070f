"""Boot, save, restore and transfer rates taken from a site's own ledgers, so the simulator
answers for this site's hardware rather than the paper's 2008 assumptions."""

from __future__ import annotations

import json
import sqlite3
import statistics
from dataclasses import dataclass, replace
from pathlib import Path

from .engine import Cluster
from .workload import WorkloadError


class CalibrationError(WorkloadError):
    pass


@dataclass(frozen=True)
class Calibration:
    boot_s: float | None = None           # VM created -> guest booted, plus exited -> destroyed
    save_mb_s: float | None = None        # memory written per second of a whole save
    restore_mb_s: float | None = None     # the job's saved memory read back per second of a restore
    transfer_mb_s: float | None = None    # image bytes fetched per second (cache misses)
    samples: dict | None = None           # how many events each rate rests on

    def apply(self, cluster: Cluster) -> Cluster:
        kw = {"boot_s": self.boot_s, "suspend_mb_s": self.save_mb_s, "restore_mb_s": self.restore_mb_s,
              "bandwidth_mb_s": self.transfer_mb_s}
        return replace(cluster, **{k: v for k, v in kw.items() if v})

    def describe(self) -> str:
        s = self.samples or {}
        parts = []
        for name, v, unit, key in (("boot+shutdown", self.boot_s, "s", "boot"),
                                   ("save", self.save_mb_s, "MB/s", "save"),
                                   ("restore", self.restore_mb_s, "MB/s", "restore"),
                                   ("image transfer", self.transfer_mb_s, "MB/s", "transfer")):
            parts.append(f"{name} {v:.1f} {unit} ({s.get(key, 0)} events)" if v else f"{name}: default (no events)")
        return "calibrated from ledgers: " + "; ".join(parts)


def _events(path: Path) -> list[tuple]:
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            rows = db.execute("SELECT ts, job_id, event, detail FROM events ORDER BY id").fetchall()
        finally:
            db.close()
    except sqlite3.Error as e:
        raise CalibrationError(f"{path}: not a vmwrap ledger ({e})") from None
    out = []
    for ts, job, ev, detail in rows:
        try:
            d = json.loads(detail or "{}")
            out.append((float(ts), str(job), str(ev), d if isinstance(d, dict) else {}))
        except (TypeError, ValueError):
            raise CalibrationError(f"{path}: malformed event detail for job {job}: {str(detail)[:60]!r}") from None
    return out


def _num(d: dict, k: str) -> float | None:
    v = d.get(k)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 else None


def calibrate(paths: list[str | Path]) -> Calibration:
    """Medians over every ledger's events (one slow outlier must not set the site's rate)."""
    boots, downs, saves, restores, xfer_b, xfer_s = [], [], [], [], 0.0, 0.0
    n_xfer = 0
    for p in map(Path, paths):
        if not p.is_file():
            raise CalibrationError(f"{p}: no such ledger file")
        last: dict[str, dict[str, float]] = {}
        mem: dict[str, float] = {}
        prev_ts: dict[str, float] = {}
        for ts, job, ev, d in _events(p):
            seen = last.setdefault(job, {})
            if ev == "booted" and "created" in seen and ts > seen["created"]:
                boots.append(ts - seen["created"])
            elif ev == "destroyed" and "exited" in seen and ts >= seen["exited"]:
                downs.append(ts - seen["exited"])
            elif ev == "saved":
                b, s = _num(d, "memory_bytes"), _num(d, "total_s")
                if b and s:
                    saves.append(b / 1e6 / s)
                    mem[job] = b
            elif ev == "restored":
                s = _num(d, "total_s")
                if s and job in mem:
                    restores.append(mem[job] / 1e6 / s)
            elif ev == "cache_miss":
                b = _num(d, "bytes")
                if b and job in prev_ts and ts > prev_ts[job]:
                    xfer_b += b
                    xfer_s += ts - prev_ts[job]   # the fetch is all that happens between the two
                    n_xfer += 1
            seen[ev] = ts
            prev_ts[job] = ts
    if not (boots or saves or restores or n_xfer):
        names = ", ".join(str(p) for p in paths)
        raise CalibrationError(f"{names}: no boot, save, restore or image-transfer events to calibrate from")
    boot = statistics.median(boots) + (statistics.median(downs) if downs else 0.0) if boots else None
    return Calibration(
        boot_s=boot, save_mb_s=statistics.median(saves) if saves else None,
        restore_mb_s=statistics.median(restores) if restores else None,
        transfer_mb_s=xfer_b / 1e6 / xfer_s if n_xfer else None,
        samples={"boot": len(boots), "save": len(saves), "restore": len(restores), "transfer": n_xfer})
