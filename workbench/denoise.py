"""Long-file inference: restore hours-long transfers with a denoising model, block by block from disk.

The path of one file, all of it streaming so memory does not grow with the recording's length:

    input (any rate, C channels) ──StreamingResampler──▶ 44.1 kHz ──OverlapAdd(removed noise)──▶
    noise estimate at 44.1 kHz ──StreamingResampler──▶ input rate ──▶ output = input − strength · noise

A device model with its machine's hum template (`workbench.audio.hum`) cancels the hum first, and the
noise estimate is that hum plus what the network removes from the rest (`HumFirst`).

The model only ever sees 44.1 kHz, but it is the *noise it removes* that travels back to the input's rate
and is subtracted from the original samples. So `strength 0` returns the input bit for bit, every
sample stays where it was (the output has exactly the input's frame count, trimmed by the exact count
after the two resamplings), and whatever lies above 22.05 kHz in a 96 kHz transfer, which the model
never saw, passes through untouched instead of being low-passed away.

Chunking, crossfades and the model as a chunk process are `workbench.model.overlap_add`'s; this module
streams files through them.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import platform
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio

from workbench import __version__
from workbench.audio.dsp import MODEL_SAMPLE_RATE, StreamingResampler, resampled_length
from workbench.audio.hum import HumCanceller, HumTemplate
from workbench.audio.io import (
    AUDIO_SUFFIXES,
    atomic_audio_writer,
    atomic_write_json,
    audio_info,
    check_finite,
    exact_dtype,
    format_for,
    iter_blocks,
    read_json_object,
    same_file,
    sha256_file,
)
from workbench.errors import WorkbenchError
from workbench.model.overlap_add import (
    DEFAULT_CHUNK_SECONDS,
    ChunkPlan,
    OverlapAdd,
    Process,
    chunk_batch,
    model_grid_frames,
    model_process,
)
from workbench.model_registry.resolve import load_device_model, load_model
from workbench.progress import Progress, no_progress
from workbench.recipes import PRECISIONS
from workbench.workspace import Workspace

OUTPUT_TAG = "denoised"
SIDECAR_SCHEMA = "workbench.denoise/1"
WAV_LIMIT_BYTES = 4 * 1024**3 - 1024  # a RIFF WAV's 32-bit sizes (minus header room)
SUFFIX_FOR_FORMAT = {"WAV": ".wav", "RF64": ".rf64", "W64": ".w64", "FLAC": ".flac", "AIFF": ".aiff"}
_BYTES_PER_SAMPLE = {"PCM_U8": 1, "PCM_S8": 1, "PCM_16": 2, "PCM_24": 3, "PCM_32": 4, "FLOAT": 4, "DOUBLE": 8}


# ---------------------------------------------------------------------------------------------------
# The noise a process removes


def removed_by(process: Process) -> Process:
    """The noise `process` takes away from a chunk (chunk − processed): overlap-add is linear, so
    overlap-adding this equals the input minus the overlap-added denoised signal."""
    def removed(chunk: torch.Tensor) -> torch.Tensor:
        return chunk - process(chunk).to(chunk.device, chunk.dtype)
    return removed


class HumFirst:
    """What a device model removes, streamed at the model's rate: its machine's hum (`HumCanceller`), then
    what the chunked network (`OverlapAdd` of `removed_by`) takes from the rest. Same push/flush as
    `OverlapAdd`; the two removals are summed frame by frame, so strength scales them together."""

    def __init__(self, canceller: HumCanceller, chunker: OverlapAdd):
        self.canceller, self.chunker = canceller, chunker
        channels = canceller.channels
        self.signal = np.zeros((channels, 0), np.float32)  # input the canceller has not returned yet
        self.hum = np.zeros((channels, 0), np.float32)  # hum cancelled, not yet matched by the network's output

    @property
    def chunks(self) -> int:
        return self.chunker.chunks

    def push(self, block: np.ndarray) -> np.ndarray:
        self.signal = np.concatenate([self.signal, block], axis=1)
        return self._with_hum(self.chunker.push(self._cancelled(self.canceller.push(block))))

    def flush(self) -> np.ndarray:
        last = self._with_hum(self.chunker.push(self._cancelled(self.canceller.flush())))
        out = np.concatenate([last, self._with_hum(self.chunker.flush())], axis=1)
        assert self.signal.shape[1] == 0 and self.hum.shape[1] == 0, "every frame's hum went out with it"
        return out

    def _cancelled(self, cancelled: np.ndarray) -> np.ndarray:
        frames = cancelled.shape[1]
        self.hum = np.concatenate([self.hum, self.signal[:, :frames] - cancelled], axis=1)
        self.signal = self.signal[:, frames:]
        return cancelled

    def _with_hum(self, removed: np.ndarray) -> np.ndarray:
        frames = removed.shape[1]
        out = self.hum[:, :frames] + removed
        self.hum = self.hum[:, frames:]
        return out


# ---------------------------------------------------------------------------------------------------
# Strength


def strength_from_reduction_db(reduction_db: float) -> float:
    """The strength that lowers what the model identifies as noise by `reduction_db` dB (∞ -> 1)."""
    if not reduction_db >= 0:
        raise WorkbenchError(f"noise reduction {reduction_db} dB: must be 0 dB or more")
    return 1.0 - 10.0 ** (-reduction_db / 20.0)


def check_strength(strength: float) -> float:
    if not 0.0 <= strength <= 1.0:
        raise WorkbenchError(f"strength {strength}: must be between 0 (leave the input as it is) and 1 (remove all)")
    return float(strength)


# ---------------------------------------------------------------------------------------------------
# One file, streamed


@dataclass
class StreamResult:
    frames: int
    sample_rate: int
    channels: int
    seconds: float
    wall_seconds: float
    clipped_samples: int
    chunks: int

    @property
    def real_time_factor(self) -> float:
        """Seconds of audio restored per second of wall time (higher is faster)."""
        return self.seconds / self.wall_seconds if self.wall_seconds > 0 else math.inf


def _clip_limits(subtype: str) -> tuple[float, float] | None:
    """The float range an integer PCM subtype can hold (libsndfile would wrap beyond it), or None."""
    bits = {"PCM_S8": 8, "PCM_U8": 8, "PCM_16": 16, "PCM_24": 24, "PCM_32": 32}.get(subtype.upper())
    return None if bits is None else (-1.0, 1.0 - 2.0 ** (1 - bits))


def denoise_stream(process: Process, input_path: Path, output_path: Path, *, strength: float = 1.0,
                   plan: ChunkPlan | None = None, subtype: str | None = None, format: str | None = None,
                   block_seconds: float = 4.0, progress: Progress = no_progress,
                   stage: str | None = None, batch: int = 1, hum_template: HumTemplate | None = None) -> StreamResult:
    """Denoise one file into `output_path` (atomically), streaming: memory does not grow with its length.

    `process` maps 44.1 kHz chunks (channels, n) to their denoised version; a device model's
    `hum_template` is cancelled before it (`HumFirst`). The output keeps the input's sample rate,
    channels and exact frame count, and its format/subtype unless given.
    """
    strength = check_strength(strength)
    plan = plan or ChunkPlan.from_seconds()
    info = audio_info(input_path)
    subtype = subtype or info.subtype
    format = format or format_for(output_path)
    channels, rate, total = info.channels, info.sample_rate, info.frames
    stage = stage or f"denoise {Path(input_path).name}"

    to_model = StreamingResampler(rate, MODEL_SAMPLE_RATE, channels)
    chunker = OverlapAdd(removed_by(process), channels, plan, batch=batch)  # `batch` chunks per process call
    if hum_template is not None:
        chunker = HumFirst(HumCanceller(hum_template, channels), chunker)
    to_input = StreamingResampler(MODEL_SAMPLE_RATE, rate, channels)
    assert resampled_length(resampled_length(total, rate, MODEL_SAMPLE_RATE), MODEL_SAMPLE_RATE, rate) >= total
    # Original samples wait here until the noise estimate for them comes back (bounded by the latency).
    waiting: list[np.ndarray] = []
    waiting_frames = 0
    written = 0
    clipped = 0
    limits = _clip_limits(subtype)
    started = time.perf_counter()

    def write(handle: sf.SoundFile, noise: np.ndarray) -> None:
        nonlocal waiting, waiting_frames, written, clipped
        noise = noise[:, : total - written]  # the round trip may give a frame or two more: drop exactly those
        count = noise.shape[1]
        if count == 0:
            return
        original = np.concatenate(waiting, axis=1) if len(waiting) > 1 else waiting[0]
        assert original.shape[1] >= count, "a noise estimate never runs ahead of the input it came from"
        out = original[:, :count] - np.float32(strength) * noise if strength else original[:, :count].copy()
        waiting, waiting_frames = [original[:, count:]], waiting_frames - count
        # The input was checked as it was read, so a NaN or inf here came from the model: refuse the file
        # (the partial output is removed) rather than hand an archive a silently broken restoration.
        check_finite(out, input_path, rate, written, what="the model (a damaged checkpoint?) outputs NaN or inf")
        if limits is not None:
            outside = (out < limits[0]) | (out > limits[1])
            clipped += int(np.count_nonzero(outside))
            np.clip(out, limits[0], limits[1], out=out)
        handle.write(out.T)
        written += count

    block_frames = max(1, round(block_seconds * rate))
    with atomic_audio_writer(output_path, rate, channels, subtype=subtype, format=format) as handle:
        # The original samples are kept exactly (float64 for PCM_32 and DOUBLE), so strength 0 returns them
        # bit for bit; the model and the resamplers work in float32 on a copy.
        for block in iter_blocks(input_path, block_frames, dtype=exact_dtype(info.subtype)):
            waiting.append(block)
            waiting_frames += block.shape[1]
            write(handle, to_input.push(chunker.push(to_model.push(block))))
            elapsed = time.perf_counter() - started
            progress(stage, round(written / rate, 1), round(total / rate, 1),
                     rtf=round(written / rate / elapsed, 2) if elapsed > 0 else 0.0)
        tail = chunker.push(to_model.flush())
        write(handle, to_input.push(np.concatenate([tail, chunker.flush()], axis=1)))
        write(handle, to_input.flush())
        assert written == total, f"wrote {written} of {total} frames"
        assert waiting_frames == 0
    wall = time.perf_counter() - started
    progress(stage, round(total / rate, 1), round(total / rate, 1), rtf=round(total / rate / wall, 2))
    return StreamResult(frames=written, sample_rate=rate, channels=channels, seconds=total / rate,
                        wall_seconds=wall, clipped_samples=clipped, chunks=chunker.chunks)


# ---------------------------------------------------------------------------------------------------
# The model: how a chunk goes through it (where it comes from: workbench.model_registry.resolve)


def choose_accelerator(accelerator: str = "auto") -> torch.device:
    """The torch device: `auto` is CUDA when torch sees a GPU, else the CPU; or cpu, cuda, cuda:N."""
    if accelerator == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", accelerator):
        raise WorkbenchError(f"--accelerator {accelerator!r}: choose auto, cpu, cuda or cuda:N")
    if accelerator.startswith("cuda") and not torch.cuda.is_available():
        raise WorkbenchError(f"--accelerator {accelerator}: torch sees no CUDA device here (use cpu or auto)")
    return torch.device(accelerator)


def inference_bf16(precision: str, device: torch.device) -> bool:
    """Whether the network runs under bf16 autocast: `auto` on CUDA only, so that a CPU gives the float32
    outputs every figure in the README was measured with; `bf16` on a CPU with AMX made paper-size `denoise`
    2.1x and 2.7x faster in two runs on 2 cores, its output 1.2 % RMS from float32's (benchmarks/denoise.py
    --bf16)."""
    if precision not in PRECISIONS:
        raise WorkbenchError(f"--precision {precision!r}: choose {', '.join(PRECISIONS)}")
    return device.type == "cuda" if precision == "auto" else precision == "bf16"


def compute_facts(device: torch.device, bf16: bool = False) -> dict:
    facts = {"device": device.type, "threads": torch.get_num_threads(), "autocast": "bfloat16" if bf16 else None}
    if device.type == "cuda":
        facts.update(name=torch.cuda.get_device_name(device), stft="float32")
    else:
        facts.update(name=platform.processor() or platform.machine())
    return facts


# ---------------------------------------------------------------------------------------------------
# Many files: outputs planned and checked before anything is written


@dataclass(frozen=True)
class Job:
    input: Path
    output: Path
    format: str
    subtype: str
    info: object  # AudioInfo of the input
    done_before: bool = False  # output and sidecar exist (an earlier run, perhaps killed later): skip if the same

    @property
    def sidecar(self) -> Path:
        return sidecar_path(self.output)


def sidecar_path(output: Path) -> Path:
    """The provenance JSON beside an output: `take.denoised.wav` -> `take.denoised.wav.json`."""
    return Path(output).with_name(Path(output).name + ".json")


def default_output(input_path: Path, out_dir: Path, format: str | None = None) -> Path:
    input_path = Path(input_path)
    suffix = SUFFIX_FOR_FORMAT[format] if format else input_path.suffix
    return Path(out_dir) / f"{input_path.stem}.{OUTPUT_TAG}{suffix}"


def _normalise_format(format: str | None) -> str | None:
    if format is None:
        return None
    upper = format.upper().lstrip(".")
    upper = {"WAVE": "WAV", "AIF": "AIFF", "BWF": "WAV"}.get(upper, upper)
    if upper not in SUFFIX_FOR_FORMAT:
        raise WorkbenchError(f"format {format!r}: choose one of {', '.join(SUFFIX_FOR_FORMAT)}")
    return upper


def find_inputs(paths: Iterable[Path], out_dir: Path) -> list[tuple[Path, Path]]:
    """Each input file with the subfolder its output goes to: files named go straight into `out_dir`;
    a folder named contributes every audio file below it (AUDIO_SUFFIXES, not hidden, not inside
    `out_dir`), whose outputs keep their place relative to that folder."""
    found: list[tuple[Path, Path]] = []
    out_resolved = Path(out_dir).resolve()
    for path in map(Path, paths):
        if not path.is_dir():
            found.append((path, Path(".")))
            continue
        inside = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES
                        and not p.name.startswith(".") and not p.resolve().is_relative_to(out_resolved))
        if not inside:
            raise WorkbenchError(f"{path}: folder holds no audio files ({', '.join(sorted(AUDIO_SUFFIXES))})")
        found += [(p, p.parent.relative_to(path)) for p in inside]
    if not found:
        raise WorkbenchError("no input files given")
    return found


def plan_jobs(inputs: Iterable[Path], *, out_dir: Path = Path("denoised"), output: Path | None = None,
              format: str | None = None, subtype: str | None = None, overwrite: bool = False) -> list[Job]:
    """Check every input and output before any work starts; raise one line for the first problem.

    Refuses: unreadable inputs, an output that is an input (source recordings are never written),
    two inputs writing one output, an existing output (unless `overwrite`), a subtype the format
    cannot hold, a WAV/AIFF output past its 4 GiB limit.
    """
    found = find_inputs(inputs, out_dir)
    inputs = [path for path, _ in found]
    if output is not None and len(inputs) != 1:
        raise WorkbenchError(f"{output}: --output names one file, but {len(inputs)} inputs were given (use --out DIR)")
    format = _normalise_format(format)
    jobs: list[Job] = []
    for input_path, subfolder in found:
        info = audio_info(input_path)
        target = Path(output) if output is not None else default_output(input_path, Path(out_dir) / subfolder, format)
        # The input's own container unless told otherwise (an RF64 named .wav stays RF64).
        same_suffix = target.suffix.lower() == input_path.suffix.lower()
        job_format = format or (info.format if same_suffix else format_for(target))
        job_subtype = (subtype or info.subtype).upper()
        if not sf.check_format(job_format, job_subtype):
            raise WorkbenchError(f"{target}: {job_format} cannot hold {job_subtype} samples "
                                 f"(choose --subtype from {', '.join(sf.available_subtypes(job_format))})")
        for other in inputs:
            for path in (target, sidecar_path(target)):
                if same_file(path, other):
                    raise WorkbenchError(f"{path}: is an input; refusing to write over a source recording")
        for earlier in jobs:
            if same_file(earlier.output, target):
                raise WorkbenchError(f"{target}: both {earlier.input} and {input_path} would be written there")
        done_before = not overwrite and target.is_file() and sidecar_path(target).is_file()
        if not overwrite and not done_before and (target.exists() or sidecar_path(target).exists()):
            raise WorkbenchError(f"{target}: already exists (pass --overwrite to replace it)")
        size = info.frames * info.channels * _BYTES_PER_SAMPLE.get(job_subtype, 4)
        if job_format in ("WAV", "AIFF") and size > WAV_LIMIT_BYTES:
            raise WorkbenchError(f"{target}: {size / 1024**3:.1f} GiB is past {job_format}'s 4 GiB limit "
                                 "(use --format RF64, W64 or FLAC)")
        jobs.append(Job(input_path, target, job_format, job_subtype, info, done_before))
    return jobs


def _earlier_restoration(job: Job, model_record: dict, settings: dict) -> dict | None:
    """The sidecar record of an output an earlier run finished from this very input with this model and
    these settings (a rerun after a kill skips it), or None when there is none; any other existing output
    is refused unless --overwrite."""
    if not job.done_before:
        return None
    record = read_json_object(job.sidecar, "provenance record")
    same = (record.get("input", {}).get("sha256") == sha256_file(job.input)
            and record.get("output", {}).get("sha256") == sha256_file(job.output)
            and record.get("model", {}).get("checkpoint_sha256") == model_record["checkpoint_sha256"]
            and record.get("settings") == json.loads(json.dumps(settings)))
    if not same:
        raise WorkbenchError(f"{job.output}: already exists, restored from another input, model or settings "
                             "(pass --overwrite to replace it)")
    return record


# ---------------------------------------------------------------------------------------------------
# The command's one library call


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def software_versions() -> dict:
    return {"workbench": __version__, "torch": torch.__version__, "torchaudio": torchaudio.__version__,
            "numpy": np.__version__, "soundfile": sf.__version__, "libsndfile": sf.__libsndfile_version__,
            "python": platform.python_version()}


def settings_record(strength: float, plan: ChunkPlan) -> dict:
    removed = 1.0 - strength
    return {
        "strength": strength,
        "reduction_db": None if removed <= 0 else round(-20.0 * math.log10(removed), 3),
        "method": "output = input − strength × (noise the model removed at 44.1 kHz, resampled to the input rate)",
        "model_sample_rate": MODEL_SAMPLE_RATE,
        "chunking": plan.to_dict(),
    }


def denoise_files(inputs: Iterable[Path], *, model_ref: str | Path | None = None, device_id: str | None = None,
                  out_dir: Path = Path("denoised"), output: Path | None = None, strength: float = 1.0,
                  chunk_seconds: float = DEFAULT_CHUNK_SECONDS, format: str | None = None,
                  subtype: str | None = None, accelerator: str = "auto", overwrite: bool = False,
                  batch: int | None = None, precision: str = "auto", workspace: Workspace | None = None,
                  progress: Progress = no_progress) -> list[dict]:
    """Restore transfers with a model; returns each output's provenance record (also its sidecar JSON).

    Give exactly one of `model_ref` (checkpoint file or MLflow URI) and `device_id` (that replay
    machine's champion), both looked up in `workspace`'s registry (default: the current workspace; a
    checkpoint file needs none). Every input and output is checked, and the model loaded, before the first
    file is written. `batch` chunks go through the network per call (default: what the memory budget
    allows, see `chunk_batch`); the output does not depend on it. `precision`: see `inference_bf16`.
    """
    assert (model_ref is None) != (device_id is None), "give exactly one of model_ref and device_id"
    strength = check_strength(strength)
    if batch is not None and batch < 1:
        raise WorkbenchError(f"batch {batch}: must be at least 1 chunk per forward call")
    jobs = plan_jobs(inputs, out_dir=out_dir, output=output, format=format, subtype=subtype, overwrite=overwrite)
    device = choose_accelerator(accelerator)
    bf16 = inference_bf16(precision, device)
    model, model_record = (load_model(model_ref, device, workspace) if model_ref is not None
                           else load_device_model(device_id, device, workspace))
    plan = ChunkPlan.from_seconds(chunk_seconds, grid_frames=model_grid_frames(model))
    process = model_process(model, device, bf16)
    earlier = {job.output: _earlier_restoration(job, model_record, settings_record(strength, plan)) for job in jobs}
    created = _missing_folders(job.output.parent for job in jobs)
    records = []
    try:
        for number, job in enumerate(jobs, start=1):
            if earlier[job.output] is not None:
                records.append(earlier[job.output])
                continue
            stage = f"{number}/{len(jobs)} {job.input.name}" if len(jobs) > 1 else job.input.name
            job_batch = batch or chunk_batch(model, plan, device, job.info.channels)
            records.append(_restore(job, process, strength, plan, model_record, device, progress, stage, job_batch,
                                    bf16, model.hum_template))
    except BaseException:
        for folder in created:  # deepest first; folders that now hold earlier outputs stay
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return records


def _missing_folders(folders: Iterable[Path]) -> list[Path]:
    """Folders (and their missing parents) that do not exist yet, deepest first."""
    missing: set[Path] = set()
    for folder in folders:
        folder = Path(folder).absolute()
        while not folder.exists() and folder != folder.parent:
            missing.add(folder)
            folder = folder.parent
    return sorted(missing, key=lambda path: len(path.parts), reverse=True)


def _restore(job: Job, process: Process, strength: float, plan: ChunkPlan, model_record: dict,
             device: torch.device, progress: Progress, stage: str, batch: int = 1, bf16: bool = False,
             hum_template: HumTemplate | None = None) -> dict:
    """One input to its output and sidecar; returns the provenance record."""
    started_at = _utc_now()
    for stale in (job.output, job.sidecar):  # what a killed run left half-written for this very output
        left = re.compile(rf"\.{re.escape(stale.stem)}\.[0-9a-f]{{8}}\.partial{re.escape(stale.suffix)}")
        for partial in (stale.parent.iterdir() if stale.parent.is_dir() else ()):
            if left.fullmatch(partial.name):
                partial.unlink(missing_ok=True)
    input_sha256 = sha256_file(job.input)
    result = denoise_stream(process, job.input, job.output, strength=strength, plan=plan,
                            subtype=job.subtype, format=job.format, progress=progress, stage=stage, batch=batch,
                            hum_template=hum_template)
    out_info = audio_info(job.output)
    record = {
        "schema": SIDECAR_SCHEMA,
        "input": {"path": str(job.input.resolve()), "sha256": input_sha256, "sample_rate": job.info.sample_rate,
                  "channels": job.info.channels, "frames": job.info.frames, "seconds": job.info.seconds,
                  "format": job.info.format, "subtype": job.info.subtype},
        "output": {"path": str(job.output.resolve()), "sha256": sha256_file(job.output),
                   "sample_rate": out_info.sample_rate, "channels": out_info.channels,
                   "frames": out_info.frames, "format": out_info.format, "subtype": out_info.subtype,
                   "clipped_samples": result.clipped_samples},
        "model": model_record,
        "settings": settings_record(strength, plan),
        "hum_template": hum_template.to_dict() if hum_template is not None else None,
        "software": software_versions(),
        "compute": compute_facts(device, bf16),
        "started_at": started_at,
        "finished_at": _utc_now(),
        "wall_seconds": round(result.wall_seconds, 3),
        "real_time_factor": round(result.real_time_factor, 3),
        "chunks": result.chunks,
        "chunks_per_forward": batch,
    }
    assert out_info.frames == job.info.frames and out_info.channels == job.info.channels
    try:
        atomic_write_json(job.sidecar, record)
    except BaseException:
        job.output.unlink(missing_ok=True)  # an output without its provenance is not a restoration
        raise
    return record
