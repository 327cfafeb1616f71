"""Screening: find the usable noise in a blank-tape recording, one channel at a time, while streaming.

A `Screener` takes the recording twice over, block by block: the source-rate samples (for what only
the original samples show: digital silence, clipping, NaN/inf) and the same audio resampled to
44.1 kHz (for everything else). It removes DC with a causal running mean, measures every 50 ms window,
decides which windows are usable with a bounded look-ahead, and hands usable stretches to the snippet
cutter, which cuts them into fixed-length snippets inside train/validation/test blocks. Memory is
bounded by the look-ahead and one snippet per channel, whatever the recording's length.

Robust statistics throughout:
- digital silence: a run of `SILENCE_MIN_RUN` identical samples (exact zeros of a stopped transport or
  muted input, or a stuck converter); real noise never repeats a value that often in a row.
- clipping: a sample at or beyond `CLIP_LEVEL` of full scale (blank tape never comes close).
- clicks: a sample-to-sample difference above `CLICK_SIGMAS` times the typical difference size (the
  running median, over ±`LEVEL_CONTEXT_SECONDS`, of each window's RMS difference).
- transients and dropouts (splices, leader, bumps): a window's level more than `TRANSIENT_DB` above or
  `DROPOUT_DB` below the running median of the windows within ±`LEVEL_CONTEXT_SECONDS`.
- abrupt level changes (tape ran out): the median level of the `LEVEL_CONTEXT_SECONDS` before a window
  and of those from it on differ by more than `STEP_DB`.
Every event is padded by `EVENT_PAD_SECONDS` on both sides and reported with its time range (seconds
in the source file, which the 44.1 kHz stream shares) and reason. After the whole recording, snippets
whose level is far from the recording's typical noise (`level_outliers`) are dropped too: what remains
after the tape ran out is the machine without tape, not tape noise.

The split: the recording's timeline is divided into contiguous blocks (`split_plan`), each assigned to
train, validation or test in the requested proportions by a permutation seeded from the audio itself;
snippets never straddle a block, and `GUARD_SECONDS` (half a snippet for snippets under 2 s) at each
boundary between blocks of different splits are left unused, so no test snippet adjoins a train snippet.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field

import numpy as np
from scipy.signal import lfilter

from workbench.audio.dsp import MODEL_SAMPLE_RATE, resampled_length
from workbench.audio.io import check_finite

WINDOW_FRAMES = MODEL_SAMPLE_RATE // 20  # 50 ms at 44.1 kHz: the unit of every decision
WINDOWS_PER_SECOND = MODEL_SAMPLE_RATE // WINDOW_FRAMES
DC_SECONDS = 0.5  # time constant of the causal running mean that removes DC
SILENCE_MIN_RUN = 64  # identical consecutive source samples
CLIP_LEVEL = 0.999  # |sample| at or above this (of full scale) is clipped
CLICK_SIGMAS = 10.0
SIGMA_FLOOR = 2.0 ** -15  # one 16-bit LSB: the smallest noise scale a click is measured against
LEVEL_CONTEXT_SECONDS = 2.5
TRANSIENT_DB = 6.0
DROPOUT_DB = 6.0
STEP_DB = 3.0
EVENT_PAD_SECONDS = 0.25
REGIME_DB = 6.0  # a snippet this far from the recording's median snippet level is not its typical noise
GUARD_SECONDS = 1.0
MAX_BLOCK_SECONDS = 60.0  # split blocks are at most about this long
SPLITS = ("train", "validation", "test")

CONTEXT = int(LEVEL_CONTEXT_SECONDS * WINDOWS_PER_SECOND)
PAD = int(round(EVENT_PAD_SECONDS * WINDOWS_PER_SECOND))

# Reason codes in priority order (a window flagged for two reasons reports the first).
OK, CLIPPING, SILENCE, CLICK, STEP, TRANSIENT, DROPOUT = range(7)
REASONS = {
    CLIPPING: "clipping",
    SILENCE: "digital silence",
    CLICK: "click",
    STEP: "abrupt level change",
    TRANSIENT: "transient (splice, leader or bump)",
    DROPOUT: "dropout (level dip)",
}


@dataclass(frozen=True)
class Exclusion:
    channel: int  # 0-based
    start_s: float  # seconds in the source file
    end_s: float
    reason: str

    def to_dict(self) -> dict:
        return {"channel": self.channel, "start_s": round(self.start_s, 3), "end_s": round(self.end_s, 3),
                "reason": self.reason}


@dataclass(frozen=True)
class CandidateSnippet:
    channel: int
    start: int  # first frame in the 44.1 kHz stream
    split: str
    samples: np.ndarray  # float32 (frames,), DC removed

    @property
    def end(self) -> int:
        return self.start + self.samples.shape[0]


@dataclass(frozen=True)
class SplitPlan:
    """Contiguous blocks of `block_windows` windows, each with a split, and the guard windows."""

    block_windows: int
    splits: tuple[str, ...]  # one per block
    total_windows: int
    guard_windows: int

    def block_of(self, window: np.ndarray) -> np.ndarray:
        return np.minimum(window // self.block_windows, len(self.splits) - 1)

    def guarded(self, window: np.ndarray) -> np.ndarray:
        """True for windows within the guard of a boundary to a block of another split."""
        block = self.block_of(window)
        start = block * self.block_windows
        end = np.where(block == len(self.splits) - 1, self.total_windows, start + self.block_windows)
        splits = np.array(self.splits + ("",))
        differs_before = (block > 0) & (splits[np.maximum(block - 1, 0)] != splits[block])
        differs_after = (block < len(self.splits) - 1) & (splits[block + 1] != splits[block])
        return ((differs_before & (window < start + self.guard_windows))
                | (differs_after & (window >= end - self.guard_windows)))


def guard_windows(snippet_windows: int) -> int:
    """GUARD_SECONDS, or half a snippet when snippets are shorter than two guards."""
    return max(1, min(int(round(GUARD_SECONDS * WINDOWS_PER_SECOND)), snippet_windows // 2))


def _allocate(blocks: int, proportions: tuple[float, float, float]) -> list[int]:
    """Blocks per split by largest remainder (ties to the earlier split)."""
    total = float(sum(proportions))
    exact = [blocks * p / total for p in proportions]
    counts = [math.floor(e) for e in exact]
    for i in sorted(range(3), key=lambda i: (exact[i] - counts[i], -i), reverse=True)[: blocks - sum(counts)]:
        counts[i] += 1
    return counts


def split_plan(total_windows: int, snippet_windows: int, proportions: tuple[float, float, float],
               seed: str) -> SplitPlan:
    """Blocks for a recording of `total_windows`.

    About as many blocks as give the smallest split one (10 for 80/10/10, 5 for 60/20/20), each
    holding as many whole snippets (plus its two guards) as fit; but no block longer than
    MAX_BLOCK_SECONDS, so long recordings get more, shorter blocks. Big blocks keep a split from
    vanishing when a click lands in its only block. The last block takes the remainder. Split counts
    follow the proportions by largest remainder; the block order is a permutation seeded by `seed`
    (the audio's own digest: same audio, same split)."""
    assert len(proportions) == 3 and sum(proportions) > 0 and min(proportions) >= 0
    guard = guard_windows(snippet_windows)
    wanted = sum(p > 0 for p in proportions)
    smallest = min(p for p in proportions if p > 0) / sum(proportions)  # e.g. 0.1: about 10 blocks
    fewest = next(n for n in itertools.count(max(wanted, round(1 / smallest)))
                  if sum(c > 0 for c in _allocate(n, proportions)) == wanted)
    most = max(1, (int(MAX_BLOCK_SECONDS * WINDOWS_PER_SECOND) - 2 * guard) // snippet_windows)
    per_block = min(max(1, (total_windows // fewest - 2 * guard) // snippet_windows), most)
    block_windows = per_block * snippet_windows + 2 * guard
    blocks = max(1, total_windows // block_windows)
    labels = [name for name, count in zip(SPLITS, _allocate(blocks, proportions)) for _ in range(count)]
    random.Random(seed).shuffle(labels)
    return SplitPlan(block_windows, tuple(labels), total_windows, guard)


def _running_nanmedian(values: np.ndarray, width: int) -> np.ndarray:
    """Median of each run of `width` consecutive values along axis 1, ignoring NaN (NaN if all are).

    Sorting puts NaN last, so the median of the k valid values sits at positions (k-1)//2 and k//2;
    much faster than np.nanmedian's masked arrays for these short windows."""
    ordered = np.sort(np.lib.stride_tricks.sliding_window_view(values, width, axis=1), axis=2)
    valid = np.sum(~np.isnan(ordered), axis=2)
    low = np.take_along_axis(ordered, np.maximum((valid - 1) // 2, 0)[..., None], axis=2)[..., 0]
    high = np.take_along_axis(ordered, np.minimum(valid // 2, width - 1)[..., None], axis=2)[..., 0]
    return np.where(valid > 0, 0.5 * (low + high), np.nan)


def _run_lengths(mask: np.ndarray, carry: np.ndarray) -> np.ndarray:
    """For (channels, n) booleans, the number of consecutive Trues ending at each position, continuing
    `carry` (the run length at the end of the previous block)."""
    index = np.arange(mask.shape[1])
    last_false = np.maximum.accumulate(np.where(mask, -1, index), axis=1)
    return np.where(last_false < 0, index + 1 + carry[:, None], index - last_false)


@dataclass
class _ChannelCutter:
    """Cuts one channel's decided windows into snippets within split blocks."""

    channel: int
    run_start: int = -1
    run_block: int = -1
    run_audio: list = field(default_factory=list)

    def reset(self) -> None:
        self.run_start, self.run_block, self.run_audio = -1, -1, []


class Screener:
    """Streaming screening of one recording; see the module docstring.

    Call `push_source(block)` with each source-rate block before `push_stream(resampled)` with the
    resampler's output for it, then `finish()`. `push_stream` and `finish` return the candidate
    snippets completed so far; `exclusions` lists what was left out and why.
    """

    def __init__(self, name: str, source_rate: int, channels: int, source_frames: int,
                 snippet_seconds: float, plan_proportions: tuple[float, float, float], seed: str,
                 check_finite: bool = True):
        self.name, self.source_rate, self.channels = name, int(source_rate), int(channels)
        self.check_finite = check_finite  # integer PCM cannot hold NaN or inf: skip the pass
        self.snippet_windows = max(1, int(round(snippet_seconds * WINDOWS_PER_SECOND)))
        self.total_windows = resampled_length(source_frames, self.source_rate, MODEL_SAMPLE_RATE) // WINDOW_FRAMES
        self.plan = split_plan(self.total_windows, self.snippet_windows, plan_proportions, seed)
        # source-rate state
        self.source_pos = 0
        self.last_sample = np.full(channels, np.nan, dtype=np.float32)
        self.equal_run = np.zeros(channels, dtype=np.int64)
        # 44.1 kHz state: per-window arrays start at global window `base`
        self.base = 0
        self.levels = np.zeros((channels, 0))  # dB of each window's RMS
        self.difference_rms = np.zeros((channels, 0))  # RMS of its sample-to-sample differences
        self.difference_peak = np.zeros((channels, 0))  # largest |difference|
        self.events = np.zeros((channels, 0), dtype=np.int8)  # silence/clipping, may run ahead
        self.raw = np.zeros((channels, 0), dtype=np.int8)  # unpadded codes, windows base..raw_done
        self.audio = np.zeros((channels, 0), dtype=np.float32)  # windows base..available
        self.pending = np.zeros((channels, 0), dtype=np.float32)  # < one window, not yet measured
        self.previous = None  # last filtered sample per channel, for the first difference
        self.dc_estimate = None
        self.raw_done = 0
        self.decided = 0
        self.cutters = [_ChannelCutter(c) for c in range(channels)]
        self.open_runs: list[list | None] = [None] * channels  # [start, end, code] being merged
        self.exclusions: list[Exclusion] = []

    # --- source-rate checks -------------------------------------------------------------------------
    def push_source(self, block: np.ndarray) -> None:
        assert block.ndim == 2 and block.shape[0] == self.channels
        if self.check_finite:
            check_finite(block, self.name, self.source_rate, self.source_pos)
        self._find_silence(block)
        if block.max() >= CLIP_LEVEL or block.min() <= -CLIP_LEVEL:  # rare: look closer only then
            for channel in range(self.channels):
                clipped = np.flatnonzero(np.abs(block[channel]) >= CLIP_LEVEL)
                windows = np.unique((self.source_pos + clipped) * WINDOWS_PER_SECOND // self.source_rate)
                self._flag_windows(channel, windows, CLIPPING)
        self.last_sample = block[:, -1].copy()
        self.source_pos += block.shape[1]

    def _find_silence(self, block: np.ndarray) -> None:
        """Flag runs of SILENCE_MIN_RUN identical samples, continuing runs across blocks."""
        previous = np.where(np.isnan(self.last_sample), np.inf, self.last_sample)[:, None]
        equal = np.empty(block.shape, dtype=bool)
        equal[:, 0:1] = block[:, :1] == previous
        np.equal(block[:, 1:], block[:, :-1], out=equal[:, 1:])
        # Fast path: a run of 63 equal steps always covers a whole aligned group of 32, and a run
        # carried in from the last block shows in the first samples.
        chunk = 32
        whole = equal.shape[1] // chunk * chunk
        candidate = (equal[:, :whole].reshape(self.channels, -1, chunk).all(axis=2).any()
                     or (self.equal_run > 0).any()
                     or (whole < equal.shape[1] and equal[:, whole:].all(axis=1).any()))
        if not candidate:
            self.equal_run = self._trailing_run(equal)
            return
        runs = _run_lengths(equal, self.equal_run)
        self.equal_run = runs[:, -1].copy()
        for channel in range(self.channels):
            silent = np.flatnonzero(runs[channel] >= SILENCE_MIN_RUN - 1)
            if silent.size:  # positions of one run share its start; report each run once
                starts = self.source_pos + silent - runs[channel, silent]
                ends = self.source_pos + silent
                firsts = np.concatenate([[0], np.flatnonzero(np.diff(starts)) + 1])
                lasts = np.concatenate([firsts[1:] - 1, [starts.size - 1]])
                for first, last in zip(firsts, lasts):
                    self._flag_source(channel, int(starts[first]), int(ends[last]), SILENCE)

    def _trailing_run(self, equal: np.ndarray) -> np.ndarray:
        """Run length of equal steps at the end of a block holding no long run."""
        tail = equal[:, -SILENCE_MIN_RUN:]
        return _run_lengths(tail, np.zeros(self.channels, dtype=np.int64))[:, -1] if tail.shape[1] else self.equal_run

    def _flag_source(self, channel: int, first: int, last: int, code: int) -> None:
        """Flag the windows holding source frames first..last (inclusive)."""
        lo = first * WINDOWS_PER_SECOND // self.source_rate
        hi = last * WINDOWS_PER_SECOND // self.source_rate
        self._flag_windows(channel, np.arange(lo, hi + 1), code)

    def _flag_windows(self, channel: int, windows: np.ndarray, code: int) -> None:
        windows = windows[windows >= self.base] - self.base
        if not windows.size:
            return
        needed = int(windows.max()) + 1
        if needed > self.events.shape[1]:
            self.events = np.pad(self.events, ((0, 0), (0, needed - self.events.shape[1])))
        current = self.events[channel, windows]
        self.events[channel, windows] = np.where((current == OK) | (current > code), code, current)

    # --- 44.1 kHz measurements -------------------------------------------------------------------------
    def push_stream(self, block: np.ndarray) -> list[CandidateSnippet]:
        assert block.ndim == 2 and block.shape[0] == self.channels
        stream = np.concatenate([self.pending, block], axis=1) if self.pending.shape[1] else block
        whole = stream.shape[1] // WINDOW_FRAMES * WINDOW_FRAMES
        self.pending = stream[:, whole:].copy()
        if whole:
            self._measure(stream[:, :whole])
        return self._decide(final=False)

    def _remove_dc(self, windows: np.ndarray) -> np.ndarray:
        """Subtract a causal running mean: per-window means smoothed by a one-pole filter with time
        constant DC_SECONDS, ramped linearly across each window so the estimate is continuous."""
        means = windows.mean(axis=2, dtype=np.float64)
        alpha = 1.0 - math.exp(-1.0 / (DC_SECONDS * WINDOWS_PER_SECOND))
        if self.dc_estimate is None:  # start as if the signal had always sat at its first window's mean
            self.dc_estimate = means[:, 0].copy()
        estimates, _ = lfilter([alpha], [1.0, alpha - 1.0], means, axis=1,
                               zi=((1.0 - alpha) * self.dc_estimate)[:, None])
        previous = np.concatenate([self.dc_estimate[:, None], estimates[:, :-1]], axis=1)
        self.dc_estimate = estimates[:, -1].copy()
        ramp = (np.arange(1, WINDOW_FRAMES + 1, dtype=np.float32) / WINDOW_FRAMES)[None, None, :]
        start = previous.astype(np.float32)[:, :, None]
        return windows - (start + (estimates.astype(np.float32)[:, :, None] - start) * ramp)

    def _measure(self, audio: np.ndarray) -> None:
        windows = self._remove_dc(audio.reshape(self.channels, -1, WINDOW_FRAMES))
        power = np.einsum("cwf,cwf->cw", windows, windows, dtype=np.float64) / WINDOW_FRAMES
        flat = windows.reshape(self.channels, -1)
        previous = flat[:, :1] if self.previous is None else self.previous
        difference = np.diff(np.concatenate([previous, flat], axis=1), axis=1).reshape(windows.shape)
        self.previous = flat[:, -1:].copy()
        difference_power = np.einsum("cwf,cwf->cw", difference, difference, dtype=np.float64) / WINDOW_FRAMES
        peak_difference = np.maximum(difference.max(axis=2), -difference.min(axis=2))
        self.levels = np.concatenate([self.levels, 10 * np.log10(np.maximum(power, 1e-20))], axis=1)
        self.difference_rms = np.concatenate([self.difference_rms, np.sqrt(difference_power)], axis=1)
        self.difference_peak = np.concatenate([self.difference_peak, peak_difference], axis=1)
        self.audio = np.concatenate([self.audio, flat], axis=1)

    def _events_for(self, lo: int, hi: int) -> np.ndarray:
        out = np.zeros((self.channels, hi - lo), dtype=np.int8)
        have = self.events[:, lo - self.base: min(hi, self.base + self.events.shape[1]) - self.base]
        out[:, : have.shape[1]] = have
        return out

    def _window_slice(self, array: np.ndarray, lo: int, hi: int, fill=np.nan) -> np.ndarray:
        """array's global windows lo..hi, `fill` outside what is held."""
        out = np.full((self.channels, hi - lo), fill, dtype=np.float64)
        start, stop = max(lo, self.base), min(hi, self.base + array.shape[1])
        if stop > start:
            out[:, start - lo: stop - lo] = array[:, start - self.base: stop - self.base]
        return out

    def _raw_codes(self, lo: int, hi: int) -> np.ndarray:
        """Unpadded reason codes for windows lo..hi (needs levels from lo - CONTEXT to hi + CONTEXT)."""
        available = self.base + self.levels.shape[1]
        events = self._events_for(lo, hi)
        context_events = self._events_for(max(lo - CONTEXT, self.base), min(hi + CONTEXT, available))
        levels = self._window_slice(self.levels, lo - CONTEXT, hi + CONTEXT)
        # windows already known to be silent or clipped do not set the reference level
        offset = max(lo - CONTEXT, self.base) - (lo - CONTEXT)
        span = levels[:, offset: offset + context_events.shape[1]]
        span[context_events != OK] = np.nan
        centred = _running_nanmedian(levels, 2 * CONTEXT + 1)
        before = _running_nanmedian(levels[:, :-1], CONTEXT)
        # before[i] is the median of levels[i : i + CONTEXT]: for window w (= lo + j) the windows before it
        # are levels[j : j + CONTEXT] and those from it on levels[j + CONTEXT : j + 2 * CONTEXT]
        n = hi - lo
        trailing, leading = before[:, :n], before[:, CONTEXT: CONTEXT + n]
        own = levels[:, CONTEXT: CONTEXT + n]
        # a click: a sample step far beyond the typical step size of the surrounding windows
        difference_rms = self._window_slice(self.difference_rms, lo - CONTEXT, hi + CONTEXT)
        difference_rms[np.isnan(levels)] = np.nan  # silent/clipped windows set no reference either
        typical_step = _running_nanmedian(difference_rms, 2 * CONTEXT + 1)
        typical_step = np.maximum(np.nan_to_num(typical_step, nan=SIGMA_FLOOR), SIGMA_FLOOR)
        clicks = self._window_slice(self.difference_peak, lo, hi, fill=0) > CLICK_SIGMAS * typical_step
        codes = events.copy()
        for code, mask in ((CLICK, clicks),
                           (STEP, np.abs(leading - trailing) > STEP_DB),
                           (TRANSIENT, own > centred[:, :n] + TRANSIENT_DB),
                           (DROPOUT, own < centred[:, :n] - DROPOUT_DB)):
            codes = np.where((codes == OK) & mask, code, codes)
        return codes.astype(np.int8)

    def _decide(self, final: bool) -> list[CandidateSnippet]:
        available = self.base + self.levels.shape[1]
        raw_end = available if final else max(self.raw_done, available - CONTEXT)
        if raw_end > self.raw_done:
            self.raw = np.concatenate([self.raw, self._raw_codes(self.raw_done, raw_end)], axis=1)
            self.raw_done = raw_end
        decide_end = self.raw_done if final else max(self.decided, self.raw_done - PAD)
        if decide_end <= self.decided:
            return []
        lo, hi = self.decided, decide_end
        raw = self._window_slice(self.raw, lo - PAD, hi + PAD, fill=OK).astype(np.int8)
        codes = np.zeros((self.channels, hi - lo), dtype=np.int8)
        for code in sorted(REASONS, reverse=True):  # highest priority written last
            near = np.lib.stride_tricks.sliding_window_view(raw == code, 2 * PAD + 1, axis=1).any(axis=2)
            codes[near] = code
        audio = self.audio[:, (lo - self.base) * WINDOW_FRAMES: (hi - self.base) * WINDOW_FRAMES]
        snippets = self._cut(lo, codes, audio.reshape(self.channels, -1, WINDOW_FRAMES))
        self._report(lo, codes)
        self.decided = hi
        self._trim()
        return snippets

    def _trim(self) -> None:
        keep_from = max(self.base, self.decided - CONTEXT - PAD)
        drop = keep_from - self.base
        if drop <= 0:
            return
        self.levels, self.difference_rms = self.levels[:, drop:], self.difference_rms[:, drop:]
        self.difference_peak = self.difference_peak[:, drop:]
        self.events, self.raw = self.events[:, drop:], self.raw[:, drop:]
        self.audio = self.audio[:, drop * WINDOW_FRAMES:]
        self.base = keep_from

    def _cut(self, lo: int, codes: np.ndarray, windows: np.ndarray) -> list[CandidateSnippet]:
        index = np.arange(lo, lo + codes.shape[1])
        blocks = self.plan.block_of(index)
        usable_time = ~self.plan.guarded(index) & (index < self.total_windows)
        snippets = []
        for cutter in self.cutters:
            usable = usable_time & (codes[cutter.channel] == OK)
            for j in range(index.size):
                if not usable[j] or blocks[j] != cutter.run_block:
                    cutter.reset()
                if not usable[j]:
                    continue
                if cutter.run_start < 0:
                    cutter.run_start, cutter.run_block = int(index[j]), int(blocks[j])
                cutter.run_audio.append(windows[cutter.channel, j])
                if len(cutter.run_audio) == self.snippet_windows:
                    snippets.append(CandidateSnippet(cutter.channel, cutter.run_start * WINDOW_FRAMES,
                                                     self.plan.splits[cutter.run_block],
                                                     np.concatenate(cutter.run_audio)))
                    cutter.reset()
        return snippets

    def _report(self, lo: int, codes: np.ndarray) -> None:
        """Merge flagged windows into per-channel runs of one reason; close runs that ended."""
        for channel in range(self.channels):
            row = codes[channel]
            changes = np.flatnonzero(np.diff(row)) + 1
            starts = np.concatenate([[0], changes])
            ends = np.concatenate([changes, [row.size]])
            for start, end in zip(starts, ends):
                code = int(row[start])
                run = self.open_runs[channel]
                if run is not None and run[2] == code and run[1] == lo + start:
                    run[1] = lo + end
                    continue
                self._close(channel)
                if code != OK:
                    self.open_runs[channel] = [lo + int(start), lo + int(end), code]

    def _close(self, channel: int) -> None:
        run = self.open_runs[channel]
        if run is not None:
            self.exclusions.append(Exclusion(channel, float(run[0]) / WINDOWS_PER_SECOND,
                                             float(run[1]) / WINDOWS_PER_SECOND, REASONS[run[2]]))
        self.open_runs[channel] = None

    def finish(self) -> list[CandidateSnippet]:
        snippets = self._decide(final=True)
        for channel in range(self.channels):
            self._close(channel)
        self.exclusions.sort(key=lambda e: (e.channel, e.start_s))
        return snippets


def level_outliers(levels_dbfs: list[float]) -> list[bool]:
    """For one channel's snippet levels: True where a snippet is more than REGIME_DB from their median."""
    if not levels_dbfs:
        return []
    median = float(np.median(levels_dbfs))
    return [abs(level - median) > REGIME_DB for level in levels_dbfs]
