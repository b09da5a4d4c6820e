"""What the lab is doing while it builds, pushes and probes: shown on stderr, never mixed into the report.

The lab announces four phases: `network` (namespaces, bridges, veths, neighbour entries), `boot` (each host's
baseline and sshd, the one probe agent), `push` (one step per host, confirmed or failed) and `probe` (one step
per probe answered). On a terminal they are rich progress bars; otherwise (CI logs, pipes) one plain line per
phase once it is done, so a log shows where the time went and which host failed without control characters.
"""

from __future__ import annotations

import sys
import threading
import time
from types import TracebackType
from typing import IO

from rich.console import Console
from rich.table import Column
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn

PHASES = ("network", "boot", "push", "probe")


class LabProgress:
    """Receives the lab's phases and shows nothing: what a Lab used as a library (tests) gets by default.

    Lab calls these from worker threads too (pushes run in parallel), so implementations must be thread-safe.
    """

    def begin(self, phase: str, total: int | None, detail: str) -> None:
        """A phase starts; `total` steps if it counts any (hosts to push, probes to send)."""

    def advance(self, phase: str, steps: int = 1, detail: str | None = None) -> None:
        """`steps` more are done; `detail` says what happened last (`mysql-1 confirmed`)."""

    def end(self, phase: str, summary: str) -> None:
        """The phase is over; `summary` is one line for a person."""

    def __enter__(self) -> LabProgress:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        return None


class PlainProgress(LabProgress):
    """One line per phase when it ends: `lab: push      4 of 4 hosts confirmed (1.21 s)`."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self._stream = stream
        self._started: dict[str, float] = {}
        self._lock = threading.Lock()

    def begin(self, phase: str, total: int | None, detail: str) -> None:
        self._started[phase] = time.monotonic()

    def end(self, phase: str, summary: str) -> None:
        seconds = time.monotonic() - self._started.pop(phase, time.monotonic())
        stream = self._stream or sys.stderr  # looked up late: tests and callers may swap sys.stderr
        with self._lock:
            stream.write(f"lab: {phase:<8} {summary} ({seconds:.2f} s)\n")
            stream.flush()


class RichProgress(LabProgress):
    """A live progress bar per phase on a terminal; the finished phases stay on screen with their summary."""

    def __init__(self, console: Console) -> None:
        self._progress = Progress(
            SpinnerColumn(finished_text="[green]✓[/]"),
            TextColumn("[bold]{task.fields[phase]:<8}[/]"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            # the summary gives way on a narrow terminal, the bar and the counts stay
            TextColumn("{task.description}", markup=False, table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1)),
            console=console,
            transient=False,
            expand=True,  # the summary takes the room left; the bar and the counts keep theirs
        )
        self._tasks: dict[str, tuple[TaskID, int | None]] = {}

    def begin(self, phase: str, total: int | None, detail: str) -> None:
        self._tasks[phase] = (self._progress.add_task(detail, total=total, phase=phase), total)

    def advance(self, phase: str, steps: int = 1, detail: str | None = None) -> None:
        if phase not in self._tasks:
            return
        task, _ = self._tasks[phase]
        if detail is None:
            self._progress.advance(task, steps)
        else:
            self._progress.update(task, advance=steps, description=detail)

    def end(self, phase: str, summary: str) -> None:
        if phase not in self._tasks:
            return
        task, total = self._tasks.pop(phase)
        self._progress.update(task, description=summary, total=total or 1, completed=total or 1)
        self._progress.stop_task(task)

    def __enter__(self) -> RichProgress:
        self._progress.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._progress.stop()


def lab_progress(console: Console) -> LabProgress:
    """Rich bars when `console` (the CLI's stderr) is a terminal, one plain line per phase otherwise."""
    return RichProgress(console) if console.is_terminal else PlainProgress(console.file)
