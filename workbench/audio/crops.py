"""Crops of clean music and of tape noise: what training examples and evaluation fragments are cut from.

A clean crop is drawn from a file chosen with probability proportional to its length (files shorter than
a crop are skipped) and starts uniformly at random; one that is near-silent is drawn again. A noise crop
is drawn from a snippet chosen likewise by length; a snippet shorter than the crop is looped with
equal-power crossfades. Every draw takes a numpy generator, so a caller that seeds it (the training data
per example, the evaluation per fragment set) gets a pure function of its sources and its seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import soundfile as sf

from workbench.audio.dsp import MODEL_SAMPLE_RATE, resample
from workbench.audio.io import check_finite
from workbench.errors import WorkbenchError

CROSSFADE_SECONDS = 0.1  # loop seam of short noise snippets
SILENT_CROP_RETRIES = 50


class AudioSource(Protocol):
    """What a crop needs to know about a file: a corpus file or a noise-library snippet."""

    path: Path
    sha256: str
    frames: int


def _sample_rate(source: AudioSource) -> int:
    return int(getattr(source, "sample_rate", MODEL_SAMPLE_RATE))


def _model_frames(source: AudioSource) -> int:
    """The source's length in frames at the model's 44.1 kHz rate."""
    rate = _sample_rate(source)
    return source.frames if rate == MODEL_SAMPLE_RATE else source.frames * MODEL_SAMPLE_RATE // rate


def read_crop(source: AudioSource, start: int, frames: int) -> np.ndarray:
    """`frames` mono float32 samples at 44.1 kHz from `start` (in 44.1 kHz frames); channels averaged."""
    rate = _sample_rate(source)
    if rate == MODEL_SAMPLE_RATE:
        first, count = start, frames
    else:  # read a little more at the file's rate, resample, and cut the exact span
        first = max(0, start * rate // MODEL_SAMPLE_RATE - 64)
        count = frames * rate // MODEL_SAMPLE_RATE + 192
    try:
        block = sf.read(str(source.path), frames=count, start=first, dtype="float32", always_2d=True)[0]
    except (sf.LibsndfileError, RuntimeError) as error:
        raise WorkbenchError(f"{source.path}: unreadable while cropping ({error})") from None
    check_finite(block.T, source.path, rate, first)  # a NaN in a crop would reach the loss or a metric
    mono = block.mean(axis=1, dtype=np.float32) if block.shape[1] > 1 else block[:, 0]
    if rate != MODEL_SAMPLE_RATE:
        mono = np.pad(mono, (0, count - mono.shape[0]))  # the margin may run past the end of the file
        mono = resample(mono, rate, MODEL_SAMPLE_RATE)
        offset = start - first * MODEL_SAMPLE_RATE // rate
        mono = mono[offset:offset + frames]
    if mono.shape[0] < frames:
        raise WorkbenchError(f"{source.path}: shorter than its registered length ({mono.shape[0]} < {frames} frames at {start})")
    return np.ascontiguousarray(mono[:frames])


def loop_with_crossfades(noise: np.ndarray, frames: int, crossfade: int) -> np.ndarray:
    """Repeat `noise` to `frames` samples, each seam an equal-power crossfade of `crossfade` samples.

    Equal-power (sin/cos) fades keep the level constant across a seam for uncorrelated noise, so a looped
    snippet has the same power as the original throughout.
    """
    n = noise.shape[0]
    if n >= frames:
        return noise[:frames]
    crossfade = max(1, min(crossfade, n // 2))
    ramp = (np.arange(crossfade, dtype=np.float64) + 0.5) / crossfade
    fade_in, fade_out = np.sin(0.5 * np.pi * ramp), np.cos(0.5 * np.pi * ramp)
    out = noise.astype(np.float64)
    while out.shape[0] < frames:
        seam = out[-crossfade:] * fade_out + noise[:crossfade] * fade_in
        out = np.concatenate([out[:-crossfade], seam, noise[crossfade:]])
    return out[:frames].astype(np.float32)


def _weighted_choice(rng: np.random.Generator, cumulative: np.ndarray) -> int:
    return int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))


class Crops:
    """Random crops of `segment_frames` 44.1 kHz samples of the clean files and of the noise snippets."""

    def __init__(self, clean_files: Sequence[AudioSource], noise_snippets: Sequence[AudioSource],
                 segment_frames: int, silence_dbfs: float = -50.0):
        self.clean_files = [f for f in clean_files if _model_frames(f) >= segment_frames]
        if not self.clean_files:
            longest = max((_model_frames(f) for f in clean_files), default=0) / MODEL_SAMPLE_RATE
            raise WorkbenchError(f"no clean file is as long as a {segment_frames / MODEL_SAMPLE_RATE:g} s segment "
                                 f"(longest: {longest:.2f} s of {len(clean_files)} files)")
        if not noise_snippets:
            raise WorkbenchError("no noise snippets selected")
        self.noise_snippets = list(noise_snippets)
        self.segment_frames = int(segment_frames)
        self.silence_rms = 10.0 ** (silence_dbfs / 20.0)
        self.clean_cumulative = np.cumsum([_model_frames(f) - segment_frames + 1 for f in self.clean_files], dtype=np.float64)
        self.noise_cumulative = np.cumsum([_model_frames(s) for s in self.noise_snippets], dtype=np.float64)

    def clean_crop(self, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
        for _ in range(SILENT_CROP_RETRIES):
            source = self.clean_files[_weighted_choice(rng, self.clean_cumulative)]
            start = int(rng.integers(0, _model_frames(source) - self.segment_frames + 1))
            crop = read_crop(source, start, self.segment_frames)
            if math.sqrt(float(np.mean(np.square(crop, dtype=np.float64)))) > self.silence_rms:
                return crop, {"sha256": source.sha256, "start": start}
        raise WorkbenchError(f"{SILENT_CROP_RETRIES} random crops of the clean corpus were all near-silent "
                             f"(below {20 * math.log10(self.silence_rms):.0f} dBFS); is it music?")

    def noise_crop(self, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
        snippet = self.noise_snippets[_weighted_choice(rng, self.noise_cumulative)]
        length = _model_frames(snippet)
        if length >= self.segment_frames:
            start = int(rng.integers(0, length - self.segment_frames + 1))
            return read_crop(snippet, start, self.segment_frames), {"sha256": snippet.sha256, "start": start}
        # Short snippet: loop it with crossfades and start at a random phase of the loop.
        start = int(rng.integers(0, length))
        looped = loop_with_crossfades(read_crop(snippet, 0, length), self.segment_frames + start,
                                      int(CROSSFADE_SECONDS * MODEL_SAMPLE_RATE))
        return np.ascontiguousarray(looped[start:]), {"sha256": snippet.sha256, "start": start, "looped": True}
