"""Noise profiles: hum found within ±0.5 Hz (acceptance), tilt, bandwidth, streaming, JSON, plot."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.signal import butter, sosfilt

from workbench.noise.profile import (
    NoiseProfile,
    ProfileAccumulator,
    noise_profile,
    plot_profile,
    profile_distance,
)

SR = 44_100


def hiss_with_hum(fundamental: float | None, seconds: float = 3.0, channels: int = 2, seed: int = 0,
                  hiss_dbfs: float = -50.0, hum_dbfs: float = -56.0, sr: int = SR) -> np.ndarray:
    rng = np.random.default_rng(seed)
    frames = int(seconds * sr)
    signal = rng.normal(0.0, 10 ** (hiss_dbfs / 20), (channels, frames))
    if fundamental is not None:
        t = np.arange(frames) / sr
        for k in range(1, 6):  # mains hum: a fundamental and falling harmonics, odd ones stronger
            level = hum_dbfs - 4 * k - (0 if k % 2 else 6)
            signal += np.sqrt(2) * 10 ** (level / 20) * np.sin(2 * np.pi * k * fundamental * t + 0.7 * k)
    return signal.astype(np.float32)


@pytest.mark.parametrize("fundamental", [50.0, 60.0, 49.9, 60.2])
def test_hum_fundamental_is_found_within_half_a_hertz_and_far_better(fundamental):
    profile = noise_profile(hiss_with_hum(fundamental), SR)
    assert profile.hum is not None
    assert profile.hum.mains_hz == (50 if fundamental < 55 else 60)
    assert abs(profile.hum.fundamental_hz - fundamental) < 0.5  # the acceptance criterion
    assert abs(profile.hum.fundamental_hz - fundamental) < 0.05  # what the estimator actually achieves
    first, second, third = profile.hum.harmonics_db[:3]
    assert abs(first[0] - fundamental) < 0.05 and abs(third[0] - 3 * fundamental) < 0.1
    assert first[1] > third[1] > second[1] > 10  # odd harmonics stronger, as injected


def test_hum_at_a_different_sample_rate_and_in_mono():
    profile = noise_profile(hiss_with_hum(50.0, channels=1, sr=48_000)[0], 48_000)
    assert profile.sample_rate == 48_000 and profile.hum is not None
    assert abs(profile.hum.fundamental_hz - 50.0) < 0.05


def test_plain_hiss_has_no_hum_flat_tilt_and_full_bandwidth():
    profile = noise_profile(hiss_with_hum(None, seconds=4.0, seed=3), SR)
    assert profile.hum is None
    assert abs(profile.tilt_db_per_octave) < 0.3
    assert profile.bandwidth_hz == SR / 2
    assert abs(profile.rms_dbfs - (-50.0)) < 0.2


def test_tilt_and_bandwidth_follow_the_shape_of_the_noise():
    rng = np.random.default_rng(1)
    white = rng.normal(0, 0.05, 4 * SR)
    # -3 dB/octave ("pink") from the spectrum shaped directly, then a 6 kHz low-pass for the roll-off
    spectrum = np.fft.rfft(white)
    f = np.fft.rfftfreq(white.size, 1 / SR)
    pink = np.fft.irfft(spectrum / np.sqrt(np.maximum(f, 20.0)), n=white.size)
    profile = noise_profile(pink, SR)
    assert profile.tilt_db_per_octave == pytest.approx(-3.0, abs=0.3)
    lowpassed = noise_profile(sosfilt(butter(6, 6000, fs=SR, output="sos"), white), SR)
    assert 6000 < lowpassed.bandwidth_hz < 8000
    assert profile_distance(lowpassed, lowpassed) == 0.0
    assert profile_distance(lowpassed, noise_profile(white, SR)) > 3.0


def test_streaming_accumulation_equals_the_one_shot_profile():
    audio = hiss_with_hum(50.0, seconds=3.0)
    accumulator = ProfileAccumulator(SR)
    for start in range(0, audio.shape[1], 7001):  # odd block size: segments straddle blocks
        accumulator.add(audio[:, start:start + 7001])
    streamed, whole = accumulator.result(), noise_profile(audio, SR)
    np.testing.assert_allclose(streamed.psd_db, whole.psd_db, atol=1e-9)
    assert streamed.hum.fundamental_hz == pytest.approx(whole.hum.fundamental_hz, abs=1e-9)
    assert streamed.rms_dbfs == pytest.approx(whole.rms_dbfs, abs=1e-9)


def test_separate_streams_and_very_short_input():
    accumulator = ProfileAccumulator(SR)
    for seed in range(3):
        accumulator.add(hiss_with_hum(60.0, seconds=1.0, seed=seed))
        accumulator.end_stream()
    profile = accumulator.result()
    assert profile.hum is not None and abs(profile.hum.fundamental_hz - 60.0) < 0.05
    short = noise_profile(np.random.default_rng(0).normal(0, 0.01, 2000), SR)  # shorter than one segment
    assert abs(short.rms_dbfs - (-40.0)) < 1.0
    with pytest.raises(ValueError):
        noise_profile(np.array([0.0, np.nan, 0.1] * 100), SR)


def test_json_round_trip_and_plot(tmp_path):
    profile = noise_profile(hiss_with_hum(50.0), SR)
    data = json.loads(json.dumps(profile.to_dict()))
    again = NoiseProfile.from_json(data)
    assert again.hum.mains_hz == 50 and again.hum.fundamental_hz == pytest.approx(profile.hum.fundamental_hz)
    assert again.tilt_db_per_octave == profile.tilt_db_per_octave
    np.testing.assert_allclose(again.psd_db, profile.psd_db, atol=1e-3)
    plot = tmp_path / "profile.png"
    plot_profile(again, plot, "revox-a77 @ 7.5 ips")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["profile.png"]  # no temporary left behind


def test_hum_from_many_short_snippets_with_a_pure_fundamental():
    """Snippets shorter than the hum analysis segment still count, and chance noise peaks near the
    (absent) harmonics must not pull the fundamental."""
    rng = np.random.default_rng(7)
    accumulator = ProfileAccumulator(SR)
    for _ in range(12):
        t = np.arange(SR) / SR
        tone = np.sqrt(2) * 10 ** (-56 / 20) * np.sin(2 * np.pi * 50.0 * t + rng.uniform(0, 6.28))
        accumulator.add(rng.normal(0, 10 ** (-50 / 20), SR) + tone)
        accumulator.end_stream()
    profile = accumulator.result()
    assert profile.hum is not None and profile.hum.mains_hz == 50
    assert abs(profile.hum.fundamental_hz - 50.0) < 0.05
    assert profile.hum.harmonics_db[0][1] > 20 and max(level for _, level in profile.hum.harmonics_db[1:]) < 12
