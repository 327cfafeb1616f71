"""The bad-input battery: generated recordings (hypothesis) through the readers, `denoise` and `capture-noise`.

Each case is a real file that soundfile writes: a rate from 8 to 384 kHz (the archive's standard rates and
any integer between), 1 to 8 channels, every subtype WAV and FLAC can hold that an archive meets (PCM_U8,
PCM_16, PCM_24, PCM_32, FLOAT, DOUBLE, ULAW, ALAW; FLAC at compression levels 0 to 1), a length of 0 or 1
frame up to several of denoise's chunks, hiss, a DC offset, full-scale square waves or silence, and
sometimes a header that lies about the length (the file cut short, or junk after the audio).

The rule every case must obey: it either succeeds with the rate, channels, length and subtype kept, or it
fails with ONE line (a WorkbenchError naming the file) and nothing written; and the source file is
byte-identical afterwards. The number of cases is the hypothesis profile's (tests/conftest.py: `ci` 60 per
test, the readers five times that; `dev` 10).
"""

from __future__ import annotations

import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from hypothesis import event, given, reject, settings
from hypothesis import strategies as st

from workbench.audio.io import audio_info, read_audio, sha256_file
from workbench.errors import WorkbenchError

STANDARD_RATES = (8000, 11025, 16000, 22050, 32000, 44100, 48000, 88200, 96000, 176400, 192000, 352800, 384000)
WAV_SUBTYPES = ("PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE", "ULAW", "ALAW")
FLAC_SUBTYPES = ("PCM_S8", "PCM_16", "PCM_24")
PCM_BITS = {"PCM_U8": 8, "PCM_S8": 8, "PCM_16": 16, "PCM_24": 24, "PCM_32": 32}
# How far a sample read back may be from the one written: half a step of the subtype's quantiser
# (µ-law and A-law: their coarsest step, at full scale).
TOLERANCE = {"PCM_U8": 2 ** -7, "PCM_S8": 2 ** -7, "PCM_16": 2 ** -15, "PCM_24": 2 ** -23, "PCM_32": 2 ** -23,
             "FLOAT": 1e-7, "DOUBLE": 1e-7, "ULAW": 1 / 30, "ALAW": 1 / 30}


@dataclass(frozen=True)
class Case:
    """One generated recording, as written, and how its header lies (if it does)."""

    rate: int
    channels: int
    format: str
    subtype: str
    compression: float | None
    frames: int
    content: str  # hiss, dc, square, silence
    level: float
    dc: float
    lie: str  # none, cut (the body ends before the header says), junk (bytes after the audio)
    seed: int

    @property
    def suffix(self) -> str:
        return ".flac" if self.format == "FLAC" else ".wav"

    def samples(self) -> np.ndarray:
        """(frames, channels) float64, what is handed to soundfile."""
        rng = np.random.default_rng(self.seed)
        if self.content == "square":  # full scale: +1.0 and -1.0, the clipped count's hardest case
            period = max(2, self.rate // 441)
            wave = np.where((np.arange(self.frames) // (period // 2)) % 2 == 0, 1.0, -1.0)
            return np.repeat(wave[:, None], self.channels, axis=1)
        if self.content == "silence":
            return np.zeros((self.frames, self.channels))
        audio = rng.normal(0.0, self.level, (self.frames, self.channels))
        return np.clip(audio + (self.dc if self.content == "dc" else 0.0), -1.0, 1.0 - 2 ** -7)

    def write(self, folder: Path) -> Path:
        path = folder / f"case-{self.seed}{self.suffix}"
        try:
            sf.write(str(path), self.samples(), self.rate, subtype=self.subtype, format=self.format,
                     compression_level=self.compression)
        except sf.LibsndfileError:  # e.g. libFLAC refuses some rates (65536 Hz): no such file can exist
            reject()
        if self.lie == "cut" and path.stat().st_size > 64:
            data = path.read_bytes()
            path.write_bytes(data[: max(64, len(data) - 1 - self.seed % max(1, len(data) // 3))])
        elif self.lie == "junk":
            with open(path, "ab") as handle:
                handle.write(bytes(np.random.default_rng(self.seed).integers(0, 256, 37, dtype=np.uint8)))
        return path


@st.composite
def cases(draw, max_seconds: float = 0.5, min_seconds: float = 0.0,
          contents: tuple[str, ...] = ("hiss", "dc", "square", "silence")) -> Case:
    standard = st.sampled_from(STANDARD_RATES)
    rate = draw(st.one_of(standard, standard, standard, st.integers(8000, 384_000)))  # most archives: standard
    format = draw(st.sampled_from(("WAV", "WAV", "FLAC")))
    subtype = draw(st.sampled_from(FLAC_SUBTYPES if format == "FLAC" else WAV_SUBTYPES))
    compression = draw(st.sampled_from((0.0, 0.5, 1.0))) if format == "FLAC" else None
    lengths = st.integers(max(3, int(min_seconds * rate)), int(max_seconds * rate))
    frames = draw(st.one_of(st.sampled_from((0, 1, 2)), lengths, lengths, lengths))
    return Case(rate=rate, channels=draw(st.integers(1, 8)), format=format, subtype=subtype, compression=compression,
                frames=frames, content=draw(st.sampled_from(contents)),
                level=draw(st.sampled_from((1e-4, 3e-3, 0.1, 0.5))), dc=draw(st.sampled_from((-0.3, 0.02, 0.4))),
                lie=draw(st.sampled_from(("none", "none", "none", "cut", "junk"))),
                seed=draw(st.integers(0, 2 ** 20)))


def refusal(error: WorkbenchError, path: Path) -> str:
    """The one line a failure must be: no newline, and it names the file."""
    message = str(error)
    assert "\n" not in message and path.name in message, message
    event("refused: " + message.split(": ", 1)[1].split(" (")[0][:40])
    return message


def fresh(folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


# --- the readers ------------------------------------------------------------------------------------------

@settings(max_examples=5 * settings().max_examples)  # a case costs milliseconds here: five times the profile's
@given(case=cases())
def test_readers_keep_what_was_written_or_refuse_in_one_line(case, tmp_path_factory):
    folder = fresh(tmp_path_factory.getbasetemp() / "battery-readers")
    path = case.write(folder)
    before = sha256_file(path)
    try:
        info = audio_info(path)
        samples, rate = read_audio(path)
    except WorkbenchError as error:
        message = refusal(error, path)
        honest = case.frames == 0 or case.lie == "cut" or "too costly to resample" in message
        assert honest, f"{case}: refused a sound file: {message}"
    else:
        event("read back")
        assert case.frames > 0, case
        assert (info.sample_rate, info.channels, info.subtype, info.format) == (case.rate, case.channels, case.subtype,
                                                                                case.format)
        assert rate == case.rate and samples.shape == (case.channels, info.frames)
        if case.lie != "cut":
            assert info.frames == case.frames, (case, info)
            expected = np.clip(case.samples().T, -1.0, 1.0)
            assert np.max(np.abs(samples - expected)) <= TOLERANCE[case.subtype] + 1e-9, case
        else:  # a cut that removed no audio (FLAC padding, a WAV trailer): what is read is what the header says
            assert info.frames <= case.frames
    assert sha256_file(path) == before


# --- denoise ----------------------------------------------------------------------------------------------

def _clip_range(subtype: str) -> tuple[float, float] | None:
    bits = PCM_BITS.get(subtype)
    return None if bits is None else (-1.0, 1.0 - 2.0 ** (1 - bits))


@given(case=cases(max_seconds=0.4), strength=st.sampled_from((0.0, 1.0)))
def test_denoise_keeps_rate_channels_length_subtype_or_refuses_with_nothing_written(
        case, strength, tmp_path_factory, random_tiny_checkpoint, one_torch_thread):
    from workbench.denoise import denoise_files

    folder = fresh(tmp_path_factory.getbasetemp() / "battery-denoise")
    path = case.write(fresh(folder / "in"))
    before = sha256_file(path)
    out = folder / "out"
    try:
        [record] = denoise_files([path], model_ref=random_tiny_checkpoint, out_dir=out, strength=strength,
                                 chunk_seconds=0.1, accelerator="cpu")
    except WorkbenchError as error:
        message = refusal(error, path)
        honest = case.frames == 0 or case.lie == "cut" or "too costly to resample" in message
        assert honest, f"{case}: refused: {message}"
        assert not out.exists() or not any(out.rglob("*")), f"{case}: left {sorted(out.rglob('*'))}"
    else:
        event(f"restored at strength {strength:g}")
        output = Path(record["output"]["path"])
        assert sorted(p.name for p in out.rglob("*")) == sorted([output.name, output.name + ".json"])
        info = audio_info(output)
        assert (info.sample_rate, info.channels, info.frames, info.subtype, info.format) == (
            case.rate, case.channels, audio_info(path).frames, case.subtype, case.format), case
        restored, _ = read_audio(output)
        assert np.isfinite(restored).all()
        source, _ = read_audio(path)
        if strength == 0.0:  # the input, sample for sample (read both as float64: PCM_32 and DOUBLE too)
            exact_in = sf.read(str(path), dtype="float64", always_2d=True)[0]
            exact_out = sf.read(str(output), dtype="float64", always_2d=True)[0]
            assert np.array_equal(exact_in, exact_out), case
            assert record["output"]["clipped_samples"] == 0
        limits = _clip_range(case.subtype)
        if limits is not None and case.content == "square" and strength == 1.0:
            # The same restoration as floats (no clipping): the count the sidecar reports is exactly the
            # samples of it outside what the subtype holds.
            [unclipped] = denoise_files([path], model_ref=random_tiny_checkpoint, out_dir=folder / "float",
                                        subtype="FLOAT", format="W64", chunk_seconds=0.1, accelerator="cpu")
            floats = sf.read(unclipped["output"]["path"], dtype="float64", always_2d=True)[0]
            outside = int(np.count_nonzero((floats < limits[0]) | (floats > limits[1])))
            assert record["output"]["clipped_samples"] == outside, (case, outside)
    assert sha256_file(path) == before


# --- capture-noise ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def battery_workspace(tmp_path_factory):
    from workbench.workspace import init_workspace

    return init_workspace(tmp_path_factory.mktemp("battery-noise") / "archive", with_research_devices=True)


def _library_listing(workspace) -> list[tuple[str, int]]:
    """Every file of the noise library with its size: what a failed ingest must leave as it was."""
    root = workspace.noise_library
    return sorted((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*") if p.is_file()) \
        if root.is_dir() else []


@given(case=cases(max_seconds=2.0, min_seconds=0.6, contents=("hiss", "hiss", "hiss", "dc", "square", "silence")))
def test_capture_noise_records_the_source_as_it_is_or_refuses_and_leaves_the_library(case, tmp_path_factory,
                                                                                     battery_workspace,
                                                                                     one_torch_thread):
    from workbench.noise.ingest import capture_noise
    from workbench.noise.library import NoiseLibrary

    folder = fresh(tmp_path_factory.getbasetemp() / "battery-capture")
    path = case.write(folder)
    before = sha256_file(path)
    library = NoiseLibrary(battery_workspace)
    listing = _library_listing(battery_workspace)
    try:
        report = capture_noise(battery_workspace, [path], "revox-a77", 7.5, snippet_seconds=0.5, replace=True)
    except WorkbenchError as error:
        refusal(error, path)
        assert _library_listing(battery_workspace) == listing, case
    else:
        event("ingested")
        with sqlite3.connect(library.manifest) as db:
            kept = db.execute("SELECT sample_rate, channels, frames, subtype FROM sources WHERE sha256 = ?",
                              (before,)).fetchall()
        assert kept == [(case.rate, case.channels, audio_info(path).frames, case.subtype)], case
        assert report.files[0].sample_rate == case.rate and report.files[0].channels == case.channels
    assert sha256_file(path) == before
