"""Training data: random crops of clean music and of tape noise, and the fixed, stored validation mixtures.

Every training example is a pure function of (seed, example index): the index picks, through its own
random generator, a clean file and a crop in it (drawn again while the crop is near-silent), a noise
snippet and a crop in it (short snippets are looped with equal-power crossfades), and the example's SNR
and gain for Eq. 1. Step s of a run with batch size B uses examples s·B .. s·B + B − 1, so

- resuming a run at step s reproduces exactly the batches an uninterrupted run would have seen, whatever
  the number of DataLoader workers (the "data position" is the step);
- with DDP, rank r of W takes its slice of the same global batch: W processes see the batches one would.

A recipe may add a synthetic mains-hum family to a share of the examples' tape noise ([data] hum, `HumSpec`),
drawn from a generator of its own (seed, index, HUM_STREAM), so the examples without one are the very same
as with no hum at all. Validation mixtures never get one: they are the archive's noise as it is.

Loading happens in DataLoader workers (numpy + soundfile); mixing happens on the training device with
`workbench.audio.mixing.mix_at_snr`. Validation (and test) mixtures are built the same way from the
held-out splits, mixed once, and stored in `registry/mixtures/` under a digest of everything that made
them, so every model trained on the same selection is scored on the very same audio.
"""

from __future__ import annotations

import hashlib
import json
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from workbench.audio.crops import AudioSource, Crops
from workbench.audio.dsp import MODEL_SAMPLE_RATE
from workbench.audio.io import atomic_path, atomic_write_json
from workbench.audio.mixing import mix_at_snr, sample_gain_db, sample_snr_db
from workbench.model.allocator import worker_init
from workbench.recipes import validation_seconds


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


HUM_STREAM = 0x48554D  # the third word of a hum family's generator seed: independent of the example's own draws


@dataclass(frozen=True)
class HumSpec:
    """[data] hum: a `share` of the training examples get a mains-hum family on `mains_hz` (one drawn per
    example) with harmonics up to `harmonics`, its fundamental's RMS drawn uniformly in [level_db_low,
    level_db_high] dB relative to the example's tape-noise crop (`workbench.synth.tape_noise.hum_family`)."""

    share: float = 0.0
    mains_hz: tuple[float, ...] = (50.0, 60.0)
    level_db_low: float = -12.0
    level_db_high: float = 6.0
    harmonics: int = 8

    @classmethod
    def from_recipe(cls, data: dict) -> "HumSpec":
        hum = data["hum"]
        return cls(float(hum["share"]), tuple(float(f) for f in hum["mains_hz"]), float(hum["level_db_low"]),
                   float(hum["level_db_high"]), int(hum["harmonics"]))

    def add_to(self, noise: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict | None]:
        """`noise` with a hum family added (for a `share` of generators), and what was added (None: nothing)."""
        from workbench.synth.tape_noise import hum_family

        if rng.random() >= self.share:
            return noise, None
        mains = float(self.mains_hz[int(rng.integers(len(self.mains_hz)))])
        level_db = float(rng.uniform(self.level_db_low, self.level_db_high))
        hum = hum_family(rng, noise.shape[0], mains, self.harmonics)  # fundamental's RMS 1
        noise_rms = float(np.sqrt(np.mean(np.square(noise, dtype=np.float64))))
        assert noise_rms > 0, "tape-noise crops are never digital silence (capture-noise refuses those)"
        noisy = (noise + np.float32(noise_rms * 10 ** (level_db / 20)) * hum).astype(np.float32)
        return noisy, {"mains_hz": mains, "level_db": level_db}


class TrainingExamples(Crops, torch.utils.data.Dataset):
    """Example i = (clean crop, noise crop, SNR dB, gain dB), a pure function of (seed, i); the crops are
    `workbench.audio.crops.Crops`'s, drawn with a generator seeded by (seed, i); with a `hum` spec, a hum
    family is added to a share of the noise crops."""

    def __init__(self, clean_files: Sequence[AudioSource], noise_snippets: Sequence[AudioSource],
                 segment_frames: int, mixing: MixingSpec, seed: int, silence_dbfs: float = -50.0,
                 hum: HumSpec | None = None):
        super().__init__(clean_files, noise_snippets, segment_frames, silence_dbfs)
        self.mixing = mixing
        self.seed = int(seed)
        self.hum = hum

    @classmethod
    def from_recipe(cls, clean_files: Sequence[AudioSource], noise_snippets: Sequence[AudioSource],
                    data: dict) -> "TrainingExamples":
        """The examples a recipe's [data] section describes."""
        return cls(clean_files, noise_snippets, round(data["segment_seconds"] * MODEL_SAMPLE_RATE),
                   MixingSpec.from_recipe(data), data["seed"], data["silence_dbfs"], HumSpec.from_recipe(data))

    def __len__(self) -> int:  # examples are endless; the sampler decides which indices are used
        return 2**62

    def example(self, index: int) -> tuple[dict[str, Any], dict]:
        rng = np.random.default_rng([self.seed, int(index)])
        clean, clean_source = self.clean_crop(rng)
        noise, noise_source = self.noise_crop(rng)
        sources = {"clean": clean_source, "noise": noise_source}
        if self.hum is not None and self.hum.share > 0:
            noise, sources["hum"] = self.hum.add_to(noise, np.random.default_rng([self.seed, int(index), HUM_STREAM]))
        generator = torch.Generator().manual_seed(int(rng.integers(0, 2**63 - 1)))
        m = self.mixing
        snr = sample_snr_db(1, m.snr_low, m.snr_high, m.snr_distribution, generator)[0]
        gain = sample_gain_db(1, m.gain_low, m.gain_high, generator)[0]
        item = {"clean": torch.from_numpy(clean), "noise": torch.from_numpy(noise), "snr_db": snr, "gain_db": gain}
        return item, sources

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


def recipe_validation_mixtures(recipe: dict, mixtures_dir: Path, label: str, clean_files: Sequence[AudioSource],
                               noise_snippets: Sequence[AudioSource]) -> Mixtures:
    """The recipe's fixed validation mixtures of these sources (its [data] count, length, mixing, seed and
    silence threshold, never a trial's), built once and stored: pretraining's and each study's."""
    data = recipe["data"]
    return stored_mixtures(mixtures_dir, label, clean_files, noise_snippets, data["validation_mixtures"],
                           validation_seconds(recipe), MixingSpec.from_recipe(data), data["seed"], data["silence_dbfs"])
