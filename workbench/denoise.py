"""Long-file inference: restore hours-long transfers with a denoising model, block by block from disk.

The path of one file, all of it streaming so memory does not grow with the recording's length:

    input (any rate, C channels) ──StreamingResampler──▶ 44.1 kHz ──OverlapAdd(removed noise)──▶
    noise estimate at 44.1 kHz ──StreamingResampler──▶ input rate ──▶ output = input − strength · noise

The model only ever sees 44.1 kHz, but it is the *noise it removes* that travels back to the input's rate
and is subtracted from the original samples. So `strength 0` returns the input bit for bit, every
sample stays where it was (the output has exactly the input's frame count, trimmed by the exact count
after the two resamplings), and whatever lies above 22.05 kHz in a 96 kHz transfer, which the model
never saw, passes through untouched instead of being low-passed away.

Chunking (`OverlapAdd`): the signal is cut into chunks of `chunk_frames` output samples that overlap by
`overlap_frames`; each chunk is processed with `context_frames` of real neighbouring signal on both sides
(mirrored at the file's ends), and only its middle is kept, so the model's edge effects (the STFT's
first and last n_fft − hop samples, the U-Net's mirrored padding) fall into discarded context. Neighbours
are crossfaded with a raised-cosine ramp whose two weights are `rise` and `1 − rise`, so the weights sum
to one everywhere, the first chunk's start and the last chunk's end weigh one, and an identity (or any
linear, short-support) process gives the whole-signal result to float rounding. For a U-Net the chunk
starts are also placed on the network's own grid (STFT hop × 2^downsamplings) so that every chunk sees
the same frame alignment as the whole signal would; the only difference left is the finite context at
the seams. Measured with random-weight networks (fixed seed) on tone-plus-noise, default plan (0.25 s
crossfades, 0.5 s context), as max |chunked − whole| / RMS(whole): tiny ≈ 1e-5, small ≈ 4e-4, paper ≈ 8e-4
(RMS of the difference ≈ 2.5e-5 of the output's: −92 dB); doubling the context to 1 s brings paper to 1.5e-4
at 1.5× rather than 1.28× the compute. tests/test_denoise.py holds the tiny network to 1e-3 and linear
processes to float rounding.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import platform
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from workbench.audio.dsp import MODEL_SAMPLE_RATE, StreamingResampler, resampled_length
from workbench.audio.io import (
    AUDIO_SUFFIXES,
    atomic_audio_writer,
    atomic_write_json,
    audio_info,
    check_finite,
    exact_dtype,
    format_for,
    iter_blocks,
    same_file,
    sha256_file,
)
from workbench.errors import WorkbenchError
from workbench.progress import Progress, no_progress

# process(chunk (channels, n) float32 at 44.1 kHz) -> (channels, n): one chunk of the signal, denoised.
Process = Callable[[torch.Tensor], torch.Tensor]

DEFAULT_CHUNK_SECONDS = 5.0
DEFAULT_OVERLAP_SECONDS = 0.25
DEFAULT_CONTEXT_SECONDS = 0.5
OUTPUT_TAG = "denoised"
SIDECAR_SCHEMA = "workbench.denoise/1"
WAV_LIMIT_BYTES = 4 * 1024**3 - 1024  # a RIFF WAV's 32-bit sizes (minus header room)
SUFFIX_FOR_FORMAT = {"WAV": ".wav", "RF64": ".rf64", "W64": ".w64", "FLAC": ".flac", "AIFF": ".aiff"}
_BYTES_PER_SAMPLE = {"PCM_U8": 1, "PCM_S8": 1, "PCM_16": 2, "PCM_24": 3, "PCM_32": 4, "FLOAT": 4, "DOUBLE": 8}


# ---------------------------------------------------------------------------------------------------
# Chunked overlap-add


@dataclass(frozen=True)
class ChunkPlan:
    """How a 44.1 kHz signal is cut into chunks (all counts in 44.1 kHz frames)."""

    chunk_frames: int  # output span of one chunk, crossfades included
    overlap_frames: int  # crossfade length shared by neighbouring chunks
    context_frames: int  # extra input processed on each side of a chunk and discarded

    def __post_init__(self):
        assert self.chunk_frames >= 1 and self.context_frames >= 0, self
        assert 0 <= self.overlap_frames <= self.chunk_frames // 2, "a chunk's two crossfades must not overlap"

    @property
    def hop_frames(self) -> int:
        return self.chunk_frames - self.overlap_frames

    @classmethod
    def from_seconds(cls, chunk_seconds: float = DEFAULT_CHUNK_SECONDS,
                     overlap_seconds: float = DEFAULT_OVERLAP_SECONDS,
                     context_seconds: float = DEFAULT_CONTEXT_SECONDS, grid_frames: int = 1,
                     sample_rate: int = MODEL_SAMPLE_RATE) -> ChunkPlan:
        """A plan whose hop is a whole number of `grid_frames` (the model's alignment quantum)."""
        if not chunk_seconds > 0 or not math.isfinite(chunk_seconds):
            raise WorkbenchError(f"chunk length {chunk_seconds} s: must be a positive number of seconds")
        overlap = round(overlap_seconds * sample_rate)
        context = round(context_seconds * sample_rate)
        hop = max(1, round((chunk_seconds * sample_rate - overlap) / grid_frames)) * grid_frames
        overlap = min(overlap, hop)  # chunk = hop + overlap, and each crossfade fits in half a chunk
        return cls(chunk_frames=hop + overlap, overlap_frames=overlap, context_frames=context)

    def as_dict(self, sample_rate: int = MODEL_SAMPLE_RATE) -> dict:
        return {**asdict(self), "hop_frames": self.hop_frames, "sample_rate": sample_rate,
                "chunk_seconds": self.chunk_frames / sample_rate,
                "overlap_seconds": self.overlap_frames / sample_rate,
                "context_seconds": self.context_frames / sample_rate,
                "crossfade": "raised cosine (sin² rise, 1 − rise fall): weights sum to one",
                "edges": "context mirrored at the file's start and end"}


def crossfade_ramp(frames: int) -> np.ndarray:
    """The rising half of a raised-cosine crossfade; the falling half is `1 - ramp` so the two sum to one."""
    position = (np.arange(frames, dtype=np.float64) + 0.5) / max(frames, 1)
    return np.sin(0.5 * np.pi * position) ** 2


def _mirror_pad(samples: np.ndarray, before: int, after: int) -> np.ndarray:
    """Mirror (without repeating the edge sample) `before`/`after` frames onto a (channels, frames) array."""
    return np.pad(samples, ((0, 0), (before, after)), mode="reflect") if before or after else samples


def _run(process: Process, chunk: np.ndarray) -> np.ndarray:
    out = process(torch.from_numpy(np.ascontiguousarray(chunk, dtype=np.float32)))
    out = out.detach().to("cpu", torch.float32).numpy() if isinstance(out, torch.Tensor) else np.asarray(out, np.float32)
    assert out.shape == chunk.shape, f"process changed the chunk's shape {chunk.shape} -> {out.shape}"
    return out


class OverlapAdd:
    """Apply `process` to a stream of (channels, frames) blocks in crossfaded chunks; `push` then `flush`.

    Chunk k covers output frames [k·hop, k·hop + chunk) and is computed from input frames
    [k·hop − context, k·hop + chunk + context) of the signal mirrored at both ends. A chunk is only
    processed once the input shows it is not the last; the last chunk is shorter and ends exactly at
    the signal's end. The result equals `process_whole`'s for any process whose output at a frame
    depends only on input within `context` frames (exactly for linear ones).

    `batch` chunks go through `process` in one call, stacked as rows ((batch · channels, n)), so the
    process must treat rows independently (a model process does: rows are its batch); the result is
    the chunk-by-chunk one. Ready chunks wait until `batch` of them are there (or `flush`), so the
    output lags by up to `batch` chunks and memory holds `batch` chunk windows.
    """

    def __init__(self, process: Process, channels: int, plan: ChunkPlan, batch: int = 1):
        assert batch >= 1, batch
        self.process, self.plan, self.batch = process, plan, int(batch)
        self.pending: list[tuple[np.ndarray, int, bool]] = []  # (window, frames, last) cut, not yet processed
        self.rise = crossfade_ramp(plan.overlap_frames).astype(np.float32)
        self.fall = (1.0 - crossfade_ramp(plan.overlap_frames)).astype(np.float32)
        # The buffer holds the mirrored signal from the next chunk's input start (its context) onward.
        self.buffer = np.zeros((channels, 0), dtype=np.float32)
        self.mirrored_start = False
        self.received = 0  # input frames pushed so far
        self.chunk_start = 0  # output frame where the next chunk begins
        self.carry = np.zeros((channels, plan.overlap_frames), dtype=np.float32)  # weighted fall of the last chunk
        self.emitted = 0
        self.chunks = 0

    def push(self, block: np.ndarray) -> np.ndarray:
        block = np.asarray(block, dtype=np.float32)
        assert block.ndim == 2 and block.shape[0] == self.buffer.shape[0], "blocks are (channels, frames)"
        self.buffer = np.concatenate([self.buffer, block], axis=1)
        self.received += block.shape[1]
        plan, outputs = self.plan, []
        # A chunk is surely not the last once input reaches past its end plus context (and at least 1).
        while self.received >= self.chunk_start + plan.chunk_frames + max(plan.context_frames, 1):
            if not self.mirrored_start:
                self.buffer = _mirror_pad(self.buffer, plan.context_frames, 0)
                self.mirrored_start = True
            self._cut(plan.chunk_frames, last=False)
            if len(self.pending) == self.batch:
                outputs += self._process_pending()
        return self._joined(outputs)

    def flush(self) -> np.ndarray:
        plan, outputs = self.plan, []
        if self.received == 0:
            return self._joined(outputs)
        # Mirror the end (and the start, if no chunk ran yet) exactly as np.pad does on the whole signal.
        self.buffer = _mirror_pad(self.buffer, 0 if self.mirrored_start else plan.context_frames, plan.context_frames)
        self.mirrored_start = True
        while self.received - self.chunk_start > plan.chunk_frames:
            self._cut(plan.chunk_frames, last=False)
            if len(self.pending) == self.batch:
                outputs += self._process_pending()
        self._cut(self.received - self.chunk_start, last=True)
        outputs += self._process_pending()
        assert self.emitted == self.received, (self.emitted, self.received)
        return self._joined(outputs)

    def _cut(self, frames: int, last: bool) -> None:
        """Take the next chunk's window off the buffer (a view: buffers are replaced, never written)."""
        plan, context = self.plan, self.plan.context_frames
        window = self.buffer[:, : frames + 2 * context]
        assert window.shape[1] == frames + 2 * context
        self.pending.append((window, frames, last))
        if not last:
            self.chunk_start += plan.hop_frames
            self.buffer = self.buffer[:, plan.hop_frames :]

    def _process_pending(self) -> list[np.ndarray]:
        """Run the waiting windows, those of one length together, and crossfade them in order."""
        pending, self.pending = self.pending, []
        channels, results = self.buffer.shape[0], [None] * len(pending)
        for length in {window.shape[1] for window, _, _ in pending}:
            same = [i for i, (window, _, _) in enumerate(pending) if window.shape[1] == length]
            stacked = np.concatenate([pending[i][0] for i in same], axis=0) if len(same) > 1 else pending[same[0]][0]
            out = _run(self.process, stacked)
            for row, i in enumerate(same):
                results[i] = out[row * channels : (row + 1) * channels]
        return [self._crossfade(out, frames, last) for out, (_, frames, last) in zip(results, pending)]

    def _crossfade(self, processed: np.ndarray, frames: int, last: bool) -> np.ndarray:
        """A processed window's kept part, crossfaded with the previous chunk's fall."""
        plan, overlap, context = self.plan, self.plan.overlap_frames, self.plan.context_frames
        assert frames > (overlap if self.chunks else 0), "each chunk outlasts the crossfade it starts with"
        out = processed[:, context : context + frames].copy()
        if self.chunks:  # crossfade in: this chunk's rise plus the previous chunk's fall
            out[:, :overlap] = out[:, :overlap] * self.rise + self.carry
        self.chunks += 1
        if last:
            self.emitted += frames
            return out
        self.carry = out[:, frames - overlap :] * self.fall
        kept = out[:, : plan.hop_frames]
        self.emitted += kept.shape[1]
        return kept

    def _joined(self, outputs: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(outputs, axis=1) if outputs else np.zeros((self.buffer.shape[0], 0), np.float32)


def process_whole(process: Process, samples: np.ndarray, plan: ChunkPlan) -> np.ndarray:
    """The reference `OverlapAdd` approximates: the whole (mirrored) signal through `process` at once."""
    samples = np.asarray(samples, dtype=np.float32)
    context = plan.context_frames
    return _run(process, _mirror_pad(samples, context, context))[:, context : context + samples.shape[1]]


def removed_by(process: Process) -> Process:
    """The noise `process` takes away from a chunk (chunk − processed): overlap-add is linear, so
    overlap-adding this equals the input minus the overlap-added denoised signal."""
    def removed(chunk: torch.Tensor) -> torch.Tensor:
        return chunk - process(chunk).to(chunk.device, chunk.dtype)
    return removed


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
                   stage: str | None = None, batch: int = 1) -> StreamResult:
    """Denoise one file into `output_path` (atomically), streaming: memory does not grow with its length.

    `process` maps 44.1 kHz chunks (channels, n) to their denoised version. The output keeps the
    input's sample rate, channels and exact frame count, and its format/subtype unless given.
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
# The model: where it comes from, and how a chunk goes through it


# What `--device ID` uses while the machine has no champion: the general model the device models start from.
GENERAL_BASE_URI = "models:/tape-denoiser-general@base"


def champion_uri(device_id: str) -> str:
    """The registry URI of a replay machine's current best model."""
    return f"models:/tape-denoiser-{device_id}@champion"


def is_model_uri(ref: str) -> bool:
    """True for MLflow URIs (models:/..., runs:/..., any scheme of two letters or more); False for paths."""
    scheme, sep, _ = str(ref).partition(":")
    return bool(sep) and len(scheme) >= 2 and scheme.replace("-", "").replace("+", "").isalnum() \
        and str(ref)[len(scheme) + 1 :].startswith("/")


def _fetch_checkpoint(uri: str) -> tuple[Path, dict]:
    """Download a registered model's checkpoint through workbench.tracking; every failure is one line."""
    try:
        from workbench.tracking import fetch_checkpoint
    except ModuleNotFoundError as error:
        if error.name not in ("workbench.tracking",):
            raise
        raise WorkbenchError(f"{uri}: model URIs need the MLflow registry (workbench.tracking), "
                             "which this installation lacks; pass a checkpoint file instead") from None
    from mlflow.exceptions import MlflowException

    try:
        path, facts = fetch_checkpoint(uri)
    except MlflowException as error:
        reason = " ".join(str(getattr(error, "message", error)).split())
        raise WorkbenchError(f"{uri}: unknown model URI ({reason[:300]})") from None
    return Path(path), dict(facts or {})


def resolve_model(ref: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Load the model a `--model` REF names: a checkpoint file (X.safetensors beside X.json) or an
    MLflow registered-model URI (`models:/NAME@ALIAS`, `models:/NAME/VERSION`).

    Returns the model (eval mode, on `device`) and its provenance: name, version, uri, run_id,
    aliases, checkpoint path and sha256, and the checkpoint's config.
    """
    text = str(ref)
    path, provenance = _registered_checkpoint(text) if is_model_uri(text) else _file_checkpoint(text)
    return _load(path, provenance, device)


def resolve_device_model(device_id: str, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """A replay machine's champion model from the workspace's registry (`--device ID`).

    A machine with no champion yet (none fine-tuned, or the gate refused every version) is restored with
    the general model @base instead, and the provenance says so in `note` (the CLI prints it; the sidecar
    keeps it), with `fallback_for_device` naming the machine."""
    from workbench.devices import get_device
    from workbench.workspace import find_workspace

    get_device(find_workspace(), device_id)  # an unknown machine is its own, clearer error
    uri = champion_uri(device_id)
    try:
        path, provenance = _registered_checkpoint(uri)
    except WorkbenchError as error:
        champion_error = error
    else:
        return _load(path, provenance, device)
    try:
        path, provenance = _registered_checkpoint(GENERAL_BASE_URI)
    except WorkbenchError:
        raise WorkbenchError(f"device {device_id} has no champion model yet ({champion_error}) and there is no general "
                             f"model {GENERAL_BASE_URI} to use instead; fine-tune one with "
                             f"`workbench finetune --device {device_id}`") from None
    note = (f"device {device_id} has no champion model yet: restored with the general model {provenance['uri']} "
            f"(@base), not fitted to this machine (`workbench finetune --device {device_id}` fits one)")
    return _load(path, {**provenance, "note": note, "fallback_for_device": device_id}, device)


def _registered_checkpoint(uri: str) -> tuple[Path, dict]:
    path, facts = _fetch_checkpoint(uri)
    return path, {"name": None, "version": None, "run_id": None, "aliases": [], **facts,
                  "uri": facts.get("uri") or uri, "requested_uri": uri}


def _file_checkpoint(text: str) -> tuple[Path, dict]:
    path = Path(text)
    if path.suffix != ".safetensors" and path.with_suffix(".safetensors").is_file():
        path = path.with_suffix(".safetensors")  # `X` or `X.json` for `X.safetensors`
    if not path.is_file():
        raise WorkbenchError(f"{path}: no such checkpoint (give X.safetensors, with X.json beside it, "
                             "or an MLflow URI such as models:/tape-denoiser-revox-a77@champion)")
    return path, {"name": path.stem, "version": None, "uri": None, "requested_uri": text, "run_id": None,
                  "aliases": []}


def _load(path: Path, provenance: dict, device: str | torch.device) -> tuple[torch.nn.Module, dict]:
    from workbench.model.checkpoint import load_checkpoint

    model, config = load_checkpoint(path, device=str(device))
    return model, {**provenance, "checkpoint": str(Path(path).resolve()), "checkpoint_sha256": sha256_file(path),
                   "config": config}


def choose_accelerator(accelerator: str = "auto") -> torch.device:
    """The torch device: `auto` is CUDA when torch sees a GPU, else the CPU; or cpu, cuda, cuda:N."""
    if accelerator == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", accelerator):
        raise WorkbenchError(f"--accelerator {accelerator!r}: choose auto, cpu, cuda or cuda:N")
    if accelerator.startswith("cuda") and not torch.cuda.is_available():
        raise WorkbenchError(f"--accelerator {accelerator}: torch sees no CUDA device here (use cpu or auto)")
    return torch.device(accelerator)


def model_grid_frames(model: torch.nn.Module) -> int:
    """The alignment quantum of a U-Net: STFT hop × 2^downsamplings (44.1 kHz frames).

    The network halves the frame count at each level, so a chunk that starts at a multiple of this
    sees the same frames and the same downsampling phase as the whole signal would there; any other
    start gives a (very) different output from a shift-variant network.
    """
    from workbench.model.stft import HOP

    return HOP * 2 ** int(model.config.depth)


def model_process(model: torch.nn.Module, device: torch.device) -> Process:
    """A chunk process running `model` on `device`: rows (channels, and chunks when batched) are the
    network's batch. On CUDA: the chunk goes up from pinned memory without blocking the host, the network
    runs under bf16 autocast (the STFT and inverse STFT stay in float32), and the only synchronisation
    is the copy of the result back, once per call (a batch of chunks), never per chunk."""
    from workbench.model.unet import denoise_waveform

    model = model.to(device).eval()
    cuda = device.type == "cuda"

    def process(chunk: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            if cuda:
                wave = chunk.to(torch.float32).pin_memory().to(device, non_blocking=True)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    return denoise_waveform(model, wave).float()
            return denoise_waveform(model, chunk.to(device, torch.float32)).float()

    return process


# Working memory of one chunk through the network, per STFT frame·bin: the full-resolution activations
# alive at once (stage input and its padding, the level-0 skip, the dense block's buffer, convolution
# outputs) come to about 10·channels[0] + 30 values, the coarser levels add about half again; rounded up.
_VALUES_PER_FRAME_BIN = (16, 32)  # × channels[0], + constant
DEFAULT_CPU_BUDGET_BYTES = 1 << 30


def chunk_batch(model: torch.nn.Module, plan: ChunkPlan, device: torch.device, channels: int = 1,
                budget_bytes: int | None = None) -> int:
    """How many chunks go through the network per call: as many as fit the memory budget (on CUDA
    60 % of the free device memory, else 1 GiB), at least one. `channels` rows go with each chunk."""
    from workbench.model.stft import FREQ_BINS, HOP

    if budget_bytes is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            budget_bytes = int(0.6 * free)
        else:
            budget_bytes = DEFAULT_CPU_BUDGET_BYTES
    frames = (plan.chunk_frames + 2 * plan.context_frames) // HOP + 4
    scale, constant = _VALUES_PER_FRAME_BIN
    per_chunk = frames * FREQ_BINS * 4 * (scale * int(model.config.channels[0]) + constant) * max(1, channels)
    return max(1, int(budget_bytes // per_chunk))


def denoise_samples(model: torch.nn.Module, samples: np.ndarray, plan: ChunkPlan | None = None,
                    device: torch.device | None = None, batch: int | None = None) -> np.ndarray:
    """In-memory 44.1 kHz audio, (frames,) or (channels, frames), through `model` exactly as `workbench
    denoise` runs it at full strength (same grid-aligned chunks and crossfades); same shape back.
    `batch` chunks per forward call (default: what the memory budget allows)."""
    samples = np.asarray(samples, dtype=np.float32)
    rows = np.atleast_2d(samples)
    device = device or next(model.parameters()).device
    plan = plan or ChunkPlan.from_seconds(grid_frames=model_grid_frames(model))
    batch = batch or chunk_batch(model, plan, device, rows.shape[0])
    chunker = OverlapAdd(model_process(model, device), rows.shape[0], plan, batch=batch)
    return np.concatenate([chunker.push(rows), chunker.flush()], axis=1).reshape(samples.shape)


def compute_facts(device: torch.device) -> dict:
    facts = {"device": device.type, "threads": torch.get_num_threads()}
    if device.type == "cuda":
        facts.update(name=torch.cuda.get_device_name(device), autocast="bfloat16", stft="float32")
    else:
        facts.update(name=platform.processor() or platform.machine(), autocast=None)
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
    from workbench.audio.io import read_json_object

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
    import torchaudio

    from workbench import __version__

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
        "chunking": plan.as_dict(),
    }


def denoise_files(inputs: Iterable[Path], *, model_ref: str | Path | None = None, device_id: str | None = None,
                  out_dir: Path = Path("denoised"), output: Path | None = None, strength: float = 1.0,
                  chunk_seconds: float = DEFAULT_CHUNK_SECONDS, format: str | None = None,
                  subtype: str | None = None, accelerator: str = "auto", overwrite: bool = False,
                  batch: int | None = None, progress: Progress = no_progress) -> list[dict]:
    """Restore transfers with a model; returns each output's provenance record (also its sidecar JSON).

    Give exactly one of `model_ref` (checkpoint file or MLflow URI) and `device_id` (that replay
    machine's champion). Every input and output is checked, and the model loaded, before the first
    file is written. `batch` chunks go through the network per call (default: what the memory budget
    allows, see `chunk_batch`); the output does not depend on it.
    """
    assert (model_ref is None) != (device_id is None), "give exactly one of model_ref and device_id"
    strength = check_strength(strength)
    if batch is not None and batch < 1:
        raise WorkbenchError(f"batch {batch}: must be at least 1 chunk per forward call")
    jobs = plan_jobs(inputs, out_dir=out_dir, output=output, format=format, subtype=subtype, overwrite=overwrite)
    device = choose_accelerator(accelerator)
    model, model_record = (resolve_model(model_ref, device) if model_ref is not None
                           else resolve_device_model(device_id, device))
    plan = ChunkPlan.from_seconds(chunk_seconds, grid_frames=model_grid_frames(model))
    process = model_process(model, device)
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
            records.append(_restore(job, process, strength, plan, model_record, device, progress, stage, job_batch))
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
             device: torch.device, progress: Progress, stage: str, batch: int = 1) -> dict:
    """One input to its output and sidecar; returns the provenance record."""
    started_at = _utc_now()
    for stale in (job.output, job.sidecar):  # what a killed run left half-written for this very output
        left = re.compile(rf"\.{re.escape(stale.stem)}\.[0-9a-f]{{8}}\.partial{re.escape(stale.suffix)}")
        for partial in (stale.parent.iterdir() if stale.parent.is_dir() else ()):
            if left.fullmatch(partial.name):
                partial.unlink(missing_ok=True)
    input_sha256 = sha256_file(job.input)
    result = denoise_stream(process, job.input, job.output, strength=strength, plan=plan,
                            subtype=job.subtype, format=job.format, progress=progress, stage=stage, batch=batch)
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
        "software": software_versions(),
        "compute": compute_facts(device),
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
