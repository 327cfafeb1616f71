"""A replay machine's mains hum as a template, learnt from its blank tape and cancelled before the network.

The general network never heard a machine's own hum family, and a tiny network does not learn in CPU
minutes to follow a line's phase through a 21.5 Hz STFT bin (recipes/finetune-cpu.toml has the
measurements). But one machine's hum is one waveform: the harmonics' levels and phases relative to the
fundamental are set by its power supply and wiring; only the mains frequency drifts (a few hundredths of
a hertz) and the level breathes. So the machine's blank tape teaches the waveform (`learn_hum_template`),
and each block of a transfer needs three numbers to place it: frequency, phase and gain
(`HumCanceller`). Placing the whole family with three numbers is what lets the template take the hum
out at 120 Hz where music plays too: a free fit per harmonic takes the music's own 120 Hz with it
(measured on the demo's deck at 16 dB input: the 120 Hz residual 3.4 dB above the input's hum with 2 s
blocks, 6.5 dB with 0.5 s ones). A note sitting on one line still pulls the fit, so the fit is redone
twice with each harmonic weighed by the inverse of what the previous fit left on it (a tone 14 dB above
the 2nd harmonic and 0.3 Hz from it: the 240 Hz line −11 dB without the reweighting, −38 dB with it).

Blocks are BLOCK_SECONDS long and hop by half that, under periodic Hann windows whose halves sum to one,
so the fitted hums are overlap-added into one continuous estimate. A block the signal's start or end
cuts short takes the fit of its nearest whole neighbour (evaluated at its own times): a fit on a
half-window of music is worse than a whole block's a second away. A signal shorter than one block is
fitted as one block. Streaming (`push`/`flush`) and the whole signal (`cancel_hum`) give the same
samples for any block sizes (tests/test_hum.py).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from workbench.audio.io import MODEL_SAMPLE_RATE

BLOCK_SECONDS = 2.0  # a fit's span: the drift (≤ 0.03 Hz/s) bends the 4th harmonic's phase < 0.3 rad over it
FREQUENCY_SPAN_HZ = 0.25  # the mains frequency is searched this far either side of the template's
FREQUENCY_STEP_HZ = 0.005  # 4th harmonic's phase off by < 0.07 rad over a block at half a step
PHASE_STEPS = 720  # fundamental phase grid (0.5°)
ROBUST_PASSES = 2  # reweighted fits after the first: each harmonic weighed by 1 / what the fit left on it
INTERFERENCE_FLOOR = 0.05  # … plus (this × the fundamental's amplitude)²: clean lines do not weigh infinitely
MIN_LEARN_SECONDS = 0.5  # blank-tape recordings shorter than this teach nothing (2 Hz lines at best)
GROUP_FRAMES = 441  # samples summed before the frequency search (10 ms: the search's phase error < 0.1 rad)
OFFSETS_HZ = np.arange(-FREQUENCY_SPAN_HZ, FREQUENCY_SPAN_HZ + FREQUENCY_STEP_HZ / 2, FREQUENCY_STEP_HZ)


@dataclass(frozen=True)
class HumTemplate:
    """The hum waveform of one machine: per channel, each harmonic's complex amplitude relative to the
    fundamental's (the fundamental is 1), at `fundamental_hz`, with the fundamental's mean peak
    amplitude `level` (full scale 1) on the blank tape it was learnt from."""

    fundamental_hz: float
    harmonics: tuple[int, ...]  # the multiples of the fundamental in the template, 1 first
    shapes: tuple[tuple[complex, ...], ...]  # per channel, per harmonic
    level: float
    blocks: int  # blank-tape blocks averaged

    def __post_init__(self):
        assert self.harmonics and self.harmonics[0] == 1, self.harmonics
        assert all(a < b for a, b in zip(self.harmonics, self.harmonics[1:])), "harmonics increase"
        assert all(len(shape) == len(self.harmonics) for shape in self.shapes), "one amplitude per harmonic"
        assert self.fundamental_hz > 0 and self.level >= 0, (self.fundamental_hz, self.level)

    def shapes_for(self, row: int, rows: int) -> list[np.ndarray]:
        """The shapes a signal row may be fitted with: its channel's when the rows are the template's
        channels; else any channel's (each block takes the one that fits best: a mono fragment of one
        channel's noise, a mono transfer of a stereo machine)."""
        if rows == len(self.shapes):
            return [np.asarray(self.shapes[row], dtype=np.complex128)]
        return [np.asarray(shape, dtype=np.complex128) for shape in self.shapes]

    def to_dict(self) -> dict:
        return {"fundamental_hz": self.fundamental_hz, "harmonics": list(self.harmonics),
                "level_dbfs": round(20 * math.log10(max(self.level, 1e-12) / math.sqrt(2)), 3),  # RMS dBFS
                "channels": [[{"amplitude_db": round(20 * math.log10(max(abs(a), 1e-12)), 4),
                               "phase_rad": round(math.atan2(a.imag, a.real), 6)} for a in shape]
                             for shape in self.shapes],
                "blocks": self.blocks, "block_seconds": BLOCK_SECONDS}

    @classmethod
    def from_dict(cls, data: dict) -> HumTemplate:
        shapes = tuple(tuple(complex(10 ** (h["amplitude_db"] / 20) * math.cos(h["phase_rad"]),
                                     10 ** (h["amplitude_db"] / 20) * math.sin(h["phase_rad"])) for h in channel)
                       for channel in data["channels"])
        return cls(float(data["fundamental_hz"]), tuple(int(k) for k in data["harmonics"]), shapes,
                   math.sqrt(2) * 10 ** (float(data["level_dbfs"]) / 20), int(data["blocks"]))

    def summary(self) -> str:
        return (f"{self.fundamental_hz:.2f} Hz hum, harmonics {', '.join(map(str, self.harmonics))}, "
                f"{self.to_dict()['level_dbfs']:.1f} dBFS, learnt from {self.blocks} blocks of blank tape")


# --- fitting one block -------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Fit:
    frequency_hz: float
    phase: float  # the fundamental's phase at `centre`
    gain: float  # × `shape`
    shape: np.ndarray  # the template channel's shape that fitted best
    centre: float  # seconds, on the signal's own time axis


# Every whole block has the same times, window and mixer: computed once per block length (read-only).

def _frozen(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


@functools.lru_cache(maxsize=8)
def _block_times(frames: int, sample_rate: int) -> np.ndarray:
    """A block's times in seconds from its centre: fitted phases are the centre's."""
    return _frozen(np.arange(frames) / sample_rate - (frames - 1) / (2 * sample_rate))


@functools.lru_cache(maxsize=8)
def _hann(frames: int) -> np.ndarray:
    """A fit's window: Hann without its zero end weights (a short block keeps all its samples)."""
    return _frozen(np.hanning(frames + 2)[1:-1])


@functools.lru_cache(maxsize=8)
def _mixer(frames: int, centre_hz: float, sample_rate: int) -> np.ndarray:
    """exp(−i 2π centre t) over a block's times, complex64 for the per-sample work (the sums are taken in
    complex128, their rounding far below the hiss)."""
    return _frozen(np.exp(-2j * np.pi * centre_hz * _block_times(frames, sample_rate)).astype(np.complex64))


@functools.lru_cache(maxsize=8)
def _group_times(frames: int, sample_rate: int) -> np.ndarray:
    """The mean time of each group of GROUP_FRAMES of a block (the last group padded with its last time)."""
    groups = math.ceil(frames / GROUP_FRAMES)
    times = np.pad(_block_times(frames, sample_rate), (0, groups * GROUP_FRAMES - frames), mode="edge")
    return _frozen(times.reshape(groups, GROUP_FRAMES).mean(axis=1))


@functools.lru_cache(maxsize=64)
def _offset_turns(frames: int, k: int, sample_rate: int) -> np.ndarray:
    """(OFFSETS_HZ, groups) exp(−i 2π k offset t_group): moves harmonic k's group sums from k·centre to
    k·(centre + offset) for every offset of the search."""
    return _frozen(np.exp(-2j * np.pi * k * np.outer(OFFSETS_HZ, _group_times(frames, sample_rate))))


def _harmonic_amplitudes(samples: np.ndarray, harmonics: np.ndarray, centre_hz: float, sample_rate: int,
                         offset_hz: float | None = None) -> np.ndarray:
    """(offsets, harmonics) complex amplitudes a with samples ≈ Re Σ a_k exp(i 2π k f t), f = centre + offset,
    t from the block's centre: the Hann-windowed, window-normalised DFT at each k·f, for every offset of
    OFFSETS_HZ, or for `offset_hz` alone (one row). The samples are mixed down by k·centre, summed in groups
    of GROUP_FRAMES, and the small offsets applied per group."""
    n = len(samples)
    weights = _hann(n)
    groups = math.ceil(n / GROUP_FRAMES)
    mixed = np.zeros(groups * GROUP_FRAMES, np.complex64)  # zero-padded to whole groups
    mixed[:n] = samples * weights
    down = _mixer(n, float(centre_hz), sample_rate)
    rows = len(OFFSETS_HZ) if offset_hz is None else 1
    amplitudes = np.empty((rows, len(harmonics)), dtype=np.complex128)
    power = 0
    for column, k in enumerate(harmonics):  # increasing k: mixed = weighted · down^k by repeated products
        for _ in range(k - power):
            mixed[:n] *= down
        power = k
        summed = mixed.reshape(groups, GROUP_FRAMES).sum(axis=1, dtype=np.complex128)
        turns = (_offset_turns(n, int(k), sample_rate) if offset_hz is None else
                 np.exp(-2j * np.pi * k * offset_hz * _group_times(n, sample_rate))[None, :])
        amplitudes[:, column] = turns @ summed
    return amplitudes * (2.0 / weights.sum())


def _fit_block(samples: np.ndarray, start: int, shapes: list[np.ndarray], template: HumTemplate,
               sample_rate: int) -> _Fit:
    """Frequency, phase and gain of the template in samples[...] (a Hann-windowed block starting at frame
    `start`), by least squares over the harmonics' amplitudes; of several shapes, the one that explains
    most of the block."""
    centre = start / sample_rate + (len(samples) - 1) / (2 * sample_rate)
    harmonics = np.asarray(template.harmonics)
    amplitudes = _harmonic_amplitudes(samples, harmonics, template.fundamental_hz, sample_rate)
    phases = np.linspace(0.0, 2 * np.pi, PHASE_STEPS, endpoint=False)
    turns = np.exp(-1j * np.outer(phases, harmonics))  # (phases, harmonics)

    def fit(shape: np.ndarray, trust: np.ndarray) -> tuple[_Fit, float, int]:
        """Weighted least squares: harmonic k counts `trust[k]` (its inverse interference power)."""
        match = ((turns * (trust * np.conj(shape))[None, :]) @ amplitudes.T).real  # Re Σ w_k conj(T_k e^{ikφ}) a_k
        phase_index, offset_index = np.unravel_index(int(np.argmax(match)), match.shape)
        energy = float(np.sum(trust * np.abs(shape) ** 2))
        value = max(float(match[phase_index, offset_index]), 0.0)
        # No ceiling from the blank tape's level: a transfer's hum is as loud as its replay made it (and the
        # evaluation scales the noise to each input SNR); least squares never takes out more than is there.
        return (_Fit(template.fundamental_hz + float(OFFSETS_HZ[offset_index]), float(phases[phase_index]),
                     value / energy, shape, centre), value ** 2 / energy, int(offset_index))

    # The shape that explains most of the block (the least-squares residual falls by match² / ‖shape‖²).
    equal = np.ones(len(harmonics))
    best, _, offset_index = max((fit(shape, equal) for shape in shapes), key=lambda found: found[1])
    for _ in range(ROBUST_PASSES):  # music on a line (a note at 120 Hz) weighs that line down
        predicted = best.gain * best.shape * np.exp(1j * harmonics * best.phase)
        interference = np.abs(amplitudes[offset_index] - predicted) ** 2 + (INTERFERENCE_FLOOR * best.gain) ** 2 + 1e-30
        best, _, offset_index = fit(best.shape, interference.min() / interference)
    return best


def _synthesise(fit: _Fit, harmonics: Sequence[int], start: int, frames: int, sample_rate: int) -> np.ndarray:
    """The fitted hum over frames [start, start + frames)."""
    times = (start + np.arange(frames)) / sample_rate - fit.centre
    rotation = np.exp(1j * (2 * np.pi * fit.frequency_hz * times + fit.phase)).astype(np.complex64)
    coefficients = np.zeros(max(harmonics) + 1, np.complex64)
    coefficients[list(harmonics)] = fit.gain * fit.shape
    hum = np.zeros(frames, np.complex64)  # Horner: Σ_k c_k z^k = z(c_1 + z(c_2 + …))
    for c in coefficients[:0:-1]:
        hum = (hum + c) * rotation
    return hum.real


# --- the canceller ----------------------------------------------------------------------------------

class HumCanceller:
    """Subtract a machine's hum from a stream of (channels, frames) blocks: `push` then `flush`.

    Block j covers frames [j·H − H, j·H + H) (H = half a block) under a periodic Hann window; once block j
    is fitted, frames before j·H have both their blocks and are returned. The output lags the input by up
    to one block (two while the first whole block is awaited); `flush` returns the rest.
    """

    def __init__(self, template: HumTemplate, channels: int, sample_rate: int = MODEL_SAMPLE_RATE):
        self.template, self.channels, self.sample_rate = template, channels, sample_rate
        self.half = round(BLOCK_SECONDS * sample_rate / 2)
        self.window = np.hanning(2 * self.half + 1)[:-1]  # periodic: w(n) + w(n + H) = 1
        self.shapes = [template.shapes_for(row, channels) for row in range(channels)]
        self.buffer = np.zeros((channels, 0), dtype=np.float32)  # input from frame `self.emitted` on
        self.received = 0
        self.emitted = 0
        self.next_block = 1  # block 0 (cut by the start) is placed with block 1's fit
        self.fits: dict[int, list[_Fit]] = {}  # the whole blocks whose windows reach unreturned frames

    def push(self, block: np.ndarray) -> np.ndarray:
        block = np.asarray(block, dtype=np.float32)
        assert block.ndim == 2 and block.shape[0] == self.channels, "blocks are (channels, frames)"
        self.buffer = np.concatenate([self.buffer, block], axis=1)
        self.received += block.shape[1]
        out = []
        while self.received >= (self.next_block + 1) * self.half:  # block j is whole: fit it, return to j·H
            j = self.next_block
            self.fits[j] = self._fit((j - 1) * self.half, 2 * self.half)
            self.next_block += 1
            out.append(self._emit(j * self.half, last_whole=j))
        return np.concatenate(out, axis=1) if out else np.zeros((self.channels, 0), np.float32)

    def flush(self) -> np.ndarray:
        if self.received == self.emitted:
            return np.zeros((self.channels, 0), np.float32)
        if not self.fits:  # shorter than one block: the whole signal is the block
            return self._emit_as_one_block()
        return self._emit(self.received, last_whole=self.next_block - 1)

    def _fit(self, start: int, frames: int) -> list[_Fit]:
        offset = start - self.emitted
        assert offset >= 0 and offset + frames <= self.buffer.shape[1], (start, frames, self.emitted)
        return [_fit_block(self.buffer[row, offset:offset + frames], start, self.shapes[row], self.template,
                           self.sample_rate) for row in range(self.channels)]

    def _emit(self, end: int, last_whole: int) -> np.ndarray:
        """Frames [emitted, end) less their hum: each frame's two blocks, cut blocks taking the fit of the
        nearest whole one (block 0 that of block 1, blocks past the last whole one that of the last)."""
        start, half = self.emitted, self.half
        hum = np.zeros((self.channels, end - start))
        first_block, last_block = start // half, (end - 1) // half + 1
        for j in range(first_block, last_block + 1):
            lo, hi = max(start, (j - 1) * half), min(end, (j + 1) * half)
            if hi <= lo:
                continue
            fits = self.fits[min(max(j, 1), last_whole)]
            weights = self.window[lo - (j - 1) * half: hi - (j - 1) * half]
            for row in range(self.channels):
                hum[row, lo - start: hi - start] += weights * _synthesise(
                    fits[row], self.template.harmonics, lo, hi - lo, self.sample_rate)
        out = self.buffer[:, : end - start] - hum.astype(np.float32)
        self.buffer = self.buffer[:, end - start:]
        self.emitted = end
        for j in [j for j in self.fits if (j + 1) * half <= end and j < last_whole]:
            del self.fits[j]  # its window ends before the next frame to return
        return out

    def _emit_as_one_block(self) -> np.ndarray:
        frames = self.received
        out = np.empty_like(self.buffer)
        for row in range(self.channels):
            fit = _fit_block(self.buffer[row], 0, self.shapes[row], self.template, self.sample_rate)
            hum = _synthesise(fit, self.template.harmonics, 0, frames, self.sample_rate)
            out[row] = self.buffer[row] - hum.astype(np.float32)
        self.buffer = self.buffer[:, frames:]
        self.emitted = frames
        return out


def cancel_hum(samples: np.ndarray, template: HumTemplate, sample_rate: int = MODEL_SAMPLE_RATE) -> np.ndarray:
    """(frames,) or (channels, frames) float32 audio less the fitted hum, same shape: the stream's samples."""
    samples = np.asarray(samples, dtype=np.float32)
    rows = np.atleast_2d(samples)
    canceller = HumCanceller(template, rows.shape[0], sample_rate)
    out = np.concatenate([canceller.push(rows), canceller.flush()], axis=1)
    assert out.shape == rows.shape, (out.shape, rows.shape)
    return out.reshape(samples.shape)


# --- learning the template ----------------------------------------------------------------------------

def learn_hum_template(recordings: Iterable[tuple[int, np.ndarray]], fundamental_hz: float,
                       harmonics: Sequence[int], sample_rate: int = MODEL_SAMPLE_RATE) -> HumTemplate | None:
    """The hum template of a machine's blank tape: `recordings` are (channel, mono samples) pairs, every
    whole block of them is used (hop half a block; a recording shorter than a block, down to
    MIN_LEARN_SECONDS, is one block). Two passes: the harmonics' phases are first taken relative to each
    block's fundamental, then relative to the phase the first template fits (which the hiss disturbs less
    than the fundamental's alone). None when no recording is long enough."""
    harmonics = tuple(sorted({1, *(int(k) for k in harmonics)}))
    frames = round(BLOCK_SECONDS * sample_rate)
    blocks_by_channel: dict[int, list[np.ndarray]] = {}
    for channel, samples in recordings:
        samples = np.asarray(samples, dtype=np.float64)
        if len(samples) < frames:  # blank tape has no music to tell apart: a shorter block still resolves the lines
            if len(samples) >= MIN_LEARN_SECONDS * sample_rate:
                blocks_by_channel.setdefault(int(channel), []).append(samples)
            continue
        for start in range(0, len(samples) - frames + 1, frames // 2):
            blocks_by_channel.setdefault(int(channel), []).append(samples[start:start + frames])
    if not blocks_by_channel:
        return None
    channels = sorted(blocks_by_channel)
    k = np.asarray(harmonics)

    def averaged(place) -> tuple[tuple[tuple[complex, ...], ...], float]:
        """Per channel, every block's harmonic amplitudes turned to the block's reference phase (`place`:
        block, channel -> amplitudes, phase) and averaged, as a shape (fundamental 1); and the fundamental's
        mean amplitude over the channels."""
        shapes, levels = [], []
        for channel in channels:
            total = np.zeros(len(k), np.complex128)
            for block in blocks_by_channel[channel]:
                a, phase = place(block, channel)
                total += a * np.exp(-1j * k * phase)
            levels.append(abs(total[0]) / len(blocks_by_channel[channel]))
            shape = total / total[0] if abs(total[0]) > 0 else np.ones(len(k), np.complex128)
            shapes.append(tuple(complex(v) for v in shape))
        return tuple(shapes), float(np.mean(levels))

    def by_power(block: np.ndarray, channel: int) -> tuple[np.ndarray, float]:
        """Pass 1: the frequency that gathers most of the family's power; the fundamental's phase."""
        amplitudes = _harmonic_amplitudes(block, k, fundamental_hz, sample_rate)
        a = amplitudes[int(np.argmax((np.abs(amplitudes) ** 2).sum(axis=1)))]
        return a, float(np.angle(a[0]))

    blocks = sum(len(b) for b in blocks_by_channel.values())
    first = HumTemplate(float(fundamental_hz), harmonics, *averaged(by_power), blocks)

    def by_first_template(block: np.ndarray, channel: int) -> tuple[np.ndarray, float]:
        """Pass 2: the block placed by the first template; its harmonics at that frequency, that phase."""
        fit = _fit_block(block, 0, [np.asarray(first.shapes[channels.index(channel)])], first, sample_rate)
        offset = fit.frequency_hz - fundamental_hz
        return _harmonic_amplitudes(block, k, fundamental_hz, sample_rate, offset)[0], fit.phase

    return HumTemplate(float(fundamental_hz), harmonics, *averaged(by_first_template), blocks)
