"""Noise profiles: what a replay machine's noise looks like, measured the same way everywhere.

A profile is a Welch power spectral density plus the few numbers an engineer reads off it: RMS level,
spectral tilt (the hiss slope), bandwidth (where the high-frequency roll-off sets in) and mains hum
(50 or 60 Hz family, with a sub-bin accurate fundamental and the level of each harmonic). The tape-noise
simulator checks its rendered noise with exactly this code, so every definition below is a stated
constant.

The profile is computed incrementally: `ProfileAccumulator.add(block)` accumulates Welch sums block by
block (a streaming ingest never holds the audio), `result()` turns the sums into a `NoiseProfile`.
`noise_profile(samples, sr)` is the one-shot form built on it.

Two Welch estimates run side by side: a moderate one (`PSD_SEGMENT_SECONDS`, ≈5.4 Hz bins at
44.1 kHz) for the spectrum, tilt and bandwidth, and a long one (`HUM_SEGMENT_SECONDS`, ≈0.67 Hz bins,
zero-padded to twice that resolution) of the audio decimated to about `HUM_ANALYSIS_RATE_HZ`, kept
only below `HUM_BAND_HZ`, for the hum. Hum harmonics are
located by a harmonic sum over candidate fundamentals, then each is refined by parabolic interpolation
of the log spectrum; the fundamental is the k²-weighted mean of f_k / k over the harmonics that stand
out, so higher harmonics (k times more precise in f0) count more.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from workbench.audio.dsp import dbfs

# --- stated definitions (the simulator and its tests rely on these) --------------------------------
PSD_SEGMENT_SECONDS = 8192 / 44100  # Welch segment for the spectrum (Hann, 50 % overlap)
HUM_SEGMENT_SECONDS = 65536 / 44100  # long Welch segment for the hum (Hann, 50 % overlap)
HUM_ZERO_PAD = 2  # FFT length = HUM_ZERO_PAD x segment: finer grid for the peak interpolation
HUM_BAND_HZ = 1500.0  # the long spectrum is kept only below this ...
HUM_ANALYSIS_RATE_HZ = 6000.0  # ... and computed after decimating (torchaudio) to about this rate
HUM_FAMILIES = (50, 60)
HUM_HARMONICS = 10  # harmonics k = 1..10 are reported
HUM_SEARCH_FRACTION = 0.03  # a fundamental within ±3 % of 50 or 60 Hz (mains drift, speed error)
HUM_FLOOR_HALF_WIDTH_HZ = 15.0  # local noise floor: running median over ±15 Hz
HUM_STANDS_OUT_DB = 12.0  # hum is reported when a harmonic's peak is this far above its local floor
HUM_HARMONIC_USED_DB = 10.0  # ... and a second harmonic at least this far (they refine the fundamental),
HUM_ALONE_DB = 20.0  # ... or that one harmonic alone this far (a lone 12 dB bin is chance in a short PSD)
TILT_BAND_HZ = (200.0, 8000.0)  # the tilt is fitted over this band (hum harmonics masked out)
SMOOTHING_OCTAVES = 1 / 6  # smoothed PSD: median of the bins within ±1/12 octave of each centre
SMOOTHING_STEP_OCTAVES = 1 / 24  # spacing of the smoothed PSD's centre frequencies
MID_BAND_HZ = (500.0, 2000.0)  # mid-band level: median of the smoothed PSD over this band
BANDWIDTH_DROP_DB = 10.0  # bandwidth: first frequency above the mid band where the smoothed PSD is this far below
DISTANCE_BAND_HZ = (100.0, 16000.0)  # profile_distance compares smoothed PSDs over this band
_TINY = 1e-30


@dataclass
class HumEstimate:
    mains_hz: int  # 50 or 60: the family found
    fundamental_hz: float  # measured fundamental, sub-bin accurate
    harmonics_db: list[tuple[float, float]]  # (frequency Hz, dB above the local noise floor), k = 1..N

    def to_dict(self) -> dict:
        return {"mains_hz": self.mains_hz, "fundamental_hz": self.fundamental_hz,
                "harmonics_db": [[float(f), float(level)] for f, level in self.harmonics_db]}

    @classmethod
    def from_json(cls, data: dict) -> HumEstimate:
        return cls(int(data["mains_hz"]), float(data["fundamental_hz"]),
                   [(float(f), float(level)) for f, level in data["harmonics_db"]])


@dataclass
class NoiseProfile:
    sample_rate: int
    frequencies_hz: np.ndarray  # Welch PSD bins
    psd_db: np.ndarray  # Welch PSD, dB re full scale²/Hz, averaged over channels
    rms_dbfs: float
    tilt_db_per_octave: float  # slope of the smoothed PSD (hum masked) over TILT_BAND_HZ vs log2 f
    bandwidth_hz: float  # where the smoothed PSD first falls BANDWIDTH_DROP_DB below its mid-band level
    hum: HumEstimate | None  # None when no hum stands out
    seconds: float = 0.0  # how much audio (per channel, summed over channels) the profile is made from

    def smoothed(self) -> tuple[np.ndarray, np.ndarray]:
        """(centre frequencies, dB): the PSD median-smoothed over fractional-octave bands, hum masked."""
        return smooth_psd(self.frequencies_hz, self.psd_db, self.hum)

    def to_dict(self) -> dict:
        return {
            "sample_rate": self.sample_rate,
            "rms_dbfs": self.rms_dbfs,
            "tilt_db_per_octave": self.tilt_db_per_octave,
            "bandwidth_hz": self.bandwidth_hz,
            "hum": self.hum.to_dict() if self.hum else None,
            "seconds": self.seconds,
            "definitions": {
                "psd": f"Welch, Hann, {PSD_SEGMENT_SECONDS * 1000:.0f} ms segments, 50 % overlap, dB re FS^2/Hz",
                "tilt": f"least-squares slope of the smoothed PSD vs log2 f over {TILT_BAND_HZ[0]:g}-{TILT_BAND_HZ[1]:g} Hz",
                "bandwidth": f"first frequency above {MID_BAND_HZ[1]:g} Hz where the smoothed PSD is "
                             f"{BANDWIDTH_DROP_DB:g} dB below its {MID_BAND_HZ[0]:g}-{MID_BAND_HZ[1]:g} Hz median",
                "hum": f"harmonics k=1..{HUM_HARMONICS}, dB above the ±{HUM_FLOOR_HALF_WIDTH_HZ:g} Hz median floor "
                       f"of a {HUM_SEGMENT_SECONDS:.2f} s Welch PSD",
            },
            "frequencies_hz": [round(float(f), 4) for f in self.frequencies_hz],
            "psd_db": [round(float(v), 3) for v in self.psd_db],
        }

    @classmethod
    def from_json(cls, data: dict) -> NoiseProfile:
        return cls(
            sample_rate=int(data["sample_rate"]),
            frequencies_hz=np.asarray(data["frequencies_hz"], dtype=np.float64),
            psd_db=np.asarray(data["psd_db"], dtype=np.float64),
            rms_dbfs=float(data["rms_dbfs"]),
            tilt_db_per_octave=float(data["tilt_db_per_octave"]),
            bandwidth_hz=float(data["bandwidth_hz"]),
            hum=HumEstimate.from_json(data["hum"]) if data.get("hum") else None,
            seconds=float(data.get("seconds", 0.0)),
        )


def _segment_length(sample_rate: float, seconds: float) -> int:
    """The power of two nearest to `seconds` at `sample_rate` (8192 and 65536 at 44.1 kHz)."""
    return 1 << max(4, round(math.log2(seconds * sample_rate)))


class _WelchSum:
    """Running sum of Hann-windowed periodograms over 50 %-overlapping segments of one or more streams.

    Holds at most one segment of audio per channel between calls. Bins above `keep_hz` are dropped.
    A stream shorter than one segment (a short snippet) still counts: it is analysed as one shorter
    Hann segment, zero-padded to the same FFT length, so many short snippets add up.
    """

    def __init__(self, sample_rate: float, segment: int, nfft: int, keep_hz: float | None = None):
        self.sample_rate, self.segment, self.nfft, self.hop = sample_rate, segment, nfft, segment // 2
        frequencies = np.fft.rfftfreq(nfft, 1.0 / sample_rate)
        self.bins = len(frequencies) if keep_hz is None else int(np.searchsorted(frequencies, keep_hz, "right"))
        self.frequencies = frequencies[: self.bins]
        self.window, self.window_spectrum = self._window(segment)
        self.power = np.zeros(self.bins, dtype=np.float64)
        self.segments = 0
        self.pending: np.ndarray | None = None  # (channels, frames) not yet in a full segment
        self.stream_segments = 0  # full segments of the current stream

    def _window(self, length: int) -> tuple[np.ndarray, np.ndarray]:
        """A periodic Hann window (float32, like the FFTs) and its spectrum, for the detrend."""
        window = np.hanning(length + 1)[:-1].astype(np.float32)
        return window, np.fft.rfft(window, n=self.nfft)[: self.bins]

    def add(self, block: np.ndarray) -> None:
        pending = block if self.pending is None else np.concatenate([self.pending, block], axis=1)
        count = 0 if pending.shape[1] < self.segment else (pending.shape[1] - self.segment) // self.hop + 1
        chunk = max(1, (1 << 22) // self.segment)  # bound the FFT work area to a few MB per channel
        for start in range(0, count, chunk):
            stop = min(count, start + chunk)
            frames = np.lib.stride_tricks.sliding_window_view(
                pending[:, start * self.hop: (stop - 1) * self.hop + self.segment], self.segment, axis=1)[:, :: self.hop]
            self._add_segments(frames.reshape(-1, self.segment), self.window, self.window_spectrum)
        self.stream_segments += count
        self.pending = pending[:, count * self.hop:].copy() if count else pending

    def _add_segments(self, segments: np.ndarray, window: np.ndarray, window_spectrum: np.ndarray) -> None:
        """Add the periodograms of (n, length) float32 segments (single-precision FFTs, float64 sums)."""
        spectrum = np.fft.rfft(segments * window, n=self.nfft, axis=1)[:, : self.bins]
        # Welch's constant detrend by linearity: FFT(w·(x - mean)) = FFT(w·x) - mean·FFT(w)
        spectrum -= segments.mean(axis=1, dtype=np.float64).astype(np.float32)[:, None] * window_spectrum
        power = np.sum(np.square(spectrum.real), axis=0, dtype=np.float64)
        power += np.sum(np.square(spectrum.imag), axis=0, dtype=np.float64)
        # one-sided density: double all but DC and Nyquist; scale by fs * sum(w²)
        power[1:] *= 2.0
        if self.nfft % 2 == 0 and self.bins == self.nfft // 2 + 1:
            power[-1] /= 2.0
        self.power += power / (self.sample_rate * np.sum(np.square(window, dtype=np.float64)))
        self.segments += segments.shape[0]

    def end_stream(self) -> None:
        """The next block starts a new stream: no segment spans the two. A stream that never filled
        one segment is analysed as one shorter segment."""
        if self.stream_segments == 0 and self.pending is not None and self.pending.shape[1] >= 16:
            self._add_segments(self.pending, *self._window(self.pending.shape[1]))
        self.pending = None
        self.stream_segments = 0

    def density(self) -> np.ndarray:
        """Mean periodogram over every segment of every stream (ends the current stream)."""
        self.end_stream()
        if self.segments == 0:
            raise ValueError("not enough audio for a noise profile")
        return self.power / self.segments


class ProfileAccumulator:
    """Build a `NoiseProfile` block by block: `add` (channels, frames) or (frames,) blocks, then `result()`.

    Consecutive `add` calls are one continuous stream; call `end_stream()` between unrelated pieces of
    audio (e.g. separate snippets) so no analysis segment spans a discontinuity. `result()` ends the
    current stream too.
    """

    def __init__(self, sample_rate: int):
        self.sample_rate = int(sample_rate)
        psd_segment = _segment_length(self.sample_rate, PSD_SEGMENT_SECONDS)
        self.psd = _WelchSum(self.sample_rate, psd_segment, psd_segment)
        # The hum needs only the band below HUM_BAND_HZ: decimating first makes its long FFTs cheap.
        self.hum_decimation = max(1, int(self.sample_rate // HUM_ANALYSIS_RATE_HZ))
        hum_rate = self.sample_rate / self.hum_decimation
        hum_segment = _segment_length(hum_rate, HUM_SEGMENT_SECONDS)
        self.hum = _WelchSum(hum_rate, hum_segment, hum_segment * HUM_ZERO_PAD, keep_hz=min(HUM_BAND_HZ, hum_rate / 2))
        self.decimator = None  # a StreamingResampler per stream, made on its first block
        self.sum_squares = 0.0
        self.samples = 0  # summed over channels

    def add(self, block: np.ndarray) -> None:
        block = np.asarray(block)
        block = block[np.newaxis] if block.ndim == 1 else block
        assert block.ndim == 2, "blocks are (channels, frames) or (frames,)"
        if not np.all(np.isfinite(block)):
            raise ValueError("NaN or inf samples in a noise profile's input")
        block = block.astype(np.float32, copy=False)  # FFTs in single precision: ample for dB levels
        self.sum_squares += float(np.einsum("ij,ij->", block, block, dtype=np.float64))
        self.samples += block.size
        self.psd.add(block)
        if self.hum_decimation == 1:
            self.hum.add(block)
            return
        from workbench.audio.dsp import StreamingResampler, torch_threads

        if self.decimator is None:
            self.decimator = StreamingResampler(self.hum_decimation, 1, block.shape[0])
        with torch_threads(1):
            self.hum.add(self.decimator.push(block))

    def _flush_decimator(self) -> np.ndarray:
        from workbench.audio.dsp import torch_threads

        with torch_threads(1):
            return self.decimator.flush()

    def end_stream(self) -> None:
        self.psd.end_stream()
        if self.decimator is not None:
            self.hum.add(self._flush_decimator())
            self.decimator = None
        self.hum.end_stream()

    def result(self) -> NoiseProfile:
        if self.samples == 0:
            raise ValueError("no audio was added to the noise profile")
        psd = self.psd.density()
        psd_db = 10.0 * np.log10(psd + _TINY)
        if self.decimator is not None:
            self.hum.add(self._flush_decimator())
            self.decimator = None
        hum = estimate_hum(self.hum.frequencies, 10.0 * np.log10(self.hum.density() + _TINY))
        frequencies = self.psd.frequencies.copy()
        centres, smoothed = smooth_psd(frequencies, psd_db, hum)
        return NoiseProfile(
            sample_rate=self.sample_rate,
            frequencies_hz=frequencies,
            psd_db=psd_db,
            rms_dbfs=dbfs(math.sqrt(self.sum_squares / self.samples)),
            tilt_db_per_octave=_tilt(centres, smoothed),
            bandwidth_hz=_bandwidth(centres, smoothed, self.sample_rate),
            hum=hum,
            seconds=self.samples / self.sample_rate,
        )


def noise_profile(samples: np.ndarray, sample_rate: int) -> NoiseProfile:
    """The noise profile of `samples` ((channels, frames) or (frames,)), channels averaged."""
    accumulator = ProfileAccumulator(sample_rate)
    accumulator.add(samples)
    return accumulator.result()


# --- hum --------------------------------------------------------------------------------------------

def _running_median(values: np.ndarray, half_width: int) -> np.ndarray:
    from scipy.ndimage import median_filter

    return median_filter(values, size=2 * half_width + 1, mode="nearest")


def _parabolic_peak(db: np.ndarray, index: int) -> tuple[float, float]:
    """(fractional bin, interpolated dB) of the peak at `index` from a parabola through 3 log bins."""
    if index <= 0 or index >= len(db) - 1:
        return float(index), float(db[index])
    left, centre, right = db[index - 1], db[index], db[index + 1]
    curvature = left - 2 * centre + right
    if curvature >= 0 or centre < max(left, right):  # not a local maximum: nothing to interpolate
        return float(index), float(centre)
    offset = float(np.clip(0.5 * (left - right) / curvature, -0.5, 0.5))
    return index + offset, float(centre - 0.25 * (left - right) * offset)


def estimate_hum(frequencies: np.ndarray, psd_db: np.ndarray) -> HumEstimate | None:
    """Mains hum in a fine-resolution PSD: the 50 or 60 Hz family, fundamental and harmonic levels.

    None when no harmonic of either family stands HUM_STANDS_OUT_DB above its local floor with a second
    at HUM_HARMONIC_USED_DB, or one alone at HUM_ALONE_DB.
    """
    resolution = float(frequencies[1] - frequencies[0])
    floor = _running_median(psd_db, max(2, round(HUM_FLOOR_HALF_WIDTH_HZ / resolution)))
    prominence = psd_db - floor
    nyquist_bin = len(frequencies) - 2

    def peak_near(frequency: float, radius_bins: int) -> int | None:
        centre = round(frequency / resolution)
        low, high = max(1, centre - radius_bins), min(nyquist_bin, centre + radius_bins)
        if low > high:
            return None
        return low + int(np.argmax(psd_db[low: high + 1]))

    best: tuple[float, int, float] | None = None  # (score, family, coarse fundamental)
    for family in HUM_FAMILIES:
        candidates = np.arange(family * (1 - HUM_SEARCH_FRACTION), family * (1 + HUM_SEARCH_FRACTION), 0.01)
        harmonics = np.arange(1, HUM_HARMONICS + 1)
        bins = np.rint(np.outer(candidates, harmonics) / resolution).astype(int)
        valid = bins <= nyquist_bin
        gains = np.where(valid, np.clip(prominence[np.minimum(bins, nyquist_bin)], 0.0, None), 0.0)
        scores = gains.sum(axis=1)
        pick = int(np.argmax(scores))
        if best is None or scores[pick] > best[0]:
            best = (float(scores[pick]), family, float(candidates[pick]))
    assert best is not None
    _, family, coarse = best

    measured: list[tuple[int, float, float]] = []  # (k, frequency, prominence)
    for k in range(1, HUM_HARMONICS + 1):
        index = peak_near(k * coarse, 1 + HUM_ZERO_PAD)
        if index is None:
            break
        fractional, peak_db = _parabolic_peak(psd_db, index)
        measured.append((k, float(fractional * resolution), float(peak_db - floor[index])))
    levels = sorted((level for _, _, level in measured), reverse=True)
    if not levels or levels[0] < HUM_STANDS_OUT_DB:
        return None
    if levels[0] < HUM_ALONE_DB and (len(levels) < 2 or levels[1] < HUM_HARMONIC_USED_DB):
        return None
    # Refine with every harmonic that stands out and sits where the strongest one says it should: a
    # chance noise peak next to k·f0 must not pull the estimate. Each f_k / k is weighted by its
    # precision, ∝ k² (the error of f_k is divided by k) times its power above the floor.
    k_best, f_best, _ = max(measured, key=lambda item: item[2])
    used = [(k, f, level) for k, f, level in measured if level >= HUM_HARMONIC_USED_DB
            and abs(f - k * f_best / k_best) <= (0.5 + 0.05 * k) * resolution]
    weights = np.array([k * k * 10 ** (level / 10) for k, _, level in used], dtype=np.float64)
    fundamental = float(np.sum(weights * np.array([f / k for k, f, _ in used])) / np.sum(weights))
    consistent = {k for k, _, _ in used}
    harmonics = [(f if k in consistent else k * fundamental, level) for k, f, level in measured]
    return HumEstimate(mains_hz=family, fundamental_hz=fundamental, harmonics_db=harmonics)


# --- smoothing, tilt, bandwidth, distance --------------------------------------------------------------

def smooth_psd(frequencies: np.ndarray, psd_db: np.ndarray, hum: HumEstimate | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """Median of the PSD bins within ±SMOOTHING_OCTAVES/2 of centres SMOOTHING_STEP_OCTAVES apart.

    The bins within two bins of a hum harmonic are left out, so narrow lines do not lift the hiss.
    Centres without any bin are dropped.
    """
    frequencies = np.asarray(frequencies, dtype=np.float64)
    psd_db = np.asarray(psd_db, dtype=np.float64)
    keep = frequencies > 0
    if hum is not None:
        resolution = frequencies[1] - frequencies[0]
        for k in range(1, int(frequencies[-1] / hum.fundamental_hz) + 1):
            keep &= np.abs(frequencies - k * hum.fundamental_hz) > 2.5 * resolution
    f, db = frequencies[keep], psd_db[keep]
    low = max(20.0, frequencies[1])
    steps = int(math.floor(math.log2(frequencies[-1] / low) / SMOOTHING_STEP_OCTAVES)) + 1
    centres = low * np.power(2.0, np.arange(steps) * SMOOTHING_STEP_OCTAVES)
    half = SMOOTHING_OCTAVES / 2
    lows = np.searchsorted(f, centres * 2.0 ** -half, "left")
    highs = np.searchsorted(f, centres * 2.0 ** half, "right")
    values = np.array([np.median(db[a:b]) if b > a else np.nan for a, b in zip(lows, highs)])
    ok = np.isfinite(values)
    return centres[ok], values[ok]


def _tilt(centres: np.ndarray, smoothed: np.ndarray) -> float:
    band = (centres >= TILT_BAND_HZ[0]) & (centres <= TILT_BAND_HZ[1])
    if band.sum() < 3:
        return float("nan")
    slope, _ = np.polyfit(np.log2(centres[band]), smoothed[band], 1)
    return float(slope)


def _bandwidth(centres: np.ndarray, smoothed: np.ndarray, sample_rate: int) -> float:
    """First crossing of (mid-band level − BANDWIDTH_DROP_DB) above the mid band, log-f interpolated;
    Nyquist when the PSD never falls that far."""
    mid = (centres >= MID_BAND_HZ[0]) & (centres <= MID_BAND_HZ[1])
    if not mid.any():
        return float(sample_rate / 2)
    threshold = float(np.median(smoothed[mid])) - BANDWIDTH_DROP_DB
    above = np.nonzero(centres > MID_BAND_HZ[1])[0]
    for i in above:
        if smoothed[i] < threshold:
            if i == 0:
                return float(centres[i])
            f0, f1, d0, d1 = centres[i - 1], centres[i], smoothed[i - 1], smoothed[i]
            t = (d0 - threshold) / (d0 - d1) if d0 != d1 else 0.0
            return float(2.0 ** (math.log2(f0) + t * (math.log2(f1) - math.log2(f0))))
    return float(sample_rate / 2)


def profile_distance(a: NoiseProfile, b: NoiseProfile) -> float:
    """RMS difference in dB of the two smoothed PSDs over DISTANCE_BAND_HZ (within both Nyquists).

    Smoothed PSDs (hum lines masked) compare the hiss shape and level, not the estimator's bin noise;
    profiles at different sample rates are compared on a common log-frequency grid.
    """
    fa, da = a.smoothed()
    fb, db = b.smoothed()
    low = DISTANCE_BAND_HZ[0]
    high = min(DISTANCE_BAND_HZ[1], fa[-1], fb[-1])
    assert high > low, "profiles share no band to compare"
    grid = low * np.power(2.0, np.arange(0.0, math.log2(high / low), SMOOTHING_STEP_OCTAVES))
    diff = np.interp(np.log2(grid), np.log2(fa), da) - np.interp(np.log2(grid), np.log2(fb), db)
    return float(np.sqrt(np.mean(np.square(diff))))


# --- plot ----------------------------------------------------------------------------------------------

def plot_profile(profile: NoiseProfile, path: Path, title: str) -> None:
    """A PNG of the PSD (raw and smoothed), the tilt fit, the bandwidth and the hum harmonics; atomic."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from workbench.audio.io import atomic_path

    figure = Figure(figsize=(9, 5), dpi=110)
    FigureCanvasAgg(figure)
    figure.subplots_adjust(left=0.09, right=0.98, bottom=0.11, top=0.93)  # fixed: tight_layout costs ~0.5 s
    axes = figure.add_subplot(1, 1, 1)
    f, db = profile.frequencies_hz[1:], profile.psd_db[1:]
    axes.semilogx(f, db, color="0.75", linewidth=0.6, label="Welch PSD")
    centres, smoothed = profile.smoothed()
    axes.semilogx(centres, smoothed, color="C0", linewidth=1.6, label="smoothed (hum masked)")
    band = (centres >= TILT_BAND_HZ[0]) & (centres <= TILT_BAND_HZ[1])
    if band.sum() >= 3:
        slope, intercept = np.polyfit(np.log2(centres[band]), smoothed[band], 1)
        fit = centres[band]
        axes.semilogx(fit, slope * np.log2(fit) + intercept, "--", color="C1",
                      label=f"tilt {profile.tilt_db_per_octave:+.2f} dB/oct")
    axes.axvline(profile.bandwidth_hz, color="C2", linestyle=":", label=f"bandwidth {profile.bandwidth_hz:.0f} Hz")
    if profile.hum is not None:
        for k, (frequency, level) in enumerate(profile.hum.harmonics_db, start=1):
            if level >= HUM_HARMONIC_USED_DB:
                axes.axvline(frequency, color="C3", alpha=0.35, linewidth=0.8,
                             label=f"hum {profile.hum.fundamental_hz:.2f} Hz family" if k == 1 else None)
    axes.set_xlim(20, profile.sample_rate / 2)
    top = max(float(np.max(db)), float(np.max(smoothed))) + 5.0  # hum peaks stay in view
    # at least 40 dB shown, at most 100 dB: a steep roll-off would squash the rest
    axes.set_ylim(max(min(float(np.min(smoothed)) - 10.0, top - 40.0), top - 100.0), top)
    axes.set_xlabel("frequency (Hz)")
    axes.set_ylabel("PSD (dB re FS²/Hz)")
    axes.set_title(f"{title} — RMS {profile.rms_dbfs:.1f} dBFS")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="lower left", fontsize=8)
    with atomic_path(Path(path)) as temporary:
        figure.savefig(temporary, format="png")
