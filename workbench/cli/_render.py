"""Rendering for the CLI: rich tables on stdout, progress and errors on stderr, JSON for scripts."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Column

console = Console()
err_console = Console(stderr=True)


def print_json(data) -> None:
    """Plain JSON on stdout, nothing else, so scripts can pipe it."""
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")
    sys.stdout.flush()


def _format_fields(fields: dict) -> str:
    parts = []
    for key, value in fields.items():
        parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    return "  ".join(parts)


@contextlib.contextmanager
def progress_bars(enabled: bool = True) -> Iterator:
    """A `workbench.progress.Progress` callback drawing one rich bar per stage on stderr."""
    if not enabled:
        yield lambda stage, done, total=None, **fields: None
        return
    # Fixed-width columns first so an 80-column terminal still shows the bar, the times and the live numbers.
    bars = Progress(
        TextColumn("{task.description}", table_column=Column(width=30, no_wrap=True, overflow="ellipsis")),
        BarColumn(bar_width=16),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}", table_column=Column(no_wrap=True, overflow="ellipsis")),
        console=err_console,
        transient=False,
    )
    tasks: dict[str, int] = {}

    def report(stage: str, done: float, total: float | None = None, **fields) -> None:
        if stage not in tasks:
            tasks[stage] = bars.add_task(stage, total=total, info="")
        bars.update(tasks[stage], completed=done, total=total, info=_format_fields(fields))

    with bars:
        yield report
