"""Objective quality measures of a denoiser, as the research reports them.

SNR and SI-SDR of an estimate against the clean reference, their gains over the noisy input (ΔSNR,
ΔSI-SDR: what the paper's tables report), the mean of per-fragment values with a 95 % confidence
interval from the t-distribution, the same for paired differences of two methods on the same fragments,
and the mains hum a method leaves behind (its residual at the hum's first harmonics against the input's). Everything works on numpy arrays over the last (time) axis in float64,
so a batch of fragments (N, T) gives N values.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

# Guards against log(0) for a perfect estimate or an all-zero reference; 1e-20 is far below any real error.
_TINY = 1e-20


def _as_float64(*arrays: np.ndarray) -> list[np.ndarray]:
    out = [np.asarray(a, dtype=np.float64) for a in arrays]
    assert all(a.shape == out[0].shape for a in out), [a.shape for a in out]
    return out


def snr_db(reference: np.ndarray, estimate: np.ndarray) -> np.ndarray:
    """10·log10(‖reference‖² / ‖estimate − reference‖²) over the last axis."""
    reference, estimate = _as_float64(reference, estimate)
    signal = np.sum(reference ** 2, axis=-1)
    error = np.sum((estimate - reference) ** 2, axis=-1)
    return 10.0 * np.log10(np.maximum(signal, _TINY) / np.maximum(error, _TINY))


def si_sdr_db(reference: np.ndarray, estimate: np.ndarray) -> np.ndarray:
    """Scale-invariant SDR (Le Roux et al. 2019), both signals made zero-mean first.

    The reference is scaled by the least-squares factor that best explains the estimate, so a denoiser
    that only changes the level is not penalised; what remains is distortion plus residual noise.
    """
    reference, estimate = _as_float64(reference, estimate)
    reference = reference - reference.mean(axis=-1, keepdims=True)
    estimate = estimate - estimate.mean(axis=-1, keepdims=True)
    scale = np.sum(estimate * reference, axis=-1, keepdims=True) / np.maximum(
        np.sum(reference ** 2, axis=-1, keepdims=True), _TINY)
    target = scale * reference
    residual = estimate - target
    return 10.0 * np.log10(np.maximum(np.sum(target ** 2, axis=-1), _TINY)
                           / np.maximum(np.sum(residual ** 2, axis=-1), _TINY))


def delta_snr_db(clean: np.ndarray, noisy: np.ndarray, estimate: np.ndarray) -> np.ndarray:
    """ΔSNR: the estimate's SNR against the clean signal minus the noisy input's."""
    return snr_db(clean, estimate) - snr_db(clean, noisy)


def delta_si_sdr_db(clean: np.ndarray, noisy: np.ndarray, estimate: np.ndarray) -> np.ndarray:
    """ΔSI-SDR: the estimate's SI-SDR against the clean signal minus the noisy input's."""
    return si_sdr_db(clean, estimate) - si_sdr_db(clean, noisy)


@dataclass(frozen=True)
class Summary:
    """Mean of per-fragment values with a two-sided confidence interval (t-distribution)."""

    mean: float
    ci_low: float
    ci_high: float
    n: int
    confidence: float = 0.95

    @property
    def half_width(self) -> float:
        return (self.ci_high - self.ci_low) / 2.0

    def to_dict(self) -> dict:
        return asdict(self) | {"half_width": self.half_width}

    def __str__(self) -> str:
        return f"{self.mean:.2f} ± {self.half_width:.2f}"

    def lies_above(self, threshold: float) -> bool:
        """True when the whole interval lies above `threshold`: the mean is resolved as greater. One value
        has no interval (its zero width says nothing), so it never is."""
        return interval_lies_above(self.ci_low, self.n, threshold)

    def interval_text(self) -> str:
        return f"{self.mean:+.2f} dB [{self.ci_low:+.2f}, {self.ci_high:+.2f}]"


def interval_lies_above(ci_low: float, n: int, threshold: float) -> bool:
    """See `Summary.lies_above` (for summaries read back from JSON)."""
    return n >= 2 and ci_low > threshold


def mean_ci(values, confidence: float = 0.95) -> Summary:
    """Mean and `confidence` interval of the mean; one value gives a zero-width interval."""
    # scipy submodules load slowly: only their callers pay.
    from scipy import stats

    values = np.asarray(values, dtype=np.float64).ravel()
    assert values.size > 0, "mean_ci of nothing"
    assert np.all(np.isfinite(values)), "mean_ci of non-finite values"
    mean = float(values.mean())
    if values.size < 2:
        return Summary(mean, mean, mean, 1, confidence)
    sem = float(stats.sem(values))
    if sem == 0.0:
        return Summary(mean, mean, mean, int(values.size), confidence)
    low, high = stats.t.interval(confidence, values.size - 1, loc=mean, scale=sem)
    return Summary(mean, float(low), float(high), int(values.size), confidence)


def paired_ci(values, rival_values, confidence: float = 0.95) -> Summary:
    """Mean of the per-fragment differences `values − rival_values` with the t-interval on those paired
    differences (the paired t-test's interval): both methods scored on the same fragments, so what varies
    from fragment to fragment (the music, the noise) cancels and only the methods' difference is left."""
    values = np.asarray(values, dtype=np.float64).ravel()
    rival_values = np.asarray(rival_values, dtype=np.float64).ravel()
    assert values.shape == rival_values.shape, ("paired values need the same fragments", values.shape, rival_values.shape)
    return mean_ci(values - rival_values, confidence)


# --------------------------------------------------------------------------------------------- mains hum

HUM_HARMONICS = 4  # the mains fundamental and its first three harmonics
HUM_HALF_BAND_HZ = 2.0  # power within ±2 Hz of each k·f0: the line and its drift, little of the hiss beside it
HUM_SEGMENT = 65536  # Welch segment (Hann, 50 % overlap) for the hum: 0.67 Hz bins at 44.1 kHz


@dataclass(frozen=True)
class HumResidual:
    """How much of the mains hum a method leaves: the residual's power (estimate − clean) in a narrow band
    at each of the first HUM_HARMONICS multiples of the fundamental, against the input noise's power in
    the same band, in dB (0: all of it left, −10: a tenth of its power left); `total_db` over all bands."""

    fundamental_hz: float
    frequencies_hz: tuple[float, ...]
    input_db: tuple[float, ...]  # the input noise's band power per harmonic, dB re full scale²
    residual_db: tuple[float, ...]  # the method's residual's band power per harmonic, dB re full scale²
    total_db: float  # residual − input over the summed bands

    @property
    def relative_db(self) -> tuple[float, ...]:
        return tuple(r - i for r, i in zip(self.residual_db, self.input_db))

    def to_dict(self) -> dict:
        return {"fundamental_hz": self.fundamental_hz, "frequencies_hz": list(self.frequencies_hz),
                "input_db": list(self.input_db), "residual_db": list(self.residual_db),
                "relative_db": list(self.relative_db), "total_db": self.total_db}


def _band_powers(x: np.ndarray, sample_rate: int, centres: list[float], half_band_hz: float) -> np.ndarray:
    """Power of x (rows averaged) within ±half_band_hz of each centre, from a long-segment Welch PSD."""
    # scipy submodules load slowly: only their callers pay.
    from scipy.signal import welch

    x = np.atleast_2d(np.asarray(x, dtype=np.float64))
    segment = min(HUM_SEGMENT, x.shape[-1])
    frequencies, psd = welch(x, fs=sample_rate, window="hann", nperseg=segment, axis=-1)
    psd = psd.reshape(-1, psd.shape[-1]).mean(axis=0)
    resolution = float(frequencies[1] - frequencies[0])
    # At least the bin the line falls in and its neighbours, however short the fragments (coarse bins).
    half = max(half_band_hz, 1.5 * resolution)
    return np.array([psd[np.abs(frequencies - centre) <= half].sum() * resolution for centre in centres])


def hum_residual(noise: np.ndarray, residual: np.ndarray, sample_rate: int, fundamental_hz: float,
                 harmonics: int = HUM_HARMONICS, half_band_hz: float = HUM_HALF_BAND_HZ) -> HumResidual:
    """The residual hum of a method: `noise` is what was added to the clean signal (noisy − clean),
    `residual` what the method left (estimate − clean), both (N, T) or (T,)."""
    assert fundamental_hz > 0 and harmonics >= 1, (fundamental_hz, harmonics)
    centres = [k * float(fundamental_hz) for k in range(1, harmonics + 1)]
    assert centres[-1] + half_band_hz < sample_rate / 2, "harmonics above Nyquist"
    before = _band_powers(noise, sample_rate, centres, half_band_hz)
    after = _band_powers(residual, sample_rate, centres, half_band_hz)
    to_db = lambda power: 10.0 * np.log10(np.maximum(power, _TINY))  # noqa: E731
    return HumResidual(float(fundamental_hz), tuple(centres), tuple(float(v) for v in to_db(before)),
                       tuple(float(v) for v in to_db(after)), float(to_db(after.sum()) - to_db(before.sum())))
