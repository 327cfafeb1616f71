"""capture-noise end to end: real files in many formats, screening, splits, idempotency, bad input, kills.

Recordings are written with soundfile; snippets are 1 s (`--snippet-seconds 1`) so files stay short.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from workbench.noise.library import NoiseLibrary
from workbench.noise.screening import WINDOWS_PER_SECOND, guard_windows
from workbench.workspace import init_workspace

HISS_DBFS = -50.0


def blank_tape(seconds: float, sample_rate: int = 48_000, channels: int = 2, seed: int = 0,
               hum_hz: float | None = None, dc: float = 0.0) -> np.ndarray:
    """(frames, channels) of independent hiss per channel, optional mains hum and DC offset."""
    rng = np.random.default_rng(seed)
    frames = int(seconds * sample_rate)
    audio = rng.normal(0.0, 10 ** (HISS_DBFS / 20), (frames, channels)) + dc
    if hum_hz is not None:
        t = np.arange(frames) / sample_rate
        audio += (10 ** (-56 / 20) * np.sqrt(2) * np.sin(2 * np.pi * hum_hz * t))[:, None]
    return audio


def write(path: Path, audio: np.ndarray, sample_rate: int = 48_000, subtype: str = "PCM_24",
          format: str | None = None) -> Path:
    sf.write(str(path), audio, sample_rate, subtype=subtype, format=format)
    return path


def ingest(cli, *paths, device="revox-a77", speed="7.5", snippet="1", extra=()):
    return cli("capture-noise", "--device", device, "--speed", speed, "--snippet-seconds", snippet, "--json",
               *extra, *paths)


def library_state(workspace) -> dict:
    """Everything a user of the library could see: manifest rows, snippet files, profiles."""
    library = NoiseLibrary(workspace)
    rows = []
    if library.manifest.exists():
        with sqlite3.connect(library.manifest) as db:
            for table in ("sources", "snippets", "exclusions"):
                rows.append(sorted(map(repr, db.execute(f"SELECT * FROM {table}").fetchall())))
    files = sorted(str(p.relative_to(library.root)) for p in library.root.rglob("*") if p.is_file()
                   and p.name != "library.sqlite") if library.root.exists() else []
    profiles = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(library.profiles_dir.glob("*"))} if library.profiles_dir.exists() else {}
    return {"rows": rows, "files": files, "profiles": profiles}


# --- formats, rates, channel counts -----------------------------------------------------------------

@pytest.mark.parametrize("suffix,format,subtype,rate,channels", [
    (".wav", "WAV", "PCM_16", 48_000, 1),
    (".wav", "WAV", "FLOAT", 44_100, 4),
    (".flac", "FLAC", "PCM_24", 96_000, 2),
    (".aiff", "AIFF", "PCM_24", 44_100, 2),
    (".w64", "W64", "PCM_16", 48_000, 1),
    (".rf64", "RF64", "DOUBLE", 96_000, 1),
])
def test_ingests_every_format_rate_and_channel_count(workspace, cli, tmp_path, suffix, format, subtype, rate, channels):
    path = write(tmp_path / f"blank{suffix}", blank_tape(6.5, rate, channels, dc=0.01), rate, subtype, format)
    result = ingest(cli, path, extra=("--tape", "ATR Master", "--notes", "reel 12"))
    assert result.code == 0, result.stderr
    report = result.json()["files"][0]
    assert report["status"] == "ingested" and report["channels"] == channels and report["sample_rate"] == rate
    snippets = NoiseLibrary(workspace).snippets("revox-a77", 7.5)
    assert {s.channel for s in snippets} == set(range(channels))  # each channel is its own source
    assert len(snippets) == report["added"] == sum(report["snippets"].values())
    for snippet in snippets[:3]:
        samples = snippet.load()
        assert samples.dtype == np.float32 and samples.shape == (44_100,) and snippet.frames == 44_100
        assert hashlib.sha256(samples.astype("<f4").tobytes()).hexdigest() == snippet.sha256
        assert abs(float(np.mean(samples))) < 1e-3  # DC removed
        in_band = 10 * np.log10(min(1.0, 22_050 / (rate / 2)))  # white hiss above 22.05 kHz is resampled away
        assert snippet.rms_dbfs == pytest.approx(HISS_DBFS + in_band, abs=0.5)
        assert snippet.tape == "ATR Master" and snippet.notes == "reel 12" and snippet.source_path == str(path.resolve())
        assert snippet.end_sample - snippet.start_sample == 44_100
        assert snippet.source_start_sample == snippet.start_sample * rate // 44_100
        assert snippet.source_end_sample - snippet.source_start_sample == pytest.approx(rate, abs=1)


def test_folders_are_searched_for_audio(workspace, cli, tmp_path):
    folder = tmp_path / "blank-reels"
    (folder / "side-b").mkdir(parents=True)
    write(folder / "side-a.wav", blank_tape(5, seed=1))
    write(folder / "side-b" / "take.flac", blank_tape(5, seed=2), subtype="PCM_16")
    (folder / "notes.txt").write_text("not audio, not picked up from a folder")
    result = ingest(cli, folder)
    assert result.code == 0, result.stderr
    assert sorted(Path(f["path"]).name for f in result.json()["files"]) == ["side-a.wav", "take.flac"]


# --- screening ----------------------------------------------------------------------------------------

def test_screening_leaves_out_injected_events_and_reports_them(workspace, cli, tmp_path):
    rate = 48_000
    audio = blank_tape(40, rate, 2, seed=3, dc=0.002)
    s = lambda seconds: int(seconds * rate)  # noqa: E731
    audio[s(5):s(7), 0] = 0.0  # transport stopped: digital silence on channel 1
    audio[s(12.3), 1] += 0.4  # a click on channel 2
    audio[s(18):s(18.02), 0] = 1.0  # clipped on channel 1
    audio[s(25):s(25.5), 1] *= 0.1  # dropout on channel 2
    audio[s(31):s(31.2), :] *= 10.0  # a splice: a loud bump on both
    audio[s(35):, :] = audio[s(35):, :] * 0.05  # the tape ran out: only the electronics' noise is left
    path = write(tmp_path / "events.wav", audio, rate)
    result = ingest(cli, path)
    assert result.code == 0, result.stderr
    exclusions = result.json()["files"][0]["exclusions"]

    def excluded(channel: int, start: float, end: float, reason: str) -> bool:
        return any(e["channel"] == channel and e["start_s"] <= start and e["end_s"] >= end and reason in e["reason"]
                   for e in exclusions)

    def touched(channel: int, start: float, end: float) -> bool:
        return any(e["channel"] == channel and e["start_s"] < end and e["end_s"] > start for e in exclusions)

    assert excluded(0, 5.0, 7.0, "digital silence")
    assert excluded(1, 12.3, 12.3, "click")
    assert excluded(0, 18.0, 18.02, "clipping")
    assert touched(1, 25.0, 25.5) and touched(0, 31.0, 31.2) and touched(1, 31.0, 31.2)
    assert touched(0, 35.0, 35.0) and touched(1, 35.0, 35.0)  # the level change itself
    events = {0: [(5, 7), (18, 18.02), (31, 31.2), (35, 40)], 1: [(12.3, 12.3), (25, 25.5), (31, 31.2), (35, 40)]}
    snippets = NoiseLibrary(workspace).snippets()
    assert len(snippets) >= 20
    for snippet in snippets:
        start, end = snippet.start_sample / 44_100, snippet.end_sample / 44_100
        for first, last in events[snippet.channel]:
            assert end <= first or start >= last, (snippet.channel, start, end, first, last)
        assert snippet.rms_dbfs == pytest.approx(HISS_DBFS, abs=1.0)  # only the tape's own noise is kept
    # every exclusion names a reason and a time range inside the recording
    assert all(0 <= e["start_s"] < e["end_s"] <= 40.0 and e["reason"] for e in exclusions)


# --- splits -------------------------------------------------------------------------------------------

def split_pattern(workspace) -> list[tuple[int, int, str, str]]:
    return [(s.channel, s.start_sample, s.split, s.sha256) for s in NoiseLibrary(workspace).snippets()]


def test_splits_are_contiguous_guarded_deterministic_and_follow_the_audio(workspace, cli, tmp_path, monkeypatch):
    audio = blank_tape(60, 48_000, 1, seed=4)
    wav = write(tmp_path / "reel.wav", audio, subtype="FLOAT")
    result = ingest(cli, wav)
    assert result.code == 0, result.stderr
    first = split_pattern(workspace)
    splits = [split for _, _, split, _ in first]
    assert splits.count("train") > splits.count("validation") >= 1 and splits.count("test") >= 1
    # contiguous blocks: each split change between consecutive snippets leaves a guard gap, so no
    # snippet of one split adjoins a snippet of another
    for (_, start_a, split_a, _), (_, start_b, split_b, _) in zip(first, first[1:]):
        gap = (start_b - start_a - 44_100) / 44_100
        assert gap >= 0
        if split_a != split_b:
            assert gap >= 2 * guard_windows(WINDOWS_PER_SECOND) / WINDOWS_PER_SECOND - 1e-9  # 1 s snippets
    changes = sum(a != b for a, b in zip(splits, splits[1:]))
    assert changes <= 6  # a handful of blocks, not an interleaving

    # deterministic and seeded by the audio, not the file: the same audio as FLAC and as 24-bit WAV,
    # each in a fresh workspace, gives exactly the same snippets in the same splits
    samples_24bit = (np.round(audio * 2 ** 23).astype(np.int32) << 8)  # exact in both containers
    flac = write(tmp_path / "reel.flac", samples_24bit, subtype="PCM_24")
    wav24 = write(tmp_path / "reel24.wav", samples_24bit, subtype="PCM_24")
    patterns = []
    for recording in (flac, wav24):
        fresh = init_workspace(tmp_path / recording.name.replace(".", "-"))
        monkeypatch.setenv("WORKBENCH_HOME", str(fresh.root))
        assert ingest(cli, recording).code == 0
        patterns.append([(channel, start, split) for channel, start, split, _ in split_pattern(fresh)])
    assert patterns[0] == patterns[1] and len(patterns[0]) == len(first)


def test_split_proportions_flag(workspace, cli, tmp_path):
    path = write(tmp_path / "reel.wav", blank_tape(40, 48_000, 1, seed=5))
    result = ingest(cli, path, extra=("--split", "50/0/50"))
    assert result.code == 0, result.stderr
    counts = result.json()["files"][0]["snippets"]
    assert counts["validation"] == 0 and counts["train"] > 0 and counts["test"] > 0
    assert cli("capture-noise", "--device", "revox-a77", "--speed", "7.5", "--split", "80/20", str(path)).code == 2


# --- idempotency ----------------------------------------------------------------------------------------

def test_same_recording_again_adds_nothing_and_replace_reingests(workspace, cli, tmp_path):
    path = write(tmp_path / "reel.wav", blank_tape(12, seed=6, hum_hz=50.0))
    first = ingest(cli, path)
    assert first.code == 0, first.stderr
    state = library_state(workspace)
    listing = cli("noise", "list", "--json").json()

    again = ingest(cli, path)
    assert again.code == 0
    assert again.json()["files"][0]["status"] == "already in the library"
    assert library_state(workspace) == state and cli("noise", "list", "--json").json() == listing
    human = cli("capture-noise", "--device", "revox-a77", "--speed", "7.5", "--snippet-seconds", "1", str(path))
    text = " ".join(human.stdout.split())
    assert "already in the library" in text and "--replace" in text

    replaced = ingest(cli, path, extra=("--replace",))
    assert replaced.code == 0
    assert replaced.json()["files"][0]["status"] == "replaced"
    assert cli("noise", "list", "--json").json() == listing  # same snippets, no duplicates
    # the same recording at another speed of the device is another noise source
    other_speed = ingest(cli, path, speed="3.75")
    assert other_speed.json()["files"][0]["status"] == "ingested"


def test_identical_channels_are_stored_once(workspace, cli, tmp_path):
    mono = blank_tape(6, channels=1, seed=7)
    result = ingest(cli, write(tmp_path / "dual-mono.wav", np.repeat(mono, 2, axis=1)))
    assert result.code == 0, result.stderr
    report = result.json()["files"][0]
    assert report["duplicates"] == report["added"] > 0
    assert len(NoiseLibrary(workspace).snippets()) == report["added"]


# --- noise list, noise profile, the library API -----------------------------------------------------------

def test_noise_list_profile_and_library_api(workspace, cli, tmp_path):
    assert "empty" in cli("noise", "list").stdout
    ingest(cli, write(tmp_path / "a77.wav", blank_tape(30, seed=8, hum_hz=50.0)))
    ingest(cli, write(tmp_path / "uher.wav", blank_tape(8, channels=1, seed=9, hum_hz=60.0)),
           device="uher-4000-l", speed="1.875")
    listing = cli("noise", "list", "--json").json()
    assert {(e["device"], e["speed_ips"]) for e in listing} == {("revox-a77", 7.5), ("uher-4000-l", 1.875)}
    library = NoiseLibrary(workspace)
    for entry in listing:
        for split, numbers in entry["splits"].items():
            snippets = library.snippets(entry["device"], entry["speed_ips"], split)
            assert numbers["snippets"] == len(snippets)
            assert numbers["minutes"] == pytest.approx(len(snippets) / 60, abs=1e-3)
    only = cli("noise", "list", "--device", "uher-4000-l", "--json").json()
    assert [e["device"] for e in only] == ["uher-4000-l"]
    table = cli("noise", "list").stdout
    assert "revox-a77" in table and "validation" in table
    assert cli("noise", "list", "--device", "no-such-deck").code == 2

    profile = cli("noise", "profile", "--device", "revox-a77", "--speed", "7.5", "--json").json()
    assert profile["hum"]["mains_hz"] == 50 and abs(profile["hum"]["fundamental_hz"] - 50.0) < 0.5
    assert Path(profile["png"]).read_bytes()[:4] == b"\x89PNG" and Path(profile["json"]).exists()
    uher = library.profile("uher-4000-l", 1.875)
    assert uher.hum.mains_hz == 60 and abs(uher.hum.fundamental_hz - 60.0) < 0.5
    assert uher.rms_dbfs == pytest.approx(HISS_DBFS, abs=1.0)
    shown = cli("noise", "profile", "--device", "uher-4000-l", "--speed", "1.875")
    assert "60 Hz family" in shown.stdout and "dBFS" in shown.stdout
    assert cli("noise", "profile", "--device", "revox-c36", "--speed", "7.5").code == 2  # no noise yet

    train = library.snippets("revox-a77", 7.5, "train")
    digest = library.digest(train)
    assert digest == library.digest(list(reversed(train))) and len(digest) == 64
    assert digest != library.digest(train[1:]) and digest != library.digest(library.snippets("revox-a77", 7.5))


# --- bad input --------------------------------------------------------------------------------------------

def _bad_recording(kind: str, folder: Path) -> Path:
    path = folder / f"{kind}.wav"
    if kind == "corrupt":
        path.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + os.urandom(400))
    elif kind == "truncated":
        write(path, blank_tape(8))
        path.write_bytes(path.read_bytes()[: 44 + 6 * 48_000 * 3])  # header promises 8 s, body holds ~3
    elif kind == "non-audio":
        path.write_text("this is a spreadsheet, not a recording\n" * 50)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "silence":
        write(path, np.zeros((48_000 * 6, 2)), subtype="PCM_16")
    elif kind == "too-short":
        write(path, blank_tape(0.6))
    elif kind in ("nan", "inf"):
        audio = blank_tape(6)
        audio[48_000 * 4, 1] = np.nan if kind == "nan" else np.inf
        write(path, audio, subtype="FLOAT")
    return path


@pytest.mark.parametrize("kind,reason", [
    ("corrupt", "not readable audio"),
    ("truncated", "truncated"),
    ("non-audio", "not readable audio"),
    ("empty", "empty file"),
    ("silence", "no usable noise"),
    ("too-short", "too short for one 1 s snippet"),
    ("nan", "NaN or inf"),
    ("inf", "NaN or inf"),
])
def test_bad_recordings_are_refused_in_one_line_and_leave_the_library_alone(workspace, cli, tmp_path, kind, reason):
    good = write(tmp_path / "good.wav", blank_tape(6, seed=10))
    assert ingest(cli, good).code == 0
    before = library_state(workspace)
    bad = _bad_recording(kind, tmp_path)
    # alone, and in a batch after a good new recording: the whole batch is refused
    newer = write(tmp_path / "newer.wav", blank_tape(6, seed=11))
    for batch in ([bad], [newer, bad]):
        result = ingest(cli, *batch)
        assert result.code == 2, (kind, result.stdout, result.stderr)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and result.stderr.rstrip().endswith(errors[0])  # progress bars aside, one line
        message = errors[0]
        assert bad.name in message and reason in message, message
        assert library_state(workspace) == before


def test_unknown_device_or_speed_is_refused(workspace, cli, tmp_path):
    good = write(tmp_path / "good.wav", blank_tape(3))
    unknown = ingest(cli, good, device="studer-a807")
    assert unknown.code == 2 and "unknown device 'studer-a807'" in unknown.stderr
    wrong_speed = ingest(cli, good, device="uher-4000-l", speed="15")
    assert wrong_speed.code == 2 and "has no speed 15 ips" in wrong_speed.stderr and "3.75" in wrong_speed.stderr
    missing = ingest(cli, tmp_path / "nowhere.wav")
    assert missing.code == 2 and "nowhere.wav" in missing.stderr
    assert not NoiseLibrary(workspace).manifest.exists()


# --- a kill in the middle -----------------------------------------------------------------------------------

@pytest.mark.slow  # end to end: a workbench process killed, then run again
def test_a_killed_ingest_leaves_the_library_as_it_was(workspace, cli, tmp_path):
    assert ingest(cli, write(tmp_path / "first.wav", blank_tape(6, seed=12))).code == 0
    before = library_state(workspace)
    listing = cli("noise", "list", "--json").json()
    library = NoiseLibrary(workspace)
    existing = set(library.snippets_dir.rglob("*.wav"))
    # long enough that the ingest is still running when its first snippet file appears
    long_reel = write(tmp_path / "long.wav", blank_tape(300, 44_100, 1, seed=13), 44_100, "PCM_16")
    child = subprocess.Popen(
        [sys.executable, "-m", "workbench", "capture-noise", "--device", "revox-a77", "--speed", "7.5",
         "--snippet-seconds", "1", str(long_reel)],
        env={**os.environ, "WORKBENCH_HOME": str(workspace.root)}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and child.poll() is None:
        if set(library.snippets_dir.rglob("*.wav")) - existing:
            break
        time.sleep(0.01)
    assert child.poll() is None, "the ingest finished (or failed) before it could be killed: " + child.stderr.read().decode()
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL
    assert cli("noise", "list", "--json").json() == listing
    after = library_state(workspace)
    assert after["rows"] == before["rows"] and after["profiles"] == before["profiles"]
    # the killed ingest's snippet files are orphans: invisible, and garbage once old enough
    assert library.collect_garbage(min_age_seconds=0) > 0
    assert library_state(workspace) == before
