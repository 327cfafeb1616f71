"""Eq. 1 mixing: the requested SNR and gain are met exactly, and the SNR distributions are what they say."""

import math

import pytest
import torch

from workbench.audio.mixing import mix_at_snr, sample_gain_db, sample_snr_db, snr_db


@pytest.mark.parametrize("target_snr", [6.0, 10.0, 16.0, 32.0])
def test_mix_hits_requested_snr_within_a_tenth_of_a_db(target_snr):
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(4, 44_100, generator=g) * torch.linspace(0.05, 0.5, 4).unsqueeze(-1)
    noise = torch.randn(4, 44_100, generator=g) * 0.01
    gain = torch.tensor([0.0, -2.0, -4.0, -6.0])
    noisy, target = mix_at_snr(clean, noise, target_snr, gain)
    achieved = snr_db(target, noisy - target)
    assert torch.all((achieved - target_snr).abs() < 0.1), achieved
    beta = 10 ** (gain / 20)
    assert torch.allclose(target, beta.unsqueeze(-1) * clean)


def test_mix_refuses_silent_clean_audio():
    with pytest.raises(ValueError):
        mix_at_snr(torch.zeros(1, 100), torch.randn(1, 100), 10.0)


def test_snr_distributions_cover_their_ranges():
    g = torch.Generator().manual_seed(1)
    log_uniform = sample_snr_db(20_000, 6.0, 32.0, "log-uniform", g)
    assert log_uniform.min() >= 6.0 and log_uniform.max() <= 32.0
    # Log-uniform puts half its mass below the geometric mean of the range.
    assert abs((log_uniform < math.sqrt(6 * 32)).float().mean().item() - 0.5) < 0.02
    uniform = sample_snr_db(20_000, 2.0, 20.0, "uniform", g)
    assert abs(uniform.mean().item() - 11.0) < 0.2
    gains = sample_gain_db(1000, -6.0, 0.0, g)
    assert gains.min() >= -6.0 and gains.max() <= 0.0
    with pytest.raises(ValueError):
        sample_snr_db(1, 6, 32, "gaussian", g)
