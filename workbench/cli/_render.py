"""Rendering for the CLI: rich tables on stdout, progress and errors on stderr, JSON for scripts."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from typing import TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Column, Table

console = Console()
err_console = Console(stderr=True)
T = TypeVar("T")


def print_json(data) -> None:
    """Plain JSON on stdout, nothing else, so scripts can pipe it."""
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")
    sys.stdout.flush()


def json_option(what: str = "the result") -> bool:
    """The `--json` option every command that returns data has, worded for what it prints."""
    return typer.Option(False, "--json", help=f"Print {what} as JSON for scripts.")


def render(data: T, as_json: bool, show: Callable[[T], None]) -> None:
    """The one way a command hands back its result: with `--json`, `data` as JSON on stdout (its `to_dict()`
    when it has one), else `show(data)` draws it (tables, lines) for people."""
    if as_json:
        print_json(data.to_dict() if hasattr(data, "to_dict") else data)
    else:
        show(data)


def ci_text(value: float, low: float, high: float) -> str:
    """A mean with its interval, as the result tables show it: +1.23 [+0.45, +2.01]."""
    return f"{value:+.2f} [{low:+.2f}, {high:+.2f}]"


def paired_table(title: str, paired: dict[str, dict[str, dict]], snrs: list[float]) -> Table:
    """rival -> str(snr) -> {"mean", "ci_low", "ci_high", ...} as a table: one row per rival."""
    table = Table(title=title)
    table.add_column("fine-tuned −")
    for snr in snrs:
        table.add_column(f"input {snr:g} dB", justify="right")
    for rival, cells in paired.items():
        table.add_row(rival, *[ci_text(*(cells[f"{snr:g}"][key] for key in ("mean", "ci_low", "ci_high")))
                               if f"{snr:g}" in cells else "" for snr in snrs])
    return table


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
