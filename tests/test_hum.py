"""The hum template (workbench.audio.hum): learnt from blank tape, fitted and cancelled, streamed sample-exactly,
carried by a device model's checkpoint and applied wherever the model runs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import soundfile as sf
import torch

from workbench.audio.hum import BLOCK_SECONDS, HumCanceller, HumTemplate, cancel_hum, learn_hum_template
from workbench.evaluate.metrics import hum_residual
from workbench.model.checkpoint import load_checkpoint, save_checkpoint
from workbench.model.overlap_add import denoise_samples
from workbench.model.unet import TwoStageUNet, get_config

SR = 44100
# A 60 Hz family: harmonic k's level (dB re the fundamental) and phase (rad), per channel.
LEVELS_DB = {1: 0.0, 2: -11.0, 3: -9.0, 4: -14.0, 5: -7.0}
PHASES = ({1: 0.3, 2: -0.5, 3: 1.1, 4: 1.7, 5: 0.2}, {1: 0.3, 2: -0.3, 3: 1.3, 4: 2.2, 5: 0.8})


def hum(seconds: float, channel: int = 0, level: float = 1e-3, drift_hz: float = 0.04, start_s: float = 0.0,
        mains: float = 60.0) -> np.ndarray:
    """A drifting hum family (period 37 s) with channel `channel`'s phases, float64."""
    t = start_s + np.arange(round(seconds * SR)) / SR
    cycles = mains * t - drift_hz * 37.0 / (2 * np.pi) * np.cos(2 * np.pi * t / 37.0)  # ∫ f(t) dt
    out = np.zeros_like(t)
    for k, level_db in LEVELS_DB.items():
        out += level * 10 ** (level_db / 20) * np.cos(2 * np.pi * k * cycles + PHASES[channel][k])
    return out


def music(seconds: float, seed: int = 0) -> np.ndarray:
    """Tones (one of them 0.3 Hz from the 2nd harmonic, vibrato-free) and a little noise: what the fit must leave."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * SR)) / SR
    tones = [(110.0, 0.02), (120.3, 0.004), (233.1, 0.01), (440.0, 0.03), (1000.0, 0.01)]
    out = sum(a * np.sin(2 * np.pi * f * t + rng.uniform(0, 6)) for f, a in tones)
    return out + 1e-4 * rng.standard_normal(len(t))


@pytest.fixture(scope="module")
def template() -> HumTemplate:
    rng = np.random.default_rng(1)
    recordings = [(c, hum(30.0, c, start_s=30.0 * c) + 3e-4 * rng.standard_normal(30 * SR)) for c in (0, 1)]
    learnt = learn_hum_template(recordings, 60.0, harmonics=[2, 3, 4, 5])
    assert learnt is not None
    return learnt


def test_the_template_is_the_hum_waveform_learnt_from_blank_tape(template):
    assert template.harmonics == (1, 2, 3, 4, 5)
    assert len(template.shapes) == 2 and template.blocks == 2 * 29
    for channel, shape in enumerate(template.shapes):
        for k, amplitude in zip(template.harmonics, shape):
            assert 20 * math.log10(abs(amplitude)) == pytest.approx(LEVELS_DB[k], abs=0.3)
            expected = PHASES[channel][k] - k * PHASES[channel][1]  # re the fundamental's phase
            assert math.remainder(math.atan2(amplitude.imag, amplitude.real) - expected, 2 * math.pi) == pytest.approx(0, abs=0.05)
    assert 20 * math.log10(template.level) == pytest.approx(-60.0, abs=0.3)
    assert HumTemplate.from_dict(template.to_dict()).to_dict() == template.to_dict()
    assert "60.00 Hz hum, harmonics 1, 2, 3, 4, 5" in template.summary()


def test_cancelling_takes_the_hum_out_and_leaves_the_music_even_beside_a_harmonic(template):
    clean = music(12.0)
    noise = hum(12.0, 0, level=3e-3, start_s=100.0)  # louder than the blank tape's: the gain is fitted
    out = cancel_hum((clean + noise).astype(np.float32), template)
    residual = hum_residual(noise, out - clean, SR, 60.0)
    assert max(residual.relative_db) < -20.0, residual.relative_db
    taken = (clean + noise - out) - noise  # what it removed that was not hum (and the hum it missed)
    assert 10 * math.log10(np.mean(taken ** 2) / np.mean(clean ** 2)) < -30.0


def test_a_free_fit_of_one_line_takes_the_music_beside_it_the_template_does_not(template):
    """Why a template: the 120 Hz line fitted on its own follows the louder 120.3 Hz tone beside it; placed by
    the whole family's three numbers it does not."""
    clean, noise = music(12.0), hum(12.0, 0, level=3e-3, start_s=100.0)
    noisy = (clean + noise).astype(np.float32)
    free = cancel_hum(noisy, HumTemplate(120.0, (1,), ((1 + 0j,),), template.level, 1))
    placed = cancel_hum(noisy, template)
    at_120 = [hum_residual(noise, out - clean, SR, 60.0).relative_db[1] for out in (free, placed)]
    assert at_120[1] < at_120[0] - 10.0, at_120


@pytest.mark.parametrize("sizes", [[1000], [SR], [12345, 99999], [3 * SR + 1]])
def test_the_stream_gives_the_whole_signal_s_samples_for_any_blocks(template, sizes):
    rng = np.random.default_rng(2)
    x = np.stack([music(7.3, 3) + hum(7.3, 0, 2e-3), music(7.3, 4) + hum(7.3, 1, 2e-3)]).astype(np.float32)
    x += 1e-3 * rng.standard_normal(x.shape).astype(np.float32)
    whole = cancel_hum(x, template)
    canceller, parts, start, i = HumCanceller(template, 2), [], 0, 0
    while start < x.shape[1]:
        n = sizes[i % len(sizes)]
        parts.append(canceller.push(x[:, start:start + n]))
        start, i = start + n, i + 1
    parts.append(canceller.flush())
    assert np.array_equal(np.concatenate(parts, axis=1), whole)


@pytest.mark.parametrize("frames", [0, 1, 100, SR, round(BLOCK_SECONDS * SR) - 1, round(BLOCK_SECONDS * SR),
                                    round(BLOCK_SECONDS * SR) + 1, 3 * SR + 7])
def test_every_length_comes_back_sample_exact(template, frames):
    x = (music(frames / SR + 1e-9, 5)[:frames] + hum(frames / SR + 1e-9, 0)[:frames]).astype(np.float32)
    out = cancel_hum(x, template)
    assert out.shape == x.shape and out.dtype == np.float32 and np.isfinite(out).all()
    if frames >= SR:
        assert np.std(out - x) > 0  # something was taken
    assert np.array_equal(cancel_hum(np.zeros(frames, np.float32), template), np.zeros(frames, np.float32))  # silence stays


def test_a_short_blank_recording_still_teaches_and_a_too_short_one_does_not():
    assert learn_hum_template([(0, hum(0.2))], 60.0, [2]) is None
    learnt = learn_hum_template([(0, hum(1.0, start_s=s)) for s in range(4)], 60.0, [2, 3])
    assert learnt is not None and learnt.blocks == 4
    assert 20 * math.log10(abs(learnt.shapes[0][1])) == pytest.approx(LEVELS_DB[2], abs=0.5)


def test_a_device_model_carries_its_template_and_runs_it_first(template, tmp_path):
    torch.manual_seed(0)
    model = TwoStageUNet(get_config("tiny")).eval()
    path = tmp_path / "device.safetensors"
    model.hum_template = template
    save_checkpoint(path, model, {"kind": "test"})
    loaded, info = load_checkpoint(path)
    assert loaded.hum_template is not None and loaded.hum_template.to_dict() == template.to_dict()
    assert info["hum_template"] == template.to_dict()
    x = (music(3.0, 6) + hum(3.0, 0, 2e-3)).astype(np.float32)
    expected = denoise_samples(model.__class__.from_state_dict(model.config, model.state_dict()), cancel_hum(x, template))
    assert np.allclose(denoise_samples(loaded, x), expected, atol=1e-6)
    # Without its sidecar the weights file alone still carries the template (the safetensors header).
    path.with_suffix(".json").unlink()
    assert load_checkpoint(path)[0].hum_template.to_dict() == template.to_dict()


def test_denoise_streams_the_hum_with_the_network_and_strength_scales_both(template, tmp_path):
    from workbench.denoise import denoise_files

    torch.manual_seed(0)
    model = TwoStageUNet(get_config("tiny")).eval()
    model.hum_template = template
    weights = tmp_path / "device.safetensors"
    save_checkpoint(weights, model)
    x = np.stack([music(6.5, 7) + hum(6.5, 0, 2e-3), music(6.5, 8) + hum(6.5, 1, 2e-3)]).astype(np.float32)
    source = tmp_path / "transfer.wav"
    sf.write(source, x.T, SR, subtype="FLOAT")
    before = source.read_bytes()
    [record] = denoise_files([source], model_ref=weights, out_dir=tmp_path / "out", accelerator="cpu")
    out, _ = sf.read(record["output"]["path"], dtype="float32", always_2d=True)
    assert np.allclose(out.T, denoise_samples(load_checkpoint(weights)[0], x), atol=2e-5)
    assert record["hum_template"] == template.to_dict()
    [record] = denoise_files([source], model_ref=weights, output=tmp_path / "zero.wav", strength=0.0, accelerator="cpu")
    assert np.array_equal(sf.read(record["output"]["path"], dtype="float32", always_2d=True)[0], x.T)
    assert source.read_bytes() == before
