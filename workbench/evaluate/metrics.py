"""Objective quality measures of a denoiser, as the research reports them.

SNR and SI-SDR of an estimate against the clean reference, their gains over the noisy input (ΔSNR,
ΔSI-SDR: what the paper's tables report), and the mean of per-fragment values with a 95 % confidence
interval from the t-distribution. Everything works on numpy arrays over the last (time) axis in float64,
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


def mean_ci(values, confidence: float = 0.95) -> Summary:
    """Mean and `confidence` interval of the mean; one value gives a zero-width interval."""
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
