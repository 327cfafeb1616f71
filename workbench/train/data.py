"""Training data: random crops of clean music and of tape noise, and the fixed, stored validation mixtures.

Every training example is a pure function of (seed, example index): the index picks, through its own
random generator, a clean file and a crop in it (drawn again while the crop is near-silent), a noise
snippet and a crop in it (short snippets are looped with equal-power crossfades), and the example's SNR
and gain for Eq. 1. Step s of a run with batch size B uses examples s·B .. s·B + B − 1, so

- resuming a run at step s reproduces exactly the batches an uninterrupted run would have seen, whatever
  the number of DataLoader workers (the "data position" is the step);
- with DDP, rank r of W takes its slice of the same global batch: W processes see the batches one would.

Loading happens in DataLoader workers (numpy + soundfile); mixing happens on the training device with
`workbench.train.mixing.mix_at_snr`. Validation (and test) mixtures are built the same way from the
held-out splits, mixed once, and stored in `registry/mixtures/` under a digest of everything that made
them, so every model trained on the same selection is scored on the very same audio.
"""

from __future__ import annotations

import hashlib
import json
import math
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import soundfile as sf
import torch

from workbench.audio.dsp import MODEL_SAMPLE_RATE, resample
from workbench.audio.io import atomic_path, atomic_write_json, check_finite
from workbench.errors import WorkbenchError
from workbench.train.mixing import mix_at_snr, sample_gain_db, sample_snr_db

CROSSFADE_SECONDS = 0.1  # loop seam of short noise snippets
SILENT_CROP_RETRIES = 50


class AudioSource(Protocol):
    """What a crop needs to know about a file: a corpus file or a noise-library snippet."""

    path: Path
    sha256: str
    frames: int


@dataclass(frozen=True)
class MixingSpec:
    """Eq. 1's random choices: SNR in dB from `distribution` over [snr_low, snr_high], gain uniform in dB."""

    snr_distribution: str = "log-uniform"
    snr_low: float = 6.0
    snr_high: float = 32.0
    gain_low: float = -6.0
    gain_high: float = 0.0

    @classmethod
    def from_recipe(cls, data: dict) -> "MixingSpec":
        snr, gain = data["snr_db"], data["gain_db"]
        return cls(snr["distribution"], float(snr["low"]), float(snr["high"]), float(gain["low"]), float(gain["high"]))


def _sample_rate(source: AudioSource) -> int:
    return int(getattr(source, "sample_rate", MODEL_SAMPLE_RATE))


def _model_frames(source: AudioSource) -> int:
    """The source's length in frames at the model's 44.1 kHz rate."""
    rate = _sample_rate(source)
    return source.frames if rate == MODEL_SAMPLE_RATE else source.frames * MODEL_SAMPLE_RATE // rate


def read_crop(source: AudioSource, start: int, frames: int) -> np.ndarray:
    """`frames` mono float32 samples at 44.1 kHz from `start` (in 44.1 kHz frames); channels averaged."""
    rate = _sample_rate(source)
    if rate == MODEL_SAMPLE_RATE:
        first, count = start, frames
    else:  # read a little more at the file's rate, resample, and cut the exact span
        first = max(0, start * rate // MODEL_SAMPLE_RATE - 64)
        count = frames * rate // MODEL_SAMPLE_RATE + 192
    try:
        block = sf.read(str(source.path), frames=count, start=first, dtype="float32", always_2d=True)[0]
    except (sf.LibsndfileError, RuntimeError) as error:
        raise WorkbenchError(f"{source.path}: unreadable while cropping ({error})") from None
    check_finite(block.T, source.path, rate, first)  # a NaN in a crop would reach the loss or a metric
    mono = block.mean(axis=1, dtype=np.float32) if block.shape[1] > 1 else block[:, 0]
    if rate != MODEL_SAMPLE_RATE:
        mono = np.pad(mono, (0, count - mono.shape[0]))  # the margin may run past the end of the file
        mono = resample(mono, rate, MODEL_SAMPLE_RATE)
        offset = start - first * MODEL_SAMPLE_RATE // rate
        mono = mono[offset:offset + frames]
    if mono.shape[0] < frames:
        raise WorkbenchError(f"{source.path}: shorter than its registered length ({mono.shape[0]} < {frames} frames at {start})")
    return np.ascontiguousarray(mono[:frames])


def loop_with_crossfades(noise: np.ndarray, frames: int, crossfade: int) -> np.ndarray:
    """Repeat `noise` to `frames` samples, each seam an equal-power crossfade of `crossfade` samples.

    Equal-power (sin/cos) fades keep the level constant across a seam for uncorrelated noise, so a looped
    snippet has the same power as the original throughout.
    """
    n = noise.shape[0]
    if n >= frames:
        return noise[:frames]
    crossfade = max(1, min(crossfade, n // 2))
    ramp = (np.arange(crossfade, dtype=np.float64) + 0.5) / crossfade
    fade_in, fade_out = np.sin(0.5 * np.pi * ramp), np.cos(0.5 * np.pi * ramp)
    out = noise.astype(np.float64)
    while out.shape[0] < frames:
        seam = out[-crossfade:] * fade_out + noise[:crossfade] * fade_in
        out = np.concatenate([out[:-crossfade], seam, noise[crossfade:]])
    return out[:frames].astype(np.float32)


def _weighted_choice(rng: np.random.Generator, cumulative: np.ndarray) -> int:
    return int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))


class TrainingExamples(torch.utils.data.Dataset):
    """Example i = (clean crop, noise crop, SNR dB, gain dB), a pure function of (seed, i).

    Clean files are drawn with probability proportional to their length (files shorter than a segment
    are skipped); noise snippets likewise by length, and each crop starts uniformly at random.
    """

    def __init__(self, clean_files: Sequence[AudioSource], noise_snippets: Sequence[AudioSource],
                 segment_frames: int, mixing: MixingSpec, seed: int, silence_dbfs: float = -50.0):
        self.clean_files = [f for f in clean_files if _model_frames(f) >= segment_frames]
        if not self.clean_files:
            longest = max((_model_frames(f) for f in clean_files), default=0) / MODEL_SAMPLE_RATE
            raise WorkbenchError(f"no clean file is as long as a {segment_frames / MODEL_SAMPLE_RATE:g} s segment "
                                 f"(longest: {longest:.2f} s of {len(clean_files)} files)")
        if not noise_snippets:
            raise WorkbenchError("no noise snippets selected")
        self.noise_snippets = list(noise_snippets)
        self.segment_frames = int(segment_frames)
        self.mixing = mixing
        self.seed = int(seed)
        self.silence_rms = 10.0 ** (silence_dbfs / 20.0)
        self.clean_cumulative = np.cumsum([_model_frames(f) - segment_frames + 1 for f in self.clean_files], dtype=np.float64)
        self.noise_cumulative = np.cumsum([_model_frames(s) for s in self.noise_snippets], dtype=np.float64)

    def __len__(self) -> int:  # examples are endless; the sampler decides which indices are used
        return 2**62

    def clean_crop(self, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
        for _ in range(SILENT_CROP_RETRIES):
            source = self.clean_files[_weighted_choice(rng, self.clean_cumulative)]
            start = int(rng.integers(0, _model_frames(source) - self.segment_frames + 1))
            crop = read_crop(source, start, self.segment_frames)
            if math.sqrt(float(np.mean(np.square(crop, dtype=np.float64)))) > self.silence_rms:
                return crop, {"sha256": source.sha256, "start": start}
        raise WorkbenchError(f"{SILENT_CROP_RETRIES} random crops of the clean corpus were all near-silent "
                             f"(below {20 * math.log10(self.silence_rms):.0f} dBFS); is it music?")

    def noise_crop(self, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
        snippet = self.noise_snippets[_weighted_choice(rng, self.noise_cumulative)]
        length = _model_frames(snippet)
        if length >= self.segment_frames:
            start = int(rng.integers(0, length - self.segment_frames + 1))
            return read_crop(snippet, start, self.segment_frames), {"sha256": snippet.sha256, "start": start}
        # Short snippet: loop it with crossfades and start at a random phase of the loop.
        start = int(rng.integers(0, length))
        looped = loop_with_crossfades(read_crop(snippet, 0, length), self.segment_frames + start,
                                      int(CROSSFADE_SECONDS * MODEL_SAMPLE_RATE))
        return np.ascontiguousarray(looped[start:]), {"sha256": snippet.sha256, "start": start, "looped": True}

    def example(self, index: int) -> tuple[dict[str, Any], dict]:
        rng = np.random.default_rng([self.seed, int(index)])
        clean, clean_source = self.clean_crop(rng)
        noise, noise_source = self.noise_crop(rng)
        generator = torch.Generator().manual_seed(int(rng.integers(0, 2**63 - 1)))
        m = self.mixing
        snr = sample_snr_db(1, m.snr_low, m.snr_high, m.snr_distribution, generator)[0]
        gain = sample_gain_db(1, m.gain_low, m.gain_high, generator)[0]
        item = {"clean": torch.from_numpy(clean), "noise": torch.from_numpy(noise), "snr_db": snr, "gain_db": gain}
        return item, {"clean": clean_source, "noise": noise_source}

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.example(index)[0]


class StepBatches(torch.utils.data.Sampler):
    """Batches of example indices for steps `start_step` .. `steps - 1`; this rank's slice of each global batch."""

    def __init__(self, start_step: int, steps: int, batch_size: int, rank: int = 0, world_size: int = 1):
        assert batch_size % world_size == 0, f"batch size {batch_size} must divide among {world_size} processes"
        self.start_step, self.steps = start_step, steps
        self.batch_size, self.local = batch_size, batch_size // world_size
        self.offset = rank * self.local

    def __len__(self) -> int:
        return max(0, self.steps - self.start_step)

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.steps):
            first = step * self.batch_size + self.offset
            yield list(range(first, first + self.local))


def training_batches(examples: TrainingExamples, start_step: int, steps: int, batch_size: int, *,
                     num_workers: int = 0, rank: int = 0, world_size: int = 1,
                     pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader yielding this rank's batch for each step from `start_step` (dicts of stacked tensors)."""
    return torch.utils.data.DataLoader(
        examples, batch_sampler=StepBatches(start_step, steps, batch_size, rank, world_size),
        num_workers=num_workers, pin_memory=pin_memory, persistent_workers=False,
        prefetch_factor=4 if num_workers else None, worker_init_fn=_start_worker if num_workers else None)


def _start_worker(worker_id: int) -> None:
    from workbench.model.allocator import worker_init

    worker_init(worker_id)  # a spawned worker starts with glibc's defaults (a forked one is set already)
    _ignore_ctrl_c(worker_id)


def _ignore_ctrl_c(worker_id: int) -> None:
    # Ctrl-C (or a SIGTERM to the job) reaches the whole process group; the training process handles it
    # (saving its state at the end of the step) and needs its workers alive until then.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def mix_batch(batch: dict[str, torch.Tensor], device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 1 on the training device: (noisy, target) waveforms (B, T) for a loaded batch."""
    clean = batch["clean"].to(device, non_blocking=True)
    noise = batch["noise"].to(device, non_blocking=True)
    return mix_at_snr(clean, noise, batch["snr_db"].to(device), batch["gain_db"].to(device))


# ------------------------------------------------------------------------------------------ fixed mixtures

@dataclass
class Mixtures:
    """Fixed (noisy, clean) pairs that every model is scored on; `clean` is the Eq. 1 target β·y."""

    noisy: torch.Tensor  # (N, T) float32
    clean: torch.Tensor  # (N, T)
    snr_db: torch.Tensor  # (N,)
    gain_db: torch.Tensor  # (N,)
    key: str  # digest of everything that made them
    path: Path | None = None

    def __len__(self) -> int:
        return self.noisy.shape[0]


def _digest(items: Sequence[AudioSource]) -> str:
    return hashlib.sha256("\n".join(sorted(s.sha256 for s in items)).encode()).hexdigest()[:16]


def mixtures_key(clean_files: Sequence[AudioSource], noise_snippets: Sequence[AudioSource], count: int,
                 seconds: float, mixing: MixingSpec, seed: int, silence_dbfs: float) -> tuple[str, dict]:
    spec = {"clean": _digest(clean_files), "noise": _digest(noise_snippets), "count": int(count),
            "seconds": float(seconds), "mixing": mixing.__dict__, "seed": int(seed), "silence_dbfs": float(silence_dbfs),
            "sample_rate": MODEL_SAMPLE_RATE, "version": 1}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16], spec


def stored_mixtures(mixtures_dir: Path, label: str, clean_files: Sequence[AudioSource],
                    noise_snippets: Sequence[AudioSource], count: int, seconds: float, mixing: MixingSpec,
                    seed: int, silence_dbfs: float = -50.0) -> Mixtures:
    """`count` fixed mixtures of `seconds` each, built once and stored as `<label>-<key>.safetensors` (+ .json).

    The key digests the clean files and noise snippets (their contents), the count, length, mixing
    choices and seed: the same selection always gives the same file, a different one a new file.
    """
    from safetensors.torch import load_file, save_file

    key, spec = mixtures_key(clean_files, noise_snippets, count, seconds, mixing, seed, silence_dbfs)
    path = Path(mixtures_dir) / f"{label}-{key}.safetensors"
    if path.is_file():
        tensors = load_file(str(path))
        return Mixtures(tensors["noisy"], tensors["clean"], tensors["snr_db"], tensors["gain_db"], key, path)
    frames = int(round(seconds * MODEL_SAMPLE_RATE))
    examples = TrainingExamples(clean_files, noise_snippets, frames, mixing, seed, silence_dbfs)
    items, sources = zip(*(examples.example(i) for i in range(count)))
    batch = {name: torch.stack([torch.as_tensor(item[name]) for item in items]) for name in items[0]}
    noisy, clean = mix_batch(batch, "cpu")
    tensors = {"noisy": noisy.contiguous(), "clean": clean.contiguous(),
               "snr_db": batch["snr_db"].contiguous(), "gain_db": batch["gain_db"].contiguous()}
    # The description first: the tensors file is what marks the set as complete.
    atomic_write_json(path.with_suffix(".json"), {"label": label, "key": key, "spec": spec, "sources": list(sources)})
    with atomic_path(path) as temporary:
        save_file(tensors, str(temporary), metadata={"label": label, "key": key})
    return Mixtures(tensors["noisy"], tensors["clean"], tensors["snr_db"], tensors["gain_db"], key, path)
