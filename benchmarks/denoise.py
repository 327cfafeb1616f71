"""Benchmark `workbench denoise`: real-time factor and peak memory per model size, against noisereduce.

What it measures, each in its own child process so every peak RSS (resource.getrusage ru_maxrss) is
that run's own:
1. For each size (tiny, small, paper; random weights with a fixed seed: speed does not depend on
   training), the whole `denoise_files` path (checkpoint load, streaming resampling, chunked
   overlap-add, atomic write, sha256s, sidecar) on 60 s of 44.1 kHz mono music-plus-hiss.
   `paper` is slow on a CPU: it runs on a shorter excerpt (--paper-seconds) and its real-time factor
   is extrapolated to the 60 s (the per-chunk cost is constant, so the rate carries over); the table
   says so.
2. The reference, timed in the same run on the same 60 s: noisereduce's stationary spectral gating
   (`reduce_noise(y, sr, stationary=True, y_noise=...)`, the research's spectral-subtraction baseline)
   given 5 s of the same hiss as its noise clip. Ratio = how many times slower than it each size is.
   With --before, each size also runs as the landed main did (plain network code, glibc's default
   allocator, one chunk per forward call) just before, and the speed-up is printed. With --bf16, each
   size also runs at `--precision bf16` just after (bf16 autocast: fast on a CPU with AMX), with its
   speed-up over float32 and how far its output is from float32's (RMS of the difference re the
   float32 output's, and the largest sample difference). With --hum, each size also runs as a device model
   whose hum template (seven 60 Hz harmonics, workbench.audio.hum) is cancelled before the network.
3. Streaming: the tiny model on a --short-minutes file and on a --long-minutes (default 60) file.
   Peak RSS must not grow with length; the child's RSS after imports is printed as the floor.

    .venv/bin/python benchmarks/denoise.py [--sizes tiny,small,paper] [--seconds 60] [--paper-seconds 15]
                                            [--short-minutes 5] [--long-minutes 60] [--accelerator auto]

Timings are wall-clock on whatever else the machine is doing: on a shared machine, run it twice.
The 60-minute run takes (60 min / the tiny model's real-time factor); --long-minutes shortens it.
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

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_RATE = 44_100
HISS_DBFS = -40.0

CHILD = textwrap.dedent("""
    import json, resource, sys, time
    from pathlib import Path
    mode, args = sys.argv[1], json.loads(sys.argv[2])
    import numpy as np, soundfile as sf, torch
    if mode == "model":
        import contextlib
        from workbench.model.allocator import tune_allocator
        if not args.get("before"):
            tune_allocator()  # as the CLI does
        from workbench.denoise import denoise_files
        from workbench.model.checkpoint import save_checkpoint
        from workbench.model.unet import SIZES, TwoStageUNet, reference_path
        torch.manual_seed(0)
        checkpoint = Path(args["folder"]) / f"{args['size']}.safetensors"
        model = TwoStageUNet(SIZES[args["size"]])
        if args.get("hum"):  # a device model: seven 60 Hz harmonics cancelled before the network
            from workbench.audio.hum import HumTemplate
            model.hum_template = HumTemplate(60.0, tuple(range(1, 8)), (tuple(0.3 ** k * (1 + 0j) for k in range(7)),), 1e-4, 1)
        save_checkpoint(checkpoint, model, lineage={"source": "benchmark: random weights"})
        rss_imported = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # imports + one model built
        started = time.perf_counter()
        # "before": the landed main's path (plain network code, glibc's allocator, one chunk per call).
        with reference_path() if args.get("before") else contextlib.nullcontext():
            [record] = denoise_files([Path(args["audio"])], model_ref=checkpoint, out_dir=Path(args["folder"]) / "out",
                                     accelerator=args["accelerator"], overwrite=True, batch=1 if args.get("before") else None,
                                     precision=args.get("precision", "auto"))
        wall = time.perf_counter() - started
        result = {"wall_s": wall, "audio_s": record["input"]["seconds"], "rtf": record["real_time_factor"],
                  "device": record["compute"]["device"], "chunks": record["chunks"],
                  "chunks_per_forward": record["chunks_per_forward"], "output": record["output"]["path"],
                  "parameters": sum(p.numel() for p in TwoStageUNet(SIZES[args["size"]]).parameters())}
    else:
        import noisereduce
        audio, rate = sf.read(args["audio"], dtype="float32")
        noise, _ = sf.read(args["noise"], dtype="float32")
        rss_imported = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        started = time.perf_counter()
        noisereduce.reduce_noise(y=audio, sr=rate, stationary=True, y_noise=noise)
        wall = time.perf_counter() - started
        result = {"wall_s": wall, "audio_s": len(audio) / rate, "rtf": len(audio) / rate / wall}
    result.update(rss_imported_kb=rss_imported, rss_peak_kb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    print(json.dumps(result))
""")


def _hiss(rng: np.random.Generator, frames: int) -> np.ndarray:
    """Tape-like hiss: white noise tilted up (first difference plus some white), at HISS_DBFS RMS."""
    white = rng.normal(size=frames + 1)
    hiss = np.diff(white) + 0.5 * white[1:]
    return (hiss / np.sqrt(np.mean(hiss**2)) * 10 ** (HISS_DBFS / 20)).astype(np.float32)


def _music(rng: np.random.Generator, start: int, frames: int) -> np.ndarray:
    """A few decaying notes per second (deterministic in `start`), about −20 dBFS."""
    out = np.zeros(frames)
    ring = 3 * SAMPLE_RATE  # a note has decayed by 78 dB after 3 s: stop there
    for note in range(start * 3 // SAMPLE_RATE - 9, (start + frames) * 3 // SAMPLE_RATE + 1):
        onset = note * SAMPLE_RATE // 3
        first, last = max(onset, start), min(onset + ring, start + frames)
        if first >= last:
            continue
        since = np.arange(first - onset, last - onset) / SAMPLE_RATE
        pitch = 110 * 2 ** (((note * 7) % 24) / 12)
        tone = sum(0.08 / k * np.sin(2 * np.pi * k * pitch * since) for k in (1, 2, 3))
        out[first - start : last - start] += tone * np.exp(-3 * since)
    return out.astype(np.float32)


def write_transfer(path: Path, seconds: float, seed: int = 0) -> None:
    """Stream music plus hiss to a 44.1 kHz 24-bit mono WAV, block by block (any length)."""
    rng = np.random.default_rng(seed)
    frames, block = int(seconds * SAMPLE_RATE), 30 * SAMPLE_RATE
    with sf.SoundFile(str(path), "w", SAMPLE_RATE, 1, subtype="PCM_24", format="WAV") as handle:
        for start in range(0, frames, block):
            count = min(block, frames - start)
            handle.write(_music(rng, start, count) + _hiss(rng, count))


def run_child(mode: str, **args) -> dict:
    completed = subprocess.run([sys.executable, "-c", CHILD, mode, json.dumps(args)], cwd=ROOT,
                               capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise SystemExit(f"child {mode} {args} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="tiny,small,paper")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--paper-seconds", type=float, default=15.0,
                        help="excerpt the paper size runs on (extrapolated to --seconds); 0 = full length")
    parser.add_argument("--short-minutes", type=float, default=5.0)
    parser.add_argument("--long-minutes", type=float, default=60.0, help="0 skips the streaming runs")
    parser.add_argument("--accelerator", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--json", action="store_true", help="print the raw results as JSON too")
    parser.add_argument("--before", action="store_true", help="also time each size as the landed main ran it")
    parser.add_argument("--bf16", action="store_true", help="also time each size at --precision bf16")
    parser.add_argument("--hum", action="store_true", help="also time each size as a device model with a hum template")
    options = parser.parse_args()
    sizes = [s for s in options.sizes.split(",") if s]
    results: dict = {"sizes": {}, "streaming": {}}

    with tempfile.TemporaryDirectory(prefix="bench-denoise-") as scratch:
        folder = Path(scratch)
        audio, noise = folder / "transfer-60s.wav", folder / "hiss-5s.wav"
        write_transfer(audio, options.seconds, seed=1)
        sf.write(str(noise), _hiss(np.random.default_rng(2), 5 * SAMPLE_RATE), SAMPLE_RATE, subtype="PCM_24")

        reference = run_child("noisereduce", audio=str(audio), noise=str(noise))
        results["noisereduce"] = reference
        print(f"noisereduce (stationary): {reference['rtf']:.1f}x real time on {reference['audio_s']:.0f} s, "
              f"peak RSS {reference['rss_peak_kb'] / 1024:.0f} MB", flush=True)

        for size in sizes:
            source = audio
            if size == "paper" and options.paper_seconds and options.paper_seconds < options.seconds:
                source = folder / "excerpt.wav"
                write_transfer(source, options.paper_seconds, seed=1)
            if options.before:
                before = run_child("model", size=size, audio=str(source), folder=str(folder / f"{size}-before"),
                                   accelerator=options.accelerator, before=True)
                print(f"{size:>6} before (plain code, default allocator, 1 chunk per call): {before['rtf']:.2f}x "
                      f"real time, peak RSS {before['rss_peak_kb'] / 1024:.0f} MB", flush=True)
            run = run_child("model", size=size, audio=str(source), folder=str(folder / size), accelerator=options.accelerator)
            if options.before:
                print(f"{size:>6} after: {run['rtf']:.2f}x real time, {run['rtf'] / before['rtf']:.2f}x the before "
                      f"rate, {run['chunks_per_forward']} chunks per forward call", flush=True)
            if options.bf16:
                low = run_child("model", size=size, audio=str(source), folder=str(folder / f"{size}-bf16"),
                                accelerator=options.accelerator, precision="bf16")
                exact, _ = sf.read(run["output"], dtype="float64")
                rounded, _ = sf.read(low["output"], dtype="float64")
                relative = float(np.sqrt(np.mean((rounded - exact) ** 2) / np.mean(exact ** 2)))
                print(f"{size:>6} bf16: {low['rtf']:.2f}x real time, {low['rtf'] / run['rtf']:.2f}x the float32 rate; "
                      f"output {100 * relative:.2f} % RMS from float32's, largest sample difference "
                      f"{np.abs(rounded - exact).max():.1e}", flush=True)
                run["bf16"] = {"rtf": low["rtf"], "speed_up": low["rtf"] / run["rtf"], "relative_rms": relative}
            if options.hum:
                device = run_child("model", size=size, audio=str(source), folder=str(folder / f"{size}-hum"),
                                   accelerator=options.accelerator, hum=True)
                print(f"{size:>6} with a hum template (7 harmonics cancelled first): {device['rtf']:.2f}x real time, "
                      f"{device['rtf'] / run['rtf']:.2f}x the rate without", flush=True)
                run["hum_template"] = {"rtf": device["rtf"], "ratio": device["rtf"] / run["rtf"]}
            run["extrapolated_from_s"] = run["audio_s"] if source != audio else None
            run["slower_than_noisereduce"] = reference["rtf"] / run["rtf"]
            results["sizes"][size] = run
            note = f" (measured on a {run['audio_s']:.0f} s excerpt, extrapolated)" if source != audio else ""
            ratio = run["slower_than_noisereduce"]
            versus = f"{ratio:.1f}x slower than" if ratio >= 1 else f"{1 / ratio:.1f}x faster than"
            print(f"{size:>6} ({run['parameters'] / 1e6:.2f} M params, {run['device']}): {run['rtf']:.2f}x real time"
                  f"{note}; {options.seconds:.0f} s take {options.seconds / run['rtf']:.0f} s; "
                  f"{versus} noisereduce; peak RSS "
                  f"{run['rss_peak_kb'] / 1024:.0f} MB ({run['rss_imported_kb'] / 1024:.0f} MB after imports)",
                  flush=True)

        for label, minutes in (("short", options.short_minutes), ("long", options.long_minutes)):
            if options.long_minutes <= 0:
                break
            path = folder / f"transfer-{minutes:g}min.wav"
            write_transfer(path, minutes * 60, seed=3)
            run = run_child("model", size="tiny", audio=str(path), folder=str(folder / f"stream-{label}"),
                            accelerator=options.accelerator)
            path.unlink()
            results["streaming"][f"{minutes:g} min"] = run
            print(f"streaming, tiny, {minutes:g} min: peak RSS {run['rss_peak_kb'] / 1024:.0f} MB "
                  f"({run['rss_imported_kb'] / 1024:.0f} MB after imports), {run['rtf']:.2f}x real time", flush=True)

    if results["streaming"]:
        short, long = results["streaming"].values()
        growth = (long["rss_peak_kb"] - short["rss_peak_kb"]) / 1024
        print(f"peak RSS, {options.long_minutes:g} min vs {options.short_minutes:g} min file: {growth:+.0f} MB "
              f"({options.long_minutes / options.short_minutes:.0f}x the audio)")
    if options.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
