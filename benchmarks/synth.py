"""Benchmark the synthetic archive: render speed (real-time factor) of blank tape and of music, and the
peak memory of a blank-tape render at two lengths.

Each render runs in its own child process (peak RSS from resource.getrusage), after a one-second
warm-up render that loads every library, so imports are not timed. Baselines, measured in the same
run in the same kind of child:
- blank tape: generating white Gaussian noise of the same length and channel count in blocks and
  writing it to the same 24-bit WAV: the least any noise render must do;
- music: the same for mono white noise of the music's length.
Target (issue 3): faster than 20x real time on 2 cores for both; memory must not grow with length.

    .venv/bin/python benchmarks/synth.py [--minutes 3] [--long-minutes 12] [--music-minutes 2]

Timings are wall-clock on whatever else the machine is doing; the CPU time each render used is printed
beside it (what it would take on idle cores; the renders are single-threaded apart from BLAS/FFT calls).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

DEVICE, SPEED = "revox-a77", 7.5  # a stereo machine: two channels of everything

CHILD = textwrap.dedent("""
    import json, resource, sys, time
    from pathlib import Path
    import numpy as np
    from workbench.audio.io import atomic_audio_writer
    from workbench.devices import research_devices
    from workbench.synth.music import render_music
    from workbench.synth.tape_noise import render_blank_tape
    mode, minutes, folder, device_id, speed = sys.argv[1], float(sys.argv[2]), Path(sys.argv[3]), sys.argv[4], float(sys.argv[5])
    device = {d.id: d for d in research_devices()}[device_id]
    render_blank_tape(device, speed, 1.0, folder / "warm.wav")  # load every library before timing
    render_music(folder / "warm-music", minutes=5 / 60, piece_seconds=5.0)
    rss_imported = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def white(path, channels, seconds):
        rng = np.random.default_rng(0)
        frames, block = int(seconds * 44100), 1 << 17
        with atomic_audio_writer(path, 44100, channels, subtype="PCM_24") as handle:
            for start in range(0, frames, block):
                n = min(block, frames - start)
                handle.write((10 ** (-60 / 20) * rng.standard_normal((n, channels), dtype=np.float32)))

    started, cpu_started = time.perf_counter(), time.process_time()
    if mode == "tape":
        render_blank_tape(device, speed, minutes * 60, folder / "tape.wav", seed=1)
    elif mode == "tape-white":
        white(folder / "white.wav", device.channels, minutes * 60)
    elif mode == "music":
        render_music(folder / "music", minutes, seed=1)
    elif mode == "music-white":
        white(folder / "white.wav", 1, minutes * 60)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    print(json.dumps({"wall_s": wall, "cpu_s": cpu, "rss_imported_kb": rss_imported,
                      "rss_peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
""")


def run_child(mode: str, minutes: float, folder: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    result = subprocess.run([sys.executable, "-c", CHILD, mode, str(minutes), str(folder), DEVICE, str(SPEED)],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{mode} ({minutes:g} min) failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def report(name: str, seconds: float, render: dict, baseline: dict) -> float:
    rtf = seconds / render["wall_s"]
    print(f"  {name:<11}: {rtf:7.1f}x real time  ({render['wall_s']:.2f} s for {seconds / 60:g} min; CPU time "
          f"{render['cpu_s']:.2f} s = {seconds / render['cpu_s']:.1f}x; wall exceeds CPU when other work shares the cores)")
    print(f"  {'baseline':<11}: {seconds / baseline['wall_s']:7.1f}x real time  (white noise written to the same "
          f"format; the render costs {render['wall_s'] / baseline['wall_s']:.1f}x that, "
          f"{render['cpu_s'] / baseline['cpu_s']:.1f}x in CPU time)")
    return rtf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=3.0, help="blank tape length")
    parser.add_argument("--long-minutes", type=float, default=12.0, help="a longer blank tape, for memory")
    parser.add_argument("--music-minutes", type=float, default=2.0)
    args = parser.parse_args()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"synth benchmark: {DEVICE} @ {SPEED:g} ips (stereo) and mono music, 44.1 kHz 24-bit; "
          f"load average {load:.1f} on {os.cpu_count()} cores when it started")
    with tempfile.TemporaryDirectory(prefix="workbench-bench-synth-") as temporary:
        root = Path(temporary)
        tape = run_child("tape", args.minutes, root / "tape")
        tape_white = run_child("tape-white", args.minutes, root / "tape-white")
        long_tape = run_child("tape", args.long_minutes, root / "long")
        music = run_child("music", args.music_minutes, root / "music")
        music_white = run_child("music-white", args.music_minutes, root / "music-white")
    print(f"\nblank tape, {args.minutes:g} min:")
    tape_rtf = report("blank tape", args.minutes * 60, tape, tape_white)
    print(f"\nblank tape, {args.long_minutes:g} min: {args.long_minutes * 60 / long_tape['wall_s']:.1f}x real time; "
          f"peak RSS {long_tape['rss_peak_kb'] / 1024:.0f} MB vs {tape['rss_peak_kb'] / 1024:.0f} MB for "
          f"{args.minutes:g} min ({long_tape['rss_peak_kb'] / tape['rss_peak_kb']:.2f}x; 1.00x = memory does not "
          f"grow with length; after imports {tape['rss_imported_kb'] / 1024:.0f} MB)")
    print(f"\nmusic, {args.music_minutes:g} min (mono pieces of 30 s):")
    music_rtf = report("music", args.music_minutes * 60, music, music_white)
    print(f"\ntarget >20x real time: blank tape {tape_rtf:.1f}x {'met' if tape_rtf > 20 else 'NOT met'}; "
          f"music {music_rtf:.1f}x {'met' if music_rtf > 20 else 'NOT met'}")


if __name__ == "__main__":
    main()
