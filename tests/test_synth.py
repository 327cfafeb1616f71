"""The embedded synthetic archive: device signatures measured with the noise-profile code, determinism,
screening of the injected defects by the real capture-noise, synthetic music, and the demo archive."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import replace

import numpy as np
import pytest

from workbench.audio.io import audio_info, read_audio
from workbench.devices import research_devices
from workbench.errors import WorkbenchError
from workbench.noise import profile as profile_code
from workbench.noise.profile import noise_profile, profile_distance, smooth_psd
from workbench.synth.music import (LOUDNESS_RANGE_LUFS, MELODIC_TIMBRES, PEAK_CEILING_DBFS, _piano, loudness_lufs,
                                   render_music, render_piece)
from workbench.synth.tape_noise import (TapeNoiseRenderer, design_psd_db, device_signature, render_blank_tape,
                                        sidecar_path)

SR = 44_100
SECONDS = 4.0
DEVICES = {d.id: d for d in research_devices()}
DEVICE_SPEEDS = [(d.id, s) for d in DEVICES.values() for s in d.speeds_ips]
# Stated acceptance distances (RMS dB between smoothed PSDs, `profile_distance`):
TWIN_DECKS_DIFFER_DB = 3.0  # the two decks of the same double cassette deck
ANY_TWO_DEVICES_DIFFER_DB = 0.75  # any two registry machines at a speed they share
SAME_DEVICE_RERENDER_DB = 0.5  # the same machine with another seed: the measure's own noise (4-6 s of audio)


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def rendered():
    """Every research device at every speed: 4 s without defects, and its measured noise profile."""
    out = {}
    for device_id, speed in DEVICE_SPEEDS:
        renderer = TapeNoiseRenderer(DEVICES[device_id], speed, SECONDS, seed=1, defects=False)
        audio = renderer.render_array()
        out[device_id, speed] = renderer, audio, noise_profile(audio, SR)
    return out


def design_tilt_and_bandwidth(renderer, profile):
    """The simulator's intended spectrum put through the profile code's own tilt and bandwidth definitions."""
    design = design_psd_db(renderer.signature, renderer.eq, renderer.speed_ips, SR, profile.frequencies_hz)
    centres, smoothed = smooth_psd(profile.frequencies_hz, design)
    return profile_code._tilt(centres, smoothed), profile_code._bandwidth(centres, smoothed, SR)


@pytest.mark.parametrize("device_id,speed", DEVICE_SPEEDS)
def test_each_device_has_its_signature(rendered, device_id, speed):
    renderer, audio, profile = rendered[device_id, speed]
    signature = renderer.signature
    assert audio.shape == (DEVICES[device_id].channels, round(SECONDS * SR))
    # mains hum: the configured family, fundamental within 0.5 Hz (the acceptance bound)
    assert profile.hum is not None
    assert profile.hum.mains_hz == signature.mains_hz
    assert abs(profile.hum.fundamental_hz - signature.mains_hz) < 0.5
    # hiss slope and high-frequency roll-off: what the playback EQ and the speed's losses make of it
    tilt, bandwidth = design_tilt_and_bandwidth(renderer, profile)
    assert profile.tilt_db_per_octave == pytest.approx(tilt, abs=0.3)
    assert profile.bandwidth_hz == pytest.approx(bandwidth, rel=0.05)
    assert -80 < profile.rms_dbfs < -50


def test_both_hum_families_are_in_the_registry_and_an_override_switches_them(rendered):
    families = {renderer.signature.mains_hz for renderer, _, _ in rendered.values()}
    assert families == {50, 60}  # technics decks are simulated at 60 Hz by their [simulation] table
    revox = DEVICES["revox-a77"]
    assert device_signature(revox).mains_hz == 50
    at_60 = replace(revox, simulation={"mains_hz": 60, "hum_dbfs": -70.0})
    profile = noise_profile(TapeNoiseRenderer(at_60, 7.5, SECONDS, seed=1, defects=False).render_array(), SR)
    assert profile.hum.mains_hz == 60 and abs(profile.hum.fundamental_hz - 60.0) < 0.5
    assert device_signature(at_60).overridden == ("hum_dbfs", "mains_hz")


def test_high_frequency_roll_off_follows_the_speed(rendered):
    bandwidth = {key: p.bandwidth_hz for key, (_, _, p) in rendered.items()}
    for device in DEVICES.values():
        fast, slow = max(device.speeds_ips), min(device.speeds_ips)
        assert bandwidth[device.id, slow] <= bandwidth[device.id, fast] * 1.01
    for uher in ("uher-4000-l", "uher-4000-s"):  # the portable at 1.875 ips loses the top octave
        assert bandwidth[uher, 1.875] < 0.6 * bandwidth[uher, 3.75]
        assert 8_000 < bandwidth[uher, 1.875] < 12_500
    # a cassette deck's narrow-gap heads reproduce shorter wavelengths than the portable at 1.875 ips
    assert bandwidth["technics-tr575-a", 1.875] > 1.5 * bandwidth["uher-4000-l", 1.875]


def test_hiss_slope_follows_the_playback_equalisation():
    """A longer HF time constant (120 vs 90 µs) lifts the hiss above its turnover: a steeper tilt."""
    uher = DEVICES["uher-4000-l"]
    tilts = {}
    for curve in ("DIN 3180+90 µs", "DIN 3180+120 µs"):
        device = replace(uher, playback_eq={**uher.playback_eq, "3.75": curve})
        renderer = TapeNoiseRenderer(device, 3.75, SECONDS, seed=2, defects=False)
        tilts[curve] = noise_profile(renderer.render_array(), SR).tilt_db_per_octave
    assert tilts["DIN 3180+120 µs"] > tilts["DIN 3180+90 µs"] + 0.4


def test_devices_differ_by_a_stated_distance(rendered):
    profiles = {key: p for key, (_, _, p) in rendered.items()}
    twins = profile_distance(profiles["technics-tr575-a", 1.875], profiles["technics-tr575-b", 1.875])
    assert twins > TWIN_DECKS_DIFFER_DB
    for (a, speed_a), (b, speed_b) in itertools.combinations(profiles, 2):
        if speed_a == speed_b:
            assert profile_distance(profiles[a, speed_a], profiles[b, speed_b]) > ANY_TWO_DEVICES_DIFFER_DB, (a, b)
    again = TapeNoiseRenderer(DEVICES["technics-tr575-a"], 1.875, SECONDS, seed=9, defects=False).render_array()
    assert profile_distance(noise_profile(again, SR), profiles["technics-tr575-a", 1.875]) < SAME_DEVICE_RERENDER_DB


def test_stereo_channels_are_partly_correlated(rendered):
    for device_id in ("revox-a77", "technics-tr575-a"):
        _, audio, _ = rendered[device_id, DEVICES[device_id].speeds_ips[-1]]
        correlation = float(np.corrcoef(audio)[0, 1])
        assert 0.05 < correlation < 0.8, (device_id, correlation)


def test_same_seed_is_byte_identical_and_another_seed_differs_with_the_same_statistics(tmp_path):
    device = DEVICES["revox-a77"]
    paths = {name: tmp_path / f"{name}.wav" for name in ("a", "b", "c")}
    renders = {name: render_blank_tape(device, 3.75, 6.0, path, seed=5 if name != "c" else 6)
               for name, path in paths.items()}
    assert sha256(paths["a"]) == sha256(paths["b"])
    truths = [json.loads(sidecar_path(paths[name]).read_text()) for name in ("a", "b")]
    for truth in truths:
        del truth["path"], truth["sidecar"]
    assert truths[0] == truths[1]
    assert sha256(paths["a"]) != sha256(paths["c"])
    assert [e.start_s for e in renders["a"].events] != [e.start_s for e in renders["c"].events]
    assert audio_info(paths["a"]).subtype == "PCM_24" and audio_info(paths["a"]).channels == 2

    clean = {seed: TapeNoiseRenderer(device, 3.75, 6.0, seed=seed, defects=False).render_array() for seed in (5, 6)}
    assert not np.allclose(clean[5], clean[6])
    p5, p6 = noise_profile(clean[5], SR), noise_profile(clean[6], SR)
    assert p5.rms_dbfs == pytest.approx(p6.rms_dbfs, abs=0.5)
    assert p5.tilt_db_per_octave == pytest.approx(p6.tilt_db_per_octave, abs=0.2)
    assert profile_distance(p5, p6) < SAME_DEVICE_RERENDER_DB


def test_injected_events_are_in_the_audio_and_the_sidecar(tmp_path):
    path = tmp_path / "tape.wav"
    render = render_blank_tape(DEVICES["uher-4000-l"], 1.875, 20.0, path, seed=3)
    kinds = [e.kind for e in render.events]
    assert {"click", "dropout", "splice"} <= set(kinds) and kinds.count("splice") == 1
    truth = json.loads(sidecar_path(path).read_text())
    assert truth["events"] == [e.to_dict() for e in render.events] and truth["device"] == "uher-4000-l"
    audio, _ = read_audio(path)
    level = lambda a, b: 20 * math.log10(np.std(audio[0, int(a * SR): int(b * SR)]))  # noqa: E731
    typical = level(0, 20)
    for event in render.events:
        assert 0 < event.start_s < event.end_s < 20
        if event.kind == "click":  # a sharp peak far above the hiss
            window = np.abs(audio[0, int(event.start_s * SR): int(event.end_s * SR) + 1])
            assert 20 * math.log10(window.max()) > typical + 25
        if event.kind == "dropout":  # the tape's noise falls away in its middle
            middle = (event.start_s + event.end_s) / 2
            assert level(middle - 0.02, middle + 0.02) < typical - 6


@pytest.mark.parametrize("device_id,speed", [("technics-tr575-a", 1.875), ("uher-4000-l", 1.875), ("revox-a77", 7.5)])
def test_capture_noise_excludes_the_injected_clicks_and_dropouts(workspace, cli, tmp_path, device_id, speed):
    path = tmp_path / f"{device_id}.wav"
    render = render_blank_tape(DEVICES[device_id], speed, 20.0, path, seed=11)
    result = cli("capture-noise", "--device", device_id, "--speed", speed, "--json", path)
    assert result.code == 0, result.stderr
    report = result.json()["files"][0]
    exclusions = report["exclusions"]
    assert report["usable_seconds"] > 0
    for event in render.events:
        for channel in range(render.channels):
            assert any(x["channel"] == channel and x["start_s"] <= event.start_s and x["end_s"] >= event.end_s
                       for x in exclusions), (event, channel, exclusions)


def test_simulation_table_is_validated():
    revox = DEVICES["revox-a77"]
    assert device_signature(replace(revox, simulation={"hiss_dbfs": -60.0})).hiss_dbfs == -60.0
    for bad, message in [({"hiss": -60}, "unknown key 'hiss'"), ({"mains_hz": 55}, "50 or 60"),
                         ({"hiss_dbfs": "loud"}, "hiss_dbfs"), ({"channel_offsets_db": [0.5]}, "1 values for 2 channels"),
                         ({"modulation_depth": 3.0}, "between 0 and 0.5")]:
        with pytest.raises(WorkbenchError, match="revox-a77") as caught:
            device_signature(replace(revox, simulation=bad))
        assert message in str(caught.value)


def test_signatures_are_stable_and_distinct():
    a, b = DEVICES["technics-tr575-a"], DEVICES["technics-tr575-b"]
    assert device_signature(a) == device_signature(replace(a))
    sa, sb = device_signature(a), device_signature(b)
    assert sa.mains_hz == sb.mains_hz == 60 and sa.overridden == ("mains_hz",)
    assert sa.hiss_dbfs != sb.hiss_dbfs and sa.hum_harmonics_db != sb.hum_harmonics_db


# --- music -------------------------------------------------------------------------------------------------

def test_music_has_no_clipping_a_stated_loudness_and_every_timbre(tmp_path):
    render = render_music(tmp_path / "music", minutes=20 / 60, seed=3, piece_seconds=5.0)
    assert len(render.pieces) == 4 and not render.reused
    assert {p.timbres["lead"] for p in render.pieces} == set(MELODIC_TIMBRES)
    assert any("drums" in p.timbres for p in render.pieces) or any(p.timbres["lead"] == "mallet" for p in render.pieces)
    for piece in render.pieces:
        audio, sr = read_audio(render.folder / piece.file)
        assert sr == 44_100 and audio.shape[0] == 1
        peak_dbfs = 20 * math.log10(float(np.max(np.abs(audio))))
        assert peak_dbfs <= PEAK_CEILING_DBFS + 0.01  # no clipping: peaks stay under the ceiling
        loudness = loudness_lufs(audio, sr)  # measured again, independently, on the file
        assert LOUDNESS_RANGE_LUFS[0] - 0.2 <= loudness <= LOUDNESS_RANGE_LUFS[1] + 0.2
        assert piece.max_polyphony >= 3
    manifest = json.loads(render.manifest.read_text())
    assert manifest["complete"] and [p["file"] for p in manifest["pieces"]] == [p.file for p in render.pieces]
    again = render_music(tmp_path / "music", minutes=20 / 60, seed=3, piece_seconds=5.0)
    assert again.reused
    with pytest.raises(WorkbenchError, match="another request"):
        render_music(tmp_path / "music", minutes=20 / 60, seed=4, piece_seconds=5.0)


def test_music_is_deterministic_by_seed_and_has_pauses():
    first, piece = render_piece([7, 0], 16.0, lead_timbre="bowed")
    second, _ = render_piece([7, 0], 16.0, lead_timbre="bowed")
    other, _ = render_piece([8, 0], 6.0, lead_timbre="bowed")
    assert np.array_equal(first, second) and not np.allclose(first[:, :other.shape[1]], other)
    assert piece.pauses, "a piece longer than 15 s has a general pause"
    start, end = piece.pauses[0]
    level = lambda a, b: 10 * math.log10(np.mean(np.square(first[0, int(a * SR): int(b * SR)], dtype=np.float64)) + 1e-20)  # noqa: E731
    assert level(end - 0.4, end - 0.05) < level(0, 16) - 20  # by the end of the pause the room has gone quiet


def test_piano_partials_are_stretched_by_string_stiffness():
    f0 = 110.0
    tone = _piano(f0, 1.5, 0.9, SR, np.random.default_rng(0))
    spectrum = np.abs(np.fft.rfft(tone[: SR] * np.hanning(SR)))
    def partial(n):  # strongest bin within ±1 % of n·f0, 1 Hz resolution
        lo, hi = int(n * f0 * 0.99), int(n * f0 * 1.01) + 1
        return lo + int(np.argmax(spectrum[lo:hi]))
    assert abs(partial(1) - f0) <= 1
    assert partial(10) - 10 * f0 >= 2  # inharmonic: the 10th partial is several Hz sharp
    assert partial(12) - 12 * f0 > partial(6) - 6 * f0  # and the stretch grows with the partial number


# --- command line -------------------------------------------------------------------------------------------

def test_cli_blank_tape_and_signature(workspace, cli, tmp_path):
    out = tmp_path / "blank.wav"
    result = cli("synth", "blank-tape", "--device", "technics-tr575-b", "--speed", "1.875", "--minutes", "0.1",
                 "--seed", "4", "--json", out)
    assert result.code == 0, result.stderr
    data = result.json()
    assert data["device"] == "technics-tr575-b" and data["channels"] == 2 and data["signature"]["mains_hz"] == 60
    assert audio_info(out).frames == round(6.0 * SR) and sidecar_path(out).is_file()
    again = cli("synth", "blank-tape", "--device", "technics-tr575-b", "--speed", "1.875", "--minutes", "0.1", out)
    assert again.code == 2 and "exists; pass --force" in again.stderr
    wrong = cli("synth", "blank-tape", "--device", "revox-a77", "--speed", "15", "--minutes", "0.1", tmp_path / "x.wav")
    assert wrong.code == 2 and "no speed 15 ips (it has: 7.5, 3.75)" in wrong.stderr
    shown = cli("synth", "signature", "--device", "uher-4000-l", "--json")
    assert shown.code == 0 and [s["speed_ips"] for s in shown.json()["speeds"]] == [3.75, 1.875]


def test_cli_archive_is_complete_and_reused(workspace, cli, tmp_path):
    out = tmp_path / "archive"
    result = cli("synth", "archive", out, "--scale", "small", "--seed", "2", "--json")
    assert result.code == 0, result.stderr
    manifest = result.json()
    assert not manifest["reused"]
    assert {(t["device"], t["speed_ips"]) for t in manifest["blank_tapes"]} == {
        ("uher-4000-l", 3.75), ("uher-4000-l", 1.875), ("revox-a77", 7.5), ("revox-a77", 3.75),
        ("technics-tr575-a", 1.875)}
    for tape in manifest["blank_tapes"]:
        assert audio_info(out / tape["path"]).channels == DEVICES[tape["device"]].channels
        assert json.loads((out / tape["sidecar"]).read_text())["events"]
    for split in ("train", "validation", "test"):
        pieces = manifest["corpus"][split]["pieces"]
        assert pieces and all((out / "corpus" / split / p).is_file() for p in pieces)
    transfer = manifest["transfers"][0]
    info = audio_info(out / transfer["path"])
    assert (info.sample_rate, info.channels, info.subtype) == (48_000, 2, "PCM_24")
    noisy, _ = read_audio(out / transfer["path"])
    clean, _ = read_audio(out / transfer["reference"])
    snr = 10 * math.log10(np.mean(np.square(clean, dtype=np.float64)) / np.mean(np.square(noisy - clean, dtype=np.float64)))
    assert snr == pytest.approx(transfer["snr_db"], abs=0.5)
    assert json.loads((out / "archive.json").read_text())["complete"]

    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.wav")}
    again = cli("synth", "archive", out, "--scale", "small", "--seed", "2")
    assert again.code == 0 and "reused" in again.stdout
    assert stamps == {p: p.stat().st_mtime_ns for p in out.rglob("*.wav")}
    other = cli("synth", "archive", out, "--scale", "small", "--seed", "3")
    assert other.code == 2 and "another request" in other.stderr

    # an interrupted build resumes: only what is missing is rendered, byte-identical to before
    lost = [out / manifest["blank_tapes"][0]["path"], out / "corpus" / "train" / manifest["corpus"]["train"]["pieces"][-1]]
    digests = [sha256(path) for path in lost]
    for path in lost:
        path.unlink()
    resumed = cli("synth", "archive", out, "--scale", "small", "--seed", "2", "--json")
    assert resumed.code == 0 and not resumed.json()["reused"]
    assert sorted(resumed.json()["rendered"]) == sorted([manifest["blank_tapes"][0]["path"], "corpus/train"])
    assert [sha256(path) for path in lost] == digests
