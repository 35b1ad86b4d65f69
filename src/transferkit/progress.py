"""Progress bars with rate and ETA (rich), written to stderr so stdout stays clean for --json."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")
console = Console(stderr=True, soft_wrap=True)


class RateColumn(TextColumn):
    def __init__(self) -> None:
        super().__init__("")

    def render(self, task):  # items per second, the number people compare
        speed = task.finished_speed or task.speed
        return f"{speed:.1f}/s" if speed else "-/s"


class StepProgress(Progress):
    """Redraws from the caller's thread, at most every `interval` seconds: no refresh thread
    competes with the training loop for the interpreter."""

    interval = 0.5

    def advance_and_draw(self, task, amount: float) -> None:
        self.advance(task, amount)
        now = time.monotonic()
        if now - getattr(self, "_drawn_at", 0.0) >= self.interval:
            self._drawn_at = now
            self.refresh()


def make_progress(disable: bool = False) -> StepProgress:
    return StepProgress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=disable,
        auto_refresh=False,
    )


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    items = list(items) if total is None and not hasattr(items, "__len__") else items
    total = total if total is not None else len(items)  # type: ignore[arg-type]
    with make_progress() as progress:
        task = progress.add_task(description, total=total)
        for item in items:
            yield item
            progress.advance_and_draw(task, 1)
