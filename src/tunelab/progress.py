"""Progress bars for long work, and the stderr console they share with the CLI's run log.

Library code logs with `logging` (the `tunelab.*` loggers) and shows progress with `bar(...)`;
the CLI prints those log lines on this same console (cli/app.py), so a line logged while a bar
is live appears above the bar instead of through it.

    with bar("train", total=steps, fields={"loss": float("nan")}) as (progress, task):
        progress.update(task, advance=1, loss=0.42)
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TaskID, TextColumn, TimeElapsedColumn

console = Console(stderr=True)  # the process's stderr: run log, progress bars, errors (results go to stdout)


@contextmanager
def bar(label: str, total: int, *extra: ProgressColumn, transient: bool = False,
        fields: dict[str, object] | None = None, completed: int = 0) -> Iterator[tuple[Progress, TaskID]]:
    """A bar `label [====    ] n/total elapsed` plus `extra` columns (which may read `fields`)."""
    columns = (TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), *extra, TimeElapsedColumn())
    quiet = os.environ.get("RANK", "0") != "0"  # under torchrun, rank 0 alone shows progress (as it alone logs)
    with Progress(*columns, console=console, transient=transient, disable=quiet) as progress:
        yield progress, progress.add_task(label, total=total, completed=completed, **(fields or {}))
