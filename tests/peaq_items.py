"""Synthesised PEAQ test items: deterministic (reference, test) pairs at 48 kHz, float32, (channels, frames).

The BS.1387 conformance items are not freely available, so these stand in for them. Their expected ODGs in
tests/test_peaq.py were measured once with an independent implementation, P. Kabal's PQevalAudio (AFsp
v9r0, built from its public source, default options), reading these very arrays written as 32-bit float WAV;
`write_items` writes them for that purpose.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SAMPLE_RATE = 48_000
SECONDS = 4.0


def _noise_at(rng: np.random.Generator, x: np.ndarray, snr_db: float) -> np.ndarray:
    power = float(np.mean(x.astype(np.float64) ** 2))
    return rng.standard_normal(x.shape) * np.sqrt(power / 10 ** (snr_db / 10))


def _harmonic_tone(t: np.ndarray) -> np.ndarray:
    partials = sum(0.5 / k * np.sin(2 * np.pi * 220.0 * k * t + 0.3 * k) for k in range(1, 9))
    return 0.5 * partials * (1.0 + 0.3 * np.sin(2 * np.pi * 1.5 * t))


def _music(seed: int, channels: int) -> np.ndarray:
    """A few seconds of plain "music": plucked-string notes over sustained chords and noise-burst drums,
    cheap enough to build inside a test (the demo's renderer takes seconds)."""
    rng = np.random.default_rng(seed)
    frames = int(SECONDS * SAMPLE_RATE)
    t = np.arange(frames) / SAMPLE_RATE
    out = np.zeros((channels, frames))
    for c in range(channels):
        pan = 1.0 if channels == 1 else (0.6, 1.0)[c]
        for start in np.arange(0.0, SECONDS, 0.25):  # melody: a note every quarter second
            f0 = 220.0 * 2 ** (int(rng.integers(0, 13)) / 12)
            at = int(start * SAMPLE_RATE)
            tail = t[: min(frames - at, SAMPLE_RATE)]  # a second of ring-out
            note = sum(0.6 / k * np.sin(2 * np.pi * f0 * k * tail) * np.exp(-tail * (3.0 + k)) for k in range(1, 7))
            out[c, at:at + tail.size] += pan * 0.25 * note
        for start, root in ((0.0, 110.0), (2.0, 98.0)):  # two sustained chords
            at, stop = int(start * SAMPLE_RATE), int((start + 2.0) * SAMPLE_RATE)
            seg = t[: stop - at]
            chord = sum(np.sin(2 * np.pi * root * r * seg) for r in (1.0, 1.26, 1.5, 2.0))
            out[c, at:stop] += 0.05 * chord * np.minimum(1.0, seg / 0.05) * np.minimum(1.0, (seg[::-1]) / 0.05)
        for start in np.arange(0.0, SECONDS, 0.5):  # drums
            at = int(start * SAMPLE_RATE)
            burst = rng.standard_normal(min(4800, frames - at)) * np.exp(-np.arange(min(4800, frames - at)) / 600.0)
            out[c, at:at + burst.size] += 0.15 * burst
    return out / max(1.0, float(np.max(np.abs(out))) / 0.9)


def items() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (reference, test), float32 (channels, frames)."""
    rng = np.random.default_rng(16)
    t = np.arange(int(SECONDS * SAMPLE_RATE)) / SAMPLE_RATE
    tone = _harmonic_tone(t)[None, :]
    music = _music(7, 1)
    stereo = _music(11, 2)
    out = {
        "tone_identical": (tone, tone.copy()),
        "tone_noise_60db": (tone, tone + _noise_at(rng, tone, 60.0)),
        "tone_noise_45db": (tone, tone + _noise_at(rng, tone, 45.0)),
        "music_identical": (music, music.copy()),
        "music_noise_60db": (music, music + _noise_at(rng, music, 60.0)),
        "music_noise_16db": (music, music + _noise_at(rng, music, 16.0)),
    }
    from scipy.signal import butter, sosfilt

    for cutoff in (7000.0, 12000.0):
        lowpass = butter(8, cutoff, fs=SAMPLE_RATE, output="sos")
        out[f"music_lowpass_{cutoff / 1000:g}k"] = (music, sosfilt(lowpass, music, axis=-1))
    out["music_clipped"] = (music, np.clip(music, -0.45, 0.45))
    step = 2.0 ** -11  # 12-bit quantisation
    out["music_12bit"] = (music, np.round(music / step) * step)
    echo = music.copy()
    echo[:, 1440:] += 0.1 * music[:, :-1440]  # a 30 ms echo at −20 dB
    out["music_echo"] = (music, echo)
    gap = music.copy()
    gap[:, int(1.5 * SAMPLE_RATE):int(2.5 * SAMPLE_RATE)] = 0.0  # a silent second in the middle
    out["music_gap_noise_60db"] = (gap, gap + _noise_at(rng, gap, 60.0))
    noisy_right = stereo.copy()
    noisy_right[1] += _noise_at(rng, stereo[1], 30.0)
    out["stereo_noise_right_30db"] = (stereo, noisy_right)
    quiet = 0.01 * music
    out["music_quiet_noise_20db"] = (quiet, quiet + _noise_at(rng, quiet, 20.0))
    return {name: (ref.astype(np.float32), test.astype(np.float32)) for name, (ref, test) in out.items()}


def write_items(folder: Path) -> None:
    """<name>_ref.wav and <name>_test.wav (32-bit float) for running another PEAQ on the same samples."""
    import soundfile as sf

    folder.mkdir(parents=True, exist_ok=True)
    for name, (ref, test) in items().items():
        sf.write(folder / f"{name}_ref.wav", ref.T, SAMPLE_RATE, subtype="FLOAT")
        sf.write(folder / f"{name}_test.wav", test.T, SAMPLE_RATE, subtype="FLOAT")
