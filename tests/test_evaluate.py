"""Evaluation: metrics against hand-computed values, the stored test fragments, baselines, scoring."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from scipy import stats

from workbench.errors import WorkbenchError
from workbench.evaluate.baselines import NOISY_INPUT, SPECTRAL_GATING, noisy_input, spectral_gating
from workbench.evaluate.evaluate import NOISE_ADDED, POOLED, PerSet, evaluate_methods
from workbench.evaluate.fragments import evaluation_fragments, fragment_digest, fragments_dir, load_fragments
from workbench.evaluate.metrics import delta_si_sdr_db, delta_snr_db, mean_ci, si_sdr_db, snr_db

SR = 44100


def tones(seconds: float, seed: int, sr: int = SR) -> np.ndarray:
    """Music-like test signal: a few harmonic notes with envelopes (never silent for long)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    out = np.zeros_like(t)
    for _ in range(6):
        f0 = rng.uniform(110, 880)
        onset = rng.uniform(0, seconds)
        envelope = np.exp(-np.abs(t - onset) * rng.uniform(0.3, 1.5))
        for h in range(1, 5):
            out += envelope * np.sin(2 * np.pi * f0 * h * t + rng.uniform(0, 6.28)) / h
    return (0.2 * out / np.abs(out).max()).astype(np.float32)


def hiss(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    white = rng.standard_normal(int(seconds * SR))
    # A gentle high-pass tilt like tape hiss: first difference mixed with white.
    shaped = 0.7 * white + 0.3 * np.diff(white, prepend=0.0)
    return (0.01 * shaped).astype(np.float32)


@dataclass(frozen=True)
class AudioFile:
    """What the crop code needs of a corpus file or a noise snippet."""

    path: Path
    sha256: str
    frames: int
    sample_rate: int

    @classmethod
    def of(cls, path: Path) -> "AudioFile":
        info = sf.info(str(path))
        return cls(path, hashlib.sha256(path.read_bytes()).hexdigest(), info.frames, info.samplerate)


@pytest.fixture
def sources(tmp_path):
    """Three clean test recordings (one at 48 kHz, one stereo) and six 1.5 s noise snippets on disk."""
    clean_dir, noise_dir = tmp_path / "clean", tmp_path / "noise"
    clean_dir.mkdir()
    noise_dir.mkdir()
    sf.write(clean_dir / "a.wav", tones(4.0, 1), SR, subtype="PCM_16")
    sf.write(clean_dir / "b.flac", np.stack([tones(3.0, 2), tones(3.0, 3)], axis=1), SR)
    sf.write(clean_dir / "c.wav", tones(3.0, 4, sr=48000), 48000, subtype="FLOAT")
    clean = [AudioFile.of(p) for p in sorted(clean_dir.iterdir())]
    noise = []
    for i in range(6):
        path = noise_dir / f"snippet{i}.wav"
        sf.write(path, hiss(1.5, 10 + i), SR, subtype="FLOAT")
        noise.append(AudioFile.of(path))
    return clean, noise


# ------------------------------------------------------------------------------------------------ metrics

def test_snr_and_delta_snr_match_hand_computed_values():
    rng = np.random.default_rng(0)
    clean = rng.standard_normal((3, 1000))
    noise = rng.standard_normal((3, 1000))
    noise *= np.sqrt((clean ** 2).sum(-1, keepdims=True) / (noise ** 2).sum(-1, keepdims=True)) / 10 ** (10 / 20)
    noisy = clean + noise
    np.testing.assert_allclose(snr_db(clean, noisy), 10.0, atol=1e-9)
    # Halving the noise gains exactly 20·log10(2) dB.
    estimate = clean + 0.5 * noise
    np.testing.assert_allclose(delta_snr_db(clean, noisy, estimate), 20 * math.log10(2), atol=1e-9)
    np.testing.assert_allclose(delta_snr_db(clean, noisy, noisy), 0.0, atol=1e-12)


def test_si_sdr_ignores_level_but_snr_does_not():
    rng = np.random.default_rng(1)
    clean = rng.standard_normal(2000)
    noisy = clean + 0.1 * rng.standard_normal(2000)
    assert si_sdr_db(clean, 0.5 * noisy) == pytest.approx(si_sdr_db(clean, noisy), abs=1e-9)
    assert snr_db(clean, 0.5 * noisy) < snr_db(clean, noisy) - 3
    assert si_sdr_db(clean, clean) > 150  # a perfect estimate: only the numerical floor
    assert delta_si_sdr_db(clean, noisy, 2.0 * clean) > 100


def test_mean_ci_is_the_t_interval():
    values = np.array([1.0, 2.0, 4.0, 7.0, 3.0])
    summary = mean_ci(values)
    half = stats.t.ppf(0.975, 4) * values.std(ddof=1) / math.sqrt(5)
    assert summary.mean == pytest.approx(3.4)
    assert summary.ci_low == pytest.approx(3.4 - half)
    assert summary.ci_high == pytest.approx(3.4 + half)
    assert summary.half_width == pytest.approx(half)
    assert mean_ci([2.5]).ci_low == mean_ci([2.5]).ci_high == 2.5
    assert mean_ci([1.0, 1.0, 1.0]).half_width == 0.0


# ---------------------------------------------------------------------------------------------- fragments

def test_fragments_are_stored_once_and_identical_on_reload(tmp_path, sources):
    clean, noise = sources
    mixtures = tmp_path / "mixtures"
    first = evaluation_fragments(mixtures, "revox-a77", 7.5, clean, noise, count=4, seconds=2.0, seed=7)
    assert first.clean.shape == first.noise.shape == (4, 2 * SR)
    assert first.path == fragments_dir(mixtures, "revox-a77", 7.5, first.digest)
    assert first.path.parent.name == "revox-a77@7.5" and first.path.parent.parent.name == "test"
    assert len(list(first.path.glob("fragment-*.wav"))) == 4
    # Same sources and seed: loaded from disk, not redrawn (the files are not touched).
    mtimes = {p: p.stat().st_mtime_ns for p in first.path.iterdir()}
    again = evaluation_fragments(mixtures, "revox-a77", 7.5, clean, noise, count=4, seconds=2.0, seed=7)
    assert {p: p.stat().st_mtime_ns for p in again.path.iterdir()} == mtimes
    np.testing.assert_array_equal(again.clean, first.clean)
    np.testing.assert_array_equal(again.noise, first.noise)
    # Each fragment names where it came from (by content digest).
    for fragment in first.manifest["fragments"]:
        assert fragment["clean"]["sha256"] in {f.sha256 for f in clean}
        assert fragment["noise"]["sha256"] in {s.sha256 for s in noise}
        assert fragment["noise"]["looped"]  # 2 s from 1.5 s snippets: looped with a crossfade
    # No partial folders are left behind.
    assert [p.name for p in first.path.parent.iterdir()] == [first.path.name]


def test_fragment_noisy_inputs_hit_the_protocol_snrs(tmp_path, sources):
    clean, noise = sources
    fragments = evaluation_fragments(tmp_path, "uher-4000-l", 3.75, clean, noise, count=3, seconds=1.0, seed=1,
                                     snrs_db=(10.0, 16.0))
    for snr in (10.0, 16.0):
        noisy = fragments.noisy(snr)
        np.testing.assert_allclose(snr_db(fragments.clean, noisy), snr, atol=0.01)
    # The crossfaded noise keeps its level: no dips at the joins (equal-power fade of uncorrelated noise).
    frame = 2048
    levels = [np.sqrt(np.mean(fragments.noise[0, i:i + frame] ** 2)) for i in range(0, SR - frame, frame)]
    assert max(levels) / min(levels) < 1.5


def test_fragment_digest_changes_with_seed_and_sources(sources):
    clean, noise = sources
    base = fragment_digest(clean, noise, count=4, seconds=2.0, seed=7)
    assert fragment_digest(list(reversed(clean)), noise, count=4, seconds=2.0, seed=7) == base
    assert fragment_digest(clean, noise, count=4, seconds=2.0, seed=8) != base
    assert fragment_digest(clean, noise[:-1], count=4, seconds=2.0, seed=7) != base
    assert fragment_digest(clean, noise, count=5, seconds=2.0, seed=7) != base


def test_fragments_refuse_music_shorter_than_a_fragment(tmp_path, sources):
    clean, noise = sources
    with pytest.raises(WorkbenchError, match="as long as a 10 s segment"):
        evaluation_fragments(tmp_path, "revox-a77", 7.5, clean, noise, count=1, seconds=10.0, seed=1)
    with pytest.raises(WorkbenchError, match="no test noise"):
        evaluation_fragments(tmp_path, "revox-a77", 7.5, clean, [], count=1, seconds=1.0, seed=1)
    assert not (tmp_path / "test" / "revox-a77@7.5").exists() or not any((tmp_path / "test" / "revox-a77@7.5").iterdir())


def test_load_fragments_refuses_a_folder_without_manifest(tmp_path):
    with pytest.raises(WorkbenchError, match="not a stored fragment set"):
        load_fragments(tmp_path, (10.0,))


# ---------------------------------------------------------------------------------------------- baselines

def test_spectral_gating_reduces_stationary_noise_and_keeps_shape():
    noise_reference = hiss(2.0, 99)
    gate = spectral_gating(noise_reference)
    noisy = np.stack([hiss(1.0, 5), hiss(1.0, 6)])
    out = gate(noisy)
    assert out.shape == noisy.shape and out.dtype == np.float32
    # On noise alone the gate removes most of the energy.
    assert np.mean(out ** 2) < 0.3 * np.mean(noisy ** 2)
    assert gate(noisy[0]).shape == noisy[0].shape
    np.testing.assert_array_equal(noisy_input(noisy), noisy)


def test_spectral_gating_scales_its_reference_to_the_noise_in_the_input():
    # A reference 20 dB under the input's noise sets the gate's thresholds too low to remove much;
    # scaled up by the gain the noise has in the input, the same reference gates it away.
    gate = spectral_gating(0.1 * hiss(2.0, 99))
    noisy = np.stack([hiss(1.0, 5), hiss(1.0, 6)])
    unscaled, scaled = gate(noisy), gate(noisy, np.array([10.0, 10.0]))
    assert np.mean(scaled ** 2) < 0.3 * np.mean(noisy ** 2) < np.mean(unscaled ** 2)


# ----------------------------------------------------------------------------------------------- evaluate

def test_evaluate_methods_scores_known_methods_exactly(tmp_path, sources):
    clean, noise = sources
    sets = [evaluation_fragments(tmp_path, "revox-a77", speed, clean, noise, count=3, seconds=1.0, seed=s)
            for speed, s in ((7.5, 1), (3.75, 2))]
    clean_by_noisy = {}

    def half_noise(noisy):
        # Oracle that removes exactly half of the noise: its ΔSNR is 20·log10(2) on every fragment.
        for fragment_set in sets:
            for snr in fragment_set.snrs_db:
                for i, row in enumerate(fragment_set.noisy(snr)):
                    clean_by_noisy[row.tobytes()] = fragment_set.clean[i]
        clean_rows = np.stack([clean_by_noisy[row.tobytes()] for row in np.atleast_2d(noisy)])
        return (clean_rows + 0.5 * (noisy - clean_rows)).astype(np.float32)

    built_for, gains_seen = [], {}

    def gate_for(fragment_set):  # spectral gating given the noise of each set's own speed
        built_for.append(fragment_set.label)
        gate = spectral_gating(hiss(2.0, int(fragment_set.speed * 4)))

        def gate_and_record(noisy, gains):
            gains_seen.setdefault(fragment_set.label, []).extend(gains)
            return gate(noisy, gains)
        return gate_and_record

    result = evaluate_methods(sets, {NOISY_INPUT: noisy_input, "half noise": half_noise,
                                     SPECTRAL_GATING: PerSet(gate_for, noise_gains=True)}, batch_size=2)
    assert sorted(set(built_for)) == ["revox-a77@3.75", "revox-a77@7.5"]
    # The gate is handed Eq. 1's factor on each fragment's noise, and so removes some of it.
    for fragment_set in sets:
        expected = np.concatenate([fragment_set.noise_gains(snr) for snr in (10.0, 16.0)])
        np.testing.assert_allclose(gains_seen[fragment_set.label], expected, rtol=1e-6)
        noisy = fragment_set.noisy(10.0)
        np.testing.assert_allclose(noisy - fragment_set.clean, fragment_set.noise * fragment_set.noise_gains(10.0)[:, None],
                                   atol=1e-6)
    assert result.summary(SPECTRAL_GATING, 10.0).mean > 0.5
    assert result.labels == ["revox-a77@7.5", "revox-a77@3.75"]
    for snr in (10.0, 16.0):
        assert result.summary(NOISY_INPUT, snr).mean == pytest.approx(0.0, abs=1e-4)
        half = result.values("half noise", snr)
        assert half.shape == (6,)  # pooled over both speeds
        np.testing.assert_allclose(half, 20 * math.log10(2), atol=1e-3)
        np.testing.assert_allclose(result.values("half noise", snr, "snr", "revox-a77@7.5"), snr + 6.0206, atol=1e-3)
        # The residual of the half-noise method sits 6 dB under the added noise in every band.
        curves = result.spectra[("revox-a77@7.5", snr)]
        ratio = 10 * np.log10(curves[NOISE_ADDED][1:] / curves["half noise"][1:])
        np.testing.assert_allclose(ratio, 6.0206, atol=0.01)
    rows = result.table()
    assert len(rows) == 3 * 2 * 3  # (two speeds + pooled) x two SNRs x three methods
    assert {row["set"] for row in rows} == {"revox-a77@7.5", "revox-a77@3.75", POOLED}
    data = result.to_dict()
    assert len(data["per_fragment"]) == 2 * 2 * 3
    assert set(result.examples["revox-a77@3.75"]) >= {"snr", "clean", "noisy", NOISY_INPUT, "half noise", SPECTRAL_GATING}
    assert result.examples["revox-a77@3.75"]["snr"] == 10.0


def test_evaluate_methods_rejects_a_method_that_changes_shape(tmp_path, sources):
    clean, noise = sources
    fragments = evaluation_fragments(tmp_path, "revox-a77", 7.5, clean, noise, count=2, seconds=0.5, seed=1)
    with pytest.raises(ValueError, match="returned shape"):
        evaluate_methods(fragments, {"bad": lambda x: x[..., :-1]})
