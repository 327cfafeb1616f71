"""`workbench synth blank-tape|music|archive|signature`: the embedded synthetic archive."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import typer
from rich.table import Table

from workbench.cli._app import app
from workbench.cli._render import console, json_option, progress_bars, render

synth_app = typer.Typer(
    help=("Synthetic data with known truth: blank tape as each machine in the device registry (registry/devices/) "
          "would play it, clean music, and a whole small archive for the demo. No downloads needed."),
    no_args_is_help=True,
)
app.add_typer(synth_app, name="synth", rich_help_panel="Set-up")


def _minutes(value: float) -> str:
    seconds = round(value * 60)
    return f"{seconds // 60}:{seconds % 60:02d}"


@synth_app.command("blank-tape")
def blank_tape(
    out: Path = typer.Argument(..., metavar="OUT.wav", help="Audio file to write (.wav, .flac, ...)."),
    device: str = typer.Option(..., "--device", metavar="ID",
                               help="Replay machine id in the device registry, e.g. revox-a77."),
    speed: float = typer.Option(..., "--speed", help="Tape speed in ips, one the device has, e.g. 7.5."),
    minutes: float = typer.Option(..., "--minutes", help="Length in minutes, e.g. 2 or 0.5."),
    seed: int = typer.Option(0, "--seed", help="Noise realisation; the same seed gives byte-identical files."),
    sample_rate: int = typer.Option(44_100, "--sample-rate", help="Sample rate of the file (Hz)."),
    defects: bool = typer.Option(True, "--defects/--no-defects",
                                 help="Inject clicks, dropouts and a splice (listed in the sidecar)."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    as_json: bool = json_option("what was rendered"),
) -> None:
    """Render what a blank tape sounds like on one machine at one speed (24-bit WAV).

    The noise carries the machine's signature: hiss shaped by its playback EQ at that speed and the
    bandwidth the speed allows, head and amplifier noise, mains hum with drifting harmonics, rumble,
    modulation noise, and (unless --no-defects) clicks, dropouts and a splice. The truth (signature,
    injected events with times) is written beside it as OUT.synth.json. E.g.

        workbench synth blank-tape --device uher-4000-l --speed 1.875 --minutes 2 blank/uher.wav

    See `workbench synth signature --device ID` for the signature and how to override it.
    """
    from workbench.devices import get_device
    from workbench.errors import WorkbenchError
    from workbench.synth.tape_noise import render_blank_tape
    from workbench.workspace import find_workspace

    if out.exists() and not force:
        raise WorkbenchError(f"{out}: exists; pass --force to replace it")
    if not minutes > 0:
        raise WorkbenchError(f"--minutes must be positive, not {minutes:g}")
    entry = get_device(find_workspace(), device)
    with progress_bars() as progress:
        rendered = render_blank_tape(entry, speed, minutes * 60.0, out, seed=seed, sample_rate=sample_rate,
                                     defects=defects, progress=progress)
    render(rendered, as_json, _show_blank_tape)


def _show_blank_tape(rendered) -> None:
    kinds = Counter(e.kind for e in rendered.events)
    events = ", ".join(f"{n} {kind}{'s' if n > 1 else ''}" for kind, n in sorted(kinds.items())) or "no defects"
    assumed = ", assumed" if rendered.playback_eq_assumed else ""
    console.print(f"rendered {_minutes(rendered.seconds / 60)} of blank tape on [bold]{rendered.device_id}[/] at "
                  f"{rendered.speed_ips:g} ips ({rendered.playback_eq}{assumed}), "
                  f"{rendered.channels} ch, {rendered.sample_rate} Hz -> {rendered.path}")
    console.print(f"injected: {events}; the truth is in {rendered.sidecar}")


@synth_app.command("music")
def music(
    out_dir: Path = typer.Argument(..., metavar="OUT_DIR", help="Folder for the pieces (created if missing)."),
    minutes: float = typer.Option(..., "--minutes", help="Total length in minutes."),
    seed: int = typer.Option(0, "--seed", help="Same seed, same music (byte-identical files)."),
    stereo: bool = typer.Option(False, "--stereo", help="Stereo pieces (panned voices, stereo room); default mono."),
    piece_seconds: float = typer.Option(30.0, "--piece-seconds", help="About how long each piece is."),
    as_json: bool = json_option("the pieces"),
) -> None:
    """Render clean, music-like 44.1 kHz pieces: a corpus of known-clean audio with no download.

    Piano-like, bowed, plucked and percussive timbres with inharmonic partials, envelopes, vibrato,
    polyphony, dynamics, pauses and a room; loudness set within -26..-18 LUFS and peaks at most -1 dBFS.
    Writes piece-000.wav, ... and music.json. Running it again on the same folder reuses what is there.
    E.g.

        workbench synth music --minutes 4 --seed 1 corpus/train
    """
    from workbench.synth.music import render_music

    with progress_bars() as progress:
        rendered = render_music(out_dir, minutes, seed=seed, channels=2 if stereo else 1,
                                piece_seconds=piece_seconds, progress=progress)
    render(rendered, as_json, _show_music)


def _show_music(rendered) -> None:
    table = Table(title=f"{len(rendered.pieces)} pieces in {rendered.folder}" + (" (reused)" if rendered.reused else ""))
    for column in ("file", "length", "key", "tempo", "lead", "others", "loudness", "peak"):
        table.add_column(column, justify="right" if column in ("length", "tempo", "loudness", "peak") else "left")
    for p in rendered.pieces:
        others = ", ".join(t for v, t in p.timbres.items() if v != "lead")
        table.add_row(p.file, f"{p.seconds:.1f} s", p.key, f"{p.tempo_bpm:.0f} bpm", p.timbres["lead"], others,
                      f"{p.loudness_lufs:.1f} LUFS", f"{p.peak_dbfs:.1f} dBFS")
    console.print(table)


@synth_app.command("archive")
def archive(
    out_dir: Path = typer.Argument(..., metavar="OUT_DIR", help="Folder for the archive (created if missing)."),
    seed: int = typer.Option(0, "--seed", help="Same seed, same archive."),
    scale: str = typer.Option("demo", "--scale", help="demo (minutes of audio: the demo's size) or small (seconds)."),
    as_json: bool = json_option("the archive's manifest"),
) -> None:
    """Build a small synthetic archive: blank tape per machine and speed, a clean corpus, two transfers.

    Blank tape for uher-4000-l (3.75, 1.875 ips), revox-a77 (7.5, 3.75) and technics-tr575-a (1.875),
    clean music split into corpus/train, validation and test, and transfers (music + a machine's
    noise, 48 kHz 24-bit stereo, with their clean references). OUT_DIR/archive.json lists it all.
    Running it again with the same seed reuses a complete archive and finishes an interrupted one. E.g.

        workbench synth archive demo-archive
        workbench capture-noise --device revox-a77 --speed 7.5 demo-archive/blank-tape/revox-a77_7.5ips.wav
    """
    from workbench.devices import load_devices
    from workbench.synth.archive import build_archive
    from workbench.workspace import find_workspace

    devices = load_devices(find_workspace())
    with progress_bars() as progress:
        result = build_archive(out_dir, devices, seed=seed, scale=scale, progress=progress)
    render(result, as_json, lambda result: _show_archive(result, seed, scale))


def _show_archive(result, seed: int, scale: str) -> None:
    m = result.manifest
    if result.reused:
        console.print(f"{result.folder}: complete archive already there (seed {seed}, scale {scale}); reused it")
    table = Table(title=f"Synthetic archive in {result.folder}", show_header=False)
    table.add_column("part", style="bold")
    table.add_column("contents")
    for tape in m["blank_tapes"]:
        table.add_row(f"blank tape {tape['device']} @ {tape['speed_ips']:g} ips",
                      f"{tape['path']} ({tape['seconds']:.0f} s, {tape['channels']} ch, {tape['events']} defects)")
    for split, corpus in m["corpus"].items():
        table.add_row(f"corpus {split}", f"{corpus['folder']}/ ({len(corpus['pieces'])} pieces, {corpus['seconds']:.0f} s)")
    for transfer in m["transfers"]:
        table.add_row(f"transfer {transfer['device']} @ {transfer['speed_ips']:g} ips",
                      f"{transfer['path']} (clean: {transfer['reference']})")
    console.print(table)
    console.print(f"manifest: {result.manifest_path}" + ("" if result.reused else f"; wrote {len(result.rendered)} parts"))


@synth_app.command("signature")
def signature(
    device: str = typer.Option(..., "--device", metavar="ID",
                               help="Replay machine id in the device registry, e.g. technics-tr575-a."),
    as_json: bool = json_option("the signature"),
) -> None:
    """Show the noise signature the simulator gives a machine, and what it means at each speed.

    Every machine gets stable values from its id; any of them can be set in a [simulation] table in
    its device registry file (registry/devices/ID.toml), e.g.

        [simulation]
        mains_hz = 60
        hiss_dbfs = -68.0
    """
    from workbench.devices import get_device
    from workbench.synth.tape_noise import signature_report
    from workbench.workspace import find_workspace

    render(signature_report(get_device(find_workspace(), device)), as_json, _show_signature)


def _show_signature(report: dict) -> None:
    device = report["device"]
    sig = report["signature"]
    table = Table(title=f"Simulated noise signature: {device}")
    for column in ("key", "value", "from", "meaning"):
        table.add_column(column)
    for key, meaning in report["keys"].items():
        value = sig[key]
        text = ", ".join(f"{v:g}" for v in value) if isinstance(value, list) else f"{value:g}"
        table.add_row(key, text, "device registry \\[simulation]" if key in sig["overridden"] else "derived", meaning)
    console.print(table)
    speeds = Table(title="At each speed")
    for column in ("speed", "playback EQ", "hiss RMS", "hiss turnover", "band edge", "gap null", "capstan line"):
        speeds.add_column(column)
    for s in report["speeds"]:
        speeds.add_row(f"{s['speed_ips']:g} ips", s["playback_eq"] + (" (assumed)" if s["playback_eq_assumed"] else ""),
                       f"{s['hiss_rms_dbfs']:.1f} dBFS", f"{s['hiss_turnover_hz']:.0f} Hz", f"{s['band_edge_hz']:.0f} Hz",
                       f"{s['gap_null_hz']:.0f} Hz", f"{s['capstan_hz']:.1f} Hz")
    console.print(speeds)
