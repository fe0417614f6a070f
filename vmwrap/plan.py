"""Whether a job may use the gap before an advance reservation, and when it must be saved.

One decision shared by the live planner (`vmwrap plan`, plugins/slurm/planner.py) and the simulator
(`vmwrap simulate`), so what the simulator predicts is what the cluster does. Scheduler-neutral: it
sees times in seconds and sizes in MiB, never a scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SaveModel:
    """How long saving (and restoring) a VM takes, with a safety margin.

    `rate_mb_s` is the measured save throughput (benchmarks/checkpoint.py: 495-917 MB/s on this
    host's disk; the HPDC'08 model uses 50 MB/s); `fixed_s` covers drain, pause and commit.
    The margin is relative plus absolute because the rate varies with the page cache and the
    absolute part covers a scheduler's polling delay.
    """

    rate_mb_s: float
    fixed_s: float = 0.0
    margin: float = 0.0
    margin_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.rate_mb_s > 0:
            raise ValueError(f"save rate must be > 0 MB/s, got {self.rate_mb_s}")
        if self.fixed_s < 0 or self.margin < 0 or self.margin_s < 0:
            raise ValueError("save model times and margins must be >= 0")

    def save_seconds(self, mem_mb: float) -> float:
        """Predicted time to write `mem_mb` of guest memory (no margin)."""
        return self.fixed_s + mem_mb / self.rate_mb_s

    def budget(self, mem_mb: float) -> float:
        """Time to set aside before the reservation for a save of `mem_mb` (with margin)."""
        return self.save_seconds(mem_mb) * (1.0 + self.margin) + self.margin_s


@dataclass(frozen=True)
class GapDecision:
    start: bool
    reason: str
    save_at: float | None = None   # when the save must begin (None: it ends before the gap closes)
    run_s: float = 0.0             # work done before the save


def min_gap(remaining_s: float, mem_mb: float, model: SaveModel, *, setup_s: float = 0.0,
            factor: float = 1.0, min_run_s: float = 0.0, can_save: bool = True) -> float:
    """The shortest gap `gap_decision` accepts: lets a scheduler test many nodes with one number."""
    whole = setup_s + remaining_s
    if not can_save:
        return whole
    need = max(min_run_s, factor * (model.budget(mem_mb) + model.save_seconds(mem_mb)))
    return min(whole, setup_s + need + model.budget(mem_mb))


def gap_decision(now: float, gap_end: float, remaining_s: float, mem_mb: float, model: SaveModel,
                 *, setup_s: float = 0.0, factor: float = 1.0, min_run_s: float = 0.0) -> GapDecision:
    """May a job needing `remaining_s` (after `setup_s` of boot/restore) start at `now` on nodes that
    must be free at `gap_end`?

    Yes if it ends in time; yes with a save if the work done before the save is worth at least
    `factor` x (save + restore) time (Haizea's suspend-threshold-factor) and `min_run_s`; no
    otherwise. The reason is written for an admin's log.
    """
    gap = gap_end - now
    if now + setup_s + remaining_s <= gap_end:
        return GapDecision(True, f"ends {gap_end - now - setup_s - remaining_s:.0f}s before the gap closes",
                           None, remaining_s)
    save = model.budget(mem_mb)
    save_at = gap_end - save
    run = save_at - now - setup_s
    need = max(min_run_s, factor * (save + model.save_seconds(mem_mb)))
    if run < need:
        return GapDecision(False, f"gap of {gap:.0f}s leaves {max(run, 0):.0f}s of work before a "
                                  f"{save:.0f}s save; needs {need:.0f}s")
    return GapDecision(True, f"runs {run:.0f}s, then a save starting {save:.0f}s before the gap closes", save_at, run)
