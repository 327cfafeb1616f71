"""Mixing clean music with tape noise, the research's Eq. 1: x = β (y + α z).

y is clean music, z tape noise, α scales the noise to a target SNR against y, and β is an overall gain.
The training target is β y: the network must remove the noise, not undo the gain. All functions work on
batches of torch tensors so mixing happens on the training device.
"""

from __future__ import annotations

import math

import torch

# Segments quieter than this (mean power, full scale = 1) have no meaningful SNR: callers re-draw them.
MIN_SIGNAL_POWER = 1e-8


def power(x: torch.Tensor) -> torch.Tensor:
    """Mean power over the last (time) axis."""
    return x.double().pow(2).mean(dim=-1).to(x.dtype)


def snr_db(clean: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """10·log10(P_clean / P_noise) over the last axis."""
    return 10.0 * torch.log10(power(clean) / power(noise).clamp_min(1e-20))


def noise_gain_for_snr(clean: torch.Tensor, noise: torch.Tensor, snr: torch.Tensor | float) -> torch.Tensor:
    """Eq. 1's α: the factor on `noise` that puts `clean` exactly `snr` dB above it, shape (...,)."""
    assert clean.shape == noise.shape, (clean.shape, noise.shape)
    snr = torch.as_tensor(snr, dtype=clean.dtype, device=clean.device)
    clean_power, noise_power = power(clean), power(noise)
    if bool((clean_power < MIN_SIGNAL_POWER).any()) or bool((noise_power <= 0).any()):
        raise ValueError("Eq. 1 needs clean segments with signal and noise segments that are not silent")
    return torch.sqrt(clean_power / (noise_power * 10.0 ** (snr / 10.0)))


def mix_at_snr(clean: torch.Tensor, noise: torch.Tensor, snr: torch.Tensor | float,
               gain: torch.Tensor | float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 1 for a batch: returns (noisy x = β(y + αz), target β y).

    `clean` and `noise` are (..., T); `snr` and `gain` are in dB, scalars or (...,) tensors. α is chosen
    so that the SNR of y against αz over the whole segment is exactly `snr`; β = 10^(gain/20).
    """
    alpha = noise_gain_for_snr(clean, noise, snr)
    gain = torch.as_tensor(gain, dtype=clean.dtype, device=clean.device)
    beta = 10.0 ** (gain / 20.0)
    target = beta.unsqueeze(-1) * clean
    noisy = beta.unsqueeze(-1) * (clean + alpha.unsqueeze(-1) * noise)
    return noisy, target


def sample_snr_db(n: int, low: float, high: float, distribution: str, generator: torch.Generator) -> torch.Tensor:
    """SNRs in dB: "log-uniform" (the tape paper: uniform in log(SNR dB), 6..32) or "uniform" (Moliner: 2..20)."""
    assert 0 < low <= high if distribution == "log-uniform" else low <= high, (low, high, distribution)
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    if distribution == "log-uniform":
        values = torch.exp(math.log(low) + u * (math.log(high) - math.log(low)))
    elif distribution == "uniform":
        values = low + u * (high - low)
    else:
        raise ValueError(f"unknown SNR distribution {distribution!r} (log-uniform or uniform)")
    return values.float()


def sample_gain_db(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    """Gains β in dB, uniform in [low, high] (the tape paper: −6..0; Moliner's gramophone code: −6..+4)."""
    assert low <= high, (low, high)
    return (low + torch.rand(n, generator=generator, dtype=torch.float64) * (high - low)).float()
