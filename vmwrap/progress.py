"""Progress of an admin's long command (fetch, build, verify), drawn on stderr only.

Only the CLI opens one, and only when stderr is a terminal and --quiet was not given: a pipe, a log
file or a scheduler's job output never receives it, and core code only sees an optional callback
(None on every job path, so what a job's payload prints stays byte-identical).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal, Protocol, TextIO


class Report(Protocol):
    """What a context yields: `report(n)` adds n bytes done; `report(stage="...")` starts a stage."""

    def __call__(self, done: int = 0, *, stage: str | None = None, total: int | None = None) -> None: ...


def _silent(done: int = 0, *, stage: str | None = None, total: int | None = None) -> None:
    return None


def shown(quiet: bool = False, stream: TextIO | None = None) -> bool:
    """Whether progress would be drawn: a terminal on stderr and no --quiet."""
    stream = stream or sys.stderr
    try:
        return not quiet and stream.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stream is no terminal
        return False


@contextmanager
def progress(what: str, unit: Literal["bytes", "stages", "items"] = "bytes", total: int | None = None,
             quiet: bool = False) -> Iterator[Report]:
    """A Report for `what`: a bar with bytes and rate (`unit="bytes"`), a bar counting items done of
    total (`unit="items"`) or a stage line per stage (`unit="stages"`); a no-op when not shown()."""
    if not shown(quiet):
        yield _silent
        return
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, SpinnerColumn,
                               TextColumn, TimeElapsedColumn, TransferSpeedColumn)

    console = Console(file=sys.stderr)
    columns = [SpinnerColumn(), TextColumn("{task.description}")]
    if unit == "bytes":
        columns += [BarColumn(), DownloadColumn(), TransferSpeedColumn()]
    elif unit == "items":
        columns += [BarColumn(), MofNCompleteColumn()]
    columns.append(TimeElapsedColumn())
    with Progress(*columns, console=console, transient=unit != "stages") as bar:
        task = bar.add_task(what, total=total)

        def report(done: int = 0, *, stage: str | None = None, total: int | None = None) -> None:
            if stage is not None:  # the finished stage stays on screen as a line
                bar.console.print(f"[dim]{what}:[/dim] {stage}", highlight=False)
                bar.update(task, description=f"{what}: {stage}")
            if total is not None:
                bar.update(task, total=total)
            if done:
                bar.advance(task, done)

        yield report


def stage_callback(report: Report) -> Callable[[str], None]:
    """`report` as the one-argument stage callback core functions take."""
    return lambda stage: report(stage=stage)
