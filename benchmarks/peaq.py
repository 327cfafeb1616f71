"""Benchmark PEAQ (workbench.evaluate.peaq): a 10 s stereo pair at 48 kHz on one CPU core.

Prints the time PEAQ takes as a fraction of the audio's duration (target, issue 16: well under 1, i.e.
faster than real time on one core) and, as the baseline measured in the same run, the time of the ear
model's first step alone (the 2048-point windowed FFTs of both signals, both channels): the least any
FFT-model PEAQ must do. Every figure is the median of `--repeats` runs after one warm-up run; CPU time
is printed beside wall time because the machine may be shared.

    .venv/bin/python benchmarks/peaq.py [--seconds 10] [--repeats 3]
"""

from __future__ import annotations

import os

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_name] = "1"  # one core: set before numpy loads its BLAS

import argparse
import statistics
import time

import numpy as np


def stereo_pair(seconds: float, sr: int = 48_000) -> tuple[np.ndarray, np.ndarray]:
    """Chords and noise bursts in two channels, and a copy with white noise at 40 dB SNR."""
    rng = np.random.default_rng(16)
    t = np.arange(int(seconds * sr)) / sr
    left = sum(0.1 / k * np.sin(2 * np.pi * 196.0 * k * t) for k in range(1, 8)) * (1 + 0.5 * np.sin(2 * np.pi * 0.5 * t))
    right = sum(0.1 / k * np.sin(2 * np.pi * 261.6 * k * t + k) for k in range(1, 8))
    reference = np.stack([left, right]) + 0.02 * rng.standard_normal((2, t.size)) * (np.sin(2 * np.pi * 2 * t) > 0.9)
    test = reference + rng.standard_normal(reference.shape) * np.sqrt(np.mean(reference ** 2) / 1e4)
    return reference.astype(np.float32), test.astype(np.float32)


def timed(job, repeats: int) -> tuple[float, float]:
    job()  # warm-up: imports, tables
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        job()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from workbench.evaluate.peaq import FRAME, HOP, _frames, _tables, peaq

    reference, test = stereo_pair(args.seconds)
    frames = reference.shape[1] // HOP
    window = _tables().window

    def fft_only() -> None:
        for signal in (reference, test):
            for channel in signal:
                np.abs(np.fft.rfft(_frames(channel.astype(np.float64), frames) * window, axis=-1)) ** 2

    result = peaq(reference, test, 48_000)
    peaq_wall, peaq_cpu = timed(lambda: peaq(reference, test, 48_000), args.repeats)
    fft_wall, fft_cpu = timed(fft_only, args.repeats)
    print(f"PEAQ Basic, {args.seconds:g} s stereo pair at 48 kHz (FRAME {FRAME}, {frames} frames per channel), "
          f"one thread; ODG {result.odg:+.3f}")
    print(f"  baseline, windowed FFTs only: {fft_wall:.3f} s wall, {fft_cpu:.3f} s CPU")
    print(f"  PEAQ:                         {peaq_wall:.3f} s wall, {peaq_cpu:.3f} s CPU "
          f"({peaq_wall / fft_wall:.1f}x the FFTs)")
    print(f"  time / audio duration:        {peaq_wall / args.seconds:.3f} wall, {peaq_cpu / args.seconds:.3f} CPU "
          f"(target well under 1: {'met' if peaq_wall < args.seconds / 2 else 'NOT met'})")


if __name__ == "__main__":
    main()
