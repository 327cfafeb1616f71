"""The workspace, device registry, CLI shell and the shared audio I/O and resampling."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
import soundfile as sf

from workbench.audio.dsp import StreamingResampler, resample, resampled_length
from workbench.audio.io import atomic_path, audio_info, iter_blocks, read_ahead, write_audio
from workbench.devices import get_device, load_devices, parse_playback_eq
from workbench.errors import WorkbenchError
from workbench.workspace import find_workspace


def test_version_and_help_list_every_command(cli):
    result = cli("--version")
    assert result.code == 0 and result.stdout.startswith("workbench 0.")
    result = cli("--help")
    assert result.code == 0
    for command in ("init", "devices"):
        assert command in result.stdout


def test_research_devices_are_registered(workspace):
    devices = load_devices(workspace)
    assert set(devices) == {"revox-a77", "revox-a77-hs", "revox-c36", "uher-4000-l", "uher-4000-s",
                            "technics-tr575-a", "technics-tr575-b"}
    assert devices["revox-a77-hs"].speeds_ips == [15.0, 7.5]
    assert devices["technics-tr575-a"].format == "cassette"
    eq = devices["uher-4000-l"].eq_at(1.875)
    assert (eq.low_us, eq.high_us) == (3180.0, 120.0)


def test_playback_eq_parsing():
    assert parse_playback_eq("NAB 3180+50 µs").standard == "NAB"
    assert parse_playback_eq("IEC 70 µs").low_us is None
    with pytest.raises(ValueError):
        parse_playback_eq("flat")


def test_workspace_found_from_a_subfolder(workspace, monkeypatch, tmp_path):
    monkeypatch.delenv("WORKBENCH_HOME")
    sub = workspace.root / "transfers" / "box-3"
    sub.mkdir(parents=True)
    monkeypatch.chdir(sub)
    assert find_workspace().root == workspace.root
    monkeypatch.chdir(tmp_path)
    with pytest.raises(WorkbenchError, match="not inside a workspace"):
        find_workspace()


def test_init_refuses_an_existing_workspace(workspace, cli):
    result = cli("init", workspace.root)
    assert result.code == 2 and "already a workspace" in result.stderr


def test_devices_cli_list_show_add(workspace, cli):
    listed = cli("devices", "list", "--json").json()
    assert {d["id"] for d in listed} >= {"revox-a77", "uher-4000-s"}
    shown = cli("devices", "show", "revox-c36", "--json").json()
    assert shown["speeds_ips"] == [7.5, 3.75]
    added = cli("devices", "add", "studer-a807", "--make", "Studer", "--model", "A807", "--format", '1/4" reel',
                "--speed", "15", "--speed", "7.5", "--eq", "15=NAB 3180+50 µs")
    assert added.code == 0, added.stderr
    assert get_device(workspace, "studer-a807").eq_at(15).high_us == 50.0
    assert cli("devices", "show", "nope").code == 2


@pytest.mark.parametrize("args, message", [
    (["Bad_Id", "--speed", "7.5", "--format", "cassette"], "not a slug"),
    (["ok-id", "--speed", "-7.5", "--format", "cassette"], "not a positive"),
    (["ok-id", "--speed", "7.5", "--format", "8-track"], "format"),
    (["revox-a77", "--speed", "7.5", "--format", "cassette"], "already exists"),
])
def test_devices_add_validates(workspace, cli, args, message):
    result = cli("devices", "add", args[0], "--make", "X", "--model", "Y", *args[1:])
    assert result.code == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_check_speed_names_the_speeds_a_device_has(workspace):
    device = get_device(workspace, "uher-4000-l")
    assert device.check_speed(1.875) == 1.875
    with pytest.raises(WorkbenchError, match=r"no speed 15 ips \(it has: 3.75, 1.875\)"):
        device.check_speed(15)


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.wav"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as temporary:
            temporary.write_bytes(b"half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("subtype", ["PCM_16", "PCM_24", "FLOAT", "DOUBLE"])
def test_write_and_stream_read_round_trip(tmp_path, subtype):
    rng = np.random.default_rng(0)
    samples = (rng.uniform(-0.5, 0.5, size=(3, 10_001))).astype(np.float32)
    path = tmp_path / "x.wav"
    write_audio(path, samples, 48_000, subtype=subtype)
    info = audio_info(path)
    assert (info.sample_rate, info.channels, info.frames, info.subtype) == (48_000, 3, 10_001, subtype)
    back = np.concatenate(list(iter_blocks(path, 4096)), axis=1)
    assert back.shape == samples.shape
    assert np.max(np.abs(back - samples)) < 1e-4


def test_bad_audio_is_one_clear_line(tmp_path):
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    text = tmp_path / "notes.wav"
    text.write_text("not audio at all" * 100)
    for path, reason in ((empty, "empty file"), (text, "not readable audio"), (tmp_path / "gone.wav", "no such file")):
        with pytest.raises(WorkbenchError, match=reason) as caught:
            audio_info(path)
        assert str(path) in str(caught.value)
    truncated = tmp_path / "truncated.wav"
    sf.write(truncated, np.zeros((44_100, 2), np.float32), 44_100, subtype="PCM_24")
    truncated.write_bytes(truncated.read_bytes()[:100_000])
    with pytest.raises(WorkbenchError, match="truncated"):
        list(iter_blocks(truncated, 8192))


@pytest.mark.parametrize("orig, new", [(96_000, 44_100), (48_000, 44_100), (22_050, 44_100), (44_100, 48_000)])
def test_streaming_resampler_equals_whole_signal(orig, new):
    rng = np.random.default_rng(1)
    signal = rng.standard_normal((2, orig // 2 + 777)).astype(np.float32)
    whole = resample(signal, orig, new)
    assert whole.shape[1] == resampled_length(signal.shape[1], orig, new)
    stream = StreamingResampler(orig, new, channels=2)
    sizes = rng.integers(1, 9000, size=100)
    pieces, start = [], 0
    for size in sizes:
        if start >= signal.shape[1]:
            break
        pieces.append(stream.push(signal[:, start:start + size]))
        start += size
    pieces.append(stream.push(signal[:, start:]))
    pieces.append(stream.flush())
    streamed = np.concatenate(pieces, axis=1)
    assert streamed.shape == whole.shape
    assert np.max(np.abs(streamed - whole)) < 1e-5


def test_read_ahead_keeps_order_raises_the_workers_error_and_stops_when_left_early():
    assert list(read_ahead(iter(range(50)), depth=3)) == list(range(50))

    def failing():
        yield 1
        raise WorkbenchError("x.wav: truncated")
    with pytest.raises(WorkbenchError, match="x.wav: truncated"):
        list(read_ahead(failing()))

    produced = []

    def endless():
        for i in itertools.count():
            produced.append(i)
            yield i
    for item in read_ahead(endless(), depth=2):
        if item == 5:
            break
    settled = len(produced)
    assert settled <= 5 + 1 + 2 + 1  # bounded by the hand-off depth, and the worker has stopped
    time.sleep(0.2)
    assert len(produced) == settled
