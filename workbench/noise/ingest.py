"""`capture-noise`: stream blank-tape recordings into the noise library of one device and speed.

For each recording: read it block by block, resample each block to 44.1 kHz (every channel is its own
noise source), screen it (workbench.noise.screening), write the usable snippets as content-addressed
files, and collect manifest rows. Nothing is held but the current block and the screener's bounded
look-ahead, so memory does not depend on a recording's length.

Batch semantics: every file is checked (readable, long enough, device and speed known) before any
work starts, and the whole batch is committed in ONE manifest transaction at the end. So a bad file
anywhere in the batch, or one found unusable while streaming (NaN samples, a decoding error half-way,
no usable noise), refuses the whole batch and the library is left exactly as it was; so does a kill.
Re-running the same recording (same sha256, device and speed) adds nothing unless `replace`.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from workbench.audio.dsp import MODEL_SAMPLE_RATE, StreamingResampler, dbfs, resampled_length, rms, torch_threads
from workbench.audio.io import AUDIO_SUFFIXES, AudioInfo, audio_info, iter_blocks, read_ahead, sha256_file
from workbench.devices import get_device
from workbench.errors import WorkbenchError
from workbench.noise.library import ALREADY, NewSource, NoiseLibrary
from workbench.noise.profile import NoiseProfile
from workbench.noise.screening import (
    SPLITS,
    WINDOW_FRAMES,
    WINDOWS_PER_SECOND,
    CandidateSnippet,
    Exclusion,
    Screener,
    level_outliers,
)
from workbench.progress import Progress, no_progress
from workbench.workspace import Workspace

DEFAULT_SNIPPET_SECONDS = 5.0
DEFAULT_SPLIT = (80.0, 10.0, 10.0)
BLOCK_SECONDS = 10.0  # source audio read per step (a few MB per channel)
SEED_SECONDS = 10.0  # the split is seeded from this much decoded audio (plus its length and rate)


@dataclass
class FileReport:
    path: str
    sha256: str
    status: str  # ingested, replaced, already in the library, same audio as ... in this batch
    sample_rate: int
    channels: int
    seconds: float
    snippets: dict[str, int] = field(default_factory=lambda: {name: 0 for name in SPLITS})
    added: int = 0
    duplicates: int = 0  # snippets whose audio the library already held (e.g. identical channels)
    usable_seconds: float = 0.0  # summed over channels
    exclusions: list[Exclusion] = field(default_factory=list)

    def excluded_seconds(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for e in self.exclusions:
            key = e.reason.split(" (")[0]
            totals[key] = round(totals.get(key, 0.0) + e.end_s - e.start_s, 3)
        return totals

    def to_dict(self) -> dict:
        return {"path": self.path, "sha256": self.sha256, "status": self.status, "sample_rate": self.sample_rate,
                "channels": self.channels, "seconds": round(self.seconds, 3), "snippets": self.snippets,
                "added": self.added, "duplicates": self.duplicates, "usable_seconds": round(self.usable_seconds, 3),
                "excluded_seconds": self.excluded_seconds(), "exclusions": [e.to_dict() for e in self.exclusions]}


@dataclass
class IngestReport:
    device: str
    speed_ips: float
    files: list[FileReport]
    profile: NoiseProfile | None
    profile_json: Path | None
    profile_png: Path | None
    seconds_processed: float  # of source audio screened in this run
    wall_seconds: float

    def to_dict(self) -> dict:
        return {"device": self.device, "speed_ips": self.speed_ips, "files": [f.to_dict() for f in self.files],
                "profile": None if self.profile is None else profile_summary(self.profile),
                "profile_json": str(self.profile_json) if self.profile_json else None,
                "profile_png": str(self.profile_png) if self.profile_png else None,
                "seconds_processed": round(self.seconds_processed, 3), "wall_seconds": round(self.wall_seconds, 3)}


def profile_summary(profile: NoiseProfile) -> dict:
    """The profile's numbers without its spectrum: what tables and scripts show."""
    data = profile.to_dict()
    for key in ("frequencies_hz", "psd_db", "definitions"):
        data.pop(key)
    return data


def parse_split(text: str) -> tuple[float, float, float]:
    """'80/10/10' -> (80, 10, 10): three non-negative numbers, not all zero."""
    parts = text.replace(",", "/").split("/")
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 0 or sum(values) <= 0 or not all(map(math.isfinite, values)):
        raise WorkbenchError(f"split {text!r} is not TRAIN/VALIDATION/TEST, e.g. 80/10/10")
    return values  # type: ignore[return-value]


def find_recordings(paths: list[Path]) -> list[Path]:
    """The files named, plus the audio files (AUDIO_SUFFIXES) found in any folder named, each once."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES
                            and not p.name.startswith("."))
            if not inside:
                raise WorkbenchError(f"{path}: folder holds no audio files ({', '.join(sorted(AUDIO_SUFFIXES))})")
            found += inside
        elif path.exists():
            found.append(path)
        else:
            raise WorkbenchError(f"{path}: no such file or folder")
    unique: dict[Path, Path] = {}
    for path in found:
        unique.setdefault(path.resolve(), path)
    if not unique:
        raise WorkbenchError("no recordings given")
    return list(unique.values())


def _content_seed(path: Path, info: AudioInfo) -> str:
    """A seed from the audio itself, so a re-encoded copy (WAV -> FLAC) splits exactly the same way.

    Integer PCM is hashed as integers: libsndfile's float conversion differs between containers in the
    last bit, its integers do not."""
    import soundfile

    digest = hashlib.sha256(f"{info.sample_rate}:{info.channels}:{info.frames}:".encode())
    dtype = "int32" if info.subtype.startswith("PCM") else "float32"
    try:
        first, _ = soundfile.read(str(path), frames=min(info.frames, int(SEED_SECONDS * info.sample_rate)),
                                  dtype=dtype, always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError) as error:
        raise WorkbenchError(f"{path}: not readable audio ({' '.join(str(error).split())})") from None
    digest.update(np.ascontiguousarray(first, dtype="<" + first.dtype.str[1:]).tobytes())
    return digest.hexdigest()


@dataclass
class _Pending:
    path: Path
    info: AudioInfo
    sha256: str
    report: FileReport


def capture_noise(workspace: Workspace, paths: list[Path], device_id: str, speed_ips: float, tape: str | None = None,
                  notes: str = "", snippet_seconds: float = DEFAULT_SNIPPET_SECONDS,
                  split: tuple[float, float, float] = DEFAULT_SPLIT, replace: bool = False,
                  progress: Progress = no_progress) -> IngestReport:
    """Ingest blank-tape recordings of `device_id` at `speed_ips` into the workspace's noise library,
    then recompute the device and speed's noise profile. See the module docstring for the guarantees."""
    started = time.perf_counter()
    device = get_device(workspace, device_id)
    speed = device.check_speed(speed_ips)
    if not (math.isfinite(snippet_seconds) and snippet_seconds * WINDOWS_PER_SECOND >= 1):
        raise WorkbenchError(f"snippet length {snippet_seconds} s is too short (at least {1 / WINDOWS_PER_SECOND} s)")
    assert len(split) == 3 and min(split) >= 0 and sum(split) > 0, split
    library = NoiseLibrary(workspace)
    snippet_windows = int(round(snippet_seconds * WINDOWS_PER_SECOND))

    # 1. Check every file before doing anything.
    pending: list[_Pending] = []
    reports: list[FileReport] = []
    seen: dict[str, Path] = {}
    recordings = find_recordings(paths)
    for number, path in enumerate(recordings):
        info = audio_info(path)
        windows = resampled_length(info.frames, info.sample_rate, MODEL_SAMPLE_RATE) // WINDOW_FRAMES
        if windows < snippet_windows:
            raise WorkbenchError(f"{path}: {info.seconds:.2f} s is too short for one {snippet_seconds:g} s snippet")
        progress("checking recordings", number, len(recordings))
        sha256 = sha256_file(path)
        report = FileReport(str(path), sha256, "", info.sample_rate, info.channels, info.seconds)
        reports.append(report)
        if sha256 in seen:
            report.status = f"same audio as {seen[sha256]} in this batch"
            continue
        seen[sha256] = path
        existing = library.ingested(sha256, device.id, speed)
        if existing is not None and not replace:
            report.status = ALREADY
            report.exclusions = [Exclusion(**e) for e in library.exclusions(sha256, device.id, speed)]
            for name, (count, frames) in library.source_counts(sha256, device.id, speed).items():
                report.snippets[name] = count
                report.usable_seconds += frames / MODEL_SAMPLE_RATE
            continue
        pending.append(_Pending(path, info, sha256, report))
    progress("checking recordings", len(recordings), len(recordings))

    # 2. Stream each file: screen, cut, write snippet files (invisible until committed).
    new_sources: list[NewSource] = []
    created: list[str] = []  # snippet files this run wrote: removed again if it fails before committing
    seconds_processed = 0.0
    try:
        for item in pending:
            with torch_threads(1):
                new_sources.append(_ingest_file(library, item, device.id, speed, tape, notes, snippet_seconds,
                                                split, progress, seconds_processed, started, created))
            seconds_processed += item.info.seconds
        # 3. One transaction for the whole batch.
        if new_sources:
            stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
            outcome = library.commit(new_sources, replace=replace, ingested_at=stamp)
    except BaseException:
        library.discard_unreferenced(created)
        raise
    for item in pending:
        result = outcome[item.sha256]
        item.report.status = result["status"]
        item.report.added, item.report.duplicates = result["added"], result["duplicates"]
    if new_sources:
        library.collect_garbage()  # orphans of killed ingests, once old enough

    # 4. The device and speed's profile over all its snippets.
    with torch_threads(1):
        if any(p.report.added or p.report.status == "replaced" for p in pending):
            profile = library.update_profile(device.id, speed, progress=progress)
        else:
            profile = library.profile(device.id, speed)
    json_path, png_path = library.profile_paths(device.id, speed)
    return IngestReport(device.id, speed, reports, profile, json_path if profile else None,
                        png_path if profile else None, seconds_processed, time.perf_counter() - started)


def _decoded(path: Path, block_frames: int, resampler: StreamingResampler):
    """(source block, its 44.1 kHz resampling) per block, then (None, the resampler's tail)."""
    for block in iter_blocks(path, block_frames):
        yield block, resampler.push(block)
    yield None, resampler.flush()


def _ingest_file(library: NoiseLibrary, item: _Pending, device: str, speed: float, tape: str | None, notes: str,
                 snippet_seconds: float, split: tuple[float, float, float], progress: Progress,
                 seconds_before: float, started: float, created: list[str]) -> NewSource:
    path, info, report = item.path, item.info, item.report
    seed = _content_seed(path, info)
    screener = Screener(str(path), info.sample_rate, info.channels, info.frames, snippet_seconds, split, seed,
                        check_finite=not info.subtype.startswith("PCM"))
    resampler = StreamingResampler(info.sample_rate, MODEL_SAMPLE_RATE, info.channels)
    rows: list[dict] = []

    def keep(candidates: list[CandidateSnippet]) -> None:
        for candidate in candidates:
            sha256, file, new = library.store_snippet(candidate.samples)
            if new:
                created.append(file)
            rows.append({
                "sha256": sha256, "file": file, "channel": candidate.channel, "split": candidate.split,
                "start_sample": candidate.start, "end_sample": candidate.end,
                "source_start_sample": candidate.start * info.sample_rate // MODEL_SAMPLE_RATE,
                "source_end_sample": -(-candidate.end * info.sample_rate // MODEL_SAMPLE_RATE),
                "frames": int(candidate.samples.shape[0]), "rms_dbfs": round(dbfs(rms(candidate.samples)), 3)})

    read = 0
    block_frames = max(WINDOW_FRAMES, int(BLOCK_SECONDS * info.sample_rate))
    stage = f"ingest {path.name}"
    for block, resampled in read_ahead(_decoded(path, block_frames, resampler)):
        if block is not None:
            screener.push_source(block)
            read += block.shape[1]
        keep(screener.push_stream(resampled))
        elapsed = max(time.perf_counter() - started, 1e-9)
        progress(stage, round(read / info.sample_rate), round(info.seconds),
                 x_realtime=round((seconds_before + read / info.sample_rate) / elapsed))
    keep(screener.finish())
    exclusions = list(screener.exclusions)

    # What is left after the tape ran out (or before it started) is not this tape's noise: drop the
    # snippets far from each channel's typical level.
    kept: list[dict] = []
    for channel in range(info.channels):
        channel_rows = [r for r in rows if r["channel"] == channel]
        levels = [r["rms_dbfs"] for r in channel_rows]
        median = float(np.median(levels)) if levels else 0.0
        for row, outlier in zip(channel_rows, level_outliers(levels)):
            if outlier:
                exclusions.append(Exclusion(channel, row["start_sample"] / MODEL_SAMPLE_RATE,
                                            row["end_sample"] / MODEL_SAMPLE_RATE,
                                            f"level {row['rms_dbfs'] - median:+.1f} dB off the channel's typical "
                                            "noise (tape ran out?)"))
            else:
                kept.append(row)
    exclusions.sort(key=lambda e: (e.channel, e.start_s))
    report.exclusions = exclusions
    if not kept:
        excluded = ", ".join(f"{reason} {seconds:.1f} s" for reason, seconds in report.excluded_seconds().items())
        raise WorkbenchError(f"{path}: no usable noise for one {snippet_seconds:g} s snippet"
                             + (f" (excluded: {excluded})" if excluded else ""))
    for row in kept:
        report.snippets[row["split"]] += 1
    report.usable_seconds = sum(r["frames"] for r in kept) / MODEL_SAMPLE_RATE
    return NewSource(device=device, speed_ips=speed, sha256=item.sha256, path=str(path.resolve()), tape=tape,
                     notes=notes, sample_rate=info.sample_rate, channels=info.channels, frames=info.frames,
                     format=info.format, subtype=info.subtype, split_seed=seed, snippet_seconds=snippet_seconds,
                     usable_seconds=report.usable_seconds, snippets=kept,
                     exclusions=[e.to_dict() for e in exclusions])


