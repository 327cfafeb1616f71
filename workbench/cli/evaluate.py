"""`workbench evaluate`: score test recordings against references with SNR, SI-SDR and PEAQ."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from workbench.cli._app import app
from workbench.cli._render import console, json_option, progress_bars, render


@app.command("evaluate", rich_help_panel="Restore")
def evaluate(
    reference: Path = typer.Argument(..., metavar="REFERENCE",
                                     help="The clean reference: an audio file, or a folder of them."),
    test: Path = typer.Argument(..., metavar="TEST",
                                help="What to grade against it: a file, or a folder paired by relative path "
                                     "(a.wav pairs with a.* or a.denoised.*, as `denoise` names outputs)."),
    peaq: bool = typer.Option(True, "--peaq/--no-peaq", help="Compute the PEAQ ODG (the slow part)."),
    as_json: bool = json_option("the scores"),
) -> None:
    """Score a (reference, test) file pair, or two folders of them, with SNR, SI-SDR and PEAQ.

    Examples:

        workbench evaluate clean/take1.wav restored/take1.denoised.wav
        workbench evaluate clean/ restored/ --json

    PEAQ is ITU-R BS.1387's Basic version (our implementation): the Objective Difference Grade runs
    from 0 (difference imperceptible) to −4 (very annoying); a full-scale sine is taken to play at
    92 dB SPL, and audio not at 48 kHz is resampled to 48 kHz first. Each pair must be time-aligned:
    same sample rate, channel count and length, mono or stereo, neither file silent; anything else is
    refused with one line naming the file (exit 2). Every pair's rate, channels and length are checked
    before the first is scored; a silent file is found when its pair is read.
    """
    from workbench.evaluate.score import score_files

    with progress_bars(not as_json) as progress:
        rows = score_files(reference, test, with_peaq=peaq, progress=progress)
    render(rows, as_json, lambda rows: _show_scores(rows, peaq))


def _show_scores(rows: list[dict], peaq: bool) -> None:
    table = Table(title="evaluate")
    columns = ["test", "rate", "ch", "length", "SNR (dB)", "SI-SDR (dB)"] + (["PEAQ ODG"] if peaq else [])
    for column in columns:
        table.add_column(column, justify="left" if column == "test" else "right")
    for row in rows:
        cells = [Path(row["test"]).name, f"{row['sample_rate']} Hz", str(row["channels"]), f"{row['seconds']:.1f} s",
                 f"{row['snr_db']:+.2f}", f"{row['si_sdr_db']:+.2f}"]
        table.add_row(*cells, *([f"{row['peaq_odg']:+.2f}"] if peaq else []))
    console.print(table)
