"""The STFT the network sees: periodic Hamming window 2048, hop 512, FFT 2048, no centring, 1025 bins.

Spectra are laid out as the reference implementation feeds its network, moved to PyTorch's channel-first
order: (batch, 2, frames, 1025) with channel 0 the real part and channel 1 the imaginary part, no
magnitude compression. Frame f covers samples [f·512, f·512 + 2048) of what `stft` is given.

Two levels:
- `stft` / `istft` are the plain transform pair. `istft` overlap-adds the windowed frames and divides by
  the summed squared window, so it inverts `stft` exactly on every sample some frame covers (the Hamming
  window never reaches zero); samples past the last frame come back as zeros.
- `analysis` / `synthesis` wrap them for whole signals: `analysis` pads N_FFT − HOP = 1536 zeros before
  the signal and 1536 zeros plus up to a hop's worth after it (to a hop multiple), so that EVERY sample of
  the signal lies under exactly four frames, the same as any sample in the middle of a long recording.
  `synthesis(analysis(x), len(x))` returns all len(x) samples, reconstructed to float rounding (< 1e-5).
  Processing a spectrum between the two therefore treats the first and last samples like the others.
"""

from __future__ import annotations

import torch
from torch import Tensor

from workbench.audio.dsp import MODEL_SAMPLE_RATE

SAMPLE_RATE = MODEL_SAMPLE_RATE
N_FFT = 2048
HOP = 512
WINDOW = "hamming"  # periodic, as tf.signal.hamming_window
FREQ_BINS = N_FFT // 2 + 1
EDGE_PAD = N_FFT - HOP  # zeros `analysis` puts before the signal so the first sample has four frames

STFT_PARAMS = {
    "sample_rate": SAMPLE_RATE,
    "n_fft": N_FFT,
    "win_length": N_FFT,
    "hop_length": HOP,
    "window": "hamming (periodic)",
    "center": False,
    "freq_bins": FREQ_BINS,
    "layout": "(batch, [real, imag], frames, bins)",
    "edge_pad": EDGE_PAD,
}


def _window(like: Tensor) -> Tensor:
    return torch.hamming_window(N_FFT, periodic=True, dtype=torch.float32, device=like.device)


def stft(wave: Tensor) -> Tensor:
    """(B, T) float waveform, T >= 2048 -> (B, 2, frames, 1025) with frames = 1 + (T - 2048) // 512."""
    assert wave.dim() == 2, f"stft expects (batch, samples), got {tuple(wave.shape)}"
    assert wave.shape[-1] >= N_FFT, f"stft needs at least {N_FFT} samples, got {wave.shape[-1]}"
    spec = torch.stft(wave.float(), N_FFT, hop_length=HOP, win_length=N_FFT, window=_window(wave),
                      center=False, return_complex=True)  # (B, F, frames)
    return torch.view_as_real(spec).permute(0, 3, 2, 1).contiguous()


def istft(spec: Tensor, length: int) -> Tensor:
    """(B, 2, frames, 1025) -> (B, length): the least-squares inverse of `stft` (exact on covered samples)."""
    assert spec.dim() == 4 and spec.shape[1] == 2 and spec.shape[-1] == FREQ_BINS, \
        f"istft expects (batch, 2, frames, {FREQ_BINS}), got {tuple(spec.shape)}"
    complex_spec = torch.complex(spec[:, 0].float(), spec[:, 1].float()).transpose(1, 2)  # (B, F, frames)
    covered = (spec.shape[2] - 1) * HOP + N_FFT
    wave = torch.istft(complex_spec, N_FFT, hop_length=HOP, win_length=N_FFT, window=_window(spec),
                       center=False, length=min(length, covered))
    if length > covered:
        wave = torch.nn.functional.pad(wave, (0, length - covered))
    return wave


def analysis_frames(length: int) -> int:
    """Number of frames `analysis` gives for a signal of `length` samples: ceil(length / 512) + 3."""
    return -(-length // HOP) + N_FFT // HOP - 1


def analysis(wave: Tensor) -> Tensor:
    """(B, T) -> (B, 2, analysis_frames(T), 1025), padded so every sample lies under four frames."""
    length = wave.shape[-1]
    tail = EDGE_PAD + (-length) % HOP
    padded = torch.nn.functional.pad(wave, (EDGE_PAD, tail))
    spec = stft(padded)
    assert spec.shape[2] == analysis_frames(length)
    return spec


def synthesis(spec: Tensor, length: int) -> Tensor:
    """Inverse of `analysis`: (B, 2, frames, 1025) -> (B, length), the padding removed."""
    return istft(spec, EDGE_PAD + length)[:, EDGE_PAD:]
