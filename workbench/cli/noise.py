"""`workbench capture-noise`, `workbench noise list` and `workbench noise profile`: the noise library."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from workbench.cli._app import app
from workbench.cli._render import console, err_console, json_option, progress_bars, render
from workbench.devices import format_speed, get_device

noise_app = typer.Typer(help="The noise library: blank-tape snippets per device, speed and split.",
                        no_args_is_help=True)
app.add_typer(noise_app, name="noise", rich_help_panel="Noise library")

MAX_EXCLUSION_ROWS = 40


@app.command("capture-noise", rich_help_panel="Noise library")
def capture_noise(
    paths: list[Path] = typer.Argument(..., metavar="PATH...",
                                       help="Recordings, or folders searched for .wav .bwf .rf64 .w64 .flac .aif(f)."),
    device: str = typer.Option(..., "--device", metavar="ID",
                               help="Replay machine id, e.g. revox-a77 (see `workbench devices list`)."),
    speed: float = typer.Option(..., "--speed", help="Tape speed in ips the recording was played at, e.g. 7.5."),
    tape: str | None = typer.Option(None, "--tape", help="Tape stock of the blank tape, e.g. 'ATR Master Tape'."),
    notes: str = typer.Option("", "--notes", help="Anything worth keeping with these recordings."),
    snippet_seconds: float = typer.Option(5.0, "--snippet-seconds", help="Length of each noise snippet."),
    split: str = typer.Option("80/10/10", "--split", help="Train/validation/test proportions."),
    replace: bool = typer.Option(False, "--replace", help="Re-ingest recordings already in the library."),
    as_json: bool = json_option("the ingest report"),
) -> None:
    """Ingest blank-tape recordings of one machine at one speed into the noise library.

    Play blank tape on the machine, record the output (any rate, bit depth, channel count; WAV, BWF,
    RF64, W64, FLAC or AIFF), and run e.g.

        workbench capture-noise --device revox-a77 --speed 7.5 --tape "ATR Master" blank/*.wav

    Each channel is streamed at 44.1 kHz through screening that removes DC and leaves out digital
    silence, clipping, clicks, splices, leader and other transients, dropouts and abrupt level changes
    (each reported with its time range and reason). The usable noise is cut into snippets and split
    into train/validation/test by contiguous time blocks (with guard gaps, seeded by the audio, so the
    same recording always splits the same way). Then the machine's noise profile (level, tilt,
    bandwidth, mains hum) is recomputed and shown.

    Batches: every file is checked before anything is ingested, and the batch is committed as one
    transaction: if any file is bad or holds no usable noise, the WHOLE batch is refused and the library
    is left as it was. A recording already in the library (same content, device and speed) is skipped
    unless --replace.
    """
    from workbench.noise.ingest import capture_noise as run_capture, parse_split
    from workbench.workspace import find_workspace

    proportions = parse_split(split)
    workspace = find_workspace()
    with progress_bars() as progress:
        report = run_capture(workspace, paths, device, speed, tape=tape, notes=notes, snippet_seconds=snippet_seconds,
                             split=proportions, replace=replace, progress=progress)
    render(report, as_json, _show_report)


def _show_report(report) -> None:
    from workbench.noise.ingest import ALREADY

    files = Table(title=f"capture-noise: {report.device} @ {format_speed(report.speed_ips)} ips",
                  caption="length: seconds × channels; usable: seconds of snippets kept, all channels")
    files.add_column("recording", overflow="fold", ratio=1)
    files.add_column("status")
    for column in ("length", "usable", "train", "val", "test"):
        files.add_column(column, justify="right")
    for f in report.files:
        status = f.status + (f" ({f.duplicates} duplicate snippets)" if f.duplicates else "")
        files.add_row(f.path, status, f"{f.seconds:.1f} s × {f.channels}",
                      f"{f.usable_seconds:.1f} s" if f.usable_seconds else "",
                      *(str(f.snippets[s]) if f.usable_seconds else "" for s in ("train", "validation", "test")))
    console.print(files)
    skipped = [f for f in report.files if f.status == ALREADY]
    if skipped:
        console.print(f"{len(skipped)} recording(s) already in the library: nothing added for them "
                      "(use --replace to re-ingest).")
    rows = [(f.path, e) for f in report.files for e in f.exclusions if f.status != ALREADY]
    if rows:
        excluded = Table(title="Left out (time in the source file)")
        for column in ("recording", "ch", "from (s)", "to (s)", "reason"):
            excluded.add_column(column)
        for path, e in rows[:MAX_EXCLUSION_ROWS]:
            excluded.add_row(Path(path).name, str(e.channel + 1), f"{e.start_s:.2f}", f"{e.end_s:.2f}", e.reason)
        console.print(excluded)
        if len(rows) > MAX_EXCLUSION_ROWS:
            console.print(f"... and {len(rows) - MAX_EXCLUSION_ROWS} more (all of them with --json)")
    if report.profile is not None:
        _show_profile(report.device, report.speed_ips, report.profile, report.profile_json, report.profile_png)
    if report.seconds_processed:
        err_console.print(f"processed {report.seconds_processed:.1f} s of audio in {report.wall_seconds:.1f} s "
                          f"({report.seconds_processed / max(report.wall_seconds, 1e-9):.0f}x real time)")


def _show_profile(device: str, speed_ips: float, profile, json_path, png_path) -> None:
    table = Table(title=f"Noise profile: {device} @ {format_speed(speed_ips)} ips", show_header=False)
    table.add_column("measure", style="bold")
    table.add_column("value", overflow="fold")
    table.add_row("audio", f"{profile.seconds / 60:.2f} min (all channels)")
    table.add_row("RMS level", f"{profile.rms_dbfs:.1f} dBFS")
    table.add_row("tilt", f"{profile.tilt_db_per_octave:+.2f} dB/octave (200 Hz - 8 kHz)")
    table.add_row("bandwidth", f"{profile.bandwidth_hz:.0f} Hz (-10 dB from mid band)")
    if profile.hum is None:
        table.add_row("mains hum", "none stands out")
    else:
        table.add_row("mains hum", f"{profile.hum.mains_hz} Hz family, fundamental {profile.hum.fundamental_hz:.3f} Hz")
        levels = "  ".join(f"{k}: {int(round(level))}" for k, (_, level) in enumerate(profile.hum.harmonics_db, start=1))
        table.add_row("hum harmonics", f"dB above local floor, k = {levels}")
    if json_path:
        table.add_row("stored", f"{json_path}\n{png_path}")
    console.print(table)


@noise_app.command("list")
def noise_list(
    device: str | None = typer.Option(None, "--device", metavar="ID", help="Only this replay machine."),
    as_json: bool = json_option("the library's contents"),
) -> None:
    """Minutes of noise per device, speed and split (and snippet counts).

    Example: `workbench noise list --device revox-a77`.
    """
    from workbench.noise.library import NoiseLibrary
    from workbench.workspace import find_workspace

    workspace = find_workspace()
    if device is not None:
        get_device(workspace, device)  # an unknown device is an error, not an empty list
    render(NoiseLibrary(workspace).summary(device), as_json, lambda summary: _show_library(summary, device))


def _show_library(summary: list[dict], device: str | None) -> None:
    if not summary:
        console.print("the noise library is empty" + (f" for {device}" if device else "")
                      + "; add recordings with `workbench capture-noise`")
        return
    table = Table(title="Noise library (minutes, snippets)")
    for column in ("device", "speed", "train", "validation", "test", "total"):
        table.add_column(column, justify="left" if column == "device" else "right")
    for entry in summary:
        cells = [f"{entry['splits'][s]['minutes']:.2f} ({entry['splits'][s]['snippets']})"
                 for s in ("train", "validation", "test")]
        table.add_row(entry["device"], f"{format_speed(entry['speed_ips'])} ips", *cells,
                      f"{entry['minutes']:.2f} ({entry['snippets']})")
    console.print(table)


@noise_app.command("profile")
def noise_profile(
    device: str = typer.Option(..., "--device", metavar="ID", help="Replay machine id."),
    speed: float = typer.Option(..., "--speed", help="Tape speed in ips."),
    as_json: bool = json_option("the profile (with the full PSD)"),
) -> None:
    """The noise profile of one machine at one speed: level, tilt, bandwidth, hum; where its JSON and PNG are.

    Example: `workbench noise profile --device revox-a77 --speed 7.5`.
    """
    from workbench.errors import WorkbenchError
    from workbench.noise.library import NoiseLibrary
    from workbench.workspace import find_workspace

    workspace = find_workspace()
    speed_ips = get_device(workspace, device).check_speed(speed)
    library = NoiseLibrary(workspace)
    profile = library.profile(device, speed_ips)
    if profile is None:
        raise WorkbenchError(f"no noise for {device} at {format_speed(speed_ips)} ips yet; run `workbench capture-noise`")
    json_path, png_path = library.profile_paths(device, speed_ips)
    render({"device": device, "speed_ips": speed_ips, "json": str(json_path), "png": str(png_path),
            **profile.to_dict()}, as_json, lambda _: _show_profile(device, speed_ips, profile, json_path, png_path))
