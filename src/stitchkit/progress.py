"""Rich progress bars, one style everywhere, on stderr. On a terminal they are live; elsewhere (a batch job's log,
a pipe) each progress block prints its final state, a line per bar, when it ends (rich draws nothing else there),
so a long run logs what it has done; STITCHKIT_PROGRESS=0 silences them."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")
# One console for every bar: rich stacks a bar started inside another (a cell's training within the sweep's
# cells) only when both draw on the same console.
_STDERR = Console(stderr=True)


def progress_enabled() -> bool:
    return os.environ.get("STITCHKIT_PROGRESS", "").lower() not in {"0", "false", "off"}


def make_progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=_STDERR,  # stdout stays the command's own output (IDs, paths), fit for a pipe
        disable=not progress_enabled(),
        transient=False,
    )


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a progress bar (like rich.progress.track, with our columns)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with make_progress() as progress:
        task = progress.add_task(description, total=total, status="")
        for item in items:
            yield item
            progress.advance(task)
