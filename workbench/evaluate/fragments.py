"""The research's test protocol as data: fixed fragments of held-out clean music and a device's test noise.

A fragment is a 10 s stretch of clean test music and an equally long stretch of the device's test
noise, chosen by seed. Both are stored (float32 WAV, two channels: clean, noise) under
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
import shutil
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from workbench.audio.dsp import MODEL_SAMPLE_RATE, dbfs, resample, rms
from workbench.audio.io import atomic_write_json, audio_info, read_audio, write_audio
from workbench.devices import format_speed
from workbench.errors import WorkbenchError
from workbench.progress import Progress, no_progress

PROTOCOL_VERSION = 1
# A clean window quieter than this is a pause between pieces, not music: draw another one.
MIN_CLEAN_DBFS = -45.0
# Equal-power crossfade between noise snippets (uncorrelated noise keeps its level through the join).
NOISE_CROSSFADE = 2048
MAX_DRAWS_PER_FRAGMENT = 50
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Source:
    """One candidate recording: a stable id (a content digest where there is one) and where it is."""

    id: str
    path: Path


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
            import torch

            from workbench.train.mixing import mix_at_snr

            noisy, _ = mix_at_snr(torch.from_numpy(self.clean), torch.from_numpy(self.noise), key, 0.0)
            self._noisy_cache[key] = noisy.numpy()
        return self._noisy_cache[key]


def fragment_digest(clean_sources: Sequence[Source], noise_sources: Sequence[Source], *, count: int,
                    seconds: float, seed: int, sample_rate: int = MODEL_SAMPLE_RATE) -> str:
    """What determines a fragment set: protocol, sizes, seed and every candidate source (order-free)."""
    identity = {
        "protocol": PROTOCOL_VERSION, "count": int(count), "seconds": float(seconds), "seed": int(seed),
        "sample_rate": int(sample_rate),
        "clean": sorted(s.id for s in clean_sources), "noise": sorted(s.id for s in noise_sources),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _read_window(path: Path, start: int, frames: int) -> np.ndarray:
    """Frames [start, start+frames) of a file as float32 (channels, frames), reading only that window."""
    import soundfile as sf

    with sf.SoundFile(str(path)) as handle:
        handle.seek(start)
        block = handle.read(frames, dtype="float32", always_2d=True)
    if block.shape[0] != frames:
        raise WorkbenchError(f"{path}: ended early reading frames {start}..{start + frames} (truncated file?)")
    return block.T


def _draw_clean(rng: np.random.Generator, sources: Sequence[Source], frames: int, sample_rate: int) -> tuple[np.ndarray, dict]:
    """A random mono window of `frames` samples at `sample_rate` from a clean recording long enough for it."""
    infos = [audio_info(s.path) for s in sources]
    usable = [(s, i) for s, i in zip(sources, infos) if i.seconds * sample_rate >= frames + 1]
    if not usable:
        raise WorkbenchError(f"no clean test recording is at least {frames / sample_rate:g} s long "
                             f"(have {len(sources)}: {', '.join(str(s.path) for s in sources[:3])}...)")
    # Weight by length so every second of test music is equally likely to be heard.
    weights = np.array([i.frames / i.sample_rate for _, i in usable], dtype=np.float64)
    weights /= weights.sum()
    for _ in range(MAX_DRAWS_PER_FRAGMENT):
        source, info = usable[int(rng.choice(len(usable), p=weights))]
        # Read enough source frames that resampling yields `frames`, plus a margin for the sinc kernel.
        need = math.ceil(frames * info.sample_rate / sample_rate) + (64 if info.sample_rate != sample_rate else 0)
        if need > info.frames:
            continue
        start = int(rng.integers(0, info.frames - need + 1))
        window = _read_window(source.path, start, need).mean(axis=0)
        window = resample(window, info.sample_rate, sample_rate)[:frames].astype(np.float32)
        if window.shape[0] < frames:
            continue
        level = dbfs(rms(window))
        if level >= MIN_CLEAN_DBFS:
            return window, {"clean_id": source.id, "clean_path": str(source.path),
                            "clean_start_s": start / info.sample_rate, "clean_rms_dbfs": round(level, 2)}
    raise WorkbenchError(f"could not find {frames / sample_rate:g} s of clean test music louder than "
                         f"{MIN_CLEAN_DBFS:g} dBFS in {MAX_DRAWS_PER_FRAGMENT} draws")


def _draw_noise(rng: np.random.Generator, snippets: dict[str, np.ndarray], frames: int) -> tuple[np.ndarray, list[dict]]:
    """`frames` samples of noise: randomly chosen snippets (random start in the first) joined by
    equal-power crossfades, so a 10 s fragment can be built from 5 s snippets."""
    ids = sorted(snippets)
    fade = np.linspace(0.0, np.pi / 2, NOISE_CROSSFADE, dtype=np.float64)
    fade_in, fade_out = np.sin(fade), np.cos(fade)
    out = np.zeros(0, dtype=np.float64)
    parts: list[dict] = []
    while out.shape[0] < frames:
        snippet_id = ids[int(rng.integers(len(ids)))]
        audio = snippets[snippet_id]
        start = int(rng.integers(0, max(1, audio.shape[0] - NOISE_CROSSFADE))) if not parts else 0
        piece = audio[start:].astype(np.float64)
        if piece.shape[0] <= 2 * NOISE_CROSSFADE:
            continue
        if out.shape[0] == 0:
            out = piece
        else:
            joined = out[-NOISE_CROSSFADE:] * fade_out + piece[:NOISE_CROSSFADE] * fade_in
            out = np.concatenate([out[:-NOISE_CROSSFADE], joined, piece[NOISE_CROSSFADE:]])
        parts.append({"digest": snippet_id, "start": start})
    return out[:frames].astype(np.float32), parts


def _load_snippets(sources: Sequence[Source], sample_rate: int) -> dict[str, np.ndarray]:
    """Noise snippets as mono float32 arrays at `sample_rate`; each channel of a file is its own snippet."""
    snippets: dict[str, np.ndarray] = {}
    for source in sources:
        samples, rate = read_audio(source.path)
        samples = resample(samples, rate, sample_rate)
        for channel in range(samples.shape[0]):
            key = source.id if samples.shape[0] == 1 else f"{source.id}:{channel}"
            if samples.shape[1] > 2 * NOISE_CROSSFADE and float(np.abs(samples[channel]).max()) > 0:
                snippets[key] = samples[channel]
    return snippets


def build_fragments(clean_sources: Sequence[Source], noise_sources: Sequence[Source], *, count: int,
                    seconds: float, seed: int, sample_rate: int = MODEL_SAMPLE_RATE,
                    progress: Progress = no_progress) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Draw `count` fragments: (clean (N, T), noise (N, T), one provenance dict per fragment)."""
    assert count > 0 and seconds > 0, (count, seconds)
    if not clean_sources:
        raise WorkbenchError("no clean test music to build evaluation fragments from")
    if not noise_sources:
        raise WorkbenchError("no test noise to build evaluation fragments from")
    frames = int(round(seconds * sample_rate))
    rng = np.random.default_rng(seed)
    snippets = _load_snippets(noise_sources, sample_rate)
    if not snippets:
        raise WorkbenchError(f"the {len(noise_sources)} test noise snippets are all silent or too short")
    clean = np.zeros((count, frames), dtype=np.float32)
    noise = np.zeros((count, frames), dtype=np.float32)
    provenance = []
    for index in range(count):
        clean[index], about_clean = _draw_clean(rng, clean_sources, frames, sample_rate)
        noise[index], noise_parts = _draw_noise(rng, snippets, frames)
        provenance.append({"index": index, **about_clean, "noise": noise_parts})
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


def evaluation_fragments(mixtures_dir: Path, device: str, speed: float | None, clean_sources: Sequence[Source],
                   noise_sources: Sequence[Source], *, count: int, seconds: float, seed: int,
                   snrs_db: Sequence[float] = (10.0, 16.0), lineage: dict | None = None,
                   progress: Progress = no_progress) -> FragmentSet:
    """The device's stored test fragments for these sources and settings, building them the first time.

    Several processes may build the same set at once: each writes a private folder and renames it into
    place; whoever loses the race throws its copy away and loads the winner's, so all score the same audio.
    """
    sample_rate = MODEL_SAMPLE_RATE
    digest = fragment_digest(clean_sources, noise_sources, count=count, seconds=seconds, seed=seed,
                             sample_rate=sample_rate)
    folder = fragments_dir(mixtures_dir, device, speed, digest)
    if (folder / MANIFEST).is_file():
        return load_fragments(folder, snrs_db)
    clean, noise, provenance = build_fragments(clean_sources, noise_sources, count=count, seconds=seconds,
                                               seed=seed, sample_rate=sample_rate, progress=progress)
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
            "seed": seed, "clean_sources": len(clean_sources), "noise_sources": len(noise_sources),
            "noise_digests": sorted(s.id for s in noise_sources), "lineage": lineage or {},
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
