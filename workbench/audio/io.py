"""Every audio file the workbench reads or writes goes through here.

Reading streams in blocks so memory never grows with a recording's length. Writing always goes to a
temporary file beside the target and is renamed into place only when complete, so a failure or a kill
leaves either the old file or nothing, never half a file. Source recordings are never written to.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from workbench.errors import WorkbenchError

AUDIO_SUFFIXES = {".wav", ".bwf", ".rf64", ".w64", ".flac", ".aif", ".aiff", ".aifc"}


@dataclass(frozen=True)
class AudioInfo:
    path: Path
    sample_rate: int
    channels: int
    frames: int
    format: str  # soundfile's major format, e.g. "WAV", "FLAC"
    subtype: str  # e.g. "PCM_24", "FLOAT"

    @property
    def seconds(self) -> float:
        return self.frames / self.sample_rate


def audio_info(path: Path) -> AudioInfo:
    """Header facts of an audio file, or a WorkbenchError naming the file and why it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise WorkbenchError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise WorkbenchError(f"{path}: empty file")
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError, TypeError) as error:
        raise WorkbenchError(f"{path}: not readable audio ({_reason(error)})") from None
    if info.frames <= 0:
        raise WorkbenchError(f"{path}: no audio frames")
    # libsndfile quietly shortens a truncated WAV/AIFF to what is there; its header dump says so.
    if re.search(r"^(data|SSND)\s*:.*should be", info.extra_info or "", re.MULTILINE):
        raise WorkbenchError(f"{path}: truncated (the header promises more audio than the file holds)")
    check_resamplable(path, int(info.samplerate))
    return AudioInfo(path, int(info.samplerate), int(info.channels), int(info.frames), info.format, info.subtype)


MODEL_SAMPLE_RATE = 44_100  # the network's rate; here, not in dsp, because dsp imports torch and this module must not
# Every command resamples to 44.1 kHz and back with a sinc resampler whose work per sample grows with the
# reduced ratio's terms: 48 kHz is 160:147, 384 kHz 1280:147, but 44.056 kHz is 11014:11025 (measured:
# 25 s and 2.5 GB per second of audio) and a prime rate such as 37813 Hz would need tens of GB.
MAX_RATIO_TERM = 2048


def check_resamplable(path: Path, sample_rate: int) -> None:
    """Refuse, in one line, a sample rate whose exact ratio to 44.1 kHz is too costly to resample."""
    common = math.gcd(int(sample_rate), MODEL_SAMPLE_RATE)
    terms = (sample_rate // common, MODEL_SAMPLE_RATE // common)
    if max(terms) > MAX_RATIO_TERM:
        raise WorkbenchError(f"{path}: sample rate {sample_rate} Hz is {terms[0]}:{terms[1]} to 44.1 kHz, too costly to "
                             "resample exactly; convert it to a standard rate (e.g. 48000 or 96000 Hz) first")


def _reason(error: Exception) -> str:
    return " ".join(str(error).split()).replace(str(error.__class__.__name__), "").strip() or "unknown error"


def read_ahead(items: Iterator, depth: int = 2) -> Iterator:
    """`items`, produced in a worker thread up to `depth` ahead of the consumer.

    Decoding (libsndfile) and resampling (torch) release the GIL, so on two cores they run while the
    caller analyses the previous block. Memory stays bounded by `depth` items. An exception in the
    worker is raised here; leaving the loop early stops the worker.
    """
    import queue
    import threading

    assert depth >= 1, depth
    handoff: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                handoff.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((None, item)):
                    return
            put((None, done))
        except BaseException as error:  # handed to the consumer, raised there
            put((error, None))
        finally:
            if hasattr(items, "close"):  # a generator left early: close its files in this thread, now
                items.close()

    worker = threading.Thread(target=produce, name="read-ahead", daemon=True)
    worker.start()
    try:
        while True:
            error, item = handoff.get()
            if error is not None:
                raise error
            if item is done:
                return
            yield item
    finally:
        stop.set()
        worker.join()


def format_time(seconds: float) -> str:
    """A position in a recording as h:mm:ss.sss (what an audio editor shows), e.g. 0:01:02.250."""
    assert seconds >= 0, seconds
    millis = round(seconds * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    return f"{hours}:{minutes:02d}:{millis // 1000:02d}.{millis % 1000:03d}"


def first_non_finite(samples: np.ndarray) -> tuple[int, int] | None:
    """(frame, channel) of the earliest NaN or ±inf in (channels, frames) samples, or None when all are finite."""
    samples = np.atleast_2d(samples)
    finite = np.isfinite(samples)
    if finite.all():
        return None
    frame = int(np.argmax(~finite.all(axis=0)))  # earliest in time, whichever channel
    return frame, int(np.argmax(~finite[:, frame]))


def check_finite(samples: np.ndarray, where: str | Path, sample_rate: int, offset_frames: int = 0,
                 what: str = "NaN or inf samples") -> None:
    """Refuse (one line naming `where` and the time of the first bad sample) samples that hold NaN or ±inf.

    Every reader calls this, so a non-finite value never reaches a metric, a loss or a file.
    `offset_frames` places a block within its recording.
    """
    found = first_non_finite(samples)
    if found is None:
        return
    frame, channel = found
    seconds = (offset_frames + frame) / sample_rate
    raise WorkbenchError(f"{where}: {what} (first at {format_time(seconds)} = {seconds:.3f} s, channel {channel + 1})")


FLOAT_SUBTYPES = {"FLOAT", "DOUBLE"}  # the only stored samples that can be NaN or inf (integers cannot)
WIDE_SUBTYPES = {"PCM_32", "DOUBLE"}  # samples float32 cannot hold exactly: read them as float64 to keep them


def exact_dtype(subtype: str) -> str:
    """The float type that holds every sample of `subtype` exactly (float32 has a 24-bit mantissa)."""
    return "float64" if subtype.upper() in WIDE_SUBTYPES else "float32"


def check_file_finite(path: Path, block_frames: int = 1 << 18) -> None:
    """Refuse a float file holding NaN or ±inf anywhere (one line, with the time); integer files pass unread."""
    if audio_info(path).subtype in FLOAT_SUBTYPES:
        for _ in iter_blocks(path, block_frames):
            pass


def iter_blocks(path: Path, block_frames: int, finite: bool = True, dtype: str = "float32") -> Iterator[np.ndarray]:
    """Yield float32 (or `dtype`) blocks of shape (channels, frames) until the end of the file.

    A file whose body is shorter than its header says (truncated) or that libsndfile cannot decode
    part-way raises a WorkbenchError naming the file; so does a NaN or ±inf sample (unless not
    `finite`: a reader that reports them itself).
    """
    info = audio_info(path)
    read = 0
    try:
        with sf.SoundFile(str(path)) as handle:
            while True:
                block = handle.read(block_frames, dtype=dtype, always_2d=True)
                if block.shape[0] == 0:
                    break
                block = np.ascontiguousarray(block.T)
                if finite:
                    check_finite(block, path, info.sample_rate, read)
                read += block.shape[1]
                yield block
    except (sf.LibsndfileError, RuntimeError) as error:
        raise WorkbenchError(f"{path}: unreadable at {read / info.sample_rate:.2f} s ({_reason(error)})") from None
    if read < info.frames:
        raise WorkbenchError(f"{path}: truncated ({read} of {info.frames} frames readable)")


def read_audio(path: Path) -> tuple[np.ndarray, int]:
    """The whole file as float32 (channels, frames) and its sample rate: for short files only."""
    info = audio_info(path)
    blocks = list(iter_blocks(path, 1 << 18))
    return np.concatenate(blocks, axis=1), info.sample_rate


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


# A full disk, a file-size limit (`ulimit -f`: Python ignores SIGXFSZ, so the write fails with EFBIG), a
# quota, a read-only filesystem: the user's to fix, reported in one line rather than as a traceback.
WRITE_FAILURES = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS}


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block completes.

    The temporary name keeps the suffix so that tools which infer a format from it still work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.{secrets.token_hex(4)}.partial{path.suffix}")
    try:
        yield temporary
        os.replace(temporary, path)
    except OSError as error:
        if error.errno not in WRITE_FAILURES:
            raise
        raise WorkbenchError(f"{path}: cannot be written ({error.strerror}); nothing was written") from None
    finally:
        temporary.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, ensure_ascii=False, default=str) + "\n")


def read_json_object(path: Path, what: str) -> dict:
    """A JSON file holding an object (a manifest, a sidecar); one clear line when it is anything else."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise WorkbenchError(f"{path}: not a readable {what} ({error})") from None
    if not isinstance(data, dict):
        raise WorkbenchError(f"{path}: not a {what}")
    return data


def format_for(path: Path) -> str:
    """soundfile's major format for an output file's suffix (.bwf and .rf64 are WAV variants)."""
    suffix = Path(path).suffix.lower()
    formats = {".wav": "WAV", ".bwf": "WAV", ".rf64": "RF64", ".w64": "W64", ".flac": "FLAC",
               ".aif": "AIFF", ".aiff": "AIFF", ".aifc": "AIFF", ".ogg": "OGG"}
    if suffix not in formats:
        raise WorkbenchError(f"{path}: unknown audio suffix {suffix!r} (use one of {', '.join(sorted(formats))})")
    return formats[suffix]


@contextlib.contextmanager
def atomic_audio_writer(path: Path, sample_rate: int, channels: int, subtype: str | None = None,
                        format: str | None = None) -> Iterator[sf.SoundFile]:
    """An open soundfile for streaming writes that appears at `path` only once closed successfully.

    Write (frames, channels) float arrays to it; soundfile converts to `subtype` (default: the
    format's default, e.g. PCM_16 for WAV).
    """
    format = format or format_for(path)
    with atomic_path(path) as temporary:
        try:
            with sf.SoundFile(str(temporary), "w", samplerate=int(sample_rate), channels=int(channels),
                              subtype=subtype, format=format) as handle:
                yield handle
        except sf.LibsndfileError as error:  # reading errors arrive as WorkbenchErrors: this one is the write's
            raise WorkbenchError(f"{path}: writing failed ({_reason(error).rstrip('.')}: is the disk full, or a file-size "
                                 "limit reached?); nothing was written") from None


def write_audio(path: Path, samples: np.ndarray, sample_rate: int, subtype: str | None = None,
                format: str | None = None) -> None:
    """Write (channels, frames) samples atomically."""
    samples = np.atleast_2d(samples)
    with atomic_audio_writer(path, sample_rate, samples.shape[0], subtype, format) as handle:
        handle.write(samples.T)


def same_file(a: Path, b: Path) -> bool:
    a, b = Path(a), Path(b)
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()
