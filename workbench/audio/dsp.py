"""Signal processing shared across the workbench: resampling (torchaudio), levels, and streaming helpers.

`StreamingResampler` lets hours-long files be resampled block by block with output identical (to
float rounding) to resampling the whole signal at once, so nothing downstream depends on block size.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import numpy as np
import torch
import torchaudio.functional as AF

from workbench.audio.io import MODEL_SAMPLE_RATE  # noqa: F401  (one constant, defined in io, which must not import torch)

LOWPASS_FILTER_WIDTH = 6
ROLLOFF = 0.99


def resample(samples: np.ndarray, orig_sr: int, new_sr: int) -> np.ndarray:
    """Resample float32 (..., time) samples with torchaudio's windowed-sinc resampler."""
    if orig_sr == new_sr:
        return samples.astype(np.float32, copy=False)
    tensor = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))
    out = AF.resample(tensor, int(orig_sr), int(new_sr), lowpass_filter_width=LOWPASS_FILTER_WIDTH, rolloff=ROLLOFF)
    return out.numpy()


def resampled_length(frames: int, orig_sr: int, new_sr: int) -> int:
    """How many frames `resample` returns for `frames` input frames."""
    g = math.gcd(int(orig_sr), int(new_sr))
    return math.ceil((new_sr // g) * frames / (orig_sr // g))


class StreamingResampler:
    """Resample (channels, frames) blocks as they arrive; `push` then `flush` equals one `resample` call.

    Each output group depends on a bounded window of input (the sinc kernel's width), so keeping that
    much context on either side of each block, aligned to the resampler's input stride, reproduces the
    whole-signal result. The start and end see zeros, exactly as torchaudio pads a whole signal.
    """

    def __init__(self, orig_sr: int, new_sr: int, channels: int):
        self.orig_sr, self.new_sr = int(orig_sr), int(new_sr)
        g = math.gcd(self.orig_sr, self.new_sr)
        self.stride, self.group = self.orig_sr // g, self.new_sr // g  # input frames -> output frames
        kernel_half_width = math.ceil(LOWPASS_FILTER_WIDTH * self.stride / (min(self.stride, self.group) * ROLLOFF))
        self.context = self.stride * math.ceil((kernel_half_width + 1) / self.stride)
        self.pending = np.zeros((channels, self.context), dtype=np.float32)
        self.frames_in = 0
        self.frames_out = 0
        self.passthrough = self.orig_sr == self.new_sr

    def push(self, block: np.ndarray) -> np.ndarray:
        block = np.asarray(block, dtype=np.float32)
        assert block.ndim == 2 and block.shape[0] == self.pending.shape[0], "blocks are (channels, frames)"
        self.frames_in += block.shape[1]
        if self.passthrough:
            self.frames_out += block.shape[1]
            return block
        self.pending = np.concatenate([self.pending, block], axis=1)
        ready = (self.pending.shape[1] - 2 * self.context) // self.stride * self.stride
        if ready <= 0:
            return np.zeros((block.shape[0], 0), dtype=np.float32)
        window = self.pending[:, : ready + 2 * self.context]
        first = self.context // self.stride * self.group
        out = resample(window, self.orig_sr, self.new_sr)[:, first : first + ready // self.stride * self.group]
        self.pending = self.pending[:, ready:]
        self.frames_out += out.shape[1]
        return out

    def flush(self) -> np.ndarray:
        if self.passthrough:
            return np.zeros((self.pending.shape[0], 0), dtype=np.float32)
        total = resampled_length(self.frames_in, self.orig_sr, self.new_sr)
        window = np.concatenate([self.pending, np.zeros((self.pending.shape[0], self.context), np.float32)], axis=1)
        first = self.context // self.stride * self.group
        out = resample(window, self.orig_sr, self.new_sr)[:, first : first + total - self.frames_out]
        self.frames_out += out.shape[1]
        assert self.frames_out == total, (self.frames_out, total)
        self.pending = self.pending[:, :0]
        return out


@contextlib.contextmanager
def torch_threads(count: int = 1) -> Iterator[None]:
    """Run the block with `count` torch intra-op threads, restoring the caller's setting after.

    Streaming work (StreamingResampler pushes, per-snippet analysis) is many small torch operations;
    with several threads their hand-offs cost more than they save: measured ≈10x slower on a busy
    2-core machine than with one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def rms(samples: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(samples, dtype=np.float64)))) if samples.size else 0.0


def dbfs(value: float, floor: float = -200.0) -> float:
    """An RMS or peak value in dB relative to full scale (1.0), floored for digital silence."""
    return max(20.0 * math.log10(value), floor) if value > 0 else floor
