"""`workbench denoise`: streaming chunked inference, exact lengths, strength, provenance and refusals.

Tolerance of chunking (stated in workbench/model/overlap_add.py and checked here): with an identity or linear
process of support shorter than the context, chunked output equals whole-signal output to float
rounding (1e-6). With a real U-Net (tiny, fixed seed, random weights, so nothing is smoothed away by
training) on grid-aligned chunks, the only difference is the finite context at the seams: it must stay
below 1e-3 of the whole-signal output's RMS at every sample (measured: ~1e-5).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from workbench.audio.io import audio_info, read_audio, sha256_file, write_audio
from workbench.denoise import denoise_stream, strength_from_reduction_db
from workbench.errors import WorkbenchError
from workbench.model.checkpoint import save_checkpoint
from workbench.model.overlap_add import (
    ChunkPlan,
    OverlapAdd,
    crossfade_ramp,
    model_grid_frames,
    model_process,
    process_whole,
)
from workbench.model.unet import SIZES, TwoStageUNet

SEAM_TOLERANCE = 1e-3  # max |chunked - whole| / rms(whole) for the tiny U-Net


def _stream(process, samples: np.ndarray, plan: ChunkPlan, seed: int = 0) -> np.ndarray:
    """Push `samples` through OverlapAdd in random block sizes, as a file reader would."""
    rng = np.random.default_rng(seed)
    chunker, outputs, start = OverlapAdd(process, samples.shape[0], plan), [], 0
    while start < samples.shape[1]:
        size = int(rng.integers(1, 3 * plan.chunk_frames // 2 + 2))
        outputs.append(chunker.push(samples[:, start : start + size]))
        start += size
    outputs.append(chunker.flush())
    return np.concatenate(outputs, axis=1)


def _tones(sample_rate: int, frames: int, channels: int = 2) -> np.ndarray:
    """Band-limited stereo tones that fade in and out (no clicks for the resamplers to ring on)."""
    t = np.arange(frames) / sample_rate
    fade = np.sin(np.pi * np.arange(frames) / max(frames - 1, 1)) ** 2
    tones = [0.5 * np.sin(2 * np.pi * 440 * t), 0.3 * np.sin(2 * np.pi * 1234.5 * t + 1.0), 0.2 * np.sin(2 * np.pi * 97 * t)]
    return (np.stack(tones[:channels]) * fade).astype(np.float32)


@pytest.fixture(scope="module")
def tiny_model() -> TwoStageUNet:
    torch.manual_seed(0)
    return TwoStageUNet(SIZES["tiny"]).eval()


@pytest.fixture
def tiny_checkpoint(tmp_path, tiny_model):
    path = tmp_path / "models" / "tiny.safetensors"
    save_checkpoint(path, tiny_model, lineage={"source": "test: random weights, seed 0"})
    return path


# --- chunking -----------------------------------------------------------------------------------------


def test_crossfade_weights_sum_to_one():
    rise = crossfade_ramp(1000)
    assert np.all(np.diff(rise) > 0) and 0 < rise[0] < 1e-5 and 1 - 1e-5 < rise[-1] < 1
    assert np.array_equal(rise + (1.0 - rise), np.ones(1000))
    ones = np.ones((1, 10_000), np.float32)
    out = _stream(lambda chunk: chunk, ones, ChunkPlan(1000, 400, 0))
    assert np.max(np.abs(out - 1.0)) < 1e-6  # every seam, the first chunk's start and the last one's end


@pytest.mark.parametrize("frames", [1, 2, 299, 1000, 1001, 1599, 1600, 1601, 4321, 12_345])
def test_chunked_equals_whole_for_identity_and_linear_process(frames):
    rng = np.random.default_rng(frames)
    samples = rng.normal(size=(2, frames)).astype(np.float32)
    plan = ChunkPlan(chunk_frames=1000, overlap_frames=400, context_frames=64)
    kernel = torch.tensor(rng.normal(size=63), dtype=torch.float32)[None, None]  # support 63 < 2·64 + 1

    def fir(chunk):
        return torch.nn.functional.conv1d(chunk[:, None], kernel, padding=31)[:, 0]

    identity = _stream(lambda chunk: chunk, samples, plan)
    assert identity.shape == samples.shape and np.max(np.abs(identity - samples)) < 1e-6
    chunked, whole = _stream(fir, samples, plan, seed=1), process_whole(fir, samples, plan)
    assert chunked.shape == whole.shape == samples.shape
    assert np.max(np.abs(chunked - whole)) < 1e-5 * max(1.0, float(np.abs(whole).max()))


def test_chunk_seams_of_a_real_unet_match_the_whole_signal(tiny_model):
    """Chunked vs whole-signal output of a tiny U-Net: within SEAM_TOLERANCE only on the model's grid."""
    rng = np.random.default_rng(0)
    samples = _tones(44_100, 44_100, channels=1) + 0.05 * rng.normal(size=(1, 44_100)).astype(np.float32)
    process = model_process(tiny_model, torch.device("cpu"))
    grid = model_grid_frames(tiny_model)
    aligned = ChunkPlan.from_seconds(0.65, overlap_seconds=0.1, context_seconds=0.5, grid_frames=grid)
    assert aligned.hop_frames % grid == 0 and 1 < 44_100 / aligned.hop_frames < 2  # two chunks, one seam
    whole = process_whole(process, samples, aligned)
    chunked = _stream(process, samples, aligned)
    level = float(np.sqrt(np.mean(whole**2)))
    assert level > 0
    seam_error = float(np.max(np.abs(chunked - whole))) / level
    assert seam_error < SEAM_TOLERANCE, seam_error
    # The same chunk sizes off the grid: the network's stride-2 levels see another phase; far off.
    off_grid = ChunkPlan(aligned.chunk_frames + 1000, aligned.overlap_frames, aligned.context_frames)
    off_error = float(np.max(np.abs(_stream(process, samples, off_grid) - whole))) / level
    assert off_error > 10 * SEAM_TOLERANCE, off_error


def test_strength_from_reduction_db():
    assert strength_from_reduction_db(0) == 0
    assert strength_from_reduction_db(20) == pytest.approx(0.9)
    assert strength_from_reduction_db(float("inf")) == 1.0


# --- one file, streamed ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sample_rate", [44_100, 48_000, 96_000])
@pytest.mark.parametrize("frames", [1, 777, 2 * 44_100 + 4_097])
def test_stream_keeps_exact_length_rate_and_alignment(tmp_path, sample_rate, frames):
    """Two resamplings later, the output has exactly the input's frames, and each sample is in place."""
    samples = _tones(sample_rate, frames)
    source, target = tmp_path / "in.wav", tmp_path / "out.wav"
    write_audio(source, samples, sample_rate, subtype="FLOAT")
    plan = ChunkPlan.from_seconds(0.5, overlap_seconds=0.05, context_seconds=0.05)
    calls = []
    result = denoise_stream(lambda chunk: 0.25 * chunk, source, target, plan=plan, block_seconds=0.3,
                            progress=lambda stage, done, total=None, **fields: calls.append((done, total, fields)))
    back, rate = read_audio(target)
    assert (rate, back.shape) == (sample_rate, samples.shape)
    assert result.frames == frames and audio_info(target).subtype == "FLOAT"
    if frames > 1000:  # removing 3/4 of a band-limited signal leaves a quarter of it, sample for sample
        assert np.max(np.abs(back - 0.25 * samples)) < 2e-3
    assert calls[-1][0] == calls[-1][1] and "rtf" in calls[-1][2]


def test_strength_zero_returns_the_input_bit_for_bit(tmp_path):
    samples = np.random.default_rng(3).uniform(-0.9, 0.9, size=(3, 48_001)).astype(np.float32)
    source, target = tmp_path / "in.wav", tmp_path / "out.wav"
    write_audio(source, samples, 48_000, subtype="PCM_24")
    denoise_stream(lambda chunk: 0.0 * chunk, source, target, strength=0.0,
                   plan=ChunkPlan.from_seconds(0.3, 0.05, 0.05))
    original, _ = sf.read(source, dtype="int32")
    restored, _ = sf.read(target, dtype="int32")
    assert np.array_equal(original, restored)


# --- the command ------------------------------------------------------------------------------------------


def test_denoise_keeps_rate_channels_length_subtype_and_writes_provenance(tmp_path, cli, tiny_checkpoint):
    frames = 24_000 + 4_013
    samples = _tones(48_000, frames) + 0.02 * np.random.default_rng(1).normal(size=(2, frames)).astype(np.float32)
    source = tmp_path / "transfers" / "reel 7.wav"
    write_audio(source, samples, 48_000, subtype="PCM_24")
    before = sha256_file(source)
    out_dir = tmp_path / "restored"
    result = cli("denoise", "--model", tiny_checkpoint, source, "--out", out_dir, "--reduction-db", "20",
                 "--chunk-seconds", "1", "--json")
    assert result.code == 0, result.stderr
    output = out_dir / "reel 7.denoised.wav"
    info = audio_info(output)
    assert (info.sample_rate, info.channels, info.frames, info.subtype, info.format) == (48_000, 2, frames, "PCM_24", "WAV")
    assert sha256_file(source) == before  # the source is never touched
    restored, _ = read_audio(output)
    assert not np.allclose(restored, samples, atol=1e-4)  # the model did change it

    record = json.loads((out_dir / "reel 7.denoised.wav.json").read_text())
    assert result.json() == [record]
    assert record["input"]["sha256"] == before and record["input"]["path"] == str(source.resolve())
    assert record["output"]["sha256"] == sha256_file(output) and record["output"]["frames"] == frames
    assert record["model"]["checkpoint_sha256"] == sha256_file(tiny_checkpoint)
    assert record["model"]["name"] == "tiny" and record["model"]["config"]["size"] == "tiny"
    assert record["settings"]["strength"] == pytest.approx(0.9)
    assert record["settings"]["reduction_db"] == pytest.approx(20.0)
    chunking = record["settings"]["chunking"]
    assert chunking["hop_frames"] % model_grid_frames(TwoStageUNet(SIZES["tiny"])) == 0
    assert chunking["overlap_frames"] > 0 and chunking["context_frames"] > 0
    assert record["software"]["workbench"] and record["software"]["torch"] == torch.__version__
    assert record["compute"]["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert record["real_time_factor"] > 0 and record["started_at"] <= record["finished_at"]
    assert sorted(p.name for p in out_dir.iterdir()) == ["reel 7.denoised.wav", "reel 7.denoised.wav.json"]

    again = cli("denoise", "--model", tiny_checkpoint, source, "--out", out_dir)
    assert again.code == 2 and "already exists" in again.stderr


def test_bf16_precision_stays_close_to_float32_and_is_recorded(tmp_path, cli, tiny_checkpoint):
    source = tmp_path / "take.wav"
    frames = 44_100 + 777
    samples = _tones(44_100, frames, channels=1) + 0.05 * np.random.default_rng(3).normal(size=(1, frames)).astype(np.float32)
    write_audio(source, samples, 44_100, subtype="FLOAT")
    outputs, records = {}, {}
    for precision in ("float32", "bf16"):
        result = cli("denoise", "--model", tiny_checkpoint, source, "-o", tmp_path / f"{precision}.wav",
                     "--accelerator", "cpu", "--precision", precision, "--json")
        assert result.code == 0, result.stderr
        outputs[precision], _ = read_audio(tmp_path / f"{precision}.wav")
        [records[precision]] = result.json()
    assert records["float32"]["compute"]["autocast"] is None and records["bf16"]["compute"]["autocast"] == "bfloat16"
    difference = outputs["bf16"] - outputs["float32"]
    relative = float(np.sqrt(np.mean(difference**2) / np.mean(outputs["float32"] ** 2)))
    assert 0 < relative < 2e-2, relative  # bf16 arithmetic did run, and stays within rounding of float32's

    line = _only_line(cli("denoise", "--model", tiny_checkpoint, source, "-o", tmp_path / "fp16.wav",
                          "--precision", "fp16"))
    assert "--precision 'fp16'" in line and "auto, float32, bf16" in line
    assert not (tmp_path / "fp16.wav").exists()


def test_format_and_subtype_can_change(tmp_path, cli, tiny_checkpoint):
    source = tmp_path / "take.wav"
    write_audio(source, _tones(44_100, 10_001, channels=1), 44_100, subtype="FLOAT")
    refused = cli("denoise", "--model", tiny_checkpoint, source, "--out", tmp_path, "--format", "flac")
    assert refused.code == 2 and "FLAC cannot hold FLOAT" in refused.stderr
    done = cli("denoise", "--model", tiny_checkpoint, source, "--out", tmp_path, "--format", "flac",
               "--subtype", "PCM_16", "--strength", "0.5")
    assert done.code == 0, done.stderr
    info = audio_info(tmp_path / "take.denoised.flac")
    assert (info.format, info.subtype, info.frames, info.channels) == ("FLAC", "PCM_16", 10_001, 1)


def _only_line(result) -> str:
    """The one error line (MLflow's own INFO lines when it first creates a store are not ours)."""
    lines = [line for line in result.stderr.strip().splitlines()
             if line.strip() and not re.match(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d INFO ", line)]
    assert result.code == 2 and len(lines) == 1, result.stderr
    return lines[0]


def _files_under(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_refusals_are_one_line_and_write_nothing(tmp_path, cli, tiny_checkpoint, workspace):
    good = tmp_path / "in" / "good.wav"
    write_audio(good, _tones(44_100, 20_000), 44_100, subtype="PCM_16")
    corrupt = tmp_path / "in" / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt " + bytes(range(200)))
    wrong_shapes = tmp_path / "models" / "wrong.safetensors"
    save_checkpoint(wrong_shapes, TwoStageUNet(SIZES["tiny"]))
    sidecar = wrong_shapes.with_suffix(".json")
    config = json.loads(sidecar.read_text())
    config["config"]["channels"] = [4, 8, 8, 32]  # the weights are a tiny model's; this config is not
    sidecar.write_text(json.dumps(config))
    out = tmp_path / "out"
    before = _files_under(tmp_path / "in") + _files_under(tmp_path / "models")

    line = _only_line(cli("denoise", "--model", tiny_checkpoint, good, corrupt, "--out", out))
    assert str(corrupt) in line and "not readable audio" in line
    line = _only_line(cli("denoise", "--model", wrong_shapes, good, "--out", out))
    assert str(wrong_shapes) in line and "mis-shaped" in line
    line = _only_line(cli("denoise", "--model", "models:/tape-denoiser-nobody@champion", good, "--out", out))
    assert "models:/tape-denoiser-nobody@champion" in line
    line = _only_line(cli("denoise", "--model", tmp_path / "nothing.safetensors", good, "--out", out))
    assert "nothing.safetensors" in line
    line = _only_line(cli("denoise", "--model", tiny_checkpoint, good, "--output", good))
    assert str(good) in line and "source recording" in line
    # An input named like another input's default output is an input too.
    shadow = tmp_path / "in" / "good.denoised.wav"
    write_audio(shadow, _tones(44_100, 1_000), 44_100)
    before.append("good.denoised.wav")
    line = _only_line(cli("denoise", "--model", tiny_checkpoint, good, shadow, "--out", tmp_path / "in"))
    assert "good.denoised.wav" in line and "source recording" in line
    line = _only_line(cli("denoise", "--device", "revox-a77", good, "--out", out))
    assert "revox-a77" in line and "champion" in line
    line = _only_line(cli("denoise", "--model", tiny_checkpoint, good, "--strength", "0.5", "--reduction-db", "6"))
    assert "not both" in line
    assert _only_line(cli("denoise", good, "--out", out)).startswith("error: give a model")

    assert not out.exists()
    assert sorted(_files_under(tmp_path / "in") + _files_under(tmp_path / "models")) == sorted(before)


def test_denoise_files_look_models_up_in_the_workspace_given_not_the_current_one(tmp_path, tiny_checkpoint, workspace,
                                                                                   monkeypatch):
    """The demo restores its transfer in its own workspace whatever the current folder: from a folder outside
    any workspace it had failed ("not inside a workspace"), and inside another one it cached the model there."""
    from workbench import model_registry
    from workbench.denoise import denoise_files

    version = model_registry.register_checkpoint(tiny_checkpoint, "tape-denoiser-revox-a77", workspace=workspace)
    model_registry.set_alias("tape-denoiser-revox-a77", "champion", version, workspace=workspace)
    source = tmp_path / "side-a.wav"
    write_audio(source, _tones(44_100, 11_025), 44_100)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.delenv("WORKBENCH_HOME")
    monkeypatch.chdir(elsewhere)
    [by_device] = denoise_files([source], device_id="revox-a77", out_dir=tmp_path / "a", workspace=workspace)
    [by_uri] = denoise_files([source], model_ref="models:/tape-denoiser-revox-a77@champion", out_dir=tmp_path / "b",
                             workspace=workspace)
    for record in (by_device, by_uri):
        assert record["model"]["uri"] == f"models:/tape-denoiser-revox-a77/{version}"
        assert Path(record["model"]["checkpoint"]).is_relative_to(workspace.root)
    assert list(elsewhere.iterdir()) == []


def test_device_champion_from_the_registry(tmp_path, cli, tiny_checkpoint, workspace):
    """`--device ID` restores with the champion registered in the workspace's MLflow store."""
    from workbench import model_registry

    version = model_registry.register_checkpoint(tiny_checkpoint, "tape-denoiser-revox-a77", workspace=workspace)
    model_registry.set_alias("tape-denoiser-revox-a77", "champion", version, workspace=workspace)
    source = tmp_path / "side-a.flac"
    write_audio(source, _tones(22_050, 11_025), 22_050, subtype="PCM_16")
    result = cli("denoise", "--device", "revox-a77", source, "--out", tmp_path / "out", "--json")
    assert result.code == 0, result.stderr
    [record] = result.json()
    model = record["model"]
    assert (model["name"], model["version"], model["uri"]) == ("tape-denoiser-revox-a77", version,
                                                               f"models:/tape-denoiser-revox-a77/{version}")
    assert model["requested_uri"] == "models:/tape-denoiser-revox-a77@champion" and model["aliases"] == ["champion"]
    assert model["run_id"] and model["checkpoint_sha256"] == sha256_file(tiny_checkpoint)
    assert audio_info(tmp_path / "out" / "side-a.denoised.flac").frames == 11_025
    line = _only_line(cli("denoise", "--model", "models:/tape-denoiser-revox-a77/9", source, "--out", tmp_path / "x"))
    assert "models:/tape-denoiser-revox-a77/9" in line and not (tmp_path / "x").exists()


def test_folders_expand_to_their_audio_and_keep_their_layout(tmp_path):
    from workbench.denoise import plan_jobs

    transfers = tmp_path / "transfers"
    for name in ("box-1/reel-01.wav", "box-1/reel-02.flac", "box-2/reel-01.wav", "loose.wav",
                 "denoised/loose.denoised.wav"):  # the last is an earlier run's output: not an input
        write_audio(transfers / name, _tones(8_000, 800), 8_000, subtype="PCM_16")
    (transfers / "box-1" / "notes.txt").write_text("not audio")
    jobs = plan_jobs([transfers], out_dir=transfers / "denoised", overwrite=True)
    assert sorted(str(job.output.relative_to(transfers / "denoised")) for job in jobs) == [
        "box-1/reel-01.denoised.wav", "box-1/reel-02.denoised.flac", "box-2/reel-01.denoised.wav",
        "loose.denoised.wav"]
    with pytest.raises(WorkbenchError, match="already exists"):  # the earlier run's output
        plan_jobs([transfers / "loose.wav"], out_dir=transfers / "denoised")
    with pytest.raises(WorkbenchError, match="would be written there"):
        plan_jobs([transfers / "box-1" / "reel-01.wav", transfers / "box-2" / "reel-01.wav"], out_dir=tmp_path / "x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WorkbenchError, match="holds no audio"):
        plan_jobs([tmp_path / "empty"], out_dir=tmp_path / "x")


def test_denoise_samples_is_what_the_command_runs_at_44k(tmp_path, tiny_model):
    from workbench.model.overlap_add import denoise_samples

    samples = _tones(44_100, 20_000, channels=1)[0]
    source, target = tmp_path / "in.wav", tmp_path / "out.wav"
    write_audio(source, samples, 44_100, subtype="FLOAT")
    denoise_stream(model_process(tiny_model, torch.device("cpu")), source, target,
                   plan=ChunkPlan.from_seconds(grid_frames=model_grid_frames(tiny_model)))
    in_memory = denoise_samples(tiny_model, samples)
    assert in_memory.shape == samples.shape
    assert np.max(np.abs(in_memory - read_audio(target)[0][0])) < 1e-6


def test_audio_that_breaks_mid_stream_leaves_nothing(tmp_path, cli, tiny_checkpoint):
    """A FLAC cut short passes the header check and fails while decoding: one line, no partial output."""
    whole = tmp_path / "whole.flac"
    write_audio(whole, np.random.default_rng(0).uniform(-0.5, 0.5, (2, 88_200)).astype(np.float32), 44_100,
                subtype="PCM_16")
    cut = tmp_path / "in" / "cut.flac"
    cut.parent.mkdir()
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    line = _only_line(cli("denoise", "--model", tiny_checkpoint, cut, "--out", tmp_path / "out"))
    assert str(cut) in line and "unreadable" in line
    assert not (tmp_path / "out").exists()  # not even the folder it would have made
    # The library, given a process, stops the same way without leaving its temporary file behind.
    with pytest.raises(WorkbenchError, match="unreadable"):
        denoise_stream(lambda chunk: chunk, cut, tmp_path / "out2" / "cut.flac")
    assert list((tmp_path / "out2").iterdir()) == []


def test_denoising_with_a_checkpoint_file_loads_neither_mlflow_nor_sympy(tmp_path, tiny_checkpoint):
    """Start-up is part of every `denoise --model FILE`: MLflow (1.4 s to import) is for registered models
    only, and building the network must not wake torch's symbolic-shape machinery (sympy)."""
    import subprocess
    import sys

    source = tmp_path / "in.wav"
    write_audio(source, _tones(44_100, 44_100, channels=1), 44_100, "PCM_16")
    script = ("import json, sys\nfrom pathlib import Path\nfrom workbench.denoise import denoise_files\n"
              f"denoise_files([Path({str(source)!r})], model_ref=Path({str(tiny_checkpoint)!r}), "
              f"out_dir=Path({str(tmp_path / 'out')!r}), accelerator='cpu')\n"
              "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & {'mlflow', 'sympy'})))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
    assert (tmp_path / "out" / "in.denoised.wav").is_file()
