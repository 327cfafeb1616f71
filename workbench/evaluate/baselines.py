"""The reference rows of every evaluation: the noisy input itself and the research's spectral subtraction.

The paper compares its networks with noisereduce's stationary spectral gating given a sample of the
machine's noise; here it gets the device's own noise (from its train split, never the test noise the
fragments are mixed with). A method is any callable taking noisy audio, (T,) or (B, T) float32 at
44.1 kHz, and returning an estimate of the same shape.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from workbench.audio.dsp import MODEL_SAMPLE_RATE

Method = Callable[[np.ndarray], np.ndarray]

NOISY_INPUT = "noisy input"
SPECTRAL_GATING = "spectral gating"


def noisy_input(noisy: np.ndarray) -> np.ndarray:
    """The do-nothing method: its ΔSNR is 0 by definition, the row every gain is measured from."""
    return np.asarray(noisy, dtype=np.float32)


def spectral_gating(noise_reference: np.ndarray, sample_rate: int = MODEL_SAMPLE_RATE) -> Method:
    """noisereduce's stationary spectral gating with `noise_reference` (mono) as the noise profile.

    The gate's thresholds come from the reference's absolute level, so the reference must carry the noise
    at the level it has in the input: `gate(noisy, gains)` scales it by gains[i] for row i (see
    `PerSet.noise_gains`); without gains it is used as given.
    """
    noise_reference = np.asarray(noise_reference, dtype=np.float32)
    assert noise_reference.ndim == 1 and noise_reference.size > 0, noise_reference.shape

    def gate(noisy: np.ndarray, gains: np.ndarray | None = None) -> np.ndarray:
        import noisereduce  # heavy (it loads scipy and more): only spectral gating pays for it

        noisy = np.asarray(noisy, dtype=np.float32)
        rows = noisy.reshape(-1, noisy.shape[-1])
        gains = np.ones(len(rows), dtype=np.float32) if gains is None else np.asarray(gains, dtype=np.float32).reshape(-1)
        assert len(gains) == len(rows), (gains.shape, rows.shape)
        out = np.stack([
            noisereduce.reduce_noise(y=row, sr=sample_rate, stationary=True, y_noise=gain * noise_reference)
            for row, gain in zip(rows, gains)
        ]).astype(np.float32)
        assert out.shape == rows.shape, (out.shape, rows.shape)
        return out.reshape(noisy.shape)

    return gate
