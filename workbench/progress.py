"""How long-running library functions report progress without printing.

Library code takes an optional `progress` callback and calls it as
`progress(stage, done, total, **fields)`: `stage` is a short human label ("ingest revox-a77"), `done`
and `total` are in the stage's own unit (frames, steps, trials; `total` None when unknown) and `fields`
are live numbers worth showing (loss=0.12, rtf=35.0). The CLI turns calls into rich progress bars on
stderr; tests and scripts pass nothing.
"""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def __call__(self, stage: str, done: float, total: float | None = None, **fields) -> None: ...


def no_progress(stage: str, done: float, total: float | None = None, **fields) -> None:
    """The default callback: report nothing."""
