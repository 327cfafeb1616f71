"""Benchmark `capture-noise`: speed (seconds of processing per hour of audio, real-time factor) and
peak memory of ingesting 96 kHz 24-bit stereo blank-tape noise, for two lengths.

Each ingest runs in its own child process so the peak RSS it reports is the ingest's own
(resource.getrusage ru_maxrss). Baselines measured in the same run, in the same kind of child:
- speed: plain decoding of the same file in blocks (soundfile), the least any ingest must do;
- memory: the child's peak RSS after importing everything, before ingesting.
Targets (issue 2): faster than 60x real time on 2 cores; peak RSS under 1 GB whatever the length
(the longer file must not need more memory than the shorter one).

    .venv/bin/python benchmarks/ingest.py [--minutes 10] [--long-minutes 30]

Timings are wall-clock on whatever else the machine is doing; the CPU time the ingest used is printed
beside them (decoding and resampling run in a read-ahead thread beside the screening, so on two idle
cores wall time is below CPU time; on one core, or on busy ones, it is at least the CPU time).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import soundfile as sf

SAMPLE_RATE = 96_000
CHANNELS = 2

CHILD = textwrap.dedent("""
    import json, resource, sys, time
    from pathlib import Path
    import soundfile
    from workbench.audio.io import iter_blocks
    from workbench.noise.ingest import capture_noise
    from workbench.workspace import init_workspace
    mode, recording, root = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    rss_imported = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started, cpu_started = time.perf_counter(), time.process_time()
    if mode == "decode":
        frames = sum(block.shape[1] for block in iter_blocks(recording, 1 << 19))
        snippets = 0
    else:
        report = capture_noise(init_workspace(root), [recording], "revox-a77", 7.5, tape="benchmark")
        snippets = sum(f.added for f in report.files)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    print(json.dumps({"wall_s": wall, "cpu_s": cpu, "rss_imported_kb": rss_imported, "snippets": snippets,
                      "rss_peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
""")


def write_blank_tape(path: Path, minutes: float, seed: int) -> float:
    """Stream `minutes` of hiss with 50 Hz hum to a 96 kHz 24-bit stereo WAV (RF64 past 4 GB)."""
    rng = np.random.default_rng(seed)
    frames = int(minutes * 60 * SAMPLE_RATE)
    block = 10 * SAMPLE_RATE
    with sf.SoundFile(str(path), "w", SAMPLE_RATE, CHANNELS, subtype="PCM_24", format="RF64") as handle:
        for start in range(0, frames, block):
            n = min(block, frames - start)
            t = (start + np.arange(n)) / SAMPLE_RATE
            hum = 10 ** (-62 / 20) * np.sqrt(2) * np.sin(2 * np.pi * 50.0 * t)
            hiss = rng.normal(0.0, 10 ** (-50 / 20), (n, CHANNELS))
            handle.write((hiss + hum[:, None]).astype(np.float32))
    return frames / SAMPLE_RATE


def run_child(mode: str, recording: Path, root: Path) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, mode, str(recording), str(root)],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{mode} of {recording} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--long-minutes", type=float, default=30.0)
    args = parser.parse_args()
    print(f"capture-noise benchmark: {SAMPLE_RATE // 1000} kHz 24-bit stereo, one ingest per child process")
    rows = []
    with tempfile.TemporaryDirectory(prefix="workbench-bench-") as temporary:
        for number, minutes in enumerate((args.minutes, args.long_minutes)):
            recording = Path(temporary) / f"blank-{minutes:g}min.wav"
            seconds = write_blank_tape(recording, minutes, seed=number)
            decode = run_child("decode", recording, Path(temporary) / f"decode-{number}")
            ingest = run_child("ingest", recording, Path(temporary) / f"archive-{number}")
            recording.unlink()
            rows.append((minutes, seconds, decode, ingest))
            hours = seconds / 3600
            print(f"\n{minutes:g} min of audio ({ingest['snippets']} snippets):")
            print(f"  ingest : {ingest['wall_s'] / hours:7.1f} s per hour of audio  "
                  f"{seconds / ingest['wall_s']:6.1f}x real time  (CPU time: {ingest['cpu_s'] / hours:.1f} s per hour, "
                  f"{seconds / ingest['cpu_s']:.1f}x: the rate on one core)")
            print(f"  decode : {decode['wall_s'] / hours:7.1f} s per hour of audio  "
                  f"{seconds / decode['wall_s']:6.1f}x real time  (baseline: ingest costs "
                  f"{ingest['wall_s'] / decode['wall_s']:.1f}x plain decoding)")
            print(f"  peak RSS {ingest['rss_peak_kb'] / 1024:7.1f} MB  (after imports {ingest['rss_imported_kb'] / 1024:.1f} MB;"
                  f" the ingest itself added {(ingest['rss_peak_kb'] - ingest['rss_imported_kb']) / 1024:.1f} MB)")
    (short_min, _, _, short), (long_min, _, _, long) = rows
    print(f"\npeak RSS {long_min:g} min / {short_min:g} min: {long['rss_peak_kb'] / short['rss_peak_kb']:.2f}x "
          f"(1.00x = memory does not grow with length)")
    wall_rtf = min(s / i["wall_s"] for _, s, _, i in rows)
    cpu_rtf = min(s / i["cpu_s"] for _, s, _, i in rows)
    worst_rss = max(i["rss_peak_kb"] for _, _, _, i in rows) / 1024
    print(f"target >60x real time on 2 cores: wall {wall_rtf:.1f}x {'met' if wall_rtf > 60 else 'NOT met'} here; "
          f"CPU time {cpu_rtf:.1f}x {'met' if cpu_rtf > 60 else 'NOT met'} (the rate on one core)")
    print(f"target peak RSS < 1024 MB whatever the length: {worst_rss:.0f} MB {'met' if worst_rss < 1024 else 'NOT met'}")


if __name__ == "__main__":
    main()
