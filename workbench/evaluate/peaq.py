"""PEAQ, Basic version (ITU-R BS.1387-1): the Objective Difference Grade of a test signal against its reference.

Written from the recommendation's equations (with P. Kabal's "An Examination and Interpretation of ITU-R
BS.1387", McGill TSP report 2002/2003, for the places where the text is ambiguous); numpy/scipy only, every
stage vectorised over frames except the first-order smoothers, which run over frames on whole band vectors.

Pipeline per channel, frames of 2048 samples at 48 kHz advancing by 1024:
  FFT ear model   Hann window scaled so a full-scale sine (amplitude 1.0) at 1019.5 Hz reads 92 dB SPL;
                  outer and middle ear weighting; grouping into 109 quarter-Bark bands (80 Hz .. 18 kHz);
                  internal noise; level-dependent frequency spreading ("unsmeared excitation"); time-domain
                  spreading ("excitation patterns").
  pre-processing  level and pattern adaptation, modulation patterns, loudness.
  MOVs            the 11 model output variables (see MOV_NAMES), averaged over the frames the recommendation
                  counts (the data boundary of the reference, a 0.5 s settling delay for the modulation and
                  noise-loudness ones, the 0.1 sone loudness test for RmsNoiseLoud).
  neural network  3 hidden sigmoid nodes to the Distortion Index and the ODG (range −3.98 .. +0.22).

Stereo: every MOV is computed per channel and the two are averaged, except ADB and MFPD, whose per-band
detection probabilities take the larger of the two channels (binaural), as the recommendation says.

Interpretation choices (Kabal's readings, as his PQevalAudio v9r0 implements them, unless said otherwise):
band edges from the Bark formula z = 7·asinh(f/650) rather than the printed table (ours); the mask offset
uses the band index times 0.25 Bark; the pattern-correction smoothers start at 0; MFPD is the plain maximum
of the filtered detection probability (forgetting factor c1 = 1, as gstpeaq too); the scaled MOVs are not
clipped before the network; EHS correlates over lags 0..255 with a half Hann window, drops the
zero-frequency bin and takes the largest rising power after the spectrum first falls; the data boundary is
the first/last 5-sample window of the reference whose absolute sum exceeds 200/32768 in any channel (ours:
PQevalAudio takes the later of the channels' first windows).

Input other than 48 kHz is resampled to 48 kHz with the project's resampler (workbench.audio.dsp.resample)
before analysis; the recommendation is calibrated for 48 kHz only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from workbench.errors import WorkbenchError

SAMPLE_RATE = 48_000
PLAYBACK_LEVEL_DB_SPL = 92.0  # listening level of a full-scale sine (gstpeaq's and PQevalAudio's default)
FRAME = 2048
HOP = FRAME // 2
FRAME_RATE = SAMPLE_RATE / HOP  # 46.875 frames per second
BANDS_LOW_HZ, BANDS_HIGH_HZ, BAND_BARK = 80.0, 18_000.0, 0.25
E_MIN = 1e-12  # floor of a band energy (the recommendation's Emin)

MOV_NAMES = ("BandwidthRefB", "BandwidthTestB", "TotalNMRB", "WinModDiff1B", "ADBB", "EHSB", "AvgModDiff1B",
             "AvgModDiff2B", "RmsNoiseLoudB", "MFPDB", "RelDistFramesB")

# The Basic version's network (BS.1387-1 Tables 14-16): MOV scaling, input weights (11 x 3), biases, output.
_A_MIN = np.array([393.916656, 361.965332, -24.045116, 1.110661, -0.206623, 0.074318, 1.113683, 0.950345,
                   0.029985, 0.000101, 0.0])
_A_MAX = np.array([921.0, 881.131226, 16.212030, 107.137772, 2.886017, 13.933351, 63.257874, 1145.018555,
                   14.819740, 1.0, 1.0])
_W_X = np.array([[-0.502657, 0.436333, 1.219602], [4.307481, 3.246017, 1.123743], [4.984241, -2.211189, -0.192096],
                 [0.051056, -1.762424, 4.331315], [2.321580, 1.789971, -0.754560],
                 [-5.303901, -3.452257, -10.814982], [2.730991, -6.111805, 1.519223],
                 [0.624950, -1.331523, -5.955151], [3.102889, 0.871260, -5.922878],
                 [-1.051468, -0.939882, -0.142913], [-1.804679, -0.503610, -0.620456]])
_W_X_BIAS = np.array([-2.518254, 0.654841, -2.207228])
_W_Y = np.array([-3.817048, 4.107138, 4.629582])
_W_Y_BIAS = -0.307594
_ODG_MIN, _ODG_MAX = -3.98, 0.22

# Thresholds the recommendation states for 16-bit samples, here for float samples with full scale 1.0.
_BOUNDARY_SUM = 200.0 / 32768.0  # absolute sum over 5 samples
_EHS_ENERGY = 8000.0 / 32768.0 ** 2  # energy of the second half of a frame
_EHS_LAGS = 256


@dataclass(frozen=True)
class PeaqResult:
    """The grade and what it was computed from."""

    odg: float  # Objective Difference Grade: 0 imperceptible .. −4 very annoying
    distortion_index: float
    movs: dict[str, float]
    frames: int  # frames averaged (inside the reference's data boundary)

    def to_dict(self) -> dict:
        return {"odg": self.odg, "distortion_index": self.distortion_index, "movs": dict(self.movs),
                "frames": self.frames}


# ----------------------------------------------------------------------------------------------- tables

@dataclass(frozen=True)
class _Tables:
    window: np.ndarray  # (FRAME,) scaled Hann window
    ear_weight: np.ndarray  # (FRAME/2+1,) outer/middle ear power weighting
    grouping: Any  # (FRAME/2+1, bands) share of each FFT bin in each band, a scipy CSR matrix
    centre_hz: np.ndarray  # (bands,)
    internal_noise: np.ndarray  # (bands,)
    spread_norm: np.ndarray  # (bands,) Bs: the spreading of a unit excitation
    threshold: np.ndarray  # (bands,) energy threshold of hearing (loudness, noise loudness)
    excitation_index: np.ndarray  # (bands,) s
    loudness_scale: np.ndarray  # (bands,)
    mask_gain: np.ndarray  # (bands,) 10^(−m/10), m the masking offset in dB
    a_time_spread: np.ndarray  # smoothing coefficients: time-domain spreading (τ100 30 ms)
    a_adapt: np.ndarray  # level/pattern adaptation and modulation (τ100 50 ms)


def _time_constants(centre_hz: np.ndarray, tau_100: float, tau_min: float = 0.008) -> np.ndarray:
    tau = tau_min + (100.0 / centre_hz) * (tau_100 - tau_min)
    return np.exp(-1.0 / (FRAME_RATE * tau))


def _peak_factor(frequency: float) -> float:
    """Largest DFT bin of a Hann-windowed sine relative to its continuous-spectrum peak (the sine falls
    between bins), so the level calibration holds for the 1019.5 Hz calibration tone."""
    bin_width = 1.0 / FRAME
    normalised = frequency / SAMPLE_RATE
    k = math.floor(normalised / bin_width)
    offset = min((k + 1) * bin_width - normalised, normalised - k * bin_width) * (FRAME - 1)
    return math.sin(math.pi * offset) / (math.pi * offset * (1.0 - offset ** 2))


@lru_cache(maxsize=4)
def _tables(level_db: float = PLAYBACK_LEVEL_DB_SPL) -> _Tables:
    """Every fixed table of the ear model for a listening level (dB SPL of a full-scale sine)."""
    hann = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(FRAME) / (FRAME - 1))
    gain = 10.0 ** (level_db / 20.0) / (_peak_factor(1019.5) * 0.25 * (FRAME - 1))
    f = np.arange(FRAME // 2 + 1) * SAMPLE_RATE / FRAME
    with np.errstate(divide="ignore"):
        khz = f / 1000.0
        weight_db = -2.184 * khz ** -0.8 + 6.5 * np.exp(-0.6 * (khz - 3.3) ** 2) - 0.001 * khz ** 3.6
    ear_weight = np.where(f > 0, 10.0 ** (weight_db / 10.0), 0.0)

    z_low, z_high = 7.0 * np.arcsinh(BANDS_LOW_HZ / 650.0), 7.0 * np.arcsinh(BANDS_HIGH_HZ / 650.0)
    bands = int(math.ceil((z_high - z_low) / BAND_BARK))
    assert bands == 109, bands  # the Basic version's band count
    z_lower = z_low + BAND_BARK * np.arange(bands)
    z_upper = np.minimum(z_lower + BAND_BARK, z_high)
    lower_hz, upper_hz = 650.0 * np.sinh(z_lower / 7.0), 650.0 * np.sinh(z_upper / 7.0)
    centre_hz = 650.0 * np.sinh((z_lower + z_upper) / 14.0)
    # each FFT bin k stands for [k − ½, k + ½]·df; a band gets the overlapping share of it
    df = SAMPLE_RATE / FRAME
    overlap = np.minimum(upper_hz[None, :], f[:, None] + df / 2) - np.maximum(lower_hz[None, :], f[:, None] - df / 2)
    # scipy submodules load slowly: only their callers pay.
    from scipy.sparse import csr_matrix

    # sparse (about two bands per bin): a dense product would hand a tiny job to a multi-threaded BLAS
    grouping = csr_matrix(np.clip(overlap / df, 0.0, 1.0))

    khz_c = centre_hz / 1000.0
    internal_noise = 10.0 ** (0.1456 * khz_c ** -0.8)
    threshold = 10.0 ** (0.364 * khz_c ** -0.8)
    excitation_index = 10.0 ** ((-2.0 - 2.05 * np.arctan(centre_hz / 4000.0)
                                 - 0.75 * np.arctan((centre_hz / 1600.0) ** 2)) / 10.0)
    loudness_scale = 1.07664 * (threshold / (excitation_index * 1e4)) ** 0.23
    band = np.arange(bands)
    mask_db = np.where(band <= 12.0 / BAND_BARK, 3.0, 0.25 * band * BAND_BARK)
    tables = _Tables(hann * gain, ear_weight, grouping, centre_hz, internal_noise, np.ones(bands), threshold,
                     excitation_index, loudness_scale, 10.0 ** (-mask_db / 10.0),
                     _time_constants(centre_hz, 0.030), _time_constants(centre_hz, 0.050))
    # Bs: the spreading of a unit excitation in every band, so a flat 0 dB input stays 0 dB
    unit = _spread(np.ones((1, bands)), tables)[0]
    return _Tables(**{**tables.__dict__, "spread_norm": unit})


# ------------------------------------------------------------------------------------------- ear model

def _frames(x: np.ndarray, count: int) -> np.ndarray:
    """(count, FRAME) frames of x advancing by HOP; past the end reads zeros."""
    padded = np.zeros((count - 1) * HOP + FRAME)
    padded[: min(x.size, padded.size)] = x[: padded.size]
    return np.lib.stride_tricks.sliding_window_view(padded, FRAME)[::HOP][:count]


def _spread(energy: np.ndarray, tables: _Tables, chunk: int = 128) -> np.ndarray:
    """Level-dependent spreading over bands: −27 dB/Bark downwards, −24 − 230/fc + 0.2·L dB/Bark upwards,
    each band's spreading normalised to unit sum, contributions added with exponent 0.4, divided by Bs."""
    bands = energy.shape[-1]
    step = np.arange(bands)
    lower = 10.0 ** (-2.7 * BAND_BARK)
    lower_sum = (1.0 - lower ** (step + 1)) / (1.0 - lower)  # sum of the lower skirt from band m down to 0
    distance = step[None, :] - step[:, None]  # [source, target] = target − source
    lower_matrix = np.where(distance <= 0, lower ** (0.4 * np.maximum(-distance, 0)), 0.0)  # target <= source
    out = np.empty_like(energy)
    for start in range(0, energy.shape[0], chunk):
        e = energy[start:start + chunk]
        upper = 10.0 ** ((-2.4 - 23.0 / tables.centre_hz) * BAND_BARK) * e ** (0.2 * BAND_BARK)
        terms = bands - step
        near_one = np.abs(1.0 - upper) < 1e-12
        upper_sum = np.where(near_one, terms, (1.0 - upper ** terms) / np.where(near_one, 0.5, 1.0 - upper))
        normalised = (e / (lower_sum + upper_sum - 1.0)) ** 0.4
        total = np.einsum("fm,mi->fi", normalised, lower_matrix)  # einsum: single-threaded, no BLAS hand-off
        # upper skirt: source m reaches target i > m with upper[m]^(0.4·(i−m))
        log_upper = 0.4 * np.log(upper)[:, :, None] * np.maximum(distance, 0)[None]
        skirt = np.where(distance[None] > 0, np.exp(log_upper), 0.0)
        total += np.einsum("fm,fmi->fi", normalised, skirt)
        out[start:start + chunk] = total ** (1.0 / 0.4) / tables.spread_norm
    return out


def _smooth(x: np.ndarray, a: np.ndarray, b: np.ndarray | float, initial: float = 0.0) -> np.ndarray:
    """y[n] = a·y[n−1] + b·x[n] along axis −2 (frames), a per band (last axis)."""
    y = np.empty_like(x)
    state = np.full(x.shape[:-2] + x.shape[-1:], initial, dtype=np.float64)
    for n in range(x.shape[-2]):
        state = a * state + b * x[..., n, :]
        y[..., n, :] = state
    return y


@dataclass
class _Patterns:
    """The ear model's output for one channel; arrays are (2 = reference/test, frames, ...)."""

    power: np.ndarray  # |X|² unweighted, (2, F, FRAME/2+1)
    noise: np.ndarray  # EbN: grouped weighted error spectrum, (F, bands)
    unsmeared: np.ndarray  # Es (2, F, bands)
    excitation: np.ndarray  # Ehs (2, F, bands)


def _group(power: np.ndarray, grouping) -> np.ndarray:
    """(..., FRAME/2+1) bin powers -> (..., bands) band energies."""
    flat = power.reshape(-1, power.shape[-1])
    return np.asarray((grouping.T @ flat.T).T).reshape(power.shape[:-1] + (grouping.shape[1],))


def _ear_model(reference: np.ndarray, test: np.ndarray, count: int, tables: _Tables) -> _Patterns:
    power = np.stack([np.abs(np.fft.rfft(_frames(x, count) * tables.window, axis=-1)) ** 2
                      for x in (reference, test)])
    weighted = power * tables.ear_weight
    error = (np.sqrt(weighted[0]) - np.sqrt(weighted[1])) ** 2
    grouped = np.maximum(_group(weighted, tables.grouping), E_MIN)
    noise = np.maximum(_group(error, tables.grouping), E_MIN)
    pitch = grouped + tables.internal_noise
    unsmeared = _spread(pitch.reshape(-1, pitch.shape[-1]), tables).reshape(pitch.shape)
    smoothed = _smooth(unsmeared, tables.a_time_spread, 1.0 - tables.a_time_spread)
    return _Patterns(power, noise, unsmeared, np.maximum(smoothed, unsmeared))


# ------------------------------------------------------------------------------------- pre-processing

def _adapted(excitation: np.ndarray, tables: _Tables) -> np.ndarray:
    """Level and pattern adaptation: (2, F, bands) excitation -> spectrally adapted patterns EP."""
    a = tables.a_adapt
    smoothed = _smooth(excitation, a, 1.0 - a)
    level = (np.sum(np.sqrt(smoothed[0] * smoothed[1]), axis=-1) / np.sum(smoothed[1], axis=-1)) ** 2
    louder_ref = (level > 1.0)[:, None]
    ref = np.where(louder_ref, excitation[0] / level[:, None], excitation[0])
    test = np.where(louder_ref, excitation[1], excitation[1] * level[:, None])
    numerator = _smooth(test * ref, a, 1.0)
    denominator = _smooth(ref * ref, a, 1.0)
    test_larger = numerator >= denominator
    ratio_ref = np.where(test_larger, 1.0, numerator / denominator)
    ratio_test = np.where(test_larger, denominator / numerator, 1.0)
    bands = excitation.shape[-1]
    low = np.maximum(np.arange(bands) - 3, 0)
    high = np.minimum(np.arange(bands) + 4, bands - 1)

    def band_average(r: np.ndarray) -> np.ndarray:
        cumulative = np.concatenate([np.zeros((r.shape[0], 1)), np.cumsum(r, axis=-1)], axis=-1)
        return (cumulative[:, high + 1] - cumulative[:, low]) / (high - low + 1)

    correction = _smooth(np.stack([band_average(ratio_ref), band_average(ratio_test)]), a, 1.0 - a)
    return np.stack([ref, test]) * correction


def _modulation(unsmeared: np.ndarray, tables: _Tables) -> tuple[np.ndarray, np.ndarray]:
    """Modulation patterns (2, F, bands) and the reference's smoothed loudness-like envelope Ē_R (F, bands)."""
    a = tables.a_adapt
    compressed = unsmeared ** 0.3
    previous = np.concatenate([np.zeros_like(compressed[:, :1]), compressed[:, :-1]], axis=1)
    derivative = _smooth(FRAME_RATE * np.abs(compressed - previous), a, 1.0 - a)
    envelope = _smooth(compressed, a, 1.0 - a)
    return derivative / (1.0 + envelope / 0.3), envelope[0]


def _loudness(excitation: np.ndarray, tables: _Tables) -> np.ndarray:
    """Total loudness in sone per frame, (..., F)."""
    s, threshold = tables.excitation_index, tables.threshold
    specific = tables.loudness_scale * ((1.0 - s + s * excitation / threshold) ** 0.23 - 1.0)
    return 24.0 / excitation.shape[-1] * np.sum(np.maximum(specific, 0.0), axis=-1)


# -------------------------------------------------------------------------------- per-frame precursors

def _bandwidths(power: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame bandwidth of reference and test in FFT bins (−1 where undefined)."""
    top = int(round(21_586.0 / SAMPLE_RATE * FRAME))  # 921
    floor = int(round(8_109.0 / SAMPLE_RATE * FRAME))  # 346
    ref, test = power[0], power[1]
    zero_level = test[:, top:FRAME // 2].max(axis=-1, keepdims=True)
    bins = np.arange(FRAME // 2 + 1)
    above_ref = (ref >= 10.0 * zero_level) & (bins > floor) & (bins < top)
    has_ref = above_ref.any(axis=-1)
    bw_ref = np.where(has_ref, FRAME // 2 - np.argmax(above_ref[:, ::-1], axis=-1) + 1, -1)
    above_test = (test >= 10.0 ** 0.5 * zero_level) & (bins < bw_ref[:, None])
    has_test = above_test.any(axis=-1) & has_ref
    bw_test = np.where(has_test, FRAME // 2 - np.argmax(above_test[:, ::-1], axis=-1) + 1, -1)
    return bw_ref.astype(np.float64), bw_test.astype(np.float64)


def _detection(excitation: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-band probability of detection and steps above threshold, (F, bands) each."""
    level_ref, level_test = 10.0 * np.log10(excitation[0]), 10.0 * np.log10(excitation[1])
    difference = level_ref - level_test
    louder_ref = difference > 0
    level = np.where(louder_ref, 0.3 * level_ref + 0.7 * level_test, level_test)
    slope = np.where(louder_ref, 4.0, 6.0)
    positive = np.maximum(level, 1e-30)
    step = np.where(level > 0, 5.95072 * (6.39468 / positive) ** 1.71332 + 9.01033e-11 * positive ** 4
                    + 5.05622e-6 * positive ** 3 - 0.00102438 * positive ** 2 + 0.0550197 * positive - 0.198719,
                    1e30)
    probability = 1.0 - 0.5 ** (np.abs(difference / step) ** slope)  # slopes are even
    steps = np.abs(np.trunc(difference)) / step
    return probability, steps


def _harmonic_structure(reference: np.ndarray, test: np.ndarray, power: np.ndarray, count: int) -> np.ndarray:
    """Per-frame EHS precursor (−1 for frames too quiet in both signals to count): the normalised
    autocorrelation of the log spectral ratio over 256 lags, windowed by a half Hann window, and the largest
    rising power of its spectrum after the spectrum first falls ("the peak after the first valley")."""
    lags = span = _EHS_LAGS
    energy_ref = np.sum(_frames(reference, count)[:, HOP:] ** 2, axis=-1)
    energy_test = np.sum(_frames(test, count)[:, HOP:] ** 2, axis=-1)
    floor = 1e-30  # a bin of exact zeros (digital silence in one signal) stays finite
    d = np.log(np.maximum(power[1, :, :lags + span - 1], floor) / np.maximum(power[0, :, :lags + span - 1], floor))
    windows = np.lib.stride_tricks.sliding_window_view(d, span, axis=-1)  # (F, lag, i): d[lag + i]
    correlation = np.einsum("fli,fi->fl", windows, d[:, :span])
    squares = np.cumsum(np.concatenate([np.zeros((d.shape[0], 1)), d ** 2], axis=-1), axis=-1)
    energies = squares[:, span:span + lags] - squares[:, :lags]  # Σ d² over [lag, lag + span)
    product = energies[:, :1] * energies
    normalised = np.where(product > 0, correlation / np.sqrt(np.where(product > 0, product, 1.0)), 1.0)
    half_hann = 0.5 - 0.5 * np.cos(2.0 * np.pi * (np.arange(lags) + lags - 1) / (2 * lags - 2))
    spectrum = np.abs(np.fft.rfft(normalised * half_hann * math.sqrt(8.0 / 3.0) / lags, axis=-1)) ** 2
    spectrum[:, 0] = 0.0  # the windowed mean is not a harmonic
    falling = spectrum[:, 1:] < spectrum[:, :-1]  # at bin n (n ≥ 1), against bin n − 1
    rising = spectrum[:, 1:] > spectrum[:, :-1]
    valley = np.where(falling.any(axis=-1), np.argmax(falling, axis=-1), falling.shape[-1])
    after = np.arange(falling.shape[-1])[None, :] > valley[:, None]
    peak = np.max(np.where(after & rising, spectrum[:, 1:], 0.0), axis=-1)
    quiet = (energy_ref < _EHS_ENERGY) & (energy_test < _EHS_ENERGY)
    return np.where(quiet, -1.0, peak)


# --------------------------------------------------------------------------------------- averaging

def _positive_mean(x: np.ndarray) -> float:
    kept = x[x >= 0]
    return float(kept.mean()) if kept.size else 0.0


def _windowed_average(x: np.ndarray, length: int = 4) -> float:
    if x.size < length:
        return 0.0
    roots = np.lib.stride_tricks.sliding_window_view(np.sqrt(x), length).mean(axis=-1)
    return float(np.sqrt(np.mean(roots ** 4)))


def _weighted_average(x: np.ndarray, weights: np.ndarray) -> float:
    total = float(weights.sum())
    return float(np.sum(weights * x) / total) if x.size and total > 0 else 0.0


def _data_boundary(reference: np.ndarray) -> tuple[int, int] | None:
    """First and last sample of the reference's audible part (5-sample windows, any channel), or None."""
    window = min(5, reference.shape[-1])
    sums = np.lib.stride_tricks.sliding_window_view(np.abs(reference), window, axis=-1).sum(axis=-1)
    loud = np.flatnonzero((sums > _BOUNDARY_SUM).any(axis=0))
    if loud.size == 0:
        return None
    return int(loud[0]), int(loud[-1]) + window - 1


def _channel_movs(reference: np.ndarray, test: np.ndarray, first: int, count: int, tables: _Tables) -> dict:
    """Per-frame MOV precursors of one channel, over frames 0..count−1 (the first `first` are warm-up)."""
    patterns = _ear_model(reference, test, count, tables)
    adapted = _adapted(patterns.excitation, tables)
    modulation, envelope_ref = _modulation(patterns.unsmeared, tables)
    loudness = _loudness(patterns.excitation, tables)

    difference = modulation[1] - modulation[0]
    mod_ref = modulation[0]
    mod_diff1 = 100.0 / mod_ref.shape[-1] * np.sum(np.abs(difference) / (1.0 + mod_ref), axis=-1)
    mod_diff2 = 100.0 / mod_ref.shape[-1] * np.sum(np.where(difference < 0, 0.1 * -difference, difference)
                                                   / (0.01 + mod_ref), axis=-1)
    mod_weight = np.sum(envelope_ref / (envelope_ref + 100.0 * tables.internal_noise ** 0.3), axis=-1)

    s_ref, s_test = 0.15 * modulation[0] + 0.5, 0.15 * modulation[1] + 0.5
    ep_ref, ep_test = adapted[0], adapted[1]
    beta = np.exp(-1.5 * (ep_test - ep_ref) / ep_ref)
    audible = np.maximum(s_test * ep_test - s_ref * ep_ref, 0.0)
    specific = (tables.internal_noise / s_test) ** 0.23 * (
        (1.0 + audible / (tables.internal_noise + s_ref * ep_ref * beta)) ** 0.23 - 1.0)
    noise_loudness = np.maximum(24.0 / specific.shape[-1] * specific.sum(axis=-1), 0.0)

    bw_ref, bw_test = _bandwidths(patterns.power)
    nmr = patterns.noise / (tables.mask_gain * patterns.excitation[0])
    probability, steps = _detection(patterns.excitation)
    ehs = _harmonic_structure(reference, test, patterns.power, count)
    keep = slice(first, count)
    return {"mod_diff1": mod_diff1[keep], "mod_diff2": mod_diff2[keep], "mod_weight": mod_weight[keep],
            "noise_loudness": noise_loudness[keep], "loudness": loudness[:, keep],
            "bw_ref": bw_ref[keep], "bw_test": bw_test[keep], "nmr_mean": nmr.mean(axis=-1)[keep],
            "nmr_max": nmr.max(axis=-1)[keep], "probability": probability[keep], "steps": steps[keep],
            "ehs": ehs[keep]}


def _average(channels: list[dict], warm_up: int) -> dict[str, float]:
    """The 11 MOVs from per-frame precursors (recommendation's averaging, channels averaged)."""
    count = channels[0]["mod_diff1"].size
    delay = max(0, math.ceil(0.5 * FRAME_RATE) - warm_up)
    # noise loudness starts 50 ms after both signals first exceed 0.1 sone (earliest channel)
    loud_from = min(int(np.argmax(both)) if both.any() else count
                    for both in ((c["loudness"] > 0.1).all(axis=0) for c in channels))
    noise_delay = max(loud_from + math.ceil(0.05 * FRAME_RATE), delay)

    def mean_over(values) -> float:
        return float(np.mean(values))

    movs = {
        "BandwidthRefB": mean_over([_positive_mean(c["bw_ref"]) for c in channels]),
        "BandwidthTestB": mean_over([_positive_mean(c["bw_test"]) for c in channels]),
        "TotalNMRB": mean_over([10.0 * np.log10(c["nmr_mean"].mean()) for c in channels]),
        "WinModDiff1B": mean_over([_windowed_average(c["mod_diff1"][delay:]) for c in channels]),
        "AvgModDiff1B": mean_over([_weighted_average(c["mod_diff1"][delay:], c["mod_weight"][delay:])
                                   for c in channels]),
        "AvgModDiff2B": mean_over([_weighted_average(c["mod_diff2"][delay:], c["mod_weight"][delay:])
                                   for c in channels]),
        "RmsNoiseLoudB": mean_over([float(np.sqrt(np.mean(c["noise_loudness"][noise_delay:] ** 2)))
                                    if count > noise_delay else 0.0 for c in channels]),
        "RelDistFramesB": mean_over([float(np.mean(c["nmr_max"] > 10.0 ** 0.15)) for c in channels]),
        "EHSB": 1000.0 * mean_over([_positive_mean(c["ehs"]) for c in channels]),
    }
    probability = np.max([c["probability"] for c in channels], axis=0)  # binaural: the more audible ear
    steps = np.max([c["steps"] for c in channels], axis=0)
    frame_probability = 1.0 - np.prod(1.0 - probability, axis=-1)
    frame_steps = steps.sum(axis=-1)
    distorted = frame_probability > 0.5
    if not distorted.any():
        movs["ADBB"] = 0.0
    elif frame_steps[distorted].sum() > 0:
        movs["ADBB"] = float(np.log10(frame_steps[distorted].sum() / distorted.sum()))
    else:
        movs["ADBB"] = -0.5
    # scipy submodules load slowly: only their callers pay.
    from scipy.signal import lfilter

    filtered = lfilter([0.1], [1.0, -0.9], frame_probability)  # first-order smoothing, c0 = 0.9
    movs["MFPDB"] = float(filtered.max(initial=0.0))  # c1 = 1: the plain maximum (see the module docstring)
    return {name: movs[name] for name in MOV_NAMES}


def _network(movs: dict[str, float]) -> tuple[float, float]:
    """Distortion Index and ODG from the 11 MOVs (no clipping of the scaled MOVs, as the recommendation)."""
    x = (np.array([movs[name] for name in MOV_NAMES]) - _A_MIN) / (_A_MAX - _A_MIN)
    hidden = 1.0 / (1.0 + np.exp(-(_W_X_BIAS + x @ _W_X)))
    di = float(_W_Y_BIAS + hidden @ _W_Y)
    return di, float(_ODG_MIN + (_ODG_MAX - _ODG_MIN) / (1.0 + math.exp(-di)))


# ------------------------------------------------------------------------------------------- public

def _as_channels(x, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[0] not in (1, 2):
        raise WorkbenchError(f"PEAQ takes mono or stereo audio as (samples,) or (channels, samples); "
                             f"the {name} has shape {x.shape}")
    if x.shape[1] == 0:
        raise WorkbenchError(f"the {name} has no samples")
    if not np.all(np.isfinite(x)):
        raise WorkbenchError(f"the {name} has non-finite samples (NaN or infinity)")
    return x


def peaq(reference, test, sample_rate: int = SAMPLE_RATE, *,
         playback_level_db: float = PLAYBACK_LEVEL_DB_SPL) -> PeaqResult:
    """PEAQ Basic ODG of `test` against `reference`: arrays (samples,) or (channels, samples), 1 or 2
    channels, full scale 1.0 = a sine at `playback_level_db` dB SPL; resampled to 48 kHz if needed. Both
    must have the same shape (time-aligned, as PEAQ assumes). A silent reference is an error."""
    ref, tst = _as_channels(reference, "reference"), _as_channels(test, "test signal")
    if ref.shape != tst.shape:
        raise WorkbenchError(f"reference and test signal differ in shape: {ref.shape[0]} channel(s) x "
                             f"{ref.shape[1]} samples vs {tst.shape[0]} x {tst.shape[1]}")
    if int(sample_rate) <= 0:
        raise WorkbenchError(f"invalid sample rate {sample_rate}")
    if int(sample_rate) != SAMPLE_RATE:
        from workbench.audio.dsp import resample, torch_threads

        with torch_threads(1):  # one short signal: more threads only add hand-offs
            ref = resample(ref.astype(np.float32), int(sample_rate), SAMPLE_RATE).astype(np.float64)
            tst = resample(tst.astype(np.float32), int(sample_rate), SAMPLE_RATE).astype(np.float64)
    boundary = _data_boundary(ref)
    if boundary is None:
        raise WorkbenchError("the reference is silent (no 5 samples sum above −44 dBFS), PEAQ has nothing to grade")
    start, end = boundary
    first = start // HOP
    last = max(first, (end + 1 - HOP) // HOP)
    tables = _tables(float(playback_level_db))
    channels = [_channel_movs(ref[c], tst[c], first, last + 1, tables) for c in range(ref.shape[0])]
    movs = _average(channels, first)
    di, odg = _network(movs)
    assert math.isfinite(odg), movs
    return PeaqResult(odg, di, movs, last + 1 - first)


def peaq_odg(reference, test, sample_rate: int = SAMPLE_RATE) -> float:
    """Just the ODG; see `peaq`."""
    return peaq(reference, test, sample_rate).odg


def peaq_odg_rows(reference: np.ndarray, test: np.ndarray, sample_rate: int) -> np.ndarray:
    """ODG of each row of (N, samples) mono batches: test row i against reference row i."""
    reference, test = np.atleast_2d(reference), np.atleast_2d(test)
    assert reference.shape == test.shape and reference.ndim == 2, (reference.shape, test.shape)
    odgs = []
    for row, (r, t) in enumerate(zip(reference, test)):
        try:
            odgs.append(peaq_odg(r, t, sample_rate))
        except WorkbenchError as error:
            raise WorkbenchError(f"row {row}: {error}") from None
    return np.array(odgs, dtype=np.float64)
