"""The research's test protocol as data: fixed fragments of held-out clean music and a device's test noise.

A fragment is a 10 s stretch of clean test music and an equally long stretch of the device's test
noise, chosen by seed with the training data's own crop rules. Both are stored (float32 WAV, two channels: clean, noise) under
`mixtures/test/<device>@<speed>/<digest>/` in the workspace, so every model ever scored on that device
hears exactly the same audio; the noisy inputs at 10 and 16 dB are made from them on load with Eq. 1
(`mix_at_snr`), which is exact and deterministic. The digest covers the seed, the sizes and every
candidate source, so adding noise or music gives a new set instead of silently changing an old one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from workbench.audio.crops import AudioSource, Crops
from workbench.audio.dsp import MODEL_SAMPLE_RATE
from workbench.audio.io import atomic_write_json, read_audio, write_audio
from workbench.audio.mixing import mix_at_snr, noise_gain_for_snr
from workbench.devices import format_speed
from workbench.errors import WorkbenchError
from workbench.progress import Progress, no_progress

PROTOCOL_VERSION = 2
MANIFEST = "manifest.json"


@dataclass
class FragmentSet:
    """N fixed test fragments of one device at one speed; noisy inputs are made on demand per SNR."""

    device: str
    speed: float | None
    snrs_db: tuple[float, ...]
    clean: np.ndarray  # (N, T) float32
    noise: np.ndarray  # (N, T) float32, unscaled: mix_at_snr sets its level per fragment and SNR
    manifest: dict
    path: Path | None = None
    _noisy_cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        assert self.clean.shape == self.noise.shape and self.clean.ndim == 2, (self.clean.shape, self.noise.shape)

    @property
    def count(self) -> int:
        return int(self.clean.shape[0])

    @property
    def sample_rate(self) -> int:
        return int(self.manifest.get("sample_rate", MODEL_SAMPLE_RATE))

    @property
    def digest(self) -> str:
        return str(self.manifest["digest"])

    @property
    def label(self) -> str:
        """`device@speed` (or `device` when the set spans all speeds)."""
        return self.device if self.speed is None else f"{self.device}@{format_speed(self.speed)}"

    def noisy(self, snr_db: float) -> np.ndarray:
        """The fragments mixed with their noise at exactly `snr_db` (Eq. 1, gain 0 dB): (N, T) float32."""
        key = float(snr_db)
        if key not in self._noisy_cache:
            noisy, _ = mix_at_snr(torch.from_numpy(self.clean), torch.from_numpy(self.noise), key, 0.0)
            self._noisy_cache[key] = noisy.numpy()
        return self._noisy_cache[key]

    def noise_gains(self, snr_db: float) -> np.ndarray:
        """The factor `noisy(snr_db)` put on each fragment's noise (Eq. 1's α): (N,) float32.

        A noise reference recorded on the same machine at the same gain as a transfer carries its noise at
        the transfer's level; scaling the reference by these factors plays that for the fixed fragments.
        """
        return noise_gain_for_snr(torch.from_numpy(self.clean), torch.from_numpy(self.noise), float(snr_db)).numpy()


def fragment_digest(clean_files: Sequence[AudioSource], noise_snippets: Sequence[AudioSource], *, count: int,
                    seconds: float, seed: int, silence_dbfs: float = -50.0) -> str:
    """What determines a fragment set: protocol, sizes, seed and every candidate source's content."""
    identity = {
        "protocol": PROTOCOL_VERSION, "count": int(count), "seconds": float(seconds), "seed": int(seed),
        "sample_rate": MODEL_SAMPLE_RATE, "silence_dbfs": float(silence_dbfs),
        "clean": sorted(s.sha256 for s in clean_files), "noise": sorted(s.sha256 for s in noise_snippets),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def build_fragments(clean_files: Sequence[AudioSource], noise_snippets: Sequence[AudioSource], *, count: int,
                    seconds: float, seed: int, silence_dbfs: float = -50.0,
                    progress: Progress = no_progress) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Draw `count` fragments: (clean (N, T), noise (N, T), one provenance dict per fragment).

    The crops are the training data's own (`workbench.audio.crops.Crops`: length-weighted
    choice, near-silent music drawn again, short snippets looped with equal-power crossfades), driven by
    one generator seeded here, so the set is a pure function of the sources and the seed.
    """
    assert count > 0 and seconds > 0, (count, seconds)
    if not clean_files:
        raise WorkbenchError("no clean test music to build evaluation fragments from")
    if not noise_snippets:
        raise WorkbenchError("no test noise to build evaluation fragments from")
    frames = int(round(seconds * MODEL_SAMPLE_RATE))
    crops = Crops(clean_files, noise_snippets, frames, silence_dbfs)
    rng = np.random.default_rng([int(seed), PROTOCOL_VERSION])
    clean = np.zeros((count, frames), dtype=np.float32)
    noise = np.zeros((count, frames), dtype=np.float32)
    provenance = []
    for index in range(count):
        clean[index], about_clean = crops.clean_crop(rng)
        noise[index], about_noise = crops.noise_crop(rng)
        provenance.append({"index": index, "clean": about_clean, "noise": about_noise})
        progress("evaluation fragments", index + 1, count)
    return clean, noise, provenance


def fragments_dir(mixtures_dir: Path, device: str, speed: float | None, digest: str) -> Path:
    label = f"{device}@{format_speed(speed)}" if speed is not None else f"{device}@all"
    return Path(mixtures_dir) / "test" / label / digest[:16]


def _fragment_file(folder: Path, index: int) -> Path:
    return folder / f"fragment-{index:04d}.wav"


def load_fragments(folder: Path, snrs_db: Sequence[float]) -> FragmentSet:
    """A stored fragment set; its manifest is written last, so a folder without one is not a set."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise WorkbenchError(f"{folder}: not a stored fragment set (no {MANIFEST})")
    manifest = json.loads(manifest_path.read_text())
    clean, noise = [], []
    for index in range(int(manifest["count"])):
        samples, rate = read_audio(_fragment_file(folder, index))
        if rate != manifest["sample_rate"] or samples.shape != (2, manifest["frames"]):
            raise WorkbenchError(f"{_fragment_file(folder, index)}: does not match {manifest_path} "
                                 f"(expected 2 x {manifest['frames']} at {manifest['sample_rate']} Hz); delete {folder}")
        clean.append(samples[0])
        noise.append(samples[1])
    return FragmentSet(manifest["device"], manifest["speed"], tuple(float(s) for s in snrs_db),
                       np.stack(clean), np.stack(noise), manifest, folder)


def evaluation_fragments(mixtures_dir: Path, device: str, speed: float | None, clean_files: Sequence[AudioSource],
                         noise_snippets: Sequence[AudioSource], *, count: int, seconds: float, seed: int,
                         snrs_db: Sequence[float] = (10.0, 16.0), silence_dbfs: float = -50.0,
                         lineage: dict | None = None, progress: Progress = no_progress) -> FragmentSet:
    """The device's stored test fragments for these sources and settings, building them the first time.

    Several processes may build the same set at once: each writes a private folder and renames it into
    place; whoever loses the race throws its copy away and loads the winner's, so all score the same audio.
    """
    sample_rate = MODEL_SAMPLE_RATE
    digest = fragment_digest(clean_files, noise_snippets, count=count, seconds=seconds, seed=seed,
                             silence_dbfs=silence_dbfs)
    folder = fragments_dir(mixtures_dir, device, speed, digest)
    if (folder / MANIFEST).is_file():
        return load_fragments(folder, snrs_db)
    clean, noise, provenance = build_fragments(clean_files, noise_snippets, count=count, seconds=seconds,
                                               seed=seed, silence_dbfs=silence_dbfs, progress=progress)
    folder.parent.mkdir(parents=True, exist_ok=True)
    temporary = folder.with_name(f".{folder.name}.{secrets.token_hex(4)}.partial")
    temporary.mkdir()
    try:
        for index in range(count):
            write_audio(_fragment_file(temporary, index), np.stack([clean[index], noise[index]]), sample_rate,
                        subtype="FLOAT", format="WAV")
        manifest = {
            "protocol": PROTOCOL_VERSION, "digest": digest, "device": device, "speed": speed, "split": "test",
            "count": count, "seconds": seconds, "frames": int(clean.shape[1]), "sample_rate": sample_rate,
            "seed": seed, "silence_dbfs": silence_dbfs, "clean_files": sorted(f.sha256 for f in clean_files),
            "noise_snippets": sorted(s.sha256 for s in noise_snippets), "lineage": lineage or {},
            "fragments": provenance,
        }
        atomic_write_json(temporary / MANIFEST, manifest)
        try:
            os.rename(temporary, folder)
        except OSError:
            if not (folder / MANIFEST).is_file():
                raise
    finally:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)
    return load_fragments(folder, snrs_db)


# ------------------------------------------------------------------------------------------ settings

DEFAULT_EVALUATION = {
    "fragments": 100,  # the paper's protocol: 100 fragments ...
    "seconds": 10.0,  # ... of 10 s ...
    "snrs_db": [10.0, 16.0],  # ... mixed at 10 and at 16 dB SNR
    "seed": 2023,
    "batch_size": 4,  # fragments per model call
    "peaq": True,  # PEAQ ODG and ΔPEAQ per fragment (the paper's second measure); false for quick runs
    # The promotion gate: the paired ΔSNR gain over the base model and over the champion must have its 95 %
    # interval above this many dB at every input SNR.
    "min_gain_db": 0.0,
}


@dataclass(frozen=True)
class EvaluationSettings:
    fragments: int
    seconds: float
    snrs_db: tuple[float, ...]
    seed: int
    batch_size: int
    peaq: bool = True
    min_gain_db: float = 0.0


def evaluation_settings(recipe: dict) -> EvaluationSettings:
    """The recipe's [evaluation] section (defaults: the research protocol), validated."""
    source = recipe.get("source", "recipe")
    section = recipe.get("evaluation", {})
    unknown = set(section) - set(DEFAULT_EVALUATION)
    if unknown:
        raise WorkbenchError(f"{source}: unknown key [evaluation] {sorted(unknown)[0]} (known: {', '.join(DEFAULT_EVALUATION)})")
    merged = {**DEFAULT_EVALUATION, **section}
    for key in ("fragments", "seed", "batch_size"):
        value = merged[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "seed" else 1):
            raise WorkbenchError(f"{source}: [evaluation] {key} must be a {'non-negative' if key == 'seed' else 'positive'} integer (got {value!r})")
    seconds = merged["seconds"]
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not 0.5 <= seconds <= 600:
        raise WorkbenchError(f"{source}: [evaluation] seconds must be between 0.5 and 600 (got {seconds!r})")
    snrs = merged["snrs_db"]
    if (not isinstance(snrs, list) or not snrs or len(set(snrs)) != len(snrs)
            or not all(isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) for s in snrs)):
        raise WorkbenchError(f"{source}: [evaluation] snrs_db must be a list of distinct numbers like [10.0, 16.0] (got {snrs!r})")
    if not isinstance(merged["peaq"], bool):
        raise WorkbenchError(f"{source}: [evaluation] peaq must be true or false (got {merged['peaq']!r})")
    min_gain = merged["min_gain_db"]
    if not isinstance(min_gain, (int, float)) or isinstance(min_gain, bool) or not math.isfinite(min_gain) or min_gain < 0:
        raise WorkbenchError(f"{source}: [evaluation] min_gain_db must be a number of dB, 0 or more (got {min_gain!r})")
    return EvaluationSettings(merged["fragments"], float(seconds), tuple(float(s) for s in snrs), merged["seed"],
                              merged["batch_size"], peaq=merged["peaq"], min_gain_db=float(min_gain))
